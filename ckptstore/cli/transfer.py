"""``ckpt import`` and ``ckpt export``: checkpoints in from disk and out to it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from ..errors import RefExists
from ..formats.hf import run_checkpoints
from ..gc import DEFAULT_GRACE_PERIOD_S
from ..inventory import unreferenced_since
from ..layout import is_chunk_key
from ..store import Store
from .context import Context, pass_ctx
from .options import ByteSize, duration_text
from .output import commit_json, echo_json, human_bytes, new_bytes_text, printable, progress_bars, short_id


def _prefixed(progress: Callable[[str, int, int], None], name: str) -> Callable[[str, int, int], None]:
    """``progress`` with each phase prefixed ``name`` (a bar per PATH)."""
    return lambda phase, done, total: progress(f"{name} {phase}", done, total)


@contextmanager
def _reporting_interrupt(store: Store) -> Iterator[None]:
    """Around a command that writes commits: on Ctrl-C, say what it stored that no commit
    references (left for ``gc`` after the grace period) and exit with status 130."""
    since_s = store.objects.clock_s() - 1.0  # S3 stamps to the second
    try:
        yield
    except KeyboardInterrupt:
        left = unreferenced_since(store, since_s=since_s)
        chunks = sum(is_chunk_key(info.key) for info in left)
        manifests = len(left) - chunks
        what = f"{chunks} chunks" + (f" and {manifests} manifests" if manifests else "")
        click.echo(
            f"interrupted: {what} ({human_bytes(sum(info.size_bytes for info in left))}) written and not referenced by any commit; "
            f"`ckpt gc` reclaims them after the grace period ({duration_text(DEFAULT_GRACE_PERIOD_S)})"
            if left else "interrupted: nothing it wrote is left unreferenced",
            err=True,
        )  # fmt: skip
        sys.exit(130)


@click.command(name="export")
@click.argument("rev")
@click.argument("path")
@click.option("--component", help="Export the tensors under this key (default: model, if the commit has it).")
@click.option("--include", multiple=True, metavar="PATTERN", help="Only these key paths (glob or prefix). Repeatable.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Not these key paths. Repeatable.")
@click.option("--max-shard-size", "max_shard_size_bytes", type=ByteSize(), default="5GB", show_default=True, help="Largest shard.")
@click.option(
    "--format",
    "format_",
    type=click.Choice(["hf", "safetensors", "pt"]),
    help="hf: a safetensors directory; safetensors: one file; pt: the whole state as one torch.save file (default: by PATH's suffix).",
)
@click.option("--force", is_flag=True, help="Replace a file at PATH, or export into a directory that has files in it.")
@pass_ctx
def export_(
    ctx: Context,
    rev: str,
    path: str,
    component: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    max_shard_size_bytes: int,
    format_: str | None,
    force: bool,
) -> None:
    """Write REV as a Hugging Face style safetensors directory PATH (or one PATH.pt file).
    Nothing at PATH is replaced without --force.

    \b
    Examples:
      ckpt export best ./release
      ckpt export main model.pt
      ckpt export main state.pt --format pt --exclude optimizer
    """
    with progress_bars(True) as progress:
        files = ctx.store().export(
            rev, path, component=component, include=list(include) or None, exclude=list(exclude) or None,
            max_shard_size_bytes=max_shard_size_bytes, format=format_, force=force, progress=progress,
        )  # fmt: skip
    for name in files:
        click.echo(os.path.join(path, name) if not name.startswith(path) else name)


@click.command(name="import")
@click.argument("paths", metavar="PATH...", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--branch", help="Branch to commit on (default: the store's default branch).")
@click.option("-m", "--message", help="Commit message (default: import NAME; checkpoint-N for a run's checkpoints).")
@click.option("--tag", "tags", multiple=True, help="Tag the last commit. Repeatable.")
@click.option("--append", is_flag=True, help="Let a Trainer run go onto a branch that already has commits.")
@click.option("--json", "as_json", is_flag=True, help="Print the commit as JSON (a list when there are several).")
@pass_ctx
def import_(ctx: Context, paths: tuple[str, ...], branch: str | None, message: str | None, tags: tuple[str, ...], append: bool, as_json: bool) -> None:
    """Commit checkpoints from disk, each PATH in order: a .safetensors file, a Hugging Face
    model directory (safetensors or pytorch_model.bin, with its config and tokenizer files),
    a Trainer checkpoint-N folder, a .pt file (loaded with weights_only=True), or a Trainer
    output directory (one holding checkpoint-N folders: one commit per checkpoint, in step
    order, with the metrics and best of its trainer_state.json).

    \b
    Examples:
      ckpt import ./gpt2-finetuned --branch main --tag imported
      ckpt import ./output --branch run-1
    """
    store = ctx.store(create=True)
    runs = [bool(run_checkpoints(path)) for path in paths]
    target = branch or store.config.default_branch
    if not append and (True in runs[1:] or (runs[0] and target in store.branches())):
        raise RefExists(
            f"branch {target!r} already has commits, or gets them from an earlier PATH, and a Trainer run starts its branch; "
            "import the run onto a new branch (--branch NAME), or pass --append to commit it on top"
        )  # fmt: skip
    commits = []
    with _reporting_interrupt(store), progress_bars(not as_json) as progress:
        for i, (path, is_run) in enumerate(zip(paths, runs)):
            options: dict[str, Any] = {
                "branch": branch,
                "message": message,
                "tags": tags if i == len(paths) - 1 else (),
                "progress": progress,
            }
            if progress is not None and len(paths) > 1:  # a bar per PATH
                options["progress"] = _prefixed(progress, os.path.basename(os.path.normpath(path)))
            made = store.import_run(path, append=True, **options) if is_run else [store.import_checkpoint(path, **options)]
            commits += made
            if not as_json:
                for commit in made:
                    named = f" {printable(commit.message)}" if is_run else ""
                    click.echo(
                        f"{short_id(commit.id)}{named} on {printable(commit.branch)}: {human_bytes(commit.stats.logical_bytes)}, {new_bytes_text(commit.stats.new_bytes, commit.stats.new_metadata_bytes)} newly stored"
                    )
    if as_json:
        echo_json(commit_json(commits[0]) if len(commits) == 1 and not any(runs) else [commit_json(c) for c in commits])
