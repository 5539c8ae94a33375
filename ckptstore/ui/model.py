"""The history that ``ckpt plot`` and ``ckpt ui`` draw, read once from a store.

:func:`load_history` reads every commit a branch or tag reaches (only reads: it never writes
to the store) and arranges them into *lines*: each branch's first-parent history back to
where it leaves a line drawn before it (its *fork point*), the default branch first. A
:class:`Retention` is what a policy would do to them, computed by gc's own dry run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..commit import Commit
from ..errors import CkptStoreError
from ..gc import DEFAULT_GRACE_PERIOD_S, GcPlan
from ..history import collect, newest_first
from ..records import demoted_commit_ids, dropped_components
from ..retention import Retention as RetentionPolicy
from ..store import Store
from ..tree import split_key_path


@dataclass(frozen=True)
class Node:
    """One commit as drawn: its history parents (across what gc collected), the refs that
    name it and the components gc dropped from it."""

    commit: Commit
    parents: tuple[str, ...]
    line: str
    branches: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.commit.id

    @property
    def step(self) -> float | None:
        """``metadata.step`` where it is a finite number, else ``None``."""
        step = self.commit.metadata.get("step") if isinstance(self.commit.metadata, dict) else None
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
            return None
        return step


@dataclass(frozen=True)
class Line:
    """A branch's own commits, oldest first, and the commit of another line it leaves from
    (``None`` for a line whose history starts on its own). ``kind`` is ``branch`` or ``tag``
    (a tag that reaches commits no branch does)."""

    name: str
    kind: str
    ids: tuple[str, ...]
    fork: str | None = None


@dataclass(frozen=True)
class Point:
    """One plotted value: a commit's metric at its step."""

    commit_id: str
    step: float
    value: float


@dataclass(frozen=True)
class Retention:
    """What a policy would do to each commit (``keep``, ``demote`` or ``delete``), and the
    bytes its collection would free: :meth:`Store.gc`'s dry run, which changes nothing."""

    plan: GcPlan
    outcome: dict[str, str]

    @property
    def freed_bytes(self) -> int:
        return self.plan.planned_bytes


@dataclass
class History:
    """Every commit a ref reaches, newest first (children before parents), in lines."""

    nodes: dict[str, Node]
    lines: list[Line]
    branches: dict[str, str]
    tags: dict[str, str]
    default_branch: str
    best_metric: str
    retention: Retention | None = None
    _metrics: list[str] = field(default_factory=list)

    @property
    def best(self) -> str | None:
        return self.tags.get("best")

    def fork_points(self) -> set[str]:
        return {line.fork for line in self.lines if line.fork is not None}

    def metric_names(self) -> list[str]:
        """Every metric some commit logged, the store's ``best_metric`` first."""
        if not self._metrics:
            names = {name for node in self.nodes.values() for name in node.commit.metrics}
            self._metrics = sorted(names, key=lambda n: (n != self.best_metric, n))
        return self._metrics

    def points(self, metric: str, line: Line) -> list[Point]:
        """``line``'s commits that logged ``metric`` at a step, from its fork point on."""
        ids = ((line.fork,) if line.fork is not None else ()) + line.ids
        out = []
        for cid in ids:
            node = self.nodes[cid]
            value = node.commit.metrics.get(metric)
            if node.step is not None and isinstance(value, (int, float)) and math.isfinite(value):
                out.append(Point(cid, node.step, float(value)))
        return out

    def outcome(self, commit_id: str) -> str | None:
        """``keep``, ``demote`` or ``delete`` under the retention previewed, else ``None``."""
        return self.retention.outcome.get(commit_id) if self.retention else None


def load_history(store: Store, *, lines: Iterable[str] | None = None) -> History:
    """Read the history of every branch and tag (or, with ``lines``, of those revisions:
    branch or tag names, or any revision, drawn as a line named as given)."""
    branches, tags = store.branches(), store.tags()
    heads = _heads(store, branches, tags, lines)
    commits, parents = reachable(store, heads.values())
    order = newest_first(parents, lambda cid: commits[cid].created_at.timestamp())
    demoted = demoted_commit_ids(store.objects)
    line_of: dict[str, str] = {}
    drawn: list[Line] = []
    for name, head in heads.items():
        ids: list[str] = []
        cid: str | None = head
        while cid is not None and cid in commits and cid not in line_of:
            line_of[cid] = name
            ids.append(cid)
            cid = parents[cid][0] if parents[cid] else None
        if ids:
            drawn.append(
                Line(
                    name,
                    "tag" if name not in branches and name in tags else "branch",
                    tuple(reversed(ids)),
                    cid if cid in commits else None,
                )
            )
    names_at: dict[str, list[str]] = {}
    for name, cid in branches.items():
        names_at.setdefault(cid, []).append(name)
    tags_at: dict[str, list[str]] = {}
    for name, cid in tags.items():
        tags_at.setdefault(cid, []).append(name)
    nodes = {
        cid: Node(commits[cid], tuple(parents[cid]), line_of.get(cid, ""), tuple(sorted(names_at.get(cid, ()))), tuple(sorted(tags_at.get(cid, ()))),
                  dropped_components(store.objects, cid) if cid in demoted else ())
        for cid in order
    }  # fmt: skip
    return History(nodes, drawn, branches, tags, store.config.default_branch, store.config.best_metric)


def _heads(store: Store, branches: Mapping[str, str], tags: Mapping[str, str], lines: Iterable[str] | None) -> dict[str, str]:
    """Line name → head commit, in drawing order: the default branch, the other branches,
    then tags (which draw only what no branch reaches)."""
    if lines is not None:
        return {name: store.resolve(name) for name in dict.fromkeys(lines)}
    default = store.config.default_branch
    ordered = sorted(branches, key=lambda n: (n != default, n))
    return {name: branches[name] for name in ordered} | {f"tag: {name}": cid for name, cid in sorted(tags.items())}


def reachable(store: Store, heads: Iterable[str]) -> tuple[dict[str, Commit], dict[str, list[str]]]:
    """The commits ``heads`` reach and their parents as history follows them; a commit that
    cannot be read (collected by a gc running meanwhile) ends its line of history."""

    def read(cid: str) -> tuple[Commit, list[str]] | None:
        try:
            commit = store.get_commit(cid)
        except CkptStoreError:
            return None
        return commit, store.parents_of(commit)

    return collect(heads, read)


def preview_retention(store: Store, history: History, retention: RetentionPolicy, *, grace_period_s: float = DEFAULT_GRACE_PERIOD_S) -> Retention:
    """What gc would do under ``retention``, by its own dry run (nothing is written), set on
    ``history`` and returned."""
    plan = store.gc(retention, dry_run=True, grace_period_s=grace_period_s)
    outcome = {cid: "keep" for cid in plan.kept_commits}
    outcome.update({cid: "demote" for cid in plan.newly_demoted})
    outcome.update({cid: "delete" for cid in plan.removed_commits})
    history.retention = Retention(plan, outcome)
    return history.retention


def component_of(path: str) -> str:
    """The component a tensor belongs to: the first key of its path (``model``)."""
    keys = split_key_path(path)
    return str(keys[0]) if keys else ""


def graph_layout(history: History) -> dict[str, tuple[int, int]]:
    """Commit id → (row, column) for drawing the graph: a row per commit, newest first; a
    column per line of history that is open at that row, as ``ckpt log --graph`` lays it."""
    lanes: list[str | None] = []
    out: dict[str, tuple[int, int]] = {}
    for row, (cid, node) in enumerate(history.nodes.items()):
        mine = [i for i, lane in enumerate(lanes) if lane == cid]
        if not mine:
            lanes.append(cid)
            mine = [len(lanes) - 1]
        col = mine[0]
        for i in mine[1:]:
            lanes[i] = None
        out[cid] = (row, col)
        lanes[col] = node.parents[0] if node.parents else None
        lanes.extend(node.parents[1:])
        while lanes and lanes[-1] is None:
            lanes.pop()
    return out


def describe(node: Node, metrics: Mapping[str, Any] | None = None) -> str:
    """One line naming a commit: short id, branch, step and metrics (a point's hover text)."""
    parts = [node.id[:12], f"on {node.commit.branch}"]
    if node.step is not None:
        parts.append(f"step {node.step:g}")
    parts += [f"{k}={v:.6g}" for k, v in sorted((metrics if metrics is not None else node.commit.metrics).items())]
    return " ".join(parts)
