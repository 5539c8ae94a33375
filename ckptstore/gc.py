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
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .backends import ObjectInfo, ObjectStore
from .commit import Commit
from .errors import (
    CkptStoreError,
    CollectorBusy,
    IntegrityError,
    InvalidOption,
    PolicyMatchesNothing,
    PreconditionFailed,
    StorageError,
    UnsupportedFormat,
)
from .history import ancestors, nearest_kept
from .inventory import (
    Inventory,
    Repository,
    kept_chunks,
    manifest_chains,
    manifest_chunks,
    stored_needs,
    take_inventory,
)
from .layout import (
    COMMITS_PREFIX,
    DELETION_ORDER,
    STORE_PREFIXES,
    chunk_key,
    commit_key,
    demotion_key,
    id_of,
    is_chunk_key,
    kind_of,
    manifest_key,
    prefix_of,
    shallow_key,
)
from .lease import (
    DEFAULT_LEASE_TTL_S,
    LEGACY_RECORD_TTL_S,
    CollectorLease,
    remove_dead_writers,
    storage_now,
    writers,
)
from .pipeline import ChunkReader, Progress
from .records import encode_record, grafted_parents, read_demotion
from .refs import RefKind, retry_cas
from .retention import CommitInfo, Policy, Retention, policy_for
from .tree import path_under

log = logging.getLogger("ckptstore.gc")

DEFAULT_GRACE_PERIOD_S = 3600.0
#: How long the marker of a writer from before markers carried a ttl of their own (ckptstore
#: 0.1) protects its commit; and the age past which temp files are abandoned uploads.
DEFAULT_WRITER_TIMEOUT_S = LEGACY_RECORD_TTL_S


def _gc_pause_s(attempt: int) -> float:
    return min(0.5, 0.01 * 2.0 ** (attempt + 1))  # a writer (or a dead one's lock) holds the record


def record_demotion(objects: ObjectStore, commit_id: str, prefixes: Iterable[str]) -> tuple[str, ...]:
    """Add ``prefixes`` to what commit ``commit_id`` no longer holds (compare-and-swap,
    retried). Idempotent. Returns the whole set."""
    key = demotion_key(commit_id)

    def attempt() -> tuple[str, ...]:
        found = read_demotion(objects, commit_id)
        current = () if found is None else found[0]
        merged = tuple(sorted(set(current) | set(prefixes)))
        if merged == tuple(sorted(current)) and found is not None:
            return merged
        objects.put_if_version(key, encode_record({"dropped": list(merged), "at_s": time.time()}), version=None if found is None else found[1])
        return merged

    return retry_cas(
        attempt,
        conflicts=PreconditionFailed,
        max_attempts=100,
        pause_s=_gc_pause_s,
        exhausted=lambda: CollectorBusy(f"demotion record {key} kept changing under the collector"),
    )


def record_grafts(objects: ObjectStore, commit_id: str, parents: list[str]) -> None:
    """Set the parents of a commit whose own parents GC removes (compare-and-swap, retried).
    Idempotent."""
    key = shallow_key(commit_id)

    def attempt() -> None:
        current = grafted_parents(objects, commit_id)
        if current is None or current[0] != parents:
            objects.put_if_version(key, encode_record({"parents": parents, "at_s": time.time()}), version=None if current is None else current[1])

    retry_cas(
        attempt,
        conflicts=PreconditionFailed,
        max_attempts=100,
        pause_s=_gc_pause_s,
        exhausted=lambda: CollectorBusy(f"shallow record {key} kept changing under the collector"),
    )


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
            kind = kind_of(info.key)
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
    # History follows parents, or the grafts of commits whose parents GC removed before.
    inventory = take_inventory(repo, verify_commits=False, keep_missing_parents=False)
    for commit_id, exc in inventory.unreadable.items():
        log.warning("not collecting unreadable commit %s: %s", commit_id, exc)
    result.unreadable_commits = list(inventory.unreadable)
    _refuse_unknown_history(inventory)
    drops = _select(repo, retention, inventory, now_s=now_s, cutoff_s=cutoff_s, result=result)
    kept = set(drops)
    demoted = _demote(objects, inventory, drops, result)
    needed = _needed(repo, inventory, kept, demoted, result)
    rank = _schedule(repo, inventory, needed, cutoff_s=cutoff_s, result=result)
    result.kept_commits = sorted(kept)
    result.removed_commits = sorted(set(inventory.commits) - kept)
    result.demoted_commits = demoted
    return result, _Snapshot(inventory.listing, inventory.commits, needed, inventory.parents, kept, rank)


def _refuse_unknown_history(inventory: Inventory) -> None:
    """Refuse to plan where what a ref reaches is unknown: an unreadable ref, a ref at an
    unreadable commit, or a commit with an unreadable parent (its ancestors may be needed)."""
    for exc in inventory.ref_errors.values():
        raise exc
    for name, target in inventory.ref_targets.items():
        if target not in inventory.commits:
            raise IntegrityError(f"{name} points at commit {target}, which cannot be read; run fsck before collecting", key=commit_key(target))
    unreadable = set(inventory.unreadable)
    for commit in inventory.commits.values():
        for parent in unreadable.intersection(commit.parents):
            raise IntegrityError(f"commit {commit.id} has a parent that cannot be read; run fsck before collecting", key=commit_key(parent))


def _select(repo: Repository, retention: Retention, inventory: Inventory, *, now_s: float, cutoff_s: float, result: GcPlan) -> dict[str, list[tuple[str, ...]]]:
    """Evaluate the policy on every branch's history: commit kept → what each branch keeping
    it drops of it (nothing, if it keeps it whole). A commit is kept if any branch keeps it,
    and loses only what every one of them drops. Fills in the policy's warnings."""
    commits, parents, listing = inventory.commits, inventory.parents, inventory.listing
    ref_targets = set(inventory.ref_targets.values())
    young = {cid for cid in commits if listing[commit_key(cid)].modified_s >= cutoff_s}
    drops: dict[str, list[tuple[str, ...]]] = {}
    if retention is None:
        for target in ref_targets:
            for c in _history(target, commits, parents):
                drops.setdefault(c.id, []).append(())
    governed: dict[Policy, list[list[CommitInfo]]] = {}
    for branch, head in inventory.branches.items():
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
    return drops


def _demote(objects: ObjectStore, inventory: Inventory, drops: dict[str, list[tuple[str, ...]]], result: GcPlan) -> dict[str, tuple[str, ...]]:
    """Kept commit → every prefix it no longer holds: earlier demotions stand; new ones only
    what every branch keeping it drops. Fills in what this collection newly demotes."""
    demoted: dict[str, tuple[str, ...]] = {}
    for cid in sorted(drops):
        earlier = inventory.dropped(objects, cid)
        new = _dropped_by_all(drops[cid])
        if earlier or new:
            demoted[cid] = tuple(sorted(set(earlier) | new))
        fresh = {p for p in new if not any(path_under(p, q) for q in earlier)}
        if fresh:
            result.newly_demoted[cid] = tuple(sorted(fresh))
    return demoted


def _needed(repo: Repository, inventory: Inventory, kept: set[str], demoted: dict[str, tuple[str, ...]], result: GcPlan) -> set[str]:
    """Every object the kept commits need (records included), and the grafts of kept
    commits whose parents go (into ``result.shallow_commits``)."""
    commits, parents = inventory.commits, inventory.parents
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
        grafts = nearest_kept(parents[cid], kept, parents)
        if grafts != parents[cid]:
            result.shallow_commits[cid] = grafts
        if inventory.is_grafted(cid) or cid in result.shallow_commits:
            needed.add(shallow_key(cid))
    needed.update(commit_key(cid) for cid in result.unreadable_commits)
    return needed


def _schedule(repo: Repository, inventory: Inventory, needed: set[str], *, cutoff_s: float, result: GcPlan) -> dict[str, tuple[int, int]]:
    """Fill in the deletions (what nothing needs and is older than the grace period), in
    deletion order, after adding to ``needed`` every base of a delta that stays (needed or
    young). Returns each listed key's rank in deletion order."""
    listing = inventory.listing
    chains = _chunk_chains(repo, inventory.commits, [key for key in listing if is_chunk_key(key)])
    for key, info in listing.items():
        if is_chunk_key(key) and (key in needed or info.modified_s >= cutoff_s):
            needed.update(chunk_key(base) for base in chains.get(id_of(key), ()))
    order = {prefix: i for i, prefix in enumerate(DELETION_ORDER)}
    rank = {key: (order[prefix_of(key)], -len(chains.get(id_of(key), ())) if is_chunk_key(key) else 0) for key in listing}
    for key, info in listing.items():
        if key in needed:
            continue
        if info.modified_s >= cutoff_s:
            result.young_objects += 1
        else:
            result.deletions.append(info)
    result.deletions.sort(key=lambda info: (rank[info.key], info.key))
    return rank


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
    unknown = [id_of(key) for key in chunk_keys if id_of(key) not in chains]
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


def _history(head: str, commits: dict[str, Commit], parents: dict[str, list[str]]) -> list[CommitInfo]:
    """Every readable ancestor of ``head`` (itself included), newest first."""
    out = []
    for cid in ancestors([head], lambda c: parents[c] if c in commits else None):
        commit = commits[cid]
        step = commit.metadata.get("step") if isinstance(commit.metadata, dict) else None
        out.append(CommitInfo(cid, commit.created_at.timestamp(), step if type(step) is int else None, commit.metrics))
    out.sort(key=lambda c: c.created_at_s, reverse=True)
    return out


def _fit_budget(
    repo: Repository,
    history: list[CommitInfo],
    kept: set[str],
    budget_bytes: int,
    *,
    protected: set[str],
    commits: dict[str, Commit],
    listing: dict[str, ObjectInfo],
) -> set[str]:
    """Drop the oldest unprotected commits of ``kept`` until the objects they need (chunks,
    manifest, commit object: stored bytes) add up to at most ``budget_bytes``."""
    need: dict[str, dict[str, int]] = {}
    refcount: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for c in history:
        if c.id not in kept:
            continue
        objects = {key: listing[key].size_bytes for key in stored_needs(repo, commits[c.id], listing)}
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
    for key in objects.list(COMMITS_PREFIX):
        cid = id_of(key)
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
            record_grafts(objects, cid, nearest_kept(own, snapshot.kept, snapshot.parents))
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
