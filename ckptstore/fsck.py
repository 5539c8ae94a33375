"""fsck: check that a store is whole, and say exactly what is not.

Checks, in order: every ref points at a readable commit; every commit object decodes and
hashes to its id; every commit the refs reach (following the parents GC grafted where it
removed commits) has its parents; every manifest of those decodes and hashes to its id; every
chunk they need (less what a demotion dropped) exists, with a header that declares the size
the manifest expects and a stored size that matches the header. With ``read_data`` every chunk (or a random ``read_data_subset`` of them) is read,
decompressed and re-hashed. The catalog is compared with the store; ``repair`` rebuilds it.

Objects that no commit the refs reach needs (left by crashed writers or a killed collector,
or commits no ref reaches) are reported as orphans: they are GC's business, not damage.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from .backends import ObjectInfo, ObjectStore
from .codec import (
    CHAIN_PREFIX_BYTES,
    HEADER_SIZE,
    Codec,
    Kind,
    delta_chain,
    read_header,
)
from .commit import Commit
from .errors import CkptStoreError, IntegrityError, InvalidOption, UnsupportedFormat
from .history import reachable as reachable_from
from .ids import content_id
from .inventory import Inventory, Repository, take_inventory
from .layout import (
    chunk_key,
    commit_key,
    demotion_key,
    manifest_key,
    ref_key,
    shallow_key,
)
from .manifest import ChunkRef, Manifest, TensorEntry
from .pipeline import ChunkReader, Progress
from .refs import RefKind
from .tree import path_under


@dataclass(frozen=True)
class Problem:
    """One thing wrong: what kind (``ref``, ``commit``, ``parent``, ``manifest``, ``chunk``,
    ``record``, ``catalog``), the object, and the commit and key path that need it."""

    kind: str
    message: str
    key: str | None = None
    commit: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        where = [f"object {self.key}"] if self.key else []
        if self.commit:
            where.append(f"commit {self.commit[:12]}")
        if self.path:
            where.append(f"key path {self.path}")
        return f"{self.kind}: {self.message}" + (f" ({', '.join(where)})" if where else "")


@dataclass
class FsckReport:
    """The result of :meth:`Store.fsck`. ``ok`` is whether the store is healthy."""

    problems: list[Problem] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    commits: int = 0
    manifests: int = 0
    chunks: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    catalog_repaired: bool = False
    #: Whether chunks were read and re-hashed (``read_data``): without it, ``ok`` vouches for
    #: the structure (every object present, headers and manifests sound), not the data.
    data_read: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = f"{len(self.problems)} problem(s)" if not self.ok else "healthy" if self.data_read else "structure ok (data not read; use --read-data)"
        read = f", read and re-hashed {self.chunks_read} chunks ({self.bytes_read:,} bytes)" if self.chunks_read else ""
        repaired = "; catalog rebuilt" if self.catalog_repaired else ""
        return f"{state}: checked {self.commits} commits, {self.manifests} manifests, {self.chunks} chunks{read}; {len(self.orphans)} orphan objects{repaired}"


def check(
    repo: Repository,
    *,
    read_data: bool = False,
    read_data_subset: float | None = None,
    repair: bool = False,
    threads: int = 8,
    seed: int | None = None,
    progress: Progress | None = None,
) -> FsckReport:
    """Check ``repo``; see the module docstring. Never writes to the object store; with
    ``repair`` it rebuilds the catalog."""
    if read_data_subset is not None and not 0 < read_data_subset <= 1:
        raise InvalidOption("read_data_subset", f"must be a fraction in (0, 1], not {read_data_subset!r}")
    read_data = read_data or read_data_subset is not None
    report = FsckReport(data_read=read_data)
    # Commits are read from the store (not the catalog) and verified.
    inventory = take_inventory(repo, verify_commits=True, keep_missing_parents=True)
    commits = _check_history(inventory, report)
    needs = _check_manifests(repo, inventory, commits, report)
    to_read: set[str] = set()
    if read_data:
        ids = sorted(needs.chunks)
        if read_data_subset is not None and read_data_subset < 1:
            rng = random.Random(seed)
            ids = rng.sample(ids, max(1, round(len(ids) * read_data_subset))) if ids else []
        to_read = set(ids)
    damaged, stored_whole = _check_chunks(repo, inventory, needs, report, to_read=to_read, threads=threads, progress=progress)
    _name_broken_paths(commits, needs, damaged, stored_whole, report)
    # Orphans: objects no commit that a ref reaches needs.
    report.orphans = sorted(key for key in inventory.listing if key not in needs.referenced)
    # The catalog against the store.
    stored = inventory.stored_commit_ids()
    catalog_problems = _catalog_problems(repo, commits, stored, inventory.ref_targets)
    if catalog_problems and repair:
        repo.catalog.clear()
        repo.sync_catalog()
        report.catalog_repaired = True
        catalog_problems = _catalog_problems(repo, commits, stored, inventory.ref_targets)
    report.problems.extend(catalog_problems)
    return report


def _check_history(inventory: Inventory, report: FsckReport) -> dict[str, Commit]:
    """Refs, commits and parents: report what is unreadable or missing; return the commits
    the refs reach (across what GC removed: its shallow records)."""
    for (kind, name), exc in inventory.ref_errors.items():
        report.problems.append(Problem("ref", f"{kind.noun} {name!r} is unreadable: {exc}", key=ref_key(kind.value, name)))
    for cid, exc in inventory.unreadable.items():
        report.problems.append(Problem("commit", _reason(exc), key=commit_key(cid), commit=cid))
    listing = inventory.listing
    for name, target in inventory.ref_targets.items():
        if commit_key(target) not in listing:
            report.problems.append(Problem("ref", f"{name} points at a missing commit", key=commit_key(target), commit=target))
    for cid, exc in inventory.damaged_grafts.items():
        report.problems.append(Problem("record", _reason(exc), key=shallow_key(cid), commit=cid))
    parents = inventory.parents
    reachable = reachable_from(set(inventory.ref_targets.values()), parents)
    for cid in sorted(reachable):
        for parent in parents.get(cid, []):
            if commit_key(parent) not in listing:
                report.problems.append(Problem("parent", f"parent {parent} is missing (and GC recorded no removal)", key=commit_key(parent), commit=cid))
    commits = {cid: c for cid, c in inventory.commits.items() if cid in reachable}  # the rest are orphans
    report.commits = len(commits)
    return commits


@dataclass
class _Needs:
    """What the reachable commits need, as fsck checks it."""

    #: Chunk id → (its ref, a commit and key path that need it).
    chunks: dict[str, tuple[ChunkRef, str, str | None]] = field(default_factory=dict)
    #: Manifest id → the manifest, or why it is unreadable.
    manifests: dict[str, Manifest | str] = field(default_factory=dict)
    #: Commit → the tensors it still holds (less what GC dropped).
    kept: dict[str, list[TensorEntry]] = field(default_factory=dict)
    #: Every object key a reachable commit needs (what is not is an orphan).
    referenced: set[str] = field(default_factory=set)


def _check_manifests(repo: Repository, inventory: Inventory, commits: dict[str, Commit], report: FsckReport) -> _Needs:
    """Read every reachable commit's manifest and demotion record; work out the chunks each
    needs (with the first key path that needs each, for the report)."""
    needs = _Needs(referenced={commit_key(c) for c in commits})
    for cid, commit in sorted(commits.items()):
        mkey = manifest_key(commit.manifest)
        needs.referenced.add(mkey)
        if commit.manifest not in needs.manifests:
            try:
                needs.manifests[commit.manifest] = repo.manifest_of(commit)
            except (IntegrityError, UnsupportedFormat) as exc:
                needs.manifests[commit.manifest] = _reason(exc)
        manifest = needs.manifests[commit.manifest]
        if isinstance(manifest, str):  # every commit it breaks is named
            report.problems.append(Problem("manifest", manifest, key=mkey, commit=cid))
            continue
        try:
            dropped = inventory.dropped(repo.objects, cid)
        except IntegrityError as exc:
            report.problems.append(Problem("record", _reason(exc), key=demotion_key(cid), commit=cid))
            dropped = ()
        if dropped:
            needs.referenced.add(demotion_key(cid))
        try:
            held_at = manifest.key_paths
        except IntegrityError as exc:
            report.problems.append(Problem("manifest", _reason(exc), key=mkey, commit=cid))
            continue
        _add_needed_chunks(needs, cid, manifest, held_at, dropped)
    needs.referenced.update(shallow_key(cid) for cid in commits if inventory.is_grafted(cid))
    report.manifests = sum(1 for m in needs.manifests.values() if not isinstance(m, str))
    report.chunks = len(needs.chunks)
    return needs


def _add_needed_chunks(needs: _Needs, cid: str, manifest: Manifest, held_at: list[tuple[str, ...]], dropped: tuple[str, ...]) -> None:
    needs.kept[cid] = []
    first_path: dict[int, str] = {}
    for entry, paths in zip(manifest.tensors, held_at):
        kept_paths = [path for path in paths if not any(path_under(path, p) for p in dropped)]  # a kept path holds it
        if kept_paths:
            needs.kept[cid].append(entry)
            first_path.setdefault(entry.blob, kept_paths[0])
    for index, path in first_path.items():
        for ref in manifest.blobs[index].chunks:
            needs.chunks.setdefault(ref.id, (ref, cid, path))
            for depth, base in enumerate(ref.bases):
                needs.chunks.setdefault(base, (ChunkRef(base, ref.size, ref.bases[depth + 1 :]), cid, path))


def _check_chunks(
    repo: Repository, inventory: Inventory, needs: _Needs, report: FsckReport, *, to_read: set[str], threads: int, progress: Progress | None
) -> tuple[dict[str, Problem], set[str]]:
    """Chunks: existence, header and size; those in ``to_read``, every byte. Returns the
    damaged chunks' problems and the chunks stored self-contained."""
    objects, listing = repo.objects, inventory.listing
    reader = ChunkReader(objects)
    stored_whole: set[str] = set()

    def check_chunk(chunk_id: str) -> tuple[Problem | None, int]:
        ref, cid, path = needs.chunks[chunk_id]
        key = chunk_key(chunk_id)
        needs.referenced.add(key)
        info = listing.get(key)
        if info is None:
            return Problem("chunk", "chunk is missing", key=key, commit=cid, path=path), 0
        try:
            return None, _check_chunk_object(objects, reader, ref, info, path=path, stored_whole=stored_whole, read=chunk_id in to_read)
        except (CkptStoreError, ValueError) as exc:
            reason, failed = _reason(exc), getattr(exc, "key", None)
            if failed and failed != key:  # the delta is sound, one of its bases is not
                reason = f"its delta base {failed} is damaged: {reason}"
            return Problem("chunk", reason, key=key, commit=cid, path=path), 0

    done = 0
    damaged: dict[str, Problem] = {}
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckptstore-fsck") as pool:
        for chunk_id, (problem, nread) in zip(sorted(needs.chunks), pool.map(check_chunk, sorted(needs.chunks))):
            done += 1
            if problem is not None:
                damaged[chunk_id] = problem
            if nread:
                report.chunks_read += 1
                report.bytes_read += nread
            if progress is not None and (done % 64 == 0 or done == len(needs.chunks)):
                progress("check chunks", done, len(needs.chunks))
    return damaged, stored_whole


def _check_chunk_object(
    objects: ObjectStore, reader: ChunkReader, ref: ChunkRef, info: ObjectInfo, *, path: str | None, stored_whole: set[str], read: bool
) -> int:
    """Check one stored chunk's header and size (and with ``read``, every byte, through its
    delta chain); raise what is wrong. Returns the bytes read."""
    key = info.key
    prefix = objects.get_range(key, 0, CHAIN_PREFIX_BYTES)
    codec, raw_size, body_size = read_header(prefix, key=key, kind=Kind.CHUNK)
    if raw_size != ref.size:
        raise IntegrityError(f"chunk header declares {raw_size} bytes, the manifest {ref.size}", key=key, path=path)
    if info.size_bytes != HEADER_SIZE + body_size:
        raise IntegrityError(f"chunk is {info.size_bytes} bytes stored, its header says {HEADER_SIZE + body_size}", key=key, path=path)
    bases = delta_chain(memoryview(prefix)[HEADER_SIZE:], key=key, path=path)[0] if codec is Codec.DELTA else ()
    if bases and bases != ref.bases:
        raise IntegrityError(f"chunk is read through {list(bases)}, its manifest records {list(ref.bases)}", key=key, path=path)
    if not bases:  # stored whole (maybe again, where a manifest records a delta): it needs no base
        stored_whole.add(ref.id)
    if not read:
        return 0
    import numpy as np

    reader.read_into(ref, np.empty(ref.size, dtype=np.uint8), path=path)
    return ref.size


def _name_broken_paths(commits: dict[str, Commit], needs: _Needs, damaged: dict[str, Problem], stored_whole: set[str], report: FsckReport) -> None:
    """Every commit and key path a damaged chunk breaks (found again only for those)."""
    named: set[tuple[str, str, str]] = set()
    for cid, entries in sorted(needs.kept.items()) if damaged else ():
        manifest = needs.manifests[commits[cid].manifest]
        assert not isinstance(manifest, str)  # only a commit whose manifest was read keeps tensors
        for entry in entries:
            for ref in manifest.blobs[entry.blob].chunks:
                for chunk_id in (ref.id, *(() if ref.id in stored_whole else ref.bases)):
                    if chunk_id in damaged and (chunk_id, cid, entry.path) not in named:
                        named.add((chunk_id, cid, entry.path))
                        report.problems.append(replace(damaged[chunk_id], commit=cid, path=entry.path))


def _reason(exc: Exception) -> str:
    """An error's message without the location suffix (the problem names the location)."""
    return getattr(exc, "reason", None) or str(exc)


def _catalog_problems(repo: Repository, commits: dict[str, Commit], stored: set[str], targets: dict[str, str]) -> list[Problem]:
    problems = []
    indexed = repo.catalog.commit_ids()
    for cid in sorted(set(commits) - indexed):
        problems.append(Problem("catalog", "commit is in the store but not in the catalog", commit=cid))
    for cid in sorted(indexed - stored):
        if repo.objects.exists(commit_key(cid)):
            continue  # committed while fsck ran
        problems.append(Problem("catalog", "commit is in the catalog but not in the store", commit=cid))
    for cid in sorted(indexed & set(commits)):
        raw = repo.catalog.commit_object(cid)
        if not isinstance(raw, bytes) or content_id(raw) != cid:
            problems.append(Problem("catalog", "the catalog's copy of the commit does not match its id", commit=cid))
    for kind in RefKind:
        catalog_refs = repo.catalog.refs(kind.value)
        store_refs = {name.split(" ", 1)[1]: t for name, t in targets.items() if name.startswith(kind.noun + " ")}
        if catalog_refs != store_refs:
            differing = sorted(n for n in set(catalog_refs) | set(store_refs) if catalog_refs.get(n) != store_refs.get(n))
            problems.append(Problem("catalog", f"{kind.noun} refs differ from the store: {', '.join(differing)}"))
    return problems
