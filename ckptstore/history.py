"""History: commits' parents as history follows them across what GC removed, and the walks
over them (ancestors, reachability, nearest kept ancestors).

Where GC removed a commit's parents it wrote a ``shallow/ID`` record naming the commit's
nearest kept ancestors (:mod:`ckptstore.records`): those are its parents from then on, as
grafts are in git. Every walk here reads only the parent map it is given; it never reads the
store, and visits each commit once whatever the shape of the graph (merges, cycles in a
damaged store).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Container, Iterable, Mapping

from .backends import ObjectStore
from .commit import Commit
from .errors import IntegrityError
from .layout import shallow_key
from .records import grafted_parents


def effective_parents(objects: ObjectStore, commit: Commit, *, exists: Callable[[str], bool], grafted: Callable[[str], bool]) -> list[str]:
    """A commit's parents as history follows them: the nearest kept ancestors GC recorded
    for it, if it has a ``shallow/`` record (``grafted``: whether it is known to), else its
    own parents that exist. A commit with a missing parent is looked up for a record anyway,
    in case a collector wrote one since ``grafted`` was known."""
    if grafted(commit.id) or not all(exists(p) for p in commit.parents):
        found = grafted_parents(objects, commit.id)
        if found is not None:
            return found[0]
    return [p for p in commit.parents if exists(p)]


def recorded_parents(objects: ObjectStore, commits: Mapping[str, Commit], *, listed: Container[str]) -> tuple[dict[str, list[str]], dict[str, IntegrityError]]:
    """Every commit's own parents, or the grafts of those with a shallow record in ``listed``
    (object keys), missing parents kept (what fsck checks); and the records that could not
    be read, by commit id (their commits keep their own parents)."""
    parents: dict[str, list[str]] = {}
    damaged: dict[str, IntegrityError] = {}
    for cid, commit in commits.items():
        parents[cid] = list(commit.parents)
        if shallow_key(cid) in listed:
            try:
                found = grafted_parents(objects, cid)
            except IntegrityError as exc:
                damaged[cid] = exc
            else:
                parents[cid] = found[0] if found is not None else parents[cid]
    return parents, damaged


def ancestors(heads: Iterable[str], parents_of: Callable[[str], Iterable[str] | None]) -> list[str]:
    """Every commit reachable from ``heads`` (themselves included), each once, in the order a
    depth-first walk reaches them. ``parents_of(id)`` is ``None`` for a commit outside the
    history walked (missing, unreadable): it is neither listed nor followed."""
    seen: set[str] = set()
    out: list[str] = []
    stack = list(heads)[::-1]
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        parents = parents_of(cid)
        if parents is None:
            continue
        seen.add(cid)
        out.append(cid)
        stack.extend(parents)
    return out


def reachable(heads: Iterable[str], parents: Mapping[str, list[str]]) -> set[str]:
    """The commits of ``parents`` that ``heads`` reach."""
    return set(ancestors(heads, parents.get))


def nearest_kept(start: list[str], kept: Container[str], parents: Mapping[str, list[str]]) -> list[str]:
    """For each of ``start`` in order: itself if kept (or unknown: a missing commit is fsck's
    business), else its nearest kept ancestors. What GC grafts onto a kept commit whose
    parents it removes."""
    out: list[str] = []
    seen: set[str] = set()
    stack = list(reversed(start))
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        seen.add(cid)
        if cid in kept or cid not in parents:
            out.append(cid)
        else:
            stack.extend(reversed(parents[cid]))
    return out


def collect(heads: Iterable[str], read: Callable[[str], tuple[Commit, list[str]] | None]) -> tuple[dict[str, Commit], dict[str, list[str]]]:
    """The commits ``heads`` reach and their parents, as ``read(id)`` gives them (``None``
    for a commit that cannot be read, e.g. one a collection removed meanwhile: that line of
    history ends there). Parents outside the result are dropped, so every parent is a key."""
    commits: dict[str, Commit] = {}
    parents: dict[str, list[str]] = {}

    def parents_of(cid: str) -> list[str] | None:
        found = read(cid)
        if found is None:
            return None
        commits[cid], parents[cid] = found
        return parents[cid]

    ancestors(heads, parents_of)
    for found in parents.values():
        found[:] = [p for p in found if p in commits]
    return commits, parents


def newest_first(parents: Mapping[str, Iterable[str]], created_at: Callable[[str], float]) -> list[str]:
    """The commits of ``parents`` newest first by ``created_at``, never a parent before its
    child (ties: by id, so the order is the same on every call)."""
    children = dict.fromkeys(parents, 0)
    for cid in parents:
        for p in parents[cid]:
            children[p] += 1
    ready = [(-created_at(c), c) for c, n in children.items() if n == 0]
    heapq.heapify(ready)
    out: list[str] = []
    while ready:
        _, cid = heapq.heappop(ready)
        out.append(cid)
        for p in parents[cid]:
            children[p] -= 1
            if children[p] == 0:
                heapq.heappush(ready, (-created_at(p), p))
    return out
