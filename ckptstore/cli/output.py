"""How ``ckpt`` writes to the terminal: progress bars, strict JSON, byte sizes, escaped
user strings, and the lines that describe a commit (its refs, step, metrics, what gc took)."""

from __future__ import annotations

import json
import math
import numbers
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import click

from ..commit import Commit
from ..store import Store


@contextmanager
def progress_bars(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
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


def echo_json(doc: Any) -> None:
    click.echo(json_text(doc, indent=2))


def json_text(doc: Any, *, indent: int | None = None, ensure_ascii: bool = True) -> str:
    """``doc`` as strict JSON (no NaN), keys sorted; see :func:`json_value`."""
    return json.dumps(json_value(doc), indent=indent, sort_keys=True, allow_nan=False, ensure_ascii=ensure_ascii, default=str)


def json_value(value: Any) -> Any:
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
            return {text: json_value(v) for text, v in zip(texts, value.values())}
        pairs = sorted(value.items(), key=lambda kv: (str(kv[0]), isinstance(kv[0], str)))
        return [[k if isinstance(k, (str, int)) else str(k), json_value(v)] for k, v in pairs]
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value


def human_bytes(n: float) -> str:
    """Bytes in decimal units: 1.49 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def printable(value: object) -> str:
    """``str(value)`` with every character that is not printable escaped as Python writes it
    (``\\n``, ``\\x1b``, ``\\x85``, ``\\u202e``): control characters (C0, DEL, C1), format
    characters such as bidi overrides, line and paragraph separators. Every user-supplied
    string goes through it on its way to the terminal, so none can break a line, forge one
    or drive the terminal."""
    text = value if isinstance(value, str) else str(value)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def short_id(commit_id: str) -> str:
    return click.style(commit_id[:12], fg="yellow")


def ref_decorations(store: Store) -> dict[str, list[str]]:
    """Commit id → the branch and tag names pointing at it."""
    out: dict[str, list[str]] = {}
    for name, cid in store.branches().items():
        out.setdefault(cid, []).append(click.style(printable(name), fg="green", bold=True))
    for name, cid in store.tags().items():
        out.setdefault(cid, []).append(click.style(f"tag: {printable(name)}", fg="cyan"))
    return out


def step_of(commit: Commit) -> Any:
    return commit.metadata.get("step") if isinstance(commit.metadata, dict) else None


def metrics_text(commit: Commit, sep: str) -> str:
    return sep.join(f"{printable(k)}={v:.6g}" for k, v in sorted(commit.metrics.items()))


def commit_json(commit: Commit) -> dict[str, Any]:
    return {
        "id": commit.id, "parents": list(commit.parents), "branch": commit.branch, "message": commit.message,
        "created_at": commit.created_at.isoformat(), "step": step_of(commit), "metadata": commit.metadata,
        "metrics": commit.metrics, "logical_bytes": commit.stats.logical_bytes, "new_bytes": commit.stats.new_bytes,
        "reused_bytes": commit.stats.reused_bytes, "new_chunks": commit.stats.new_chunks, "reused_chunks": commit.stats.reused_chunks,
        "new_data_bytes": commit.stats.new_data_bytes, "new_metadata_bytes": commit.stats.new_metadata_bytes,
    }  # fmt: skip


def new_bytes_text(new_bytes: int, new_metadata_bytes: int | None) -> str:
    """The bytes a commit newly stored: tensor data and metadata apart (one figure for a
    commit written before they were told apart)."""
    if new_metadata_bytes is None:
        return human_bytes(new_bytes)
    return f"{human_bytes(new_bytes - new_metadata_bytes)} data + {human_bytes(new_metadata_bytes)} metadata"


def gc_marks(store: Store, commit: Commit, collected: list[str], dropped: tuple[str, ...]) -> list[str]:
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
        lines.append(f"{', '.join(map(printable, dropped))} dropped by gc")
    return lines


def gc_marks_json(store: Store, commit: Commit, collected: list[str], dropped: tuple[str, ...]) -> dict[str, Any]:
    """:func:`gc_marks` as JSON fields (``history_parents``: the parents history follows)."""
    return {"collected_parents": collected, "history_parents": store.parents_of(commit), "dropped_components": list(dropped)}


def oneline_text(commit: Commit, decorations: dict[str, list[str]]) -> str:
    parts = [short_id(commit.id)]
    if decorations.get(commit.id):
        parts.append("(" + ", ".join(decorations[commit.id]) + ")")
    step = step_of(commit)
    if step is not None:
        parts.append(f"step {printable(step)}")
    if commit.metrics:
        parts.append(metrics_text(commit, " "))
    if commit.message:
        parts.append(printable(commit.message))
    return " ".join(parts)
