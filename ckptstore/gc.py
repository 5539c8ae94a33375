"""Garbage collection: apply a retention policy, then delete what nothing kept needs.

Plan, then execute (as restic's prune). Planning reads and never writes: it lists the store,
evaluates the policy on every branch's history and works out which commits go, which are
demoted (keep their id, lose some components), and which objects nothing kept needs.
Execution then, holding the collector lease (:mod:`ckptstore.lease`):

1. writes a ``shallow/ID`` record for every kept commit whose parent goes, naming its
   nearest kept ancestors (its parents from now on, so the history of what is kept stays
   connected across the gap, as grafts in git), and a ``demotions/ID`` record for every
   demoted commit (what it no longer holds);
2. deletes in the reverse of write order, commits → records → manifests → chunks, a delta
   chunk before its bases, in batches that never mix kinds or chain lengths. Before each
   batch it marks the lease *sweeping*, waits until no writer is live, and re-reads the refs
   and the commit list: a commit made, or a ref set, since planning protects everything it
   needs.

Never deleted: anything younger than ``grace_period_s`` (by the storage's clock), the bases
of a chunk that stays, the config, refs and the lease. A live writer's marker protects its
commit whatever the grace period. A kill at any moment leaves every kept commit whole, and no
object without what it needs (records are written before anything they describe is deleted,
and dependents go first); a rerun finishes the job.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from .catalog import Catalog
from .commit import Commit
from .errors import (
    CkptStoreError,
    CollectorBusy,
    IntegrityError,
    InvalidOption,
    ObjectNotFound,
    PolicyMatchesNothing,
    PreconditionFailed,
    StorageError,
    UnsupportedFormat,
)
from .ids import is_full_id
from .lease import (
    DEFAULT_LEASE_TTL_S,
    LEGACY_RECORD_TTL_S,
    CollectorLease,
    decode_record,
    encode_record,
    remove_dead_writers,
    storage_now,
    writers,
)
from .manifest import Manifest, path_under
from .backends import ObjectInfo, ObjectStore
from .pipeline import ChunkReader, Progress, chunk_key
from .refs import RefKind, RefStore
from .retention import CommitInfo, Policy, Retention, policy_for

log = logging.getLogger("ckptstore.gc")

DEFAULT_GRACE_PERIOD_S = 3600.0
#: How long the marker of a writer from before markers carried a ttl of their own (ckptstore
#: 0.1) protects its commit; and the age past which temp files are abandoned uploads.
DEFAULT_WRITER_TIMEOUT_S = LEGACY_RECORD_TTL_S

#: Prefixes of the objects GC may delete, in deletion order (the reverse of write order).
#: Chunks go in descending order of their delta chain's length, so that a delta is always
#: deleted before its bases.
DELETION_ORDER = ("commits/", "shallow/", "demotions/", "manifests/", "chunks/")
#: Every prefix the store's objects live under (besides ``config``), in the reverse of write
#: order: GC and ``du`` touch nothing else (a store's directory may hold other files, or
#: another store), and a listing in this order that shows a commit shows its manifest and
#: chunks too, unless a collector removed it meanwhile.
STORE_PREFIXES = (*DELETION_ORDER, "refs/", "locks/")


def commit_key(commit_id: str) -> str:
    return f"commits/{commit_id[:2]}/{commit_id}"


def manifest_key(manifest_id: str) -> str:
    return f"manifests/{manifest_id[:2]}/{manifest_id}"


def demotion_key(commit_id: str) -> str:
    return f"demotions/{commit_id}"


def shallow_key(commit_id: str) -> str:
    return f"shallow/{commit_id}"


#: Demotion and shallow records list commit ids and key paths: larger than the lease's.
MAX_GC_RECORD_BYTES = 1 << 20


def _read_record(objects: ObjectStore, key: str) -> tuple[dict, str] | None:
    try:
        data, version = objects.get_versioned(key)
    except ObjectNotFound:
        return None
    return decode_record(data, key, max_raw_size=MAX_GC_RECORD_BYTES), version


def dropped_components(objects: ObjectStore, commit_id: str) -> tuple[str, ...]:
    """The key-path prefixes GC dropped from a demoted commit (empty if it is whole)."""
    found = _read_record(objects, demotion_key(commit_id))
    if found is None:
        return ()
    prefixes = found[0].get("dropped")
    if not isinstance(prefixes, list) or not all(isinstance(p, str) and p for p in prefixes):
        raise IntegrityError("malformed demotion record", key=demotion_key(commit_id))
    return tuple(prefixes)


def demoted_commit_ids(objects: ObjectStore) -> set[str]:
    """The ids of every commit with a demotion record (one listing: cheaper than reading
    each commit's record where few commits are demoted)."""
    return {key.rsplit("/", 1)[-1] for key in objects.list(demotion_key(""))}


def record_demotion(objects: ObjectStore, commit_id: str, prefixes: Iterable[str]) -> tuple[str, ...]:
    """Add ``prefixes`` to what commit ``commit_id`` no longer holds (compare-and-swap,
    retried). Idempotent. Returns the whole set."""
    key = demotion_key(commit_id)
    for attempt in range(100):
        if attempt:
            time.sleep(min(0.5, 0.01 * 2**attempt))  # a writer (or a dead one's lock) holds it
        found = _read_record(objects, key)
        current = () if found is None else dropped_components(objects, commit_id)
        merged = tuple(sorted(set(current) | set(prefixes)))
        if merged == tuple(sorted(current)) and found is not None:
            return merged
        try:
            objects.put_if_version(key, encode_record({"dropped": list(merged), "at_s": time.time()}), version=None if found is None else found[1])
            return merged
        except PreconditionFailed:
            continue
    raise CollectorBusy(f"demotion record {key} kept changing under the collector")


def grafted_parents(objects: ObjectStore, commit_id: str) -> tuple[list[str], str] | None:
    """The parents GC gave this commit when it removed some of its own (its nearest kept
    ancestors; empty where the history ends) and the record's version; ``None`` if GC never
    removed a parent of it."""
    found = _read_record(objects, shallow_key(commit_id))
    if found is None:
        return None
    parents = found[0].get("parents")
    if not isinstance(parents, list) or not all(isinstance(p, str) and is_full_id(p) for p in parents):
        raise IntegrityError("malformed shallow record", key=shallow_key(commit_id))
    return parents, found[1]


def record_grafts(objects: ObjectStore, commit_id: str, parents: list[str]) -> None:
    """Set the parents of a commit whose own parents GC removes (compare-and-swap, retried).
    Idempotent."""
    key = shallow_key(commit_id)
    for attempt in range(100):
        if attempt:
            time.sleep(min(0.5, 0.01 * 2**attempt))
        current = grafted_parents(objects, commit_id)
        if current is not None and current[0] == parents:
            return
        try:
            objects.put_if_version(key, encode_record({"parents": parents, "at_s": time.time()}), version=None if current is None else current[1])
            return
        except PreconditionFailed:
            continue
    raise CollectorBusy(f"shallow record {key} kept changing under the collector")


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


def unreferenced_since(repo: Repository, *, since_s: float) -> list[ObjectInfo]:
    """The manifests and chunks stored at or after ``since_s`` (by the storage's clock) that
    no commit references: what an interrupted or killed writer left behind, for a
    collection after the grace period to reclaim. Reads only the commits made since."""
    objects = repo.objects
    fresh = [info for prefix in ("manifests/", "chunks/") for info in objects.list_info(prefix) if info.modified_s >= since_s]
    if not fresh:
        return []
    referenced: set[str] = set()
    for info in objects.list_info("commits/"):
        if info.modified_s < since_s:
            continue  # an older commit's chunks were stored before (but for one repaired in place since)
        try:
            commit = repo.get_commit(info.key.rsplit("/", 1)[-1])
            referenced.add(manifest_key(commit.manifest))
            referenced.update(chunk_key(c) for c in manifest_chunks(repo, commit))
        except CkptStoreError:  # unreadable, or collected meanwhile: it references nothing
            continue
    return [info for info in fresh if info.key not in referenced]


class Repository(Protocol):
    """What the collector and fsck need of a store."""

    objects: ObjectStore
    refs: RefStore
    catalog: Catalog
    config: Any  # StoreConfig: best_metric, greater_is_better

    def get_commit(self, commit_id: str) -> Commit: ...

    def read_commit(self, commit_id: str) -> Commit: ...

    def manifest_of(self, commit: Commit) -> Manifest: ...

    def sync_catalog(self) -> None: ...

    def parents_of(self, commit: Commit) -> list[str]: ...


def manifest_chunks(repo: Repository, commit: Commit) -> dict[str, int]:
    """Chunk id → raw size for every chunk a commit's manifest uses, delta bases included. From the
    manifest itself (verified against its id), never from the catalog: a damaged catalog
    must not make GC delete what a commit needs."""
    return _chunk_table(repo, commit)[0]


def manifest_chains(repo: Repository, commit: Commit) -> dict[str, tuple[str, ...]]:
    """Chunk id → its delta chain (bases, nearest first) for every chunk a commit's manifest
    uses, bases included (see :meth:`Manifest.chunk_chains`)."""
    return _chunk_table(repo, commit)[1]


def _chunk_table(repo: Repository, commit: Commit) -> tuple[dict[str, int], dict[str, tuple[str, ...]]]:
    """A manifest's chunk sizes and chains. A manifest is named by its content, so the answer
    for an id never changes: recent answers are remembered (any store)."""
    manifest_id = commit.manifest
    with _CHUNK_TABLES_LOCK:
        if manifest_id in _CHUNK_TABLES:
            _CHUNK_TABLES.move_to_end(manifest_id)
            return _CHUNK_TABLES[manifest_id]
    manifest = repo.manifest_of(commit)
    table = (manifest.chunk_sizes(), manifest.chunk_chains())
    with _CHUNK_TABLES_LOCK:
        _CHUNK_TABLES[manifest_id] = table
        while len(_CHUNK_TABLES) > 256:
            _CHUNK_TABLES.popitem(last=False)
    return table


_CHUNK_TABLES: OrderedDict[str, tuple[dict[str, int], dict[str, tuple[str, ...]]]] = OrderedDict()
_CHUNK_TABLES_LOCK = threading.Lock()


def kept_chunks(manifest: Manifest, dropped: Iterable[str]) -> set[str]:
    """The chunks a manifest still needs once the components under ``dropped`` are gone (a
    blob stays if any tensor uses it at a key path outside them), delta bases included."""
    dropped = tuple(dropped)
    needed_blobs = {
        e.blob for e, paths in zip(manifest.tensors, manifest.key_paths)
        if any(not any(path_under(path, p) for p in dropped) for path in paths)  # a kept path holds it
    }  # fmt: skip
    return set(manifest.chunk_sizes(needed_blobs))


@dataclass
class GcPlan:
    """What a collection removes (``dry_run=True`` returns it unexecuted) and, once executed,
    what it did."""

    grace_period_s: float
    kept_commits: list[str] = field(default_factory=list)
    removed_commits: list[str] = field(default_factory=list)
    #: Commit id → every key-path prefix it no longer holds (earlier demotions included).
    demoted_commits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Commit id → the prefixes this collection drops that no earlier one did (what this
    #: run demotes; what the summary counts).
    newly_demoted: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Kept commits whose parents are removed → their nearest kept ancestors (their parents
    #: from now on; empty where the history ends).
    shallow_commits: dict[str, list[str]] = field(default_factory=dict)
    #: Objects to delete, in deletion order.
    deletions: list[ObjectInfo] = field(default_factory=list)
    #: Unneeded objects left alone because they are younger than the grace period.
    young_objects: int = 0
    #: Commit objects that could not be read; never deleted (see ``fsck``).
    unreadable_commits: list[str] = field(default_factory=list)
    #: Rules of the policy that match no commit at all (a collection refuses to run on them).
    warnings: list[str] = field(default_factory=list)
    executed: bool = False
    deleted_objects: int = 0
    freed_bytes: int = 0
    #: Objects spared at execution because a commit or ref made meanwhile needs them.
    spared_objects: int = 0
    elapsed_s: float = 0.0

    @property
    def planned_bytes(self) -> int:
        return sum(info.size_bytes for info in self.deletions)

    def counts(self) -> dict[str, int]:
        """Objects to delete per kind (``commits``, ``manifests``, ``chunks``…)."""
        out: dict[str, int] = {}
        for info in self.deletions:
            kind = info.key.split("/", 1)[0]
            out[kind] = out.get(kind, 0) + 1
        return out

    def summary(self) -> str:
        counts = ", ".join(f"{n} {kind}" for kind, n in self.counts().items()) or "nothing"
        head = (
            f"removed {len(self.removed_commits)} commits, demoted {len(self.newly_demoted)}, kept {len(self.kept_commits)}; "
            f"deleted {self.deleted_objects} objects ({self.freed_bytes:,} bytes)"
            if self.executed
            else f"would remove {len(self.removed_commits)} commits, demote {len(self.newly_demoted)}, keep {len(self.kept_commits)}; "
            f"would delete {counts} ({self.planned_bytes:,} bytes)"
        )
        if self.young_objects:
            head += f"; {self.young_objects} unneeded objects are younger than the grace period ({self.grace_period_s:g} s)"
        for warning in self.warnings:
            head += f"\nWARNING: {warning}; gc would refuse to run"
        return head


@dataclass
class _Snapshot:
    """What planning saw, kept for execution."""

    listing: dict[str, ObjectInfo]
    commits: dict[str, Commit]
    needed: set[str]
    parents: dict[str, list[str]]
    kept: set[str]
    #: Object key → the order it may be deleted in (kind, then longest delta chain first).
    rank: dict[str, tuple[int, int]] = field(default_factory=dict)


def plan(repo: Repository, retention: Retention, *, grace_period_s: float, now_s: float | None = None) -> tuple[GcPlan, _Snapshot]:
    """Work out a collection without writing anything. Without a retention policy every
    commit a branch or tag reaches is kept; with one, a tag keeps its own commit only."""
    objects = repo.objects
    now_s = objects.clock_s() if now_s is None else now_s  # the clock the store stamps ages with
    cutoff_s = now_s - grace_period_s
    result = GcPlan(grace_period_s=grace_period_s)
    # Refs first: a ref moves only after its commit is stored, so the listing holds every target.
    branches = repo.refs.list(RefKind.BRANCH)
    tags = repo.refs.list(RefKind.TAG)
    listing = {info.key: info for prefix in DELETION_ORDER for info in objects.list_info(prefix)}
    ref_targets = set(branches.values()) | set(tags.values())

    commits: dict[str, Commit] = {}
    for key in listing:
        if key.startswith("commits/"):
            commit_id = key.rsplit("/", 1)[-1]
            try:
                commits[commit_id] = repo.get_commit(commit_id)
            except (IntegrityError, UnsupportedFormat) as exc:
                log.warning("not collecting unreadable commit %s: %s", commit_id, exc)
                result.unreadable_commits.append(commit_id)
    for name, target in {**{f"branch {b}": c for b, c in branches.items()}, **{f"tag {t}": c for t, c in tags.items()}}.items():
        if target not in commits:
            raise IntegrityError(f"{name} points at commit {target}, which cannot be read; run fsck before collecting", key=commit_key(target))
    unreadable = set(result.unreadable_commits)
    for commit in commits.values():  # history past it is unknown: its ancestors may be needed
        for parent in unreadable.intersection(commit.parents):
            raise IntegrityError(f"commit {commit.id} has a parent that cannot be read; run fsck before collecting", key=commit_key(parent))

    # History follows parents, or the grafts of commits whose parents GC removed before.
    has_record = lambda cid: shallow_key(cid) in listing  # noqa: E731
    parents = {cid: effective_parents(objects, c, exists=lambda p: p in commits, grafted=has_record) for cid, c in commits.items()}

    # Evaluate the policy on every branch's history. A commit is kept if any branch keeps it;
    # each branch that keeps it says what it drops of it (nothing, if it keeps it whole),
    # and it loses only what every one of them drops.
    young = {cid for cid in commits if listing[commit_key(cid)].modified_s >= cutoff_s}
    drops: dict[str, list[tuple[str, ...]]] = {}  # commit → what each branch keeping it drops
    if retention is None:
        for target in ref_targets:
            for c in _history(target, commits, parents):
                drops.setdefault(c.id, []).append(())
    governed: dict[Policy, list[list[CommitInfo]]] = {}
    for branch, head in branches.items():
        history = _history(head, commits, parents)
        policy = policy_for(retention, branch)
        if policy is None:
            for c in history:
                drops.setdefault(c.id, []).append(())
            continue
        policy = policy.resolved(best_metric=repo.config.best_metric, greater_is_better=repo.config.greater_is_better)
        governed.setdefault(policy, []).append(history)
        branch_kept, branch_whole = policy.select(history, now_s=now_s)
        if policy.max_total_bytes is not None:
            branch_kept = _fit_budget(repo, history, branch_kept, policy.max_total_bytes, protected=ref_targets | young, commits=commits, listing=listing)
        for cid in branch_kept:
            drops.setdefault(cid, []).append(() if cid in branch_whole else policy.demote)
    for cid in ref_targets | young:
        drops.setdefault(cid, []).append(())
    result.warnings = [why for policy, histories in governed.items() for why in policy.unmatched(histories)]
    kept = set(drops)

    # Demotions: earlier ones stand; new ones only what every branch keeping it drops.
    demoted: dict[str, tuple[str, ...]] = {}
    for cid in sorted(kept):
        earlier = dropped_components(objects, cid) if demotion_key(cid) in listing else ()
        new = _dropped_by_all(drops[cid])
        if earlier or new:
            demoted[cid] = tuple(sorted(set(earlier) | new))
        fresh = {p for p in new if not any(path_under(p, q) for q in earlier)}
        if fresh:
            result.newly_demoted[cid] = tuple(sorted(fresh))

    # What the kept commits need.
    needed: set[str] = set()
    manifests: dict[str, set[str]] = {}
    for cid in kept:
        commit = commits[cid]
        needed.add(commit_key(cid))
        chunks = manifests.setdefault(commit.manifest, set())
        if cid in demoted:
            chunks |= kept_chunks(repo.manifest_of(commit), demoted[cid])
            needed.add(demotion_key(cid))
        else:
            chunks |= set(manifest_chunks(repo, commit))
    for manifest_id, chunks in manifests.items():
        needed.add(manifest_key(manifest_id))
        needed.update(chunk_key(c) for c in chunks)
    for cid in kept:
        grafts = _nearest_kept(parents[cid], kept, parents)
        if grafts != parents[cid]:
            result.shallow_commits[cid] = grafts
        if shallow_key(cid) in listing or cid in result.shallow_commits:
            needed.add(shallow_key(cid))
    needed.update(commit_key(cid) for cid in result.unreadable_commits)

    # An object that stays has every object it needs: a young delta keeps its bases.
    chains = _chunk_chains(repo, commits, [key for key in listing if key.startswith("chunks/")])
    for key, info in listing.items():
        if key.startswith("chunks/") and (key in needed or info.modified_s >= cutoff_s):
            needed.update(chunk_key(base) for base in chains.get(key.rsplit("/", 1)[-1], ()))

    result.kept_commits = sorted(kept)
    result.removed_commits = sorted(set(commits) - kept)
    result.demoted_commits = demoted
    order = {prefix: i for i, prefix in enumerate(DELETION_ORDER)}
    rank = {
        key: (order[key.split("/", 1)[0] + "/"], -len(chains.get(key.rsplit("/", 1)[-1], ())) if key.startswith("chunks/") else 0)
        for key in listing
    }
    for key, info in listing.items():
        if key in needed:
            continue
        if info.modified_s >= cutoff_s:
            result.young_objects += 1
        else:
            result.deletions.append(info)
    result.deletions.sort(key=lambda info: (rank[info.key], info.key))
    return result, _Snapshot(listing, commits, needed, parents, kept, rank)


def _chunk_chains(repo: Repository, commits: dict[str, Commit], chunk_keys: list[str]) -> dict[str, tuple[str, ...]]:
    """The delta chain of every listed chunk: from the manifests of the stored commits, else
    (a chunk no readable manifest names: left by a killed commit, or by a killed collection
    that already removed its manifest) from the chunk's own header."""
    chains: dict[str, tuple[str, ...]] = {}
    for commit in commits.values():
        try:
            chains.update(manifest_chains(repo, commit))
        except (IntegrityError, UnsupportedFormat) as exc:
            log.warning("commit %s: manifest unreadable (%s); its chunks' chains are read from the chunks", commit.id, exc)
    unknown = [key.rsplit("/", 1)[-1] for key in chunk_keys if key.rsplit("/", 1)[-1] not in chains]
    if unknown:
        reader = ChunkReader(repo.objects)

        def chain_of(chunk_id: str) -> tuple[str, ...] | None:
            try:
                return reader.bases_of(chunk_id)
            except IntegrityError as exc:  # a damaged header: keep it out of the way of nothing
                log.warning("chunk %s: unreadable header (%s)", chunk_id, exc)
                return ()

        with ThreadPoolExecutor(max_workers=16, thread_name_prefix="ckptstore-gc") as pool:
            for chunk_id, chain in zip(unknown, pool.map(chain_of, unknown)):
                if chain is not None:  # else deleted meanwhile
                    chains[chunk_id] = chain
    return chains


def _dropped_by_all(drops: list[tuple[str, ...]]) -> set[str]:
    """The key-path prefixes every branch drops: a path goes only if each branch keeping the
    commit drops something it lies under."""
    candidates = {p for dropped in drops for p in dropped}
    out = {p for p in candidates if all(any(path_under(p, q) for q in dropped) for dropped in drops)}
    return {p for p in out if not any(p != q and path_under(p, q) for q in out)}


def _nearest_kept(start: list[str], kept: set[str], parents: dict[str, list[str]]) -> list[str]:
    """For each of ``start`` in order: itself if kept, else its nearest kept ancestors."""
    out: list[str] = []
    seen: set[str] = set()
    stack = list(reversed(start))
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        seen.add(cid)
        if cid in kept or cid not in parents:  # kept, or unknown (missing: fsck's business)
            out.append(cid)
        else:
            stack.extend(reversed(parents[cid]))
    return out


def _history(head: str, commits: dict[str, Commit], parents: dict[str, list[str]]) -> list[CommitInfo]:
    """Every readable ancestor of ``head`` (itself included), newest first."""
    seen: set[str] = set()
    stack = [head]
    out = []
    while stack:
        cid = stack.pop()
        if cid in seen or cid not in commits:
            continue
        seen.add(cid)
        commit = commits[cid]
        step = commit.metadata.get("step") if isinstance(commit.metadata, dict) else None
        out.append(CommitInfo(cid, commit.created_at.timestamp(), step if type(step) is int else None, commit.metrics))
        stack.extend(parents[cid])
    out.sort(key=lambda c: c.created_at_s, reverse=True)
    return out


def _fit_budget(repo: Repository, history: list[CommitInfo], kept: set[str], budget_bytes: int, *, protected: set[str], commits: dict[str, Commit], listing: dict[str, ObjectInfo]) -> set[str]:
    """Drop the oldest unprotected commits of ``kept`` until the objects they need (chunks,
    manifest, commit object: stored bytes) add up to at most ``budget_bytes``."""
    need: dict[str, dict[str, int]] = {}
    refcount: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for c in history:
        if c.id not in kept:
            continue
        manifest_id = commits[c.id].manifest
        keys = [chunk_key(k) for k in manifest_chunks(repo, commits[c.id])] + [manifest_key(manifest_id), commit_key(c.id)]
        objects = {key: listing[key].size_bytes for key in keys if key in listing}
        need[c.id] = objects
        for key, n in objects.items():
            refcount[key] = refcount.get(key, 0) + 1
            sizes[key] = n
    total = sum(sizes.values())
    out = set(kept)
    for c in reversed(history):  # oldest first
        if total <= budget_bytes:
            break
        if c.id not in out or c.id in protected:
            continue
        out.discard(c.id)
        for key in need[c.id]:
            refcount[key] -= 1
            if refcount[key] == 0:
                total -= sizes[key]
    return out


def execute(
    repo: Repository,
    result: GcPlan,
    snapshot: _Snapshot,
    lease: CollectorLease,
    *,
    batch_size: int = 1000,
    writer_timeout_s: float = DEFAULT_WRITER_TIMEOUT_S,
    max_writer_wait_s: float = 600.0,
    progress: Progress | None = None,
) -> None:
    """Carry out a plan under ``lease``: records first, then deletions in batches, each
    taken only while no writer is live and after re-reading what writers did meanwhile. A
    batch holds one kind of object and, for chunks, one length of delta chain, so a crash
    anywhere leaves no delta without its bases."""
    objects = repo.objects
    started = time.monotonic()
    for cid, grafts in result.shallow_commits.items():
        record_grafts(objects, cid, grafts)
    for cid, prefixes in result.demoted_commits.items():
        record_demotion(objects, cid, prefixes)
    protected = set(snapshot.needed)
    known_commits = set(snapshot.commits) | set(result.unreadable_commits)
    pending = list(result.deletions)
    total = len(pending)
    waited_since: float | None = None
    pause_s = 0.02
    while pending:
        lease.renew(sweeping=True)
        live, _ = writers(objects, ttl_s=lease.ttl_s, default_ttl_s=writer_timeout_s)
        if live:
            lease.renew(sweeping=False)
            waited_since = waited_since or time.monotonic()
            if time.monotonic() - waited_since > max_writer_wait_s:
                raise CollectorBusy(f"writers kept the store busy for {max_writer_wait_s:g} s; {len(pending)} deletions left, rerun gc to finish")
            time.sleep(pause_s)
            pause_s = min(1.0, pause_s * 1.5)
            continue
        waited_since, pause_s = None, 0.02
        _protect_new_work(repo, result, snapshot, protected, known_commits)
        if not lease.fresh():
            continue  # too slow to trust the handshake (the lease may look lapsed): redo it
        rank = snapshot.rank[pending[0].key]
        size = next((i for i, info in enumerate(pending[:batch_size]) if snapshot.rank[info.key] != rank), min(batch_size, len(pending)))
        batch, pending = pending[:size], pending[size:]
        batch = [info for info in batch if info.key not in protected]
        objects.delete_many(info.key for info in batch)
        lease.renew(sweeping=False)
        result.deleted_objects += len(batch)
        result.freed_bytes += sum(info.size_bytes for info in batch)
        if progress is not None:
            progress("delete", total - len(pending), total)
    result.spared_objects = total - result.deleted_objects
    with contextlib.suppress(CkptStoreError):
        objects.remove_abandoned_uploads(older_than_s=max(result.grace_period_s, writer_timeout_s), prefixes=STORE_PREFIXES)
    _, dead = writers(objects, ttl_s=lease.ttl_s, default_ttl_s=writer_timeout_s)
    remove_dead_writers(objects, dead)
    repo.sync_catalog()
    result.executed = True
    result.elapsed_s = time.monotonic() - started


def _protect_new_work(repo: Repository, result: GcPlan, snapshot: _Snapshot, protected: set[str], known_commits: set[str]) -> None:
    """Protect what commits made since planning need, and commits a ref now points at."""
    objects = repo.objects
    removed = set(result.removed_commits)
    targets = set(repo.refs.list(RefKind.BRANCH).values()) | set(repo.refs.list(RefKind.TAG).values())
    rescued = []
    for cid in sorted(targets & removed):
        if objects.exists(commit_key(cid)):
            rescued.append(cid)
        else:
            log.warning("a ref was set to commit %s after the collector deleted it", cid)
    fresh = []
    for key in objects.list("commits/"):
        cid = key.rsplit("/", 1)[-1]
        if cid not in known_commits:
            known_commits.add(cid)
            fresh.append(cid)
    for cid in fresh + rescued:
        try:
            commit = repo.get_commit(cid)
        except (IntegrityError, UnsupportedFormat):
            protected.add(commit_key(cid))
            continue
        protected.add(commit_key(cid))
        protected.add(manifest_key(commit.manifest))
        protected.update(chunk_key(c) for c in manifest_chunks(repo, commit))
        if cid in removed:
            removed.discard(cid)
            result.removed_commits.remove(cid)
            result.kept_commits.append(cid)
            snapshot.kept.add(cid)
            if objects.exists(demotion_key(cid)):
                protected.add(demotion_key(cid))
        own = snapshot.parents.get(cid, list(commit.parents))
        if any(p in removed for p in own):  # a parent goes: graft its nearest kept ancestors
            record_grafts(objects, cid, _nearest_kept(own, snapshot.kept, snapshot.parents))
            protected.add(shallow_key(cid))


def collect(
    repo: Repository,
    retention: Retention = None,
    *,
    dry_run: bool = False,
    grace_period_s: float = DEFAULT_GRACE_PERIOD_S,
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    writer_timeout_s: float = DEFAULT_WRITER_TIMEOUT_S,
    batch_size: int = 1000,
    progress: Progress | None = None,
) -> GcPlan:
    """Plan a collection and, unless ``dry_run``, execute it. See :meth:`Store.gc`."""
    if grace_period_s < 0:
        raise InvalidOption("grace_period_s", f"must be non-negative, not {grace_period_s!r}")
    if dry_run:
        result = plan(repo, retention, grace_period_s=grace_period_s)[0]
        for warning in result.warnings:
            log.warning("%s: gc would refuse to run", warning)
        return result
    lease = CollectorLease(repo.objects, ttl_s=lease_ttl_s)
    try:
        lease.acquire()
    except StorageError as exc:  # a full disk: the room the store kept aside lets gc free space
        if exc.errno != errno.ENOSPC or not repo.objects.release_space():
            raise
        log.warning("the store's disk is full: collecting in the space kept aside for it")
        lease.acquire()
    try:
        result, snapshot = plan(repo, retention, grace_period_s=grace_period_s, now_s=storage_now(repo.objects, ttl_s=lease_ttl_s))
        if result.warnings:
            raise PolicyMatchesNothing("; ".join(result.warnings) + "; nothing was deleted (fix the rule, or drop it)")
        lease.renew(sweeping=False)
        execute(repo, result, snapshot, lease, batch_size=batch_size, writer_timeout_s=writer_timeout_s, progress=progress)
        repo.objects.reserve_space()  # room for the next collection, should the disk fill up
        return result
    finally:
        lease.release()
