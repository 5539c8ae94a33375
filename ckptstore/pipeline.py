"""Parallel chunk I/O under a byte budget.

Writing: each blob is cut into fixed-size chunks; a thread pool hashes each chunk, skips it if
the store has it, else compresses it and writes it create-only. Reading: chunks are fetched,
unframed, re-hashed against their id and copied into a preallocated buffer. xxhash, zstd and
file I/O release the GIL, so the pool uses every core. At most ``max_inflight_bytes`` of raw
chunk data is staged at once, so memory stays bounded whatever the checkpoint's size.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .codec import HEADER_SIZE, Codec, Kind, decode_object, encode_object, read_header
from .errors import IntegrityError, ObjectNotFound
from .ids import content_id
from .manifest import BlobSource, ChunkRef, Manifest
from .objectstore import ObjectStore

#: ``progress(phase, done, total)``: called as long work advances (bytes, for commit and
#: checkout), from worker threads but never concurrently.
Progress = Callable[[str, int, int], None]


def chunk_key(chunk_id: str) -> str:
    return f"chunks/{chunk_id[:2]}/{chunk_id}"


def default_threads(objects: ObjectStore | None = None) -> int:
    """Threads for a store: twice the cores (at most 16) where the work is CPU and disk
    bound, or the backend's ``requests_in_flight`` where each request waits on a network
    round trip (S3)."""
    cpu = min(16, 2 * (os.cpu_count() or 1))
    return max(cpu, getattr(objects, "requests_in_flight", 0) or 0)


class ByteBudget:
    """A counting semaphore over bytes. One request larger than the whole budget is let
    through alone, so nothing deadlocks."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self._used and self._used + n > self.limit_bytes:
                self._cond.wait()
            self._used += n

    def release(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()


@dataclass
class WriteResult:
    new_chunks: int = 0
    new_bytes: int = 0
    reused_chunks: int = 0
    reused_bytes: int = 0


class Pipeline:
    """Writes and reads the chunks of manifests with a pool of ``threads``."""

    def __init__(self, objects: ObjectStore, *, threads: int, max_inflight_bytes: int) -> None:
        self._objects = objects
        self.threads = threads
        self.max_inflight_bytes = max_inflight_bytes

    def _run(self, tasks: Iterable[tuple[int, Callable[[], object]]], *, progress: Progress | None = None, phase: str = "", total_bytes: int = 0) -> list[object]:
        """Run ``(staged_bytes, fn)`` tasks in the pool under the byte budget; return their
        results in order. The first failure cancels what has not started and is raised.
        ``progress(phase, bytes_done, total_bytes)`` is called as tasks finish (serialised)."""
        budget = ByteBudget(self.max_inflight_bytes)
        failed = threading.Event()
        futures: list[Future] = []
        done_bytes = 0
        progress_lock = threading.Lock()

        def guarded(size: int, fn: Callable[[], object]) -> object:
            nonlocal done_bytes
            try:
                if failed.is_set():
                    return None
                out = fn()
                if progress is not None:
                    with progress_lock:
                        done_bytes += size
                        progress(phase, done_bytes, total_bytes)
                return out
            except BaseException:
                failed.set()
                raise
            finally:
                budget.release(size)

        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="ckptstore-io") as pool:
            for size, fn in tasks:
                if failed.is_set():
                    break
                budget.acquire(size)
                futures.append(pool.submit(guarded, size, fn))
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]
        return [f.result() for f in futures]

    def write_blobs(
        self, manifest: Manifest, sources: dict[int, BlobSource], *, chunk_size_bytes: int, compression_level: int | None, progress: Progress | None = None
    ) -> WriteResult:
        """Store the chunks of every blob in ``sources`` and fill in the manifest's chunk
        lists. Idempotent; every chunk is durable when this returns."""

        def store_chunk(view: memoryview) -> tuple[ChunkRef, bool, int]:
            chunk_id = content_id(view)
            key = chunk_key(chunk_id)
            if self._objects.exists(key):
                return ChunkRef(chunk_id, len(view)), False, 0
            parts = encode_object(Kind.CHUNK, view, compression_level=compression_level)
            written = self._objects.put_if_absent(key, parts)
            return ChunkRef(chunk_id, len(view)), written, sum(len(p) for p in parts) if written else 0

        order: list[int] = []

        def tasks() -> Iterable[tuple[int, Callable[[], object]]]:
            for index, source in sources.items():
                data = source.data
                for start in range(0, len(data), chunk_size_bytes):
                    view = data[start : start + chunk_size_bytes]
                    order.append(index)
                    yield len(view), (lambda v=view: store_chunk(v))

        total = sum(len(source.data) for source in sources.values())
        results = self._run(tasks(), progress=progress, phase="commit", total_bytes=total)
        out = WriteResult()
        for index in sources:
            manifest.blobs[index].chunks = []
        for index, (ref, written, stored) in zip(order, results):  # type: ignore[misc]
            manifest.blobs[index].chunks.append(ref)
            if written:
                out.new_chunks += 1
                out.new_bytes += stored
            else:
                out.reused_chunks += 1
                out.reused_bytes += ref.size
        return out

    def read_blobs(self, manifest: Manifest, blob_indices: Iterable[int], *, manifest_key: str, progress: Progress | None = None) -> dict[int, torch.Tensor]:
        """Read and verify the given blobs into new uint8 CPU tensors."""
        blob_indices = list(blob_indices)
        first_path: dict[int, str] = {}
        for entry in manifest.tensors:
            first_path.setdefault(entry.blob, entry.path)
        buffers: dict[int, torch.Tensor] = {}

        def fetch(ref: ChunkRef, target: memoryview, path: str | None) -> None:
            key = chunk_key(ref.id)
            try:
                f = self._objects.reader(key)
            except ObjectNotFound:
                raise IntegrityError(f"chunk is missing (needed by manifest {manifest_key})", key=key, path=path) from None
            with f:
                codec, raw_size, body_size = read_header(f.read(HEADER_SIZE), key=key, kind=Kind.CHUNK)
                if codec is Codec.RAW and raw_size == body_size == ref.size and _read_exactly(f, target) and not f.read(1):
                    raw: bytes | memoryview = target  # read straight into place: no staging copy
                else:  # compressed, or malformed: decode_object checks it and names the fault
                    f.seek(0)
                    raw = decode_object(f.read(), key=key, kind=Kind.CHUNK, max_raw_size=ref.size, path=path)
            if len(raw) != ref.size or content_id(raw) != ref.id:
                raise IntegrityError("chunk content does not match its id", key=key, path=path)
            if raw is not target:
                target[:] = raw

        def tasks() -> Iterable[tuple[int, Callable[[], object]]]:
            for index in blob_indices:
                blob = manifest.blobs[index]
                buffer = torch.empty(blob.size, dtype=torch.uint8)
                buffers[index] = buffer
                if blob.inline is not None:
                    if blob.size:
                        buffer.numpy()[:] = memoryview(blob.inline)
                    continue
                view = memoryview(buffer.numpy()).cast("B") if blob.size else memoryview(b"")
                offset = 0
                for ref in blob.chunks:
                    target = view[offset : offset + ref.size]
                    offset += ref.size
                    yield ref.size, (lambda r=ref, t=target, p=first_path.get(index): fetch(r, t, p))

        total = sum(sum(c.size for c in manifest.blobs[i].chunks) for i in blob_indices if manifest.blobs[i].inline is None)
        self._run(tasks(), progress=progress, phase="checkout", total_bytes=total)
        return buffers


def _read_exactly(f: Any, target: memoryview) -> bool:
    """Fill ``target`` from ``f``; False if the file ends first."""
    n = 0
    while n < len(target):
        got = f.readinto(target[n:])
        if not got:
            return False
        n += got
    return True
