"""``ckpt``: the command line (also ``python -m ckptstore``).

Every command takes ``--store URL`` (or ``CKPTSTORE_URL``; default ``./ckpts``). Errors are
one line on stderr and exit status 1; usage errors, and malformed or reserved ref names
(``InvalidRefName``), exit 2; ``--debug`` shows the traceback.
Progress bars appear on a terminal only. Storage options (credentials) come from
``CKPTSTORE_STORAGE_OPTIONS`` (JSON) and are never printed.

The package: this module holds the ``cli`` group, :func:`main` (the ``ckpt`` script and
``python -m ckptstore``) and how errors become exit statuses; ``context`` holds the store a
command runs against (``Context``, ``pass_ctx``), ``options`` the option types, ``output`` the
terminal and JSON formatting, and the commands live in one module per noun: ``storage``,
``history``, ``refs``, ``transfer``, and ``ui`` (``plot`` and ``ui``, drawn by :mod:`ckptstore.ui`).

Registering a command module: import it beside the others (``from . import history, ...``)
and give it one line in :data:`COMMANDS` at the foot of this module.
Every command module is imported with this one (``ckpt --help`` lists them all), so it
imports torch, numpy or plotting libraries inside the commands that need them, never at its
top (tests/test_cli_imports.py).
"""

from __future__ import annotations

import logging
import sys

import click

from .. import __version__
from ..errors import CkptStoreError, InvalidRefName
from . import history, refs, storage, transfer, ui
from .context import Context
from .output import printable


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--store",
    "url",
    envvar="CKPTSTORE_URL",
    default="ckpts",
    show_default=True,
    help="Store URL: a directory, s3://BUCKET/PREFIX or memory://NAME (env CKPTSTORE_URL).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.version_option(__version__, prog_name="ckpt")
@click.pass_context
def cli(ctx: click.Context, url: str, debug: bool) -> None:
    """Content-addressed checkpoint storage: history, branches, tags, retention and checks."""
    if debug:  # ckptstore's own logging only: botocore's debug output carries credentials
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("ckptstore").setLevel(logging.DEBUG)
    ctx.obj = Context(url, debug)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning ckptstore errors into one line and exit status 1."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="ckpt", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, CkptStoreError):
            message = exc.cli_message()  # options as ckpt spells them: --force, not force=True
        elif isinstance(exc, (OSError, ValueError)):
            message = str(exc)
        else:  # not one of ours: say what it is, in one line
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        click.echo(f"ckpt: error: {printable(message)}", err=True)
        sys.exit(2 if isinstance(exc, InvalidRefName) else 1)  # a malformed or reserved name is a usage error


#: Every command of ``ckpt``, one line per module that defines them.
COMMANDS: tuple[click.Command, ...] = (
    storage.init, storage.du, storage.gc, storage.repack, storage.fsck,
    history.log, history.show, history.diff,
    refs.branch, refs.tag, refs.rev_parse,
    transfer.import_, transfer.export_,
    ui.plot, ui.ui,
)  # fmt: skip
for _command in COMMANDS:
    cli.add_command(_command)
