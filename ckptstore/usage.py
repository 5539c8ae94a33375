"""Disk usage: logical against physical bytes, per store, branch and commit (``ckpt du``).

*Logical* bytes are what the commits would take as plain files (every tensor's bytes, each
commit counted in full). *Physical* bytes are what the object store holds. The dedup ratio
is logical bytes over the raw bytes of the distinct chunks; the compression ratio is those
raw bytes over the chunks' stored bytes.

Chunks stored raw (``compression_level=None``, or an encoder that chose speed) are what
:func:`~ckptstore.repack.repack` can shrink. A raw chunk is told by its size alone (its object
is the raw bytes and a header), and what repack would make of them is estimated from one
64 KiB sample (the middle of the chunk) of each of up to :data:`REPACK_SAMPLE_CHUNKS` of
them, spread evenly by id, encoded as repack encodes, scaled to all their bytes.

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

from .backends import ObjectStore
from .codec import HEADER_SIZE
from .commit import Commit
from .errors import CollectedWhileReading, IntegrityError, ObjectNotFound
from .history import ancestors
from .inventory import Repository, list_objects, manifest_chunks, stored_needs
from .layout import CONFIG_KEY, STORE_PREFIXES, chunk_key, commit_key, id_of, kind_of, manifest_key
from .pipeline import value_bytes
from .refs import RefKind
from .repack import DEFAULT_REPACK_LEVEL, encoded_for_repack

log = logging.getLogger("ckptstore.usage")

T = TypeVar("T")

#: How often a read that a collector races is tried, and the first pause between tries
#: (doubling each time).
READ_ATTEMPTS = 5
FIRST_RETRY_PAUSE_S = 0.05
#: Raw chunks read (64 KiB each) to estimate what repack would save.
REPACK_SAMPLE_CHUNKS = 64
REPACK_SAMPLE_BYTES = 64 << 10


@dataclass(frozen=True)
class CommitUsage:
    id: str
    logical_bytes: int
    #: Stored bytes this commit added when it was made.
    new_bytes: int
    #: Stored bytes of the objects no other commit needs (what removing it would free).
    exclusive_bytes: int
    #: Of ``new_bytes``, what is not tensor data (see :class:`~ckptstore.commit.CommitStats`;
    #: ``None`` for a commit written before it was recorded).
    new_metadata_bytes: int | None = None


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
    #: Chunks the commits need that are stored raw, and their stored bytes.
    raw_chunks: int = 0
    raw_chunk_bytes: int = 0
    #: About what those chunks would take once repacked (estimated from samples of
    #: ``repack_sampled_chunks`` of them).
    repack_estimate_bytes: int = 0
    repack_sampled_chunks: int = 0

    @property
    def repack_saving_bytes(self) -> int:
        """About how many bytes ``repack`` would free."""
        return self.raw_chunk_bytes - self.repack_estimate_bytes

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_raw_bytes if self.unique_raw_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_raw_bytes / self.chunk_stored_bytes if self.chunk_stored_bytes else 1.0


def store_sizes(objects: ObjectStore) -> dict[str, int]:
    """Key → stored size of every object of the store's own (:data:`STORE_PREFIXES` and
    ``config``), listed in the reverse of write order; nothing else under its root."""
    sizes = {key: info.size_bytes for key, info in list_objects(objects, STORE_PREFIXES).items()}
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
        raise CollectedWhileReading(f"collected while reading: a garbage collector removed commit {commit_id[:12]} while it was read", key=exc.key) from exc


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
        kind = kind_of(key)
        count, total = usage.objects.get(kind, (0, 0))
        usage.objects[kind] = (count + 1, total + size)
        usage.physical_bytes += size

    commits: dict[str, Commit] = {}
    needs: dict[str, set[str]] = {}
    raw_sizes: dict[str, int] = {}
    first_user: dict[str, str] = {}  # chunk key → a commit that needs it
    for cid in repo.catalog.commit_ids():  # those stored and indexed: a damaged commit is not
        if commit_key(cid) not in sizes:
            continue
        with reading_commit(repo, cid):
            commit = repo.get_commit(cid)  # verified: not the catalog's column
            chunks = manifest_chunks(repo, commit)
            if manifest_key(commit.manifest) not in sizes:  # listed after its commit: removed since
                raise IntegrityError("manifest object is missing", key=manifest_key(commit.manifest))
        commits[cid] = commit
        keys = stored_needs(repo, commit, sizes)  # a demoted commit's dropped chunks are gone
        for chunk_id, size in chunks.items():
            key = chunk_key(chunk_id)
            if key in keys:
                raw_sizes[key] = size
                first_user.setdefault(key, cid)
        needs[cid] = keys
    users: dict[str, int] = {}
    for keys in needs.values():
        for key in keys:
            users[key] = users.get(key, 0) + 1
    usage.unique_raw_bytes = sum(raw_sizes.values())
    usage.chunk_stored_bytes = sum(sizes[key] for key in raw_sizes)
    _estimate_repack(repo, usage, {k: n for k, n in raw_sizes.items() if sizes[k] == n + HEADER_SIZE}, {k: commits[c] for k, c in first_user.items()})
    for cid, keys in needs.items():
        commit = commits[cid]
        usage.logical_bytes += commit.stats.logical_bytes
        exclusive = sum(sizes[k] for k in keys if users[k] == 1)
        usage.commits.append(CommitUsage(cid, commit.stats.logical_bytes, commit.stats.new_bytes, exclusive, commit.stats.new_metadata_bytes))
    usage.commits.sort(key=lambda c: commits[c.id].created_at, reverse=True)

    for name, head in sorted(heads.items()):
        if commit_key(head) not in sizes and repo.refs.get(RefKind.BRANCH, name) != head:
            raise CollectedWhileReading(
                f"collected while reading: branch {name} moved on and a garbage collector removed its head {head[:12]}",
                key=commit_key(head),
            )  # (a head that a ref still names is missing for good: damage, which fsck reports)
        history = ancestors([head], lambda c: repo.parents_of(commits[c]) if c in commits else None)
        keys = set().union(*(needs[c] for c in history)) if history else set()
        usage.branches.append(BranchUsage(name, len(history), sum(commits[c].stats.logical_bytes for c in history), sum(sizes[k] for k in keys)))
    return usage


def _estimate_repack(repo: Repository, usage: Usage, raw_chunks: dict[str, int], users: dict[str, Commit]) -> None:
    """Fill in the raw chunks' bytes and what repack would make of them (see the module's
    docstring). ``raw_chunks``: key → raw size of each chunk stored raw; ``users``: key → a
    commit that needs it (its manifest says what values the chunk holds)."""
    usage.raw_chunks = len(raw_chunks)
    usage.raw_chunk_bytes = sum(n + HEADER_SIZE for n in raw_chunks.values())
    keys = sorted(raw_chunks)
    picked = [keys[i * len(keys) // REPACK_SAMPLE_CHUNKS] for i in range(REPACK_SAMPLE_CHUNKS)] if len(keys) > REPACK_SAMPLE_CHUNKS else keys
    level = repo.config.compression_level if repo.config.compression_level is not None else DEFAULT_REPACK_LEVEL
    groups: dict[str, dict[str, int]] = {}  # manifest id → chunk id → value size
    sampled_raw = sampled_stored = 0
    for key in dict.fromkeys(picked):
        commit = users[key]
        if commit.manifest not in groups:
            with reading_commit(repo, commit.id):
                manifest = repo.manifest_of(commit)
            by_blob = value_bytes(manifest)
            groups[commit.manifest] = {ref.id: by_blob.get(i, 1) for i, blob in enumerate(manifest.blobs) for ref in blob.chunks}
        group = groups[commit.manifest].get(id_of(key), 1)
        size = raw_chunks[key]
        n = min(size, REPACK_SAMPLE_BYTES) // 8 * 8 or size
        start = (size - n) // 2 // 8 * 8
        try:
            sample = repo.objects.get_range(key, HEADER_SIZE + start, HEADER_SIZE + start + n)
        except ObjectNotFound:
            continue  # collected meanwhile
        _, parts = encoded_for_repack(sample, group_bytes=group, compression_level=level)
        sampled_raw += len(sample)
        sampled_stored += sum(len(p) for p in parts) - HEADER_SIZE
        usage.repack_sampled_chunks += 1
    ratio = sampled_stored / sampled_raw if sampled_raw else 1.0
    usage.repack_estimate_bytes = sum(round(n * ratio) + HEADER_SIZE for n in raw_chunks.values())


def _ref_targets(repo: Repository) -> set[str]:
    return {cid for kind in RefKind for cid in repo.refs.list(kind).values()}
