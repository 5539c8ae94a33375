"""Run ``ckpt`` in this process as the ``ckpt`` script runs it (``ckptstore.cli.main``),
capturing its exit status and output: for CLI tests that do not need a child process."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

from ckptstore.cli import main


@dataclass
class Run:
    argv: list[str]
    rc: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"ckpt {' '.join(map(repr, self.argv))} -> {self.rc}\n--- stdout\n{self.out}--- stderr\n{self.err}"


def ckpt(url: str | Path, *args: str) -> Run:
    """One ``ckpt --store URL ARGS...`` command."""
    argv = ["--store", str(url), *args]
    out, err, rc = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return Run(argv, rc, out.getvalue(), err.getvalue())


def ok(url: str | Path, *args: str) -> Run:
    """:func:`ckpt`, asserted to exit 0 with nothing on stderr."""
    run = ckpt(url, *args)
    assert run.rc == 0 and run.err == "", str(run)
    return run
