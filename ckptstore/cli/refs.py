"""``ckpt branch``, ``ckpt tag`` and ``ckpt rev-parse``: naming commits."""

from __future__ import annotations

from collections.abc import Callable

import click

from ..commit import Commit
from ..refs import LATEST
from ..store import Store
from ..usage import read_racing_collector, reading_commit
from .context import Context, pass_ctx
from .output import commit_json, echo_json, printable, short_id, step_of


@click.command()
@click.argument("name", required=False)
@click.argument("start", required=False)
@click.option(
    "-d",
    "--delete",
    "delete",
    is_flag=True,
    help="Delete branch NAME (refused for the default branch, or the only ref to some commits, unless forced).",
)
@click.option("-D", "force_delete", is_flag=True, help="Delete branch NAME even so (-d --force).")
@click.option("-m", "--move", "rename", is_flag=True, help="Rename branch NAME to START.")
@click.option(
    "-f",
    "--force",
    is_flag=True,
    help="Move NAME to START if it exists; with -d, delete even the default branch or the only ref to commits.",
)
@click.option("--json", "as_json", is_flag=True, help="List as JSON.")
@pass_ctx
def branch(ctx: Context, name: str | None, start: str | None, delete: bool, force_delete: bool, rename: bool, force: bool, as_json: bool) -> None:
    """List branches, or create NAME at START (default: latest), delete one (-d NAME) or
    rename one (-m OLD NEW).

    \b
    Examples:
      ckpt branch
      ckpt branch lr-sweep best
      ckpt branch -m lr-sweep sweep/lr
      ckpt branch -d sweep/lr
      ckpt branch -D scratch
    """
    store = ctx.store()
    if name is None:
        if delete or force_delete or rename or force or start:
            raise click.UsageError("name a branch")
        _list_refs(store.branches, store, as_json, current=store.config.default_branch)
        return
    if delete or force_delete:
        old = store.delete_branch(name, force=force or force_delete)
        click.echo(f"Deleted branch {printable(name)} (was {short_id(old)}).")
    elif rename:
        if start is None:
            raise click.UsageError("ckpt branch -m OLD NEW: name the new branch")
        commit = store.rename_branch(name, start)
        click.echo(f"renamed branch {name} to {start} ({short_id(commit.id)})")
    else:
        commit = store.branch(name, at=start or LATEST, force=force)
        click.echo(f"branch {name} at {short_id(commit.id)}")


@click.command()
@click.argument("name", required=False)
@click.argument("at", required=False)
@click.option("-d", "--delete", "delete", is_flag=True, help="Delete tag NAME.")
@click.option("-f", "--force", is_flag=True, help="Move NAME to AT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="List as JSON.")
@pass_ctx
def tag(ctx: Context, name: str | None, at: str | None, delete: bool, force: bool, as_json: bool) -> None:
    """List tags, or create NAME at AT (default: latest), move (--force) or delete one.

    \b
    Examples:
      ckpt tag
      ckpt tag release best
      ckpt tag release main --force
      ckpt tag -d release
    """
    store = ctx.store()
    if name is None:
        if delete or force or at:
            raise click.UsageError("name a tag")
        _list_refs(store.tags, store, as_json)
        return
    if delete:
        old = store.delete_tag(name)
        click.echo(f"Deleted tag {printable(name)} (was {short_id(old)}).")
    else:
        commit = store.tag(name, at=at or LATEST, force=force)
        click.echo(f"tag {name} at {short_id(commit.id)}")


def _list_refs(list_refs: Callable[[], dict[str, str]], store: Store, as_json: bool, current: str | None = None) -> None:
    def read() -> dict[str, Commit]:
        commits = {}
        for name, cid in list_refs().items():
            with reading_commit(store, cid):  # a ref moved on, and a collector took its old target?
                commits[name] = store.get_commit(cid)
        return commits

    commits = read_racing_collector(read)
    if as_json:
        echo_json({name: commit_json(commit) for name, commit in commits.items()})
        return
    width = max((len(printable(n)) for n in commits), default=0)
    for name, commit in commits.items():
        mark = "*" if name == current else " "
        step = f" step {printable(step_of(commit))}" if step_of(commit) is not None else ""
        click.echo(f"{mark} {click.style(f'{printable(name):<{width}}', fg='green')} {short_id(commit.id)}{step} {printable(commit.message)}".rstrip())


@click.command(name="rev-parse")
@click.argument("rev")
@pass_ctx
def rev_parse(ctx: Context, rev: str) -> None:
    """Print the full commit id that REV names.

    \b
    Example:
      ckpt rev-parse main~2
    """
    click.echo(ctx.store().resolve(rev))
