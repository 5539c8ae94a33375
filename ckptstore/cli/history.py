"""``ckpt log`` (with its ``--graph`` drawing), ``ckpt show`` and ``ckpt diff``: reading history."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..commit import Commit
from ..diff import Diff
from ..history import newest_first
from ..layout import commit_key
from ..manifest import Manifest
from ..records import demoted_commit_ids, dropped_components
from ..refs import LATEST
from ..store import Store
from ..usage import CommitUsage, read_racing_collector, reading_commit
from .context import Context, pass_ctx
from .output import (
    commit_json,
    echo_json,
    gc_marks,
    gc_marks_json,
    human_bytes,
    json_text,
    metrics_text,
    new_bytes_text,
    oneline_text,
    printable,
    ref_decorations,
    step_of,
)


@click.command()
@click.argument("rev", required=False)
@click.option("-n", "--max-count", type=click.IntRange(min=1), help="Show at most N commits.")
@click.option("--oneline", is_flag=True, help="One line per commit.")
@click.option("--graph", is_flag=True, help="Draw every branch's history as a graph (one line per commit).")
@click.option("--json", "as_json", is_flag=True, help="Print commits as JSON.")
@pass_ctx
def log(ctx: Context, rev: str | None, max_count: int | None, oneline: bool, graph: bool, as_json: bool) -> None:
    """Show the history of REV (default: the default branch), newest first.

    \b
    Examples:
      ckpt log --oneline
      ckpt log --graph
      ckpt log lr-sweep -n 5 --json
    """
    store = ctx.store()

    def marks_of(commits: list[Commit]) -> dict[str, tuple[list[str], tuple[str, ...]]]:
        demoted = demoted_commit_ids(store.objects) if commits else set()
        return {c.id: (store.collected_parents(c), dropped_components(store.objects, c.id) if c.id in demoted else ()) for c in commits}

    def oneline_with_marks(marks: dict[str, tuple[list[str], tuple[str, ...]]]) -> Callable[[Commit, dict[str, list[str]]], str]:
        return lambda c, decorations: oneline_text(c, decorations) + "".join(f" [{note}]" for note in gc_marks(store, c, *marks[c.id]))

    if graph:
        commits = _all_commits(store, max_count)
        marks = marks_of(commits)
        if as_json:
            echo_json([commit_json(c) | gc_marks_json(store, c, *marks[c.id]) for c in commits])
            return
        parents = {c.id: store.parents_of(c) for c in commits}
        for line in draw_graph(commits, parents, ref_decorations(store), oneline_with_marks(marks)):
            click.echo(line)
        return
    if rev is None and store.config.default_branch not in store.branches():
        if as_json:
            echo_json([])
        else:
            click.echo(f"no commits yet on {store.config.default_branch}", err=True)
        return
    commits = store.log(rev, limit=max_count)
    marks = marks_of(commits)
    if as_json:
        echo_json([commit_json(c) | gc_marks_json(store, c, *marks[c.id]) for c in commits])
        return
    decorations = ref_decorations(store)
    for commit in commits:
        if oneline:
            click.echo(oneline_with_marks(marks)(commit, decorations))
            continue
        notes = gc_marks(store, commit, *marks[commit.id])
        names = f" ({', '.join(decorations[commit.id])})" if decorations.get(commit.id) else ""
        click.echo(f"commit {click.style(commit.id, fg='yellow')}{names}")
        click.echo(f"Date:    {commit.created_at.astimezone().isoformat(timespec='seconds')}")
        click.echo(f"Branch:  {printable(commit.branch)}")
        if step_of(commit) is not None:
            click.echo(f"Step:    {printable(step_of(commit))}")
        if commit.metrics:
            click.echo("Metrics: " + metrics_text(commit, ", "))
        click.echo(f"Size:    {human_bytes(commit.stats.logical_bytes)} logical, {new_bytes_text(commit.stats.new_bytes, commit.stats.new_metadata_bytes)} new")
        for note in notes:
            click.echo(f"Note:    {note}")
        if commit.message:
            click.echo(f"\n    {printable(commit.message)}")
        click.echo()


def _all_commits(store: Store, limit: int | None) -> list[Commit]:
    """Every commit reachable from a branch or tag, children before parents, newest first."""
    from ..ui.model import reachable  # the same reading of history as ckpt ui's graph

    commits, parents = reachable(store, sorted(set(store.branches().values()) | set(store.tags().values())))
    ordered = [commits[cid] for cid in newest_first(parents, lambda cid: commits[cid].created_at.timestamp())]
    return ordered[:limit] if limit else ordered


def draw_graph(
    commits: list[Commit],
    parents_of: dict[str, list[str]],
    decorations: dict[str, list[str]],
    describe: Callable[[Commit, dict[str, list[str]]], str],
) -> list[str]:
    """Lines of a ``git log --graph``-style drawing: one column per line of history, ``*``
    for a commit, ``|/`` where a fork joins its parent's column (``|_|/`` across columns in
    between). ``commits`` must list children before parents."""
    known = {c.id for c in commits}
    lanes: list[str | None] = []
    out = []
    for commit in commits:
        mine = [i for i, lane in enumerate(lanes) if lane == commit.id]
        if not mine:
            lanes.append(commit.id)
            mine = [len(lanes) - 1]
        col, joining = mine[0], mine[1:]
        if joining:
            row = [" "] * (2 * len(lanes))
            for i, lane in enumerate(lanes):
                if lane is not None and i not in joining:
                    row[2 * i] = "|"
            for i in joining:  # "_" across what lies between (as git draws it), then "/"
                for gap in range(2 * col + 1, 2 * i - 1):
                    if row[gap] == " " and gap % 2:
                        row[gap] = "_"
            for i in joining:
                row[2 * i - 1] = "/"  # between this column and the one before it
                if 2 * i - 2 > 2 * col and row[2 * i - 2] == " ":
                    row[2 * i - 2] = "_"
            out.append("".join(row).rstrip())
            for i in joining:
                lanes[i] = None
        cells = ["*" if i == col else "|" if lane is not None else " " for i, lane in enumerate(lanes)]
        out.append(" ".join(cells).rstrip() + " " + describe(commit, decorations))
        parents = [p for p in parents_of[commit.id] if p in known]
        lanes[col] = parents[0] if parents else None
        for p in parents[1:]:
            lanes.append(p)
        while lanes and lanes[-1] is None:
            lanes.pop()
    return out


@click.command()
@click.argument("rev", default=LATEST)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_ctx
def show(ctx: Context, rev: str, as_json: bool) -> None:
    """Show a commit: metadata, metrics, sizes and every tensor.

    \b
    Example:
      ckpt show best
    """
    store = ctx.store()

    def read() -> tuple[Commit, Manifest, CommitUsage | None, tuple[str, ...], list[str]]:
        commit_id = store.resolve(rev)
        crossed = store.collected_on_walk(rev) if "~" in rev or "^" in rev else []
        with reading_commit(store, commit_id):
            commit = store.get_commit(commit_id)
            manifest = store.manifest_of(commit)
            dropped = dropped_components(store.objects, commit_id)
            usage = {c.id: c for c in store.du().commits}.get(commit_id)
            if usage is None:  # du did not find it: if it is gone, a collector removed it
                store.objects.size(commit_key(commit_id))
        return commit, manifest, usage, dropped, crossed

    commit, manifest, usage, dropped, crossed = read_racing_collector(read)
    tensors: list[dict[str, Any]] = [{"path": e.path, "dtype": e.dtype, "shape": list(e.shape), "bytes": e.nbytes} for e in manifest.tensors]
    collected = store.collected_parents(commit)
    doc = commit_json(commit) | gc_marks_json(store, commit, collected, dropped) | {
        "manifest": commit.manifest, "exclusive_bytes": usage.exclusive_bytes if usage else None,
        "tensors": tensors, "collected_on_walk": crossed,
    }  # fmt: skip
    if as_json:
        echo_json(doc)
        return
    if crossed:
        click.echo(
            f"note: {printable(rev)} counts the commits gc kept: its walk went across "
            f"{', '.join(c[:12] for c in crossed)}, collected by gc", err=True,
        )  # fmt: skip
    click.echo(f"commit   {click.style(commit.id, fg='yellow')}")
    click.echo(f"parents  {' '.join(commit.parents) or '(none)'}")
    for line in gc_marks(store, commit, collected, dropped):
        click.echo(f"         {line}")
    click.echo(f"branch   {printable(commit.branch)}")
    click.echo(f"date     {commit.created_at.astimezone().isoformat(timespec='seconds')}")
    if commit.message:
        click.echo(f"message  {printable(commit.message)}")
    if commit.metadata:
        click.echo(f"metadata {printable(json_text(commit.metadata, ensure_ascii=False))}")
    if commit.metrics:
        click.echo("metrics  " + metrics_text(commit, ", "))
    exclusive = f", {human_bytes(usage.exclusive_bytes)} stored for this commit alone" if usage else ""
    click.echo(
        f"size     {human_bytes(commit.stats.logical_bytes)} logical, {new_bytes_text(commit.stats.new_bytes, commit.stats.new_metadata_bytes)} newly stored{exclusive}"
    )
    click.echo(f"tensors  {len(tensors)}")
    width = max((len(printable(t["path"])) for t in tensors), default=0)
    for t in tensors:
        click.echo(f"  {printable(t['path']):<{width}}  {printable(t['dtype']):<9} {str(tuple(t['shape'])):<20} {human_bytes(t['bytes'])}")


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--no-values", is_flag=True, help="Compare by hash only; do not read tensors for change statistics.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_ctx
def diff(ctx: Context, a: str, b: str, no_values: bool, as_json: bool) -> None:
    """Tensors added, removed and changed from A to B, with each change's size.

    \b
    Example:
      ckpt diff main~1 main
    """
    d: Diff = ctx.store().diff(a, b, values=not no_values)
    if as_json:
        echo_json({
            "a": d.a, "b": d.b, "unchanged": d.unchanged, "values_changed": d.values_changed,
            "added": [c.__dict__ for c in d.added], "removed": [c.__dict__ for c in d.removed], "changed": [c.__dict__ for c in d.changed],
            "added_bytes": d.added_bytes, "removed_bytes": d.removed_bytes, "changed_bytes": d.changed_bytes,
        })  # fmt: skip
        return
    for c in d.added:
        click.echo(click.style(f"+ {printable(c.path)}  {printable(c.dtype[1])} {tuple(c.shape[1] or ())}  {human_bytes(c.nbytes[1])}", fg="green"))
    for c in d.removed:
        click.echo(click.style(f"- {printable(c.path)}  {printable(c.dtype[0])} {tuple(c.shape[0] or ())}  {human_bytes(c.nbytes[0])}", fg="red"))
    for c in d.changed:
        if c.dtype[0] != c.dtype[1] or c.shape[0] != c.shape[1]:
            what = f"{printable(c.dtype[0])} {tuple(c.shape[0] or ())} -> {printable(c.dtype[1])} {tuple(c.shape[1] or ())}"
        elif c.max_abs_change is not None:
            what = f"max |Δ| {c.max_abs_change:.3g}, relative {c.relative_change:.3g}"
        else:
            what = "changed"
        click.echo(click.style(f"~ {printable(c.path)}  {what}  {human_bytes(c.nbytes[1])}", fg="yellow"))
    click.echo(
        f"{len(d.added)} added ({human_bytes(d.added_bytes)}), {len(d.removed)} removed ({human_bytes(d.removed_bytes)}), "
        f"{len(d.changed)} changed ({human_bytes(d.changed_bytes)}), {d.unchanged} unchanged" + ("; non-tensor values differ" if d.values_changed else "")
    )
