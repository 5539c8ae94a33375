"""Parallel chunk I/O under a byte budget.

Writing: each blob is cut into fixed-size chunks; a thread pool hashes each chunk, skips it if
the store has it, else encodes it (see :mod:`ckptstore.codec`: raw, zstd, byte planes, or a
delta against the same chunk of the parent commit; with ``compression="auto"`` only while the
sink, not the CPU, bounds the commit: :class:`EncodingBalance`) and writes it create-only. Reading: chunks
are announced to the store a few ahead of the workers (readahead), fetched, unframed (a delta
through its chain of bases), re-hashed against their id and written into a preallocated
buffer. xxhash, zstd, numpy and file I/O release the GIL, so the
pool uses every core. At most ``max_inflight_bytes`` of raw chunk data is staged at once, so
memory stays bounded whatever the checkpoint's size.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from .backends import ObjectStore
from .balance import EncodingBalance
from .codec import (
    CHAIN_PREFIX_BYTES,
    DTYPE_INFO,
    HEADER_SIZE,
    MAX_DELTA_CHAIN,
    Codec,
    DeltaBase,
    Frame,
    Kind,
    decode_into,
    delta_chain,
    encode_object,
    read_header,
    sample_of,
)  # fmt: skip
from .errors import IntegrityError, InvalidOption, ObjectNotFound, OutOfMemory, PreconditionFailed, SourceChanged
from .ids import content_id
from .layout import chunk_key
from .manifest import BlobSource, ChunkRef, Manifest, TensorKind
from .recent_chunks import RecentChunks

if TYPE_CHECKING:  # imported where chunks are read or written: sizing a store needs neither
    import numpy as np
    import torch

log = logging.getLogger("ckptstore")

_R = TypeVar("_R")

#: When to store a chunk as a delta against the parent commit's: never, whenever there is a
#: base, or where it is clearly smaller.
DeltaMode = Literal["off", "on", "auto"]
DELTA_MODES = ("off", "on", "auto")


def check_delta_mode(delta: str | None) -> None:
    """Refuse a delta mode other than those of :data:`DELTA_MODES` (``None``: the store's)."""
    if delta is not None and delta not in DELTA_MODES:
        raise InvalidOption("delta", f"must be one of {', '.join(DELTA_MODES)}, not {delta!r}")


#: How a commit encodes its chunks: "auto" where the sample says an encoding pays and the
#: sink, not the CPU, bounds the commit (see :class:`EncodingBalance`); "always" wherever the
#: sample says it pays; "never": every chunk raw and whole (no sampling, no deltas).
CompressionMode = Literal["auto", "always", "never"]
COMPRESSION_MODES = ("auto", "always", "never")


def check_compression_mode(compression: str | None) -> None:
    """Refuse a compression mode other than those of :data:`COMPRESSION_MODES` (``None``:
    the store's)."""
    if compression is not None and compression not in COMPRESSION_MODES:
        raise InvalidOption("compression", f"must be one of {', '.join(COMPRESSION_MODES)}, not {compression!r}")


#: ``progress(phase, done, total)``: called as long work advances (bytes, for commit and
#: checkout), from worker threads but never concurrently.
Progress = Callable[[str, int, int], None]


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
    delta_chunks: int = 0
    #: Of ``new_bytes``, what is not tensor data: each new chunk's frame, and whatever its
    #: encoding takes beyond its raw size.
    new_frame_bytes: int = 0


class _Scratch(threading.local):
    """Per-thread buffers, reused from chunk to chunk (a fresh buffer costs a page fault per
    4 KiB, more than the work done in it)."""

    def get(self, name: str, size: int) -> np.ndarray:
        import numpy as np

        buffer = self.__dict__.get(name)
        if buffer is None or len(buffer) < size:
            buffer = self.__dict__[name] = np.empty(size, dtype=np.uint8)
        return buffer[:size]


class ChunkReader:
    """Reads chunks verified against their ids, following delta chains."""

    def __init__(self, objects: ObjectStore) -> None:
        self._objects = objects
        self._scratch = _Scratch()

    def bases_of(self, chunk_id: str) -> tuple[str, ...] | None:
        """The chain a stored chunk is read through (``()`` if self-contained), or ``None``
        if the store lacks it. One small ranged read."""
        key = chunk_key(chunk_id)
        try:
            prefix = self._objects.get_range(key, 0, CHAIN_PREFIX_BYTES)
        except ObjectNotFound:
            return None
        codec, _, _ = read_header(prefix, key=key, kind=Kind.CHUNK)
        if codec is not Codec.DELTA:
            return ()
        return delta_chain(memoryview(prefix)[HEADER_SIZE:], key=key)[0]

    def will_read(self, ref: ChunkRef) -> None:
        """Tell the store that the chunk (and the bases its manifest records) is read soon:
        :meth:`~ckptstore.backends.ObjectStore.will_read`, a hint that holds no memory here."""
        for chunk_id in (ref.id, *ref.bases):
            self._objects.will_read(chunk_key(chunk_id))

    def read_into(self, ref: ChunkRef, target: np.ndarray, *, path: str | None = None, needed_by: str | None = None) -> None:
        """Fill ``target`` (uint8, ``ref.size`` long) with the chunk's bytes, checked against
        its id. A delta's bases are read first, one object body in memory at a time, and
        must be the chain ``ref.bases`` records; a chunk recorded as a delta may be stored
        self-contained (a writer stores a delta whose bases are gone whole again, in place).
        Corruption raises :class:`IntegrityError` naming the object and ``path``."""
        key = chunk_key(ref.id)
        try:
            f = self._objects.reader(key)
        except ObjectNotFound:
            where = f" (needed by {needed_by})" if needed_by else ""
            raise IntegrityError(f"chunk is missing{where}", key=key, path=path) from None
        with f:
            codec, raw_size, body_size = read_header(f.read(HEADER_SIZE), key=key, kind=Kind.CHUNK)
            if raw_size != ref.size:
                raise IntegrityError(f"chunk declares {raw_size} bytes, {ref.size} expected", key=key, path=path)
            bases: tuple[str, ...] = ()
            if codec is Codec.DELTA:
                first = f.read(1)
                prefix = first + f.read(first[0] * 16 + 1) if first else first
                bases, codec, prefix_size = delta_chain(prefix, key=key, path=path)
                body_size -= prefix_size
            if bases and bases != ref.bases:  # (a self-contained chunk where a delta was recorded was stored whole again)
                raise IntegrityError(
                    f"chunk is a delta against {bases[0]}, its manifest records {ref.bases[0] if ref.bases else 'no base'}",
                    key=key,
                    path=path,
                )
            if bases:
                self.read_into(ChunkRef(bases[0], ref.size, bases[1:]), target, path=path, needed_by=key)
            here = f.tell()
            stored = f.seek(0, os.SEEK_END) - here
            f.seek(here)
            if stored != body_size:  # checked before a buffer of the declared size is taken
                raise IntegrityError(f"object body is {stored} bytes, its header says {body_size}", key=key, path=path)
            raw_in_place = codec is Codec.RAW and not bases and body_size == raw_size
            body = target if raw_in_place else self._scratch.get("body", body_size)  # no staging copy for raw
            if not _read_exactly(f, body.data) or f.read(1):
                raise IntegrityError(f"object body is not the {body_size} bytes its header says", key=key, path=path)
            if not raw_in_place:
                decode_into(Frame(codec, raw_size, body.data, bases), target, xor=bool(bases), key=key, path=path)
        if content_id(target.data) != ref.id:
            raise IntegrityError("chunk content does not match its id", key=key, path=path)


class _Readahead:
    """Readahead for one read of many chunks: as a worker starts on the chunk at one
    position, the store is told (:meth:`ChunkReader.will_read`) of the next ``chunks``
    chunks, each once, so that the disk reads them while the workers decode; only chunks
    the pipeline has taken under its byte budget are announced, so no more than the budget
    (and the delta bases of those chunks) is ever read ahead of what is decoded.
    Thread-safe."""

    def __init__(self, reader: ChunkReader, *, chunks: int) -> None:
        self._reader = reader
        self._chunks = chunks
        self._refs: list[ChunkRef] = []
        self._admitted = 0  # positions below this are under the budget
        self._announced = 0  # positions below this were announced (or started)
        self._lock = threading.Lock()

    def add(self, ref: ChunkRef) -> int:
        """Register the next chunk to be read; its position."""
        with self._lock:
            self._refs.append(ref)
            return len(self._refs) - 1

    def admitted(self, position: int) -> None:
        """The chunk at ``position`` (and every one before it) is under the budget."""
        with self._lock:
            self._admitted = max(self._admitted, position + 1)

    def starting(self, position: int) -> None:
        """A worker starts reading the chunk at ``position``: announce those after it."""
        with self._lock:
            start = max(self._announced, position + 1)
            end = min(position + 1 + self._chunks, self._admitted)
            self._announced = max(self._announced, end)
            refs = self._refs[start:end]
        for ref in refs:
            self._reader.will_read(ref)


def value_bytes(manifest: Manifest) -> dict[int, int]:
    """Blob index → the size of the floating-point values it holds (2 for bf16, 4 for fp32;
    a complex number's parts), for blobs of floats: what byte grouping groups by."""
    out: dict[int, int] = {}
    for entry in manifest.tensors:
        if entry.blob in out:
            continue
        if entry.kind is TensorKind.NDARRAY:
            import numpy as np

            dtype = np.dtype(entry.dtype)
            floats, size = dtype.kind in "fc", dtype.itemsize // (2 if dtype.kind == "c" else 1)
        else:
            torch_dtype = DTYPE_INFO[entry.dtype]
            floats = torch_dtype.is_floating_point or torch_dtype.is_complex
            size = torch_dtype.itemsize // (2 if torch_dtype.is_complex else 1)
        out[entry.blob] = size if floats else 1
    return out


class Pipeline:
    """Writes and reads the chunks of manifests with a pool of ``threads``."""

    def __init__(self, objects: ObjectStore, *, threads: int, max_inflight_bytes: int, recent_chunks_bytes: int = 1 << 30) -> None:
        self._objects = objects
        self.threads = threads
        self.max_inflight_bytes = max_inflight_bytes
        self.reader = ChunkReader(objects)
        self.recent = RecentChunks(recent_chunks_bytes)
        self._scratch = _Scratch()
        self.balance = EncodingBalance(cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, writers=threads)

    def _drop_if_not(self, chunk_id: str, size: int, *, stored: bool | None) -> None:
        """After this call stored a chunk from bytes that changed while they were written,
        remove the object unless it reads back as its id (it may hold neither version)."""
        if not stored:
            return  # another writer's: its bytes are its own
        try:
            self.reader.read_into(ChunkRef(chunk_id, size, self.reader.bases_of(chunk_id) or ()), self._scratch.get("check", size))
        except IntegrityError:
            log.warning("chunk %s: its source changed while it was written; removing what was stored", chunk_id)
            self._objects.delete(chunk_key(chunk_id))

    def _stored_chain(self, chunk_id: str, parent: ChunkRef | None) -> tuple[str, ...] | None:
        """The chain a stored chunk is read through, if the store has the chunk and it reads
        through that chain (a writer never reuses a delta whose bases are gone); else
        ``None``. A chunk equal to the parent commit's is taken with the parent's chain."""
        if parent is not None and parent.id == chunk_id:
            if not self._objects.exists(chunk_key(chunk_id)):
                return None
            chain: tuple[str, ...] | None = parent.bases
        else:
            chain = self.reader.bases_of(chunk_id)
        if chain and not self._reads_through(chain):
            log.warning("chunk %s is a delta whose bases are gone; storing it whole again", chunk_id)
            return None
        return chain

    def _reads_through(self, chain: tuple[str, ...]) -> bool:
        """Whether every base of a delta's ``chain`` is stored the way a reader reads it: with
        the rest of the chain, or whole (one small ranged read each)."""
        for i, base in enumerate(chain):
            stored = self.reader.bases_of(base)
            if stored is None or (stored and stored != chain[i + 1 :]):
                return False
        return True

    def _put_chunk(self, chunk_id: str, parts: list[bytes | memoryview]) -> bool | None:
        """Store a chunk's encoding create-only; where the store holds the chunk as a delta
        whose bases are gone (left by a collector of an older version, or by damage), replace
        it, atomically (compare-and-swap on its version), with this encoding. Returns True if
        this call stored it, ``None`` if another writer stored it first."""
        key = chunk_key(chunk_id)
        if self._objects.put_if_absent(key, parts):
            return True
        for _ in range(3):
            chain = self.reader.bases_of(chunk_id)
            if chain is None:
                if self._objects.put_if_absent(key, parts):
                    return True
                continue
            if not chain or self._reads_through(chain):
                return None  # readable as stored (another writer's)
            try:
                _, version = self._objects.get_versioned(key)
                self._objects.put_if_version(key, b"".join(bytes(p) for p in parts), version=version)
                return True
            except (PreconditionFailed, ObjectNotFound):
                continue  # replaced or removed meanwhile: look again
        raise IntegrityError("chunk kept changing while it was repaired", key=key)

    def _run(self, tasks: Iterable[tuple[int, Callable[[], _R]]], *, progress: Progress | None = None, phase: str = "", total_bytes: int = 0) -> list[_R]:
        """Run ``(staged_bytes, fn)`` tasks in the pool under the byte budget; return their
        results in order. The first failure cancels what has not started and is raised.
        ``progress(phase, bytes_done, total_bytes)`` is called as tasks finish (serialised)."""
        budget = ByteBudget(self.max_inflight_bytes)
        failed = threading.Event()
        futures: list[Future[_R | None]] = []
        done_bytes = 0
        progress_lock = threading.Lock()

        def guarded(size: int, fn: Callable[[], _R]) -> _R | None:
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
            try:
                for size, fn in tasks:
                    if failed.is_set():
                        break
                    budget.acquire(size)
                    futures.append(pool.submit(guarded, size, fn))
                wait(futures)
            except BaseException:  # Ctrl-C: tasks not yet started are skipped, the pool ends with those running
                failed.set()
                raise
        errors = [exc for f in futures if (exc := f.exception()) is not None]
        if errors:
            raise errors[0]
        # no task failed, so none was skipped (None): each result is its task's
        return cast("list[_R]", [f.result() for f in futures])

    def write_blobs(
        self,
        manifest: Manifest,
        sources: dict[int, BlobSource],
        *,
        chunk_size_bytes: int,
        compression_level: int | None,
        parent_chunks: Mapping[int, list[ChunkRef]] | None = None,
        delta: DeltaMode = "off",
        max_delta_chain: int = 7,
        compression: CompressionMode = "auto",
        progress: Progress | None = None,
    ) -> WriteResult:
        """Store the chunks of every blob in ``sources`` and fill in the manifest's chunk
        lists. Idempotent; every chunk is durable when this returns.

        ``compression`` (with a ``compression_level``): "always" encodes each chunk the way
        its sample says pays; "auto" does so only where :attr:`balance` finds that the sink,
        not the CPU, bounds the commit, and writes the others raw; "never" writes every chunk
        raw and whole. Ids never depend on it: only the stored bytes do.

        ``parent_chunks``: blob index → the chunks of the same tensor in the parent commit.
        A chunk equal to the parent's is reused without a read; with ``delta`` on or auto, a
        changed one may be stored as the XOR against the parent's chunk at the same place,
        as long as that makes a chain of at most ``max_delta_chain`` bases (else it is stored
        whole: a keyframe). A chunk the store already holds is reused as it is stored."""
        check_delta_mode(delta)
        check_compression_mode(compression)
        if not 0 <= max_delta_chain <= MAX_DELTA_CHAIN:
            raise InvalidOption("max_delta_chain", f"must be between 0 and {MAX_DELTA_CHAIN}, not {max_delta_chain!r}")
        parent_chunks = parent_chunks or {}
        groups = value_bytes(manifest)
        if compression == "never":
            compression_level = None
        balance = self.balance if compression == "auto" and compression_level is not None else None
        if balance is not None:
            balance.start_commit()
        writer = _ChunkWriter(self, delta=delta, compression_level=compression_level, max_delta_chain=max_delta_chain, balance=balance)
        order: list[int] = []

        def tasks() -> Iterable[tuple[int, Callable[[], tuple[ChunkRef, bool, int]]]]:
            for index, source in sources.items():
                data = source.data
                parents = parent_chunks.get(index, [])
                group = groups.get(index, 1)
                for position, start in enumerate(range(0, len(data), chunk_size_bytes)):
                    view = data[start : start + chunk_size_bytes]
                    parent = parents[position] if position < len(parents) else None
                    order.append(index)
                    yield len(view), functools.partial(writer.store_chunk, view, parent, group, source)

        total = sum(len(source.data) for source in sources.values())
        try:
            results = self._run(tasks(), progress=progress, phase="commit", total_bytes=total)
        finally:  # once no task reads them: the parent's chunks that changed are no base now
            if delta != "off":
                self.recent.retire(writer.superseded)
        return _fill_chunk_lists(manifest, sources, order, results)

    def read_blobs(self, manifest: Manifest, blob_indices: Iterable[int], *, manifest_key: str, progress: Progress | None = None) -> dict[int, torch.Tensor]:
        """Read and verify the given blobs into new uint8 CPU tensors."""
        blob_indices = list(blob_indices)
        first_path: dict[int, str] = {}
        for entry in manifest.tensors:
            first_path.setdefault(entry.blob, entry.path)
        buffers: dict[int, torch.Tensor] = {}

        ahead = _Readahead(self.reader, chunks=self.threads)

        def read(position: int, ref: ChunkRef, target: np.ndarray, path: str | None) -> None:
            ahead.starting(position)
            self.reader.read_into(ref, target, path=path, needed_by=manifest_key)

        def tasks() -> Iterable[tuple[int, Callable[[], None]]]:
            for index in blob_indices:
                blob = manifest.blobs[index]
                buffer = _blob_buffer(blob.size, key=manifest_key, path=first_path.get(index))
                buffers[index] = buffer
                if blob.inline is not None:
                    if blob.size:
                        buffer.numpy()[:] = memoryview(blob.inline)
                    continue
                values = buffer.numpy()
                path = first_path.get(index)
                offset = 0
                for ref in blob.chunks:
                    target = values[offset : offset + ref.size]
                    offset += ref.size
                    position = ahead.add(ref)
                    yield ref.size, functools.partial(read, position, ref, target, path)
                    ahead.admitted(position)  # the pipeline asks for the next task once it took this one under its budget

        total = sum(sum(c.size for c in manifest.blobs[i].chunks) for i in blob_indices if manifest.blobs[i].inline is None)
        self._run(tasks(), progress=progress, phase="checkout", total_bytes=total)
        return buffers


class _ChunkWriter:
    """One :meth:`Pipeline.write_blobs` call's chunk stores: each chunk hashed, looked up,
    encoded (against its parent's chunk where a delta pays) and written, from the pool's
    threads, on the caller's bytes (no copy)."""

    def __init__(self, pipeline: Pipeline, *, delta: DeltaMode, compression_level: int | None, max_delta_chain: int, balance: EncodingBalance | None) -> None:
        self.pipeline = pipeline
        self.delta = delta
        self.compression_level = compression_level
        self.max_delta_chain = max_delta_chain
        self.balance = balance
        #: The parent's chunks this commit changed (no base for the next one).
        self.superseded: set[str] = set()

    def read_base(self, parent: ChunkRef) -> np.ndarray | None:
        data = self.pipeline._scratch.get("base", parent.size)
        try:
            self.pipeline.reader.read_into(parent, data)
        except IntegrityError as exc:  # the commit goes on, with a keyframe
            log.warning("chunk %s cannot serve as a delta base: %s", parent.id, exc)
            return None
        return data

    def base_for(self, parent: ChunkRef | None, size: int, group: int) -> DeltaBase | None:
        if self.delta == "off" or parent is None or group == 1 or self.compression_level is None:
            return None
        if parent.size != size or len(parent.bases) + 1 > self.max_delta_chain:
            return None
        data = self.pipeline.recent.get(parent.id)
        sample = self.pipeline.recent.get_sample(parent.id) if data is None else sample_of(data, group_bytes=group)
        if sample is None:  # nothing kept (a new process): read it to choose
            data = self.read_base(parent)
            if data is None:
                return None
            sample = sample_of(data, group_bytes=group)

        def load() -> np.ndarray | None:
            if not self.pipeline._objects.exists(chunk_key(parent.id)):
                return None  # removed since (GC): never write a delta against a missing base
            return data if data is not None else self.read_base(parent)

        return DeltaBase((parent.id, *parent.bases), size, sample, load)

    def store_chunk(self, view: memoryview, parent: ChunkRef | None, group: int, blob: BlobSource) -> tuple[ChunkRef, bool, int]:
        """Store one chunk of ``blob``. The bytes stored are the bytes hashed: unless the
        blob is a private copy (made at snapshot time or from a device, so stable), the
        caller's bytes are hashed again after they were encoded and after they were
        written, and a chunk whose bytes changed meanwhile is :class:`SourceChanged`, with
        nothing stored under its id that is not its bytes."""
        started_s = time.thread_time()
        chunk_id = content_id(view)
        size = len(view)
        if parent is not None and parent.id != chunk_id:
            self.superseded.add(parent.id)
        known = self.pipeline._stored_chain(chunk_id, parent)
        if known is not None:
            self.keep(chunk_id, view, group, whole=self.delta == "on")
            return ChunkRef(chunk_id, size, known), False, 0
        base = self.base_for(parent, size, group)
        chosen: list[tuple[Codec, float]] = []  # (codec, thread time) of an encoding chosen

        def worth(codec: Codec, stored_fraction: float) -> bool:
            assert self.balance is not None
            if self.balance.choose(size, group, codec, stored_fraction):
                chosen.append((codec, time.thread_time()))
                return True
            return False

        encoded = encode_object(
            Kind.CHUNK, view, compression_level=self.compression_level, group_bytes=group,
            base=base, delta="on" if self.delta == "on" else "auto",
            scratch=self.pipeline._scratch.get("encode", 2 * size), worth=worth if self.balance is not None else None,
        )  # fmt: skip
        encoded_s = time.thread_time()
        if not blob.private and encoded.codec is not Codec.RAW and content_id(view) != chunk_id:
            raise SourceChanged(blob.path)  # the encoder read other bytes: nothing stored
        put_started_s = time.thread_time()
        with self.balance.writing(encoded.stored_bytes) if self.balance is not None else nullcontext():
            stored = self.pipeline._put_chunk(chunk_id, encoded.parts)
        if self.balance is not None:  # CPU seconds besides encoding: before it, and in the write
            before_s = (chosen[0][1] if chosen else encoded_s) - started_s
            self.balance.worked(
                size,
                before_s + time.thread_time() - put_started_s,
                encoded=(chosen[0][0], group, encoded_s - chosen[0][1]) if chosen else None,
            )
        if not blob.private and content_id(view) != chunk_id:  # (a raw body is written from the caller's bytes)
            self.pipeline._drop_if_not(chunk_id, size, stored=stored)
            raise SourceChanged(blob.path)
        if stored is None:  # another writer stored it first
            known = self.pipeline.reader.bases_of(chunk_id)
            if known is None:
                raise IntegrityError("chunk vanished right after another writer stored it", key=chunk_key(chunk_id))
            self.keep(chunk_id, view, group, whole=self.delta == "on")
            return ChunkRef(chunk_id, size, known), False, 0
        # the next commit's delta likely pays where this one did, where a chain just
        # ended in a keyframe, or (until shown otherwise) where none was tried yet
        likely_base = parent is None or bool(encoded.bases) or bool(parent.bases)
        self.keep(chunk_id, view, group, whole=self.delta == "on" or likely_base, sample=encoded.sample)
        return ChunkRef(chunk_id, size, encoded.bases), True, encoded.stored_bytes

    def keep(self, chunk_id: str, view: memoryview, group: int, *, whole: bool, sample: np.ndarray | None = None) -> None:
        """Keep a chunk that the next commit may take as a base: its bytes, or its sample
        (``sample``, if encoding took it already)."""
        import numpy as np

        if self.delta == "off" or group == 1:
            return
        if whole:
            self.pipeline.recent.put(chunk_id, view)
        else:
            self.pipeline.recent.put_sample(chunk_id, sample if sample is not None else sample_of(np.frombuffer(view, dtype=np.uint8), group_bytes=group))


def _fill_chunk_lists(manifest: Manifest, sources: Mapping[int, BlobSource], order: list[int], results: list[tuple[ChunkRef, bool, int]]) -> WriteResult:
    """Set each written blob's chunk list, in order, and count what was written and reused."""
    out = WriteResult()
    for index in sources:
        manifest.blobs[index].chunks = []
    for index, (ref, written, stored) in zip(order, results):
        manifest.blobs[index].chunks.append(ref)
        if written:
            out.new_chunks += 1
            out.new_bytes += stored
            out.new_frame_bytes += stored - min(stored - HEADER_SIZE, ref.size)
            out.delta_chunks += bool(ref.bases)
        else:
            out.reused_chunks += 1
            out.reused_bytes += ref.size
    return out


def _blob_buffer(size: int, *, key: str, path: str | None) -> torch.Tensor:
    """A new uint8 CPU tensor of ``size`` bytes for a blob to be read into; memory exhaustion
    is :class:`OutOfMemory` naming ``key`` and ``path``. (Advising transparent huge pages
    here was measured: it halves the page faults of filling fresh memory, but where the page
    cache holds the files just read, the kernel compacts memory to find huge pages on each
    fault, and a warm checkout took 2.3 s instead of 0.5 s. So no advice.)"""
    import torch

    try:
        return torch.empty(size, dtype=torch.uint8)
    except (RuntimeError, MemoryError) as exc:  # torch's allocator raises RuntimeError
        raise OutOfMemory(size, key=key, path=path) from exc


def _read_exactly(f: Any, target: memoryview) -> bool:
    """Fill ``target`` from ``f``; False if the file ends first."""
    n = 0
    while n < len(target):
        got = f.readinto(target[n:])
        if not got:
            return False
        n += got
    return True
