"""Repack: re-encode stored chunks in place, off the training path.

A commit may store its chunks raw (``compression_level=None``, or an encoder that chose speed
over size). :func:`repack` reads the chunks of chosen commits that are stored raw or as plain
zstd, encodes each again the way a commit with CPU to spare would (byte planes and zstd,
:func:`~ckptstore.codec.encode_object`, kept wherever they save :data:`REPACK_MIN_SAVING` of
the raw size), and replaces the object under the same key where that is smaller. The id is
the hash of the raw bytes, so only the stored form changes.

Safe with concurrent readers, writers and a collector (``docs/design.md``, "Repack"):

- **Atomic, never a resurrection.** A chunk is replaced by compare-and-swap on the version
  read (locally: a temp file renamed over it under the object's lock file; S3: one PUT with
  ``If-Match``), so a reader sees the old object or the new, whole; a chunk removed or
  replaced since it was read is left as it is (the swap is refused), never created again.
- **The collector's protocol.** Each replacement is made while holding a writer marker
  (:func:`~ckptstore.lease.writing`), taken after any batch of deletions in progress ended
  and checked fresh right before the swap, so no collector deletes while a chunk is swapped.
- **Self-contained only.** A chunk is rewritten self-contained, never as a delta: readers,
  fsck and the collector take a chunk's chain from the manifests that name it, and those are
  immutable, so a chain added in place would be refused by readers and unknown to the
  collector (which could delete its base). Chunks already stored as deltas or byte planes
  are left alone, so the chain of every stored chunk stays what its manifests record.

Idempotent: encoding is deterministic, so a second run finds nothing to shrink.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum

from .backends import ObjectStore
from .codec import HEADER_SIZE, Codec, Kind, decode_object, encode_object, read_header
from .commit import Commit
from .errors import IntegrityError, ObjectNotFound, PreconditionFailed
from .history import ancestors
from .ids import content_id
from .inventory import Repository
from .layout import chunk_key, commit_key
from .lease import DEFAULT_MARKER_TTL_S, writing
from .pipeline import Progress, value_bytes
from .refs import RefKind

log = logging.getLogger("ckptstore.repack")

#: zstd level for repacked chunks where the store has none (``compression_level=None``): at
#: levels up to 3 byte planes use zstd tuned for them (``codec._compressor``).
DEFAULT_REPACK_LEVEL = 3
#: Repack keeps an encoding wherever it saves this fraction of the raw size (a commit keeps
#: one only above ``codec.MIN_SAVING``, to keep CPU off its critical path; repack runs off it).
REPACK_MIN_SAVING = 0.05
#: A chunk is replaced only if its new object is smaller by at least this fraction of its raw
#: size (a rewrite costs a write and a lock for nothing less).
REPACK_MIN_GAIN = 0.01
#: Codecs of the chunks repack encodes again: raw, and plain zstd (byte planes may beat it
#: for floats). Byte planes are what repack writes; deltas are left as their manifests say.
REPACKED_CODECS = (Codec.RAW, Codec.ZSTD)


class Outcome(Enum):
    REWRITTEN = "rewritten"  # (dry run: would be)
    COMPACT = "compact"  # already byte planes or a delta, or no smaller encoding
    MISSING = "missing"  # collected, or dropped by a demotion, before repack got to it
    CHANGED = "changed"  # removed or replaced between its read and its swap


@dataclass
class RepackReport:
    """What :func:`repack` did (``dry_run``: would do)."""

    dry_run: bool
    commits: int = 0
    #: Distinct chunks of those commits that were looked at.
    chunks: int = 0
    rewritten_chunks: int = 0
    #: Stored bytes of the rewritten chunks, before and after.
    stored_bytes_before: int = 0
    stored_bytes_after: int = 0
    compact_chunks: int = 0
    missing_chunks: int = 0
    changed_chunks: int = 0
    elapsed_s: float = 0.0

    @property
    def saved_bytes(self) -> int:
        return self.stored_bytes_before - self.stored_bytes_after

    def summary(self) -> str:
        verb = "would rewrite" if self.dry_run else "rewrote"
        out = (
            f"{verb} {self.rewritten_chunks} of {self.chunks} chunks in {self.commits} commits: "
            f"{self.stored_bytes_before:,} -> {self.stored_bytes_after:,} bytes (saves {self.saved_bytes:,})"
        )
        if self.missing_chunks or self.changed_chunks:
            out += f"; {self.missing_chunks + self.changed_chunks} chunks were removed or replaced meanwhile (left alone)"
        return out


def reachable_commits(repo: Repository) -> list[str]:
    """Every stored commit a branch or tag reaches, along the parents history follows."""
    heads = [cid for kind in RefKind for cid in repo.refs.list(kind).values()]

    def parents_of(cid: str) -> list[str] | None:
        commit = _stored_commit(repo, cid)
        return None if commit is None else repo.parents_of(commit)

    return ancestors(heads, parents_of)


def _stored_commit(repo: Repository, commit_id: str) -> Commit | None:
    try:
        return repo.get_commit(commit_id)
    except IntegrityError:
        if repo.objects.exists(commit_key(commit_id)):
            raise  # damage: fsck's business, and no reason to rewrite anything
        return None  # collected meanwhile


def _chunks_of(repo: Repository, commit_ids: Iterable[str]) -> tuple[int, dict[str, tuple[int, int]]]:
    """How many of ``commit_ids`` are still stored, and chunk id → (raw size, value size)
    for every chunk their manifests name (a chunk's first blob gives its value size)."""
    chunks: dict[str, tuple[int, int]] = {}
    commits = 0
    for cid in commit_ids:
        commit = _stored_commit(repo, cid)
        if commit is None:
            continue
        try:
            manifest = repo.manifest_of(commit)
        except IntegrityError:
            if repo.objects.exists(commit_key(cid)):
                raise
            continue  # collected meanwhile
        commits += 1
        groups = value_bytes(manifest)
        for index, blob in enumerate(manifest.blobs):
            for ref in blob.chunks:
                chunks.setdefault(ref.id, (ref.size, groups.get(index, 1)))
    return commits, chunks


def encoded_for_repack(raw: bytes | memoryview, *, group_bytes: int, compression_level: int) -> tuple[Codec, list[bytes | memoryview]]:
    """How repack stores ``raw`` self-contained: ``(codec, parts of the framed object)``."""
    encoded = encode_object(Kind.CHUNK, raw, compression_level=compression_level, group_bytes=group_bytes, min_saving=REPACK_MIN_SAVING)
    return encoded.codec, encoded.parts


def repack(
    repo: Repository,
    commit_ids: Iterable[str] | None = None,
    *,
    compression_level: int | None = None,
    dry_run: bool = False,
    threads: int | None = None,
    marker_ttl_s: float = DEFAULT_MARKER_TTL_S,
    progress: Progress | None = None,
) -> RepackReport:
    """Re-encode the raw or zstd chunks of ``commit_ids`` (default: every commit a ref
    reaches) as :mod:`ckptstore.repack` describes. ``compression_level``: default the
    store's, else :data:`DEFAULT_REPACK_LEVEL`. ``dry_run`` reads and encodes, and writes
    nothing. ``progress("repack", raw_bytes_done, raw_bytes_total)``. Idempotent; a killed
    repack leaves every chunk whole (old or new)."""
    started = time.monotonic()
    objects = repo.objects
    level = (
        compression_level
        if compression_level is not None
        else (repo.config.compression_level if repo.config.compression_level is not None else DEFAULT_REPACK_LEVEL)
    )
    ids = reachable_commits(repo) if commit_ids is None else list(dict.fromkeys(commit_ids))
    report = RepackReport(dry_run=dry_run)
    report.commits, chunks = _chunks_of(repo, ids)
    report.chunks = len(chunks)
    total = sum(size for size, _ in chunks.values())
    done = 0
    lock = threading.Lock()

    def one(chunk_id: str, size: int, group: int) -> None:
        nonlocal done
        outcome, before, after = _repack_chunk(objects, chunk_id, size, group, level=level, dry_run=dry_run, marker_ttl_s=marker_ttl_s)
        with lock:
            done += size
            if outcome is Outcome.REWRITTEN:
                report.rewritten_chunks += 1
                report.stored_bytes_before += before
                report.stored_bytes_after += after
            elif outcome is Outcome.COMPACT:
                report.compact_chunks += 1
            elif outcome is Outcome.MISSING:
                report.missing_chunks += 1
            else:
                report.changed_chunks += 1
            if progress is not None:
                progress("repack", done, total)

    workers = threads or max(1, (os.cpu_count() or 2) // 2)  # leave the training job cores
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckptstore-repack") as pool:
        for future in [pool.submit(one, cid, size, group) for cid, (size, group) in sorted(chunks.items())]:
            future.result()
    report.elapsed_s = time.monotonic() - started
    return report


def _repack_chunk(objects: ObjectStore, chunk_id: str, size: int, group: int, *, level: int, dry_run: bool, marker_ttl_s: float) -> tuple[Outcome, int, int]:
    """Repack one chunk: ``(outcome, stored bytes before, after)``."""
    key = chunk_key(chunk_id)
    try:
        codec, raw_size, _ = read_header(objects.get_range(key, 0, HEADER_SIZE), key=key, kind=Kind.CHUNK)
    except ObjectNotFound:
        return Outcome.MISSING, 0, 0
    if raw_size != size:
        raise IntegrityError(f"chunk declares {raw_size} bytes, {size} expected", key=key)
    if codec not in REPACKED_CODECS:
        return Outcome.COMPACT, 0, 0
    try:
        data, version = objects.get_versioned(key)
    except ObjectNotFound:
        return Outcome.MISSING, 0, 0
    raw = decode_object(data, key=key, kind=Kind.CHUNK, max_raw_size=size)
    if len(raw) != size or content_id(raw) != chunk_id:  # never re-encode damage as if it were the chunk
        raise IntegrityError("chunk content does not match its id", key=key)
    new_codec, parts = encoded_for_repack(raw, group_bytes=group, compression_level=level)
    new_size = sum(len(p) for p in parts)
    if new_codec is Codec.DELTA or new_size > len(data) - REPACK_MIN_GAIN * size:
        return Outcome.COMPACT, 0, 0
    if dry_run:
        return Outcome.REWRITTEN, len(data), new_size
    body = b"".join(parts)
    with writing(objects, ttl_s=marker_ttl_s) as marker:  # no collector deletes while it is held
        marker.check()
        try:
            objects.put_if_version(key, body, version=version)  # refused if removed or replaced since the read
        except (PreconditionFailed, ObjectNotFound):
            return Outcome.CHANGED, 0, 0
    return Outcome.REWRITTEN, len(data), new_size
