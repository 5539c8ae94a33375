"""Disk usage: logical against physical bytes, per store, branch and commit (``ckpt du``).

*Logical* bytes are what the commits would take as plain files (every tensor's bytes, each
commit counted in full). *Physical* bytes are what the object store holds. The dedup ratio
is logical bytes over the raw bytes of the distinct chunks; the compression ratio is those
raw bytes over the chunks' stored bytes.

Only the store's own keys count (``docs/design.md``, "Store layout"): another store nested in
its directory, or a user's file beside its objects, is not the store's. A collector in
another process may remove commits while they are read; :func:`read_racing_collector` starts
such a read over, and tells that from damage (:func:`reading_commit`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from .commit import Commit
from .errors import CollectedWhileReading, IntegrityError, ObjectNotFound
from .gc import STORE_PREFIXES, Repository, chunk_key, commit_key, manifest_chunks, manifest_key
from .objectstore import ObjectStore
from .refs import RefKind

log = logging.getLogger("ckptstore.usage")

T = TypeVar("T")

CONFIG_KEY = "config"
#: How often a read that a collector races is tried, and the first pause between tries
#: (doubling each time).
READ_ATTEMPTS = 5
FIRST_RETRY_PAUSE_S = 0.05


@dataclass(frozen=True)
class CommitUsage:
    id: str
    logical_bytes: int
    #: Stored bytes this commit added when it was made.
    new_bytes: int
    #: Stored bytes of the objects no other commit needs (what removing it would free).
    exclusive_bytes: int


@dataclass(frozen=True)
class BranchUsage:
    name: str
    commits: int
    logical_bytes: int
    #: Stored bytes of every object the branch's history needs.
    physical_bytes: int


@dataclass
class Usage:
    """The result of :meth:`Store.du`."""

    physical_bytes: int = 0
    #: Object count and stored bytes per kind (``chunks``, ``manifests``, ``commits``, ``refs``…).
    objects: dict[str, tuple[int, int]] = field(default_factory=dict)
    logical_bytes: int = 0
    unique_raw_bytes: int = 0
    chunk_stored_bytes: int = 0
    branches: list[BranchUsage] = field(default_factory=list)
    commits: list[CommitUsage] = field(default_factory=list)

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_raw_bytes if self.unique_raw_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_raw_bytes / self.chunk_stored_bytes if self.chunk_stored_bytes else 1.0


def store_sizes(objects: ObjectStore) -> dict[str, int]:
    """Key → stored size of every object of the store's own (:data:`STORE_PREFIXES` and
    ``config``), listed in the reverse of write order; nothing else under its root."""
    sizes = {info.key: info.size_bytes for prefix in STORE_PREFIXES for info in objects.list_info(prefix)}
    with contextlib.suppress(ObjectNotFound):
        sizes[CONFIG_KEY] = objects.size(CONFIG_KEY)
    return sizes


@contextlib.contextmanager
def reading_commit(repo: Repository, commit_id: str) -> Iterator[None]:
    """Reads of what commit ``commit_id`` needs. An object found missing or unreadable is
    damage, and its error stands, while the commit is still stored (a collector deletes a
    commit before anything it needs) or a ref, read again, still names it (a collector keeps
    every ref's target). Otherwise a collector removed the commit meanwhile:
    :class:`CollectedWhileReading`, which :func:`read_racing_collector` starts over from."""
    try:
        yield
    except (IntegrityError, ObjectNotFound) as exc:
        if repo.objects.exists(commit_key(commit_id)) or commit_id in _ref_targets(repo):
            raise
        raise CollectedWhileReading(
            f"collected while reading: a garbage collector removed commit {commit_id[:12]} while it was read", key=exc.key
        ) from exc


def read_racing_collector(read: Callable[[], T]) -> T:
    """``read()``, a read that starts from the refs, started over (with a growing pause) each
    time it raises :class:`CollectedWhileReading`: read again from the refs, it no longer
    needs what the collector removed. After :data:`READ_ATTEMPTS` tries the last such error
    stands."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return read()
        except CollectedWhileReading as exc:
            if attempt + 1 == READ_ATTEMPTS:
                raise
            log.debug("%s; reading again", exc)
            time.sleep(FIRST_RETRY_PAUSE_S * 2**attempt)
    raise AssertionError("unreachable")


def measure(repo: Repository) -> Usage:
    """Measure the store (lists its own objects once; each commit and manifest is read and
    verified, the catalog only says which commits there are). Read-only; started over while
    a collector in another process removes what it reads (:func:`read_racing_collector`)."""
    return read_racing_collector(lambda: _measure(repo))


def _measure(repo: Repository) -> Usage:
    repo.sync_catalog()
    heads = repo.refs.list(RefKind.BRANCH)  # before listing: a head is listed unless collected since
    sizes = store_sizes(repo.objects)
    usage = Usage()
    for key, size in sizes.items():
        kind = key.split("/", 1)[0]
        count, total = usage.objects.get(kind, (0, 0))
        usage.objects[kind] = (count + 1, total + size)
        usage.physical_bytes += size

    commits: dict[str, Commit] = {}
    needs: dict[str, set[str]] = {}
    raw_sizes: dict[str, int] = {}
    for cid in repo.catalog.commit_ids():  # those stored and indexed: a damaged commit is not
        if commit_key(cid) not in sizes:
            continue
        with reading_commit(repo, cid):
            commit = repo.get_commit(cid)  # verified: not the catalog's column
            chunks = manifest_chunks(repo, commit)
            if manifest_key(commit.manifest) not in sizes:  # listed after its commit: removed since
                raise IntegrityError("manifest object is missing", key=manifest_key(commit.manifest))
        commits[cid] = commit
        keys = {commit_key(cid), manifest_key(commit.manifest)}
        for chunk_id, size in chunks.items():
            key = chunk_key(chunk_id)
            if key in sizes:  # a demoted commit's dropped chunks are gone
                keys.add(key)
                raw_sizes[key] = size
        needs[cid] = keys
    users: dict[str, int] = {}
    for keys in needs.values():
        for key in keys:
            users[key] = users.get(key, 0) + 1
    usage.unique_raw_bytes = sum(raw_sizes.values())
    usage.chunk_stored_bytes = sum(sizes[key] for key in raw_sizes)
    for cid, keys in needs.items():
        commit = commits[cid]
        usage.logical_bytes += commit.stats.logical_bytes
        exclusive = sum(sizes[k] for k in keys if users[k] == 1)
        usage.commits.append(CommitUsage(cid, commit.stats.logical_bytes, commit.stats.new_bytes, exclusive))
    usage.commits.sort(key=lambda c: commits[c.id].created_at, reverse=True)

    for name, head in sorted(heads.items()):
        if commit_key(head) not in sizes and repo.refs.get(RefKind.BRANCH, name) != head:
            raise CollectedWhileReading(
                f"collected while reading: branch {name} moved on and a garbage collector removed its head {head[:12]}", key=commit_key(head)
            )  # (a head that a ref still names is missing for good: damage, which fsck reports)
        history = _ancestors(repo, head, commits)
        keys = set().union(*(needs[c] for c in history)) if history else set()
        usage.branches.append(
            BranchUsage(name, len(history), sum(commits[c].stats.logical_bytes for c in history), sum(sizes[k] for k in keys))
        )
    return usage


def _ref_targets(repo: Repository) -> set[str]:
    return {cid for kind in RefKind for cid in repo.refs.list(kind).values()}


def _ancestors(repo: Repository, head: str, commits: dict[str, Commit]) -> list[str]:
    """``head`` and its ancestors along the parents history follows, those measured."""
    seen: list[str] = []
    stack = [head]
    visited = set()
    while stack:
        cid = stack.pop()
        if cid in visited or cid not in commits:
            continue
        visited.add(cid)
        seen.append(cid)
        stack.extend(repo.parents_of(commits[cid]))
    return seen
