"""``ckpt``: the command line (also ``python -m ckptstore``).

Every command takes ``--store URL`` (or ``CKPTSTORE_URL``; default ``./ckpts``). Errors are
one line on stderr and exit status 1; usage errors, and malformed or reserved ref names
(``InvalidRefName``), exit 2; ``--debug`` shows the traceback.
Progress bars appear on a terminal only. Storage options (credentials) come from
``CKPTSTORE_STORAGE_OPTIONS`` (JSON) and are never printed.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import click

from . import __version__
from .commit import Commit
from .errors import CkptStoreError, InvalidOption, InvalidRefName, RefExists, StoreNotFound
from .formats.hf import run_checkpoints
from .gc import DEFAULT_GRACE_PERIOD_S, GcPlan, commit_key, demoted_commit_ids, dropped_components, unreferenced_since
from .manifest import Manifest
from .retention import KeepBest, KeepEveryNSteps, KeepLast, KeepNewerThan, Policy, Rule
from .store import LATEST, Diff, Store, open_store
from .usage import CommitUsage, read_racing_collector, reading_commit

_DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


class Duration(click.ParamType):
    """``90``, ``90s``, ``30m``, ``1h``, ``7d``, ``2w`` → seconds."""

    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value).lower())
        if m is None:
            self.fail(f"{value!r} is not a duration such as 90s, 30m, 1h or 7d", param, ctx)
        return float(m.group(1)) * _DURATION_UNITS_S.get(m.group(2) or "s", 1)


class ByteSize(click.ParamType):
    """``500MB``, ``1.5GiB``, ``2000000`` → bytes."""

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(value).lower())
        if m is None or m.group(2) not in _SIZE_UNITS:
            self.fail(f"{value!r} is not a size such as 500MB or 1.5GiB", param, ctx)
        return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


class Fraction(click.ParamType):
    """``10%``, ``1/5`` or ``0.1`` → a fraction in (0, 1]."""

    name = "fraction"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        text = str(value).strip()
        try:
            if text.endswith("%"):
                out = float(text[:-1]) / 100
            elif "/" in text:
                num, den = text.split("/", 1)
                out = float(num) / float(den)
            else:
                out = float(text)
        except (ValueError, ZeroDivisionError):
            out = -1.0
        if not 0 < out <= 1:
            self.fail(f"{value!r} is not a fraction such as 10%, 1/5 or 0.1", param, ctx)
        return out


def _storage_options() -> dict[str, Any]:
    raw = os.environ.get("CKPTSTORE_STORAGE_OPTIONS")
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidOption("storage_options", f"CKPTSTORE_STORAGE_OPTIONS is not valid JSON (at position {exc.pos})") from None
    if not isinstance(options, dict):
        raise InvalidOption("storage_options", "CKPTSTORE_STORAGE_OPTIONS must be a JSON object")
    return options


class _Context:
    def __init__(self, url: str, debug: bool) -> None:
        self.url = url
        self.debug = debug
        self._store: Store | None = None

    def store(self, *, create: bool = False) -> Store:
        if self._store is None:
            self._store = open_store(self.url, storage_options=_storage_options() or None, create=create)
        return self._store


pass_ctx = click.make_pass_decorator(_Context)


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A ``progress(phase, done, total)`` callback that draws a bar per phase on a
    terminal; ``None`` when stderr is not one."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    bars: dict[str, Any] = {}
    shown: dict[str, int] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in bars:
            for bar in bars.values():
                bar.render_finish()
            bars[phase] = click.progressbar(length=total, label=phase, file=sys.stderr)
            bars[phase].__enter__()
            shown[phase] = 0
        bars[phase].update(done - shown[phase])
        shown[phase] = done

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.__exit__(None, None, None)


def _duration(seconds: float) -> str:
    """Seconds as the largest unit that holds them whole (``1h``, ``90s``), as ``--grace-period`` takes them."""
    for unit, size in sorted(_DURATION_UNITS_S.items(), key=lambda kv: -kv[1]):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s"


@contextmanager
def _reporting_interrupt(store: Store) -> Iterator[None]:
    """Around a command that writes commits: on Ctrl-C, say what it stored that no commit
    references (left for ``gc`` after the grace period) and exit with status 130."""
    since_s = store.objects.clock_s() - 1.0  # S3 stamps to the second
    try:
        yield
    except KeyboardInterrupt:
        left = unreferenced_since(store, since_s=since_s)
        chunks = sum(info.key.startswith("chunks/") for info in left)
        manifests = len(left) - chunks
        what = f"{chunks} chunks" + (f" and {manifests} manifests" if manifests else "")
        click.echo(
            f"interrupted: {what} ({_human(sum(info.size_bytes for info in left))}) written and not referenced by any commit; "
            f"`ckpt gc` reclaims them after the grace period ({_duration(DEFAULT_GRACE_PERIOD_S)})"
            if left else "interrupted: nothing it wrote is left unreferenced",
            err=True,
        )  # fmt: skip
        sys.exit(130)


def _echo_json(doc: Any) -> None:
    click.echo(_json_text(doc, indent=2))


def _json_text(doc: Any, *, indent: int | None = None, ensure_ascii: bool = True) -> str:
    """``doc`` as strict JSON (no NaN), keys sorted; see :func:`_json_value`."""
    return json.dumps(_json_value(doc), indent=indent, sort_keys=True, allow_nan=False, ensure_ascii=ensure_ascii, default=str)


def _json_value(value: Any) -> Any:
    """``value`` as strict JSON holds it (docs/cli.md, "JSON output"): a NaN or infinite
    float as the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``; a dict's keys as
    strings, an int key as its decimal text, except where that text is also one of its str
    keys: then the dict is a list of ``[key, value]`` pairs, each key as it is (int keys are
    JSON numbers), int before str of the same text. Other values are left to ``json``
    (anything it cannot hold becomes its ``str``)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else "NaN" if math.isnan(number) else "Infinity" if number > 0 else "-Infinity"
    if isinstance(value, Mapping):
        texts = [k if isinstance(k, str) else str(k) for k in value]
        if len(set(texts)) == len(texts):
            return {text: _json_value(v) for text, v in zip(texts, value.values())}
        pairs = sorted(value.items(), key=lambda kv: (str(kv[0]), isinstance(kv[0], str)))
        return [[k if isinstance(k, (str, int)) else str(k), _json_value(v)] for k, v in pairs]
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def _human(n: float) -> str:
    """Bytes in decimal units: 1.49 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def _printable(value: object) -> str:
    """``str(value)`` with every character that is not printable escaped as Python writes it
    (``\\n``, ``\\x1b``, ``\\x85``, ``\\u202e``): control characters (C0, DEL, C1), format
    characters such as bidi overrides, line and paragraph separators. Every user-supplied
    string goes through it on its way to the terminal, so none can break a line, forge one
    or drive the terminal."""
    text = value if isinstance(value, str) else str(value)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short(commit_id: str) -> str:
    return click.style(commit_id[:12], fg="yellow")


def _decorations(store: Store) -> dict[str, list[str]]:
    """Commit id → the branch and tag names pointing at it."""
    out: dict[str, list[str]] = {}
    for name, cid in store.branches().items():
        out.setdefault(cid, []).append(click.style(_printable(name), fg="green", bold=True))
    for name, cid in store.tags().items():
        out.setdefault(cid, []).append(click.style(f"tag: {_printable(name)}", fg="cyan"))
    return out


def _step(commit: Commit) -> Any:
    return commit.metadata.get("step") if isinstance(commit.metadata, dict) else None


def _metrics(commit: Commit, sep: str) -> str:
    return sep.join(f"{_printable(k)}={v:.6g}" for k, v in sorted(commit.metrics.items()))


def _commit_json(commit: Commit) -> dict[str, Any]:
    return {
        "id": commit.id, "parents": list(commit.parents), "branch": commit.branch, "message": commit.message,
        "created_at": commit.created_at.isoformat(), "step": _step(commit), "metadata": commit.metadata,
        "metrics": commit.metrics, "logical_bytes": commit.stats.logical_bytes, "new_bytes": commit.stats.new_bytes,
        "reused_bytes": commit.stats.reused_bytes, "new_chunks": commit.stats.new_chunks, "reused_chunks": commit.stats.reused_chunks,
        "new_data_bytes": commit.stats.new_data_bytes, "new_metadata_bytes": commit.stats.new_metadata_bytes,
    }  # fmt: skip


def _new_bytes(new_bytes: int, new_metadata_bytes: int | None) -> str:
    """The bytes a commit newly stored: tensor data and metadata apart (one figure for a
    commit written before they were told apart)."""
    if new_metadata_bytes is None:
        return _human(new_bytes)
    return f"{_human(new_bytes - new_metadata_bytes)} data + {_human(new_metadata_bytes)} metadata"


def _gc_marks(store: Store, commit: Commit, collected: list[str], dropped: tuple[str, ...]) -> list[str]:
    """What gc took from a commit, one line each: its collected parents (and where its
    history goes on), the components it dropped."""
    lines = []
    if collected:
        goes_on = store.parents_of(commit)
        lines.append(
            f"parent {', '.join(p[:12] for p in collected)} collected by gc; "
            + (f"history goes on at {', '.join(p[:12] for p in goes_on)}" if goes_on else "history ends here")
        )  # fmt: skip
    if dropped:
        lines.append(f"{', '.join(map(_printable, dropped))} dropped by gc")
    return lines


def _gc_marks_json(store: Store, commit: Commit, collected: list[str], dropped: tuple[str, ...]) -> dict[str, Any]:
    """:func:`_gc_marks` as JSON fields (``history_parents``: the parents history follows)."""
    return {"collected_parents": collected, "history_parents": store.parents_of(commit), "dropped_components": list(dropped)}


def _oneline(commit: Commit, decorations: dict[str, list[str]]) -> str:
    parts = [_short(commit.id)]
    if decorations.get(commit.id):
        parts.append("(" + ", ".join(decorations[commit.id]) + ")")
    step = _step(commit)
    if step is not None:
        parts.append(f"step {_printable(step)}")
    if commit.metrics:
        parts.append(_metrics(commit, " "))
    if commit.message:
        parts.append(_printable(commit.message))
    return " ".join(parts)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--store", "url", envvar="CKPTSTORE_URL", default="ckpts", show_default=True, help="Store URL: a directory, s3://BUCKET/PREFIX or memory://NAME (env CKPTSTORE_URL).")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.version_option(__version__, prog_name="ckpt")
@click.pass_context
def cli(ctx: click.Context, url: str, debug: bool) -> None:
    """Content-addressed checkpoint storage: history, branches, tags, retention and checks."""
    if debug:  # ckptstore's own logging only: botocore's debug output carries credentials
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("ckptstore").setLevel(logging.DEBUG)
    ctx.obj = _Context(url, debug)


@cli.command()
@click.option("--chunk-size", "chunk_size_bytes", type=ByteSize(), help="Chunk size for new writes (default 16MiB).")
@click.option("--default-branch", help="Branch that commits go to by default (default main).")
@click.option("--best-metric", help="Metric that moves the best tag (default eval_loss).")
@click.option("--greater-is-better/--lower-is-better", default=None, help="Direction of --best-metric.")
@click.option("--delta", type=click.Choice(["off", "on", "auto"]), help="Store changed float tensors as XOR deltas against the previous commit's (default off).")
@click.option("--delta-keyframe-interval", type=click.IntRange(1, 65), help="A full copy at least every N commits (default 8).")
@click.option("--compression", type=click.Choice(["auto", "always", "never"]), help="When commits compress: auto (where the storage, not the CPU, bounds the commit; the default), always, or never.")
@pass_ctx
def init(
    ctx: _Context, chunk_size_bytes: int | None, default_branch: str | None, best_metric: str | None, greater_is_better: bool | None,
    delta: str | None, delta_keyframe_interval: int | None, compression: str | None,
) -> None:
    """Create a store (nothing changes if one exists).

    \b
    Example:
      ckpt --store ckpts init
    """
    try:
        existing = open_store(ctx.url, storage_options=_storage_options() or None, create=False)
    except StoreNotFound:
        existing = None
    if existing is not None:
        click.echo(f"store already exists at {existing.url}")
        existing.close()
        return
    store = open_store(
        ctx.url, storage_options=_storage_options() or None, create=True, chunk_size_bytes=chunk_size_bytes,
        default_branch=default_branch, best_metric=best_metric, greater_is_better=greater_is_better,
        delta=delta, delta_keyframe_interval=delta_keyframe_interval, compression=compression,
    )  # fmt: skip
    click.echo(f"created store at {store.url}")


@cli.command()
@click.argument("rev", required=False)
@click.option("-n", "--max-count", type=click.IntRange(min=1), help="Show at most N commits.")
@click.option("--oneline", is_flag=True, help="One line per commit.")
@click.option("--graph", is_flag=True, help="Draw every branch's history as a graph (one line per commit).")
@click.option("--json", "as_json", is_flag=True, help="Print commits as JSON.")
@pass_ctx
def log(ctx: _Context, rev: str | None, max_count: int | None, oneline: bool, graph: bool, as_json: bool) -> None:
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
        return lambda c, decorations: _oneline(c, decorations) + "".join(f" [{note}]" for note in _gc_marks(store, c, *marks[c.id]))

    if graph:
        commits = _all_commits(store, max_count)
        marks = marks_of(commits)
        if as_json:
            _echo_json([_commit_json(c) | _gc_marks_json(store, c, *marks[c.id]) for c in commits])
            return
        parents = {c.id: store.parents_of(c) for c in commits}
        for line in draw_graph(commits, parents, _decorations(store), oneline_with_marks(marks)):
            click.echo(line)
        return
    if rev is None and store.config.default_branch not in store.branches():
        if as_json:
            _echo_json([])
        else:
            click.echo(f"no commits yet on {store.config.default_branch}", err=True)
        return
    commits = store.log(rev, limit=max_count)
    marks = marks_of(commits)
    if as_json:
        _echo_json([_commit_json(c) | _gc_marks_json(store, c, *marks[c.id]) for c in commits])
        return
    decorations = _decorations(store)
    for commit in commits:
        if oneline:
            click.echo(oneline_with_marks(marks)(commit, decorations))
            continue
        notes = _gc_marks(store, commit, *marks[commit.id])
        names = f" ({', '.join(decorations[commit.id])})" if decorations.get(commit.id) else ""
        click.echo(f"commit {click.style(commit.id, fg='yellow')}{names}")
        click.echo(f"Date:    {commit.created_at.astimezone().isoformat(timespec='seconds')}")
        click.echo(f"Branch:  {_printable(commit.branch)}")
        if _step(commit) is not None:
            click.echo(f"Step:    {_printable(_step(commit))}")
        if commit.metrics:
            click.echo("Metrics: " + _metrics(commit, ", "))
        click.echo(f"Size:    {_human(commit.stats.logical_bytes)} logical, {_new_bytes(commit.stats.new_bytes, commit.stats.new_metadata_bytes)} new")
        for note in notes:
            click.echo(f"Note:    {note}")
        if commit.message:
            click.echo(f"\n    {_printable(commit.message)}")
        click.echo()


def _all_commits(store: Store, limit: int | None) -> list[Commit]:
    """Every commit reachable from a branch or tag, children before parents, newest first."""
    heads = set(store.branches().values()) | set(store.tags().values())
    seen: dict[str, Commit] = {}
    stack = list(heads)
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        try:
            commit = store.get_commit(cid)
        except CkptStoreError:
            continue  # collected (shallow history)
        seen[cid] = commit
        stack.extend(store.parents_of(commit))
    # Newest first, but never a parent before its child.
    ordered: list[Commit] = []
    children: dict[str, int] = {cid: 0 for cid in seen}
    parents = {cid: store.parents_of(c) for cid, c in seen.items()}
    for cid in seen:
        for p in parents[cid]:
            if p in children:
                children[p] += 1
    ready = sorted((c for c in seen.values() if children[c.id] == 0), key=lambda c: c.created_at)
    while ready:
        commit = ready.pop()
        ordered.append(commit)
        for p in parents[commit.id]:
            if p in children:
                children[p] -= 1
                if children[p] == 0:
                    ready.append(seen[p])
                    ready.sort(key=lambda c: c.created_at)
    return ordered[:limit] if limit else ordered


def draw_graph(
    commits: list[Commit], parents_of: dict[str, list[str]], decorations: dict[str, list[str]], describe: Callable[[Commit, dict[str, list[str]]], str]
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


@cli.command()
@click.argument("rev", default=LATEST)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_ctx
def show(ctx: _Context, rev: str, as_json: bool) -> None:
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
    tensors = [{"path": e.path, "dtype": e.dtype, "shape": list(e.shape), "bytes": e.nbytes} for e in manifest.tensors]
    collected = store.collected_parents(commit)
    doc = _commit_json(commit) | _gc_marks_json(store, commit, collected, dropped) | {
        "manifest": commit.manifest, "exclusive_bytes": usage.exclusive_bytes if usage else None,
        "tensors": tensors, "collected_on_walk": crossed,
    }  # fmt: skip
    if as_json:
        _echo_json(doc)
        return
    if crossed:
        click.echo(
            f"note: {_printable(rev)} counts the commits gc kept: its walk went across "
            f"{', '.join(c[:12] for c in crossed)}, collected by gc", err=True,
        )  # fmt: skip
    click.echo(f"commit   {click.style(commit.id, fg='yellow')}")
    click.echo(f"parents  {' '.join(commit.parents) or '(none)'}")
    for line in _gc_marks(store, commit, collected, dropped):
        click.echo(f"         {line}")
    click.echo(f"branch   {_printable(commit.branch)}")
    click.echo(f"date     {commit.created_at.astimezone().isoformat(timespec='seconds')}")
    if commit.message:
        click.echo(f"message  {_printable(commit.message)}")
    if commit.metadata:
        click.echo(f"metadata {_printable(_json_text(commit.metadata, ensure_ascii=False))}")
    if commit.metrics:
        click.echo("metrics  " + _metrics(commit, ", "))
    exclusive = f", {_human(usage.exclusive_bytes)} stored for this commit alone" if usage else ""
    click.echo(f"size     {_human(commit.stats.logical_bytes)} logical, {_new_bytes(commit.stats.new_bytes, commit.stats.new_metadata_bytes)} newly stored{exclusive}")
    click.echo(f"tensors  {len(tensors)}")
    width = max((len(_printable(t["path"])) for t in tensors), default=0)
    for t in tensors:
        click.echo(f"  {_printable(t['path']):<{width}}  {_printable(t['dtype']):<9} {str(tuple(t['shape'])):<20} {_human(t['bytes'])}")


@cli.command()
@click.argument("name", required=False)
@click.argument("start", required=False)
@click.option("-d", "--delete", "delete", is_flag=True, help="Delete branch NAME (refused for the default branch, or the only ref to some commits, unless forced).")
@click.option("-D", "force_delete", is_flag=True, help="Delete branch NAME even so (-d --force).")
@click.option("-m", "--move", "rename", is_flag=True, help="Rename branch NAME to START.")
@click.option("-f", "--force", is_flag=True, help="Move NAME to START if it exists; with -d, delete even the default branch or the only ref to commits.")
@click.option("--json", "as_json", is_flag=True, help="List as JSON.")
@pass_ctx
def branch(ctx: _Context, name: str | None, start: str | None, delete: bool, force_delete: bool, rename: bool, force: bool, as_json: bool) -> None:
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
        click.echo(f"Deleted branch {_printable(name)} (was {_short(old)}).")
    elif rename:
        if start is None:
            raise click.UsageError("ckpt branch -m OLD NEW: name the new branch")
        commit = store.rename_branch(name, start)
        click.echo(f"renamed branch {name} to {start} ({_short(commit.id)})")
    else:
        commit = store.branch(name, at=start or LATEST, force=force)
        click.echo(f"branch {name} at {_short(commit.id)}")


@cli.command()
@click.argument("name", required=False)
@click.argument("at", required=False)
@click.option("-d", "--delete", "delete", is_flag=True, help="Delete tag NAME.")
@click.option("-f", "--force", is_flag=True, help="Move NAME to AT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="List as JSON.")
@pass_ctx
def tag(ctx: _Context, name: str | None, at: str | None, delete: bool, force: bool, as_json: bool) -> None:
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
        click.echo(f"Deleted tag {_printable(name)} (was {_short(old)}).")
    else:
        commit = store.tag(name, at=at or LATEST, force=force)
        click.echo(f"tag {name} at {_short(commit.id)}")


def _list_refs(list_refs: Callable[[], dict[str, str]], store: Store, as_json: bool, current: str | None = None) -> None:
    def read() -> dict[str, Commit]:
        commits = {}
        for name, cid in list_refs().items():
            with reading_commit(store, cid):  # a ref moved on, and a collector took its old target?
                commits[name] = store.get_commit(cid)
        return commits

    commits = read_racing_collector(read)
    if as_json:
        _echo_json({name: _commit_json(commit) for name, commit in commits.items()})
        return
    width = max((len(_printable(n)) for n in commits), default=0)
    for name, commit in commits.items():
        mark = "*" if name == current else " "
        step = f" step {_printable(_step(commit))}" if _step(commit) is not None else ""
        click.echo(f"{mark} {click.style(f'{_printable(name):<{width}}', fg='green')} {_short(commit.id)}{step} {_printable(commit.message)}".rstrip())


@cli.command()
@click.argument("a")
@click.argument("b")
@click.option("--no-values", is_flag=True, help="Compare by hash only; do not read tensors for change statistics.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_ctx
def diff(ctx: _Context, a: str, b: str, no_values: bool, as_json: bool) -> None:
    """Tensors added, removed and changed from A to B, with each change's size.

    \b
    Example:
      ckpt diff main~1 main
    """
    d: Diff = ctx.store().diff(a, b, values=not no_values)
    if as_json:
        _echo_json({
            "a": d.a, "b": d.b, "unchanged": d.unchanged, "values_changed": d.values_changed,
            "added": [c.__dict__ for c in d.added], "removed": [c.__dict__ for c in d.removed], "changed": [c.__dict__ for c in d.changed],
            "added_bytes": d.added_bytes, "removed_bytes": d.removed_bytes, "changed_bytes": d.changed_bytes,
        })  # fmt: skip
        return
    for c in d.added:
        click.echo(click.style(f"+ {_printable(c.path)}  {_printable(c.dtype[1])} {tuple(c.shape[1] or ())}  {_human(c.nbytes[1])}", fg="green"))
    for c in d.removed:
        click.echo(click.style(f"- {_printable(c.path)}  {_printable(c.dtype[0])} {tuple(c.shape[0] or ())}  {_human(c.nbytes[0])}", fg="red"))
    for c in d.changed:
        if c.dtype[0] != c.dtype[1] or c.shape[0] != c.shape[1]:
            what = f"{_printable(c.dtype[0])} {tuple(c.shape[0] or ())} -> {_printable(c.dtype[1])} {tuple(c.shape[1] or ())}"
        elif c.max_abs_change is not None:
            what = f"max |Δ| {c.max_abs_change:.3g}, relative {c.relative_change:.3g}"
        else:
            what = "changed"
        click.echo(click.style(f"~ {_printable(c.path)}  {what}  {_human(c.nbytes[1])}", fg="yellow"))
    click.echo(
        f"{len(d.added)} added ({_human(d.added_bytes)}), {len(d.removed)} removed ({_human(d.removed_bytes)}), "
        f"{len(d.changed)} changed ({_human(d.changed_bytes)}), {d.unchanged} unchanged"
        + ("; non-tensor values differ" if d.values_changed else "")
    )


@cli.command()
@click.option("--commits", "per_commit", is_flag=True, help="Also list every commit.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_ctx
def du(ctx: _Context, per_commit: bool, as_json: bool) -> None:
    """Logical against physical bytes, dedup and compression ratios, per branch and commit.

    \b
    Example:
      ckpt du --commits
    """
    usage = ctx.store().du()
    if as_json:
        _echo_json({
            "physical_bytes": usage.physical_bytes, "logical_bytes": usage.logical_bytes,
            "unique_raw_bytes": usage.unique_raw_bytes, "chunk_stored_bytes": usage.chunk_stored_bytes,
            "dedup_ratio": usage.dedup_ratio, "compression_ratio": usage.compression_ratio,
            "raw_chunks": usage.raw_chunks, "raw_chunk_bytes": usage.raw_chunk_bytes,
            "repack_estimate_bytes": usage.repack_estimate_bytes, "repack_saving_bytes": usage.repack_saving_bytes,
            "repack_sampled_chunks": usage.repack_sampled_chunks,
            "objects": {k: {"count": n, "bytes": b} for k, (n, b) in usage.objects.items()},
            "branches": [b.__dict__ for b in usage.branches], "commits": [c.__dict__ for c in usage.commits],
        })  # fmt: skip
        return
    click.echo(f"physical  {_human(usage.physical_bytes)} in {sum(n for n, _ in usage.objects.values())} objects")
    for kind, (n, b) in sorted(usage.objects.items()):
        click.echo(f"  {kind:<10} {n:>8}  {_human(b)}")
    click.echo(f"logical   {_human(usage.logical_bytes)} in {len(usage.commits)} commits")
    click.echo(f"dedup     {usage.dedup_ratio:.2f}x   compression {usage.compression_ratio:.2f}x")
    if usage.raw_chunks:
        click.echo(
            f"raw       {_human(usage.raw_chunk_bytes)} in {usage.raw_chunks} chunks stored raw; "
            f"ckpt repack would save about {_human(usage.repack_saving_bytes)} (estimated from {usage.repack_sampled_chunks} sampled chunks)"
        )
    if usage.branches:
        click.echo("branches")
        width = max(len(_printable(b.name)) for b in usage.branches)
        for b in usage.branches:
            click.echo(f"  {click.style(f'{_printable(b.name):<{width}}', fg='green')}  {b.commits:>5} commits  {_human(b.logical_bytes):>10} logical  {_human(b.physical_bytes):>10} stored")
    if per_commit:
        click.echo("commits")
        for c in usage.commits:
            click.echo(f"  {_short(c.id)}  {_human(c.logical_bytes):>10} logical  {_new_bytes(c.new_bytes, c.new_metadata_bytes)} added  {_human(c.exclusive_bytes):>10} its own")


@cli.command(name="export")
@click.argument("rev")
@click.argument("path")
@click.option("--component", help="Export the tensors under this key (default: model, if the commit has it).")
@click.option("--include", multiple=True, metavar="PATTERN", help="Only these key paths (glob or prefix). Repeatable.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Not these key paths. Repeatable.")
@click.option("--max-shard-size", "max_shard_size_bytes", type=ByteSize(), default="5GB", show_default=True, help="Largest shard.")
@click.option("--format", "format_", type=click.Choice(["hf", "safetensors", "pt"]), help="hf: a safetensors directory; safetensors: one file; pt: the whole state as one torch.save file (default: by PATH's suffix).")
@click.option("--force", is_flag=True, help="Replace a file at PATH, or export into a directory that has files in it.")
@pass_ctx
def export_(ctx: _Context, rev: str, path: str, component: str | None, include: tuple[str, ...], exclude: tuple[str, ...], max_shard_size_bytes: int, format_: str | None, force: bool) -> None:
    """Write REV as a Hugging Face style safetensors directory PATH (or one PATH.pt file).
    Nothing at PATH is replaced without --force.

    \b
    Examples:
      ckpt export best ./release
      ckpt export main model.pt
      ckpt export main state.pt --format pt --exclude optimizer
    """
    with _progress(True) as progress:
        files = ctx.store().export(
            rev, path, component=component, include=list(include) or None, exclude=list(exclude) or None,
            max_shard_size_bytes=max_shard_size_bytes, format=format_, force=force, progress=progress,
        )  # fmt: skip
    for name in files:
        click.echo(os.path.join(path, name) if not name.startswith(path) else name)


@cli.command(name="import")
@click.argument("paths", metavar="PATH...", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--branch", help="Branch to commit on (default: the store's default branch).")
@click.option("-m", "--message", help="Commit message (default: import NAME; checkpoint-N for a run's checkpoints).")
@click.option("--tag", "tags", multiple=True, help="Tag the last commit. Repeatable.")
@click.option("--append", is_flag=True, help="Let a Trainer run go onto a branch that already has commits.")
@click.option("--json", "as_json", is_flag=True, help="Print the commit as JSON (a list when there are several).")
@pass_ctx
def import_(ctx: _Context, paths: tuple[str, ...], branch: str | None, message: str | None, tags: tuple[str, ...], append: bool, as_json: bool) -> None:
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
    with _reporting_interrupt(store), _progress(not as_json) as progress:
        for i, (path, is_run) in enumerate(zip(paths, runs)):
            options = {"branch": branch, "message": message, "tags": tags if i == len(paths) - 1 else (), "progress": progress}
            if progress is not None and len(paths) > 1:  # a bar per PATH
                options["progress"] = lambda phase, done, total, name=os.path.basename(os.path.normpath(path)): progress(f"{name} {phase}", done, total)
            made = store.import_run(path, append=True, **options) if is_run else [store.import_checkpoint(path, **options)]
            commits += made
            if not as_json:
                for commit in made:
                    named = f" {_printable(commit.message)}" if is_run else ""
                    click.echo(f"{_short(commit.id)}{named} on {_printable(commit.branch)}: {_human(commit.stats.logical_bytes)}, {_new_bytes(commit.stats.new_bytes, commit.stats.new_metadata_bytes)} newly stored")
    if as_json:
        _echo_json(_commit_json(commits[0]) if len(commits) == 1 and not any(runs) else [_commit_json(c) for c in commits])


@cli.command(name="rev-parse")
@click.argument("rev")
@pass_ctx
def rev_parse(ctx: _Context, rev: str) -> None:
    """Print the full commit id that REV names.

    \b
    Example:
      ckpt rev-parse main~2
    """
    click.echo(ctx.store().resolve(rev))


def _policy(
    keep_last: int | None, keep_best: int | None, metric: str | None, greater_is_better: bool | None,
    keep_every_steps: int | None, keep_within_s: float | None, max_total_bytes: int | None,
    demote: tuple[str, ...], keep_whole_last: int | None,
) -> Policy | None:  # fmt: skip
    rules: list[Rule] = []
    if keep_last is not None:
        rules.append(KeepLast(keep_last))
    if keep_best is not None:
        rules.append(KeepBest(keep_best, metric=metric, greater_is_better=greater_is_better))
    if keep_every_steps is not None:
        rules.append(KeepEveryNSteps(keep_every_steps))
    if keep_within_s is not None:
        rules.append(KeepNewerThan(keep_within_s))
    if not rules and max_total_bytes is None and not demote:
        return None
    keep: Rule | None = None
    for rule in rules:
        keep = rule if keep is None else keep | rule
    return Policy(keep=keep, demote=demote, keep_whole=None if keep_whole_last is None else KeepLast(keep_whole_last), max_total_bytes=max_total_bytes)


def _plan_json(plan: GcPlan) -> dict[str, Any]:
    return {
        "executed": plan.executed,
        "kept_commits": plan.kept_commits,
        "removed_commits": plan.removed_commits,
        "demoted_commits": {k: list(v) for k, v in plan.demoted_commits.items()},
        "newly_demoted": {k: list(v) for k, v in plan.newly_demoted.items()},
        "shallow_commits": plan.shallow_commits,
        "objects": plan.counts(),
        "planned_bytes": plan.planned_bytes,
        "deleted_objects": plan.deleted_objects,
        "freed_bytes": plan.freed_bytes,
        "young_objects": plan.young_objects,
        "grace_period_s": plan.grace_period_s,
        "elapsed_s": plan.elapsed_s,
    }


@cli.command()
@click.option("--keep-last", type=click.IntRange(min=0), help="Keep the N newest commits of each branch.")
@click.option("--keep-best", type=click.IntRange(min=0), help="Keep the N best commits of each branch by --metric.")
@click.option("--metric", default=None, help="Metric for --keep-best (default: the store's best_metric, which `best` follows).")
@click.option("--greater-is-better/--lower-is-better", default=None, help="Direction of --metric (default: the store's for its best_metric, else lower for names ending in 'loss').")
@click.option("--keep-every-steps", type=click.IntRange(min=1), help="Keep the first commit of every window of N steps.")
@click.option("--keep-within", "keep_within_s", type=Duration(), help="Keep commits newer than this (30m, 12h, 7d).")
@click.option("--max-total-size", "max_total_bytes", type=ByteSize(), help="Then drop the oldest kept commits until a branch's commits fit (500GB).")
@click.option("--demote", multiple=True, metavar="PREFIX", help="Drop this component (key prefix, e.g. optimizer) from kept commits not kept whole. Repeatable.")
@click.option("--keep-whole-last", type=click.IntRange(min=0), help="With --demote: the N newest commits keep every component.")
@click.option("--branch", "branches", multiple=True, metavar="PATTERN", help="Apply the policy to these branches only (glob; others keep everything). Repeatable.")
@click.option("--grace-period", "grace_period_s", type=Duration(), default=DEFAULT_GRACE_PERIOD_S, show_default="1h", help="Never delete objects younger than this.")
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be removed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@pass_ctx
def gc(ctx: _Context, keep_last, keep_best, metric, greater_is_better, keep_every_steps, keep_within_s, max_total_bytes, demote, keep_whole_last, branches, grace_period_s, dry_run, as_json) -> None:  # type: ignore[no-untyped-def]
    """Apply a retention policy and delete what no kept commit needs.

    Without a policy option, every commit a branch or tag reaches is kept and only
    unreachable objects are deleted. Branch heads and tagged commits (latest, best) are
    always kept whole.

    \b
    Example:
      ckpt gc --keep-last 3 --keep-best 1 --demote optimizer --keep-whole-last 1 --dry-run
    """
    policy = _policy(keep_last, keep_best, metric, greater_is_better, keep_every_steps, keep_within_s, max_total_bytes, demote, keep_whole_last)
    retention = {pattern: policy for pattern in branches} if branches and policy is not None else policy
    with _progress(not as_json) as progress:
        plan = ctx.store().gc(retention, dry_run=dry_run, grace_period_s=grace_period_s, progress=progress)
    if as_json:
        _echo_json(_plan_json(plan))
        return
    for cid in plan.removed_commits:
        click.echo(f"remove  {cid[:12]}")
    for cid, prefixes in sorted(plan.newly_demoted.items()):
        click.echo(f"demote  {cid[:12]}  (without {', '.join(map(_printable, prefixes))})")
    click.echo(plan.summary())


@cli.command()
@click.argument("revs", metavar="[REV]...", nargs=-1)
@click.option("--level", "compression_level", type=click.IntRange(1, 22), help="zstd level (default: the store's, else 3).")
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be rewritten; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_ctx
def repack(ctx: _Context, revs: tuple[str, ...], compression_level: int | None, dry_run: bool, as_json: bool) -> None:
    """Re-encode the chunks of REV... (default: every commit a branch or tag reaches) that are
    stored raw or as plain zstd, with byte planes and zstd, each in place under its id.

    Safe while other processes commit, check out and collect; run it again to finish after
    an interruption.

    \b
    Example:
      ckpt repack --dry-run
    """
    with _progress(not as_json) as progress:
        report = ctx.store().repack(list(revs) or None, compression_level=compression_level, dry_run=dry_run, progress=progress)
    if as_json:
        _echo_json({**report.__dict__, "saved_bytes": report.saved_bytes})
        return
    click.echo(report.summary())


@cli.command()
@click.option("--read-data", is_flag=True, help="Read every chunk and re-hash it.")
@click.option("--read-data-subset", type=Fraction(), help="Read a random fraction of the chunks (10%, 1/5, 0.1).")
@click.option("--repair", is_flag=True, help="Rebuild the catalog from the store.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_ctx
def fsck(ctx: _Context, read_data: bool, read_data_subset: float | None, repair: bool, as_json: bool) -> None:
    """Check that every ref, commit, manifest and chunk is present and intact.

    Exit status 0 if the store is healthy, 1 if not. Orphan objects (left for gc) are
    reported but are not damage.

    \b
    Example:
      ckpt fsck --read-data-subset 10%
    """
    with _progress(not as_json) as progress:
        report = ctx.store().fsck(read_data=read_data or read_data_subset is not None, read_data_subset=read_data_subset, repair=repair, progress=progress)
    if as_json:
        _echo_json({
            "ok": report.ok, "problems": [p.__dict__ for p in report.problems], "orphans": report.orphans,
            "commits": report.commits, "manifests": report.manifests, "chunks": report.chunks,
            "chunks_read": report.chunks_read, "bytes_read": report.bytes_read, "catalog_repaired": report.catalog_repaired,
            "data_read": report.data_read,
        })  # fmt: skip
    else:
        for problem in report.problems:
            click.echo(_printable(problem))
        click.echo(report.summary())
    if not report.ok:
        sys.exit(1)


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
        click.echo(f"ckpt: error: {_printable(message)}", err=True)
        sys.exit(2 if isinstance(exc, InvalidRefName) else 1)  # a malformed or reserved name is a usage error
