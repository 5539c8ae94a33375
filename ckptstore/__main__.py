"""``python -m ckptstore``: the ``ckpt`` command line."""

from .cli import main

main()
