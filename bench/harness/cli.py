"""Conventions every benchmark script follows: its parser (the docstring's first paragraph
as the description), the ckptstore options and how they pass to a child, the child-only
options, the working directory, the log line. No torch."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from .files import load1


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of ``doc`` (the script's docstring)."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)


def add_store_options(
    p: argparse.ArgumentParser,
    *,
    compression: bool = False,
    threads_help: str = "ckptstore pipeline threads (default: the store's default)",
) -> None:
    """``--threads``, ``--chunk-size-mb``, ``--compression-level`` (and ``--compression``):
    each unset keeps the store's default (:func:`harness.ops.store_options`)."""
    p.add_argument("--threads", type=int, help=threads_help)
    p.add_argument("--chunk-size-mb", type=float, help="ckptstore chunk size in MiB (default: the store's)")
    p.add_argument("--compression-level", help="zstd level for ckptstore, or 'none' (default: the store's)")
    if compression:
        p.add_argument("--compression", choices=["auto", "always", "never"], help="ckptstore's compression mode (default: the store's default, auto)")


def check_store_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.compression_level not in (None, "none"):
        try:
            int(args.compression_level)
        except ValueError:
            p.error(f"--compression-level: an integer or 'none', not {args.compression_level!r}")


def store_argv(args: argparse.Namespace, threads: int | None = None) -> list[str]:
    """The store options that were given, as a child's command-line flags."""
    out: list[str] = []
    t = threads if threads is not None else args.threads
    for flag, value in (
        ("--threads", t),
        ("--chunk-size-mb", args.chunk_size_mb),
        ("--compression-level", args.compression_level),
        ("--compression", getattr(args, "compression", None)),
    ):
        if value is not None:
            out += [flag, str(value)]
    return out


#: Options only a parent passes to its child (hidden from ``--help``).
CHILD_ONLY = ("--op", "--workdir", "--target", "--result", "--verify", "--profile")


def add_child_options(p: argparse.ArgumentParser, *more: str) -> None:
    """``--op``, ``--workdir``, ``--target``, ``--result``, ``--verify``, ``--profile`` and
    the string options ``more``, hidden from ``--help``."""
    for flag in (*CHILD_ONLY, *more):
        p.add_argument(flag, action="store_true" if flag == "--verify" else "store", help=argparse.SUPPRESS)


def public_args(args: argparse.Namespace) -> dict:
    """The parent's options, for a JSON report (child-only ones left out)."""
    hidden = {f.removeprefix("--").replace("-", "_") for f in CHILD_ONLY}
    return {k: v for k, v in vars(args).items() if k not in hidden or k == "workdir"}


@contextlib.contextmanager
def workdir(path: str | None, *, prefix: str, keep: bool = False) -> Iterator[str]:
    """``path`` (made absolute, created), or a fresh ``/tmp/PREFIX*`` removed at the end
    unless ``keep``."""
    own = path is None
    root = os.path.abspath(path) if path else tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.makedirs(root, exist_ok=True)
    try:
        yield root
    finally:
        if own and not keep:
            shutil.rmtree(root, ignore_errors=True)


def log(msg: str, *, load: bool = False) -> None:
    """``[HH:MM:SS] msg`` (with the 1-minute load average if ``load``) on stderr."""
    stamp = time.strftime("%H:%M:%S") + (f" load {load1():.2f}" if load else "")
    print(f"[{stamp}] {msg}", file=sys.stderr, flush=True)


def command_line(script: str, argv: list[str] | None) -> str:
    """``python bench/SCRIPT ARGS``: how this run was started, for the report."""
    return f"python bench/{script} " + " ".join(sys.argv[1:] if argv is None else argv)


def write_json(path: str | None, report: Any) -> None:
    """Write ``report`` to ``path`` (if given); what JSON cannot hold is written as a string."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
