"""Recently written chunks, kept in memory as the next commit's delta bases. See
:class:`RecentChunks`."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .ids import content_id

if TYPE_CHECKING:
    import numpy as np


class RecentChunks:
    """Recently written chunks that may serve as delta bases, least recently used first out,
    at most ``limit_bytes`` in all (spare buffers included). Of a chunk it keeps either its
    raw bytes, so that the next commit's delta need not read it back, or only its sample
    (:func:`~ckptstore.codec.sample_of`), which is all the next commit needs to choose, for a
    chunk unlikely to be a base: that base is read back only if a delta pays after all.
    Thread-safe. Cached bytes are never changed; :meth:`retire` keeps their buffers for reuse
    once no task can be reading them (a fresh buffer costs a page fault per 4 KiB), but no
    more bytes of spares than are cached, the largest dropped first (each commit replaces
    what the last one cached)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._chunks: OrderedDict[str, tuple[np.ndarray, bool]] = OrderedDict()  # id → (bytes or sample, whole)
        self._spare: dict[int, list[np.ndarray]] = {}
        self._bytes = 0  # everything: bytes, samples and spares
        self._cached_bytes = 0  # bytes and samples
        self._spare_bytes = 0
        self._lock = threading.Lock()

    def get(self, chunk_id: str) -> np.ndarray | None:
        """The chunk's raw bytes, if they are kept."""
        found = self._get(chunk_id)
        return found[0] if found is not None and found[1] else None

    def get_sample(self, chunk_id: str) -> np.ndarray | None:
        """The chunk's sample, if only that is kept."""
        found = self._get(chunk_id)
        return found[0] if found is not None and not found[1] else None

    def _get(self, chunk_id: str) -> tuple[np.ndarray, bool] | None:
        with self._lock:
            found = self._chunks.get(chunk_id)
            if found is not None:
                self._chunks.move_to_end(chunk_id)
            return found

    def put(self, chunk_id: str, data: bytes | memoryview | np.ndarray) -> None:
        """Keep a copy of the raw bytes ``data`` (the caller's buffer may change afterwards),
        if the copy hashes to ``chunk_id``: a delta's base must be exactly the stored chunk."""
        self._put(chunk_id, data, whole=True)

    def put_sample(self, chunk_id: str, sample: np.ndarray) -> None:
        """Keep a copy of the chunk's sample, unless its raw bytes are kept."""
        self._put(chunk_id, sample, whole=False)

    def _put(self, chunk_id: str, data: bytes | memoryview | np.ndarray, *, whole: bool) -> None:
        import numpy as np

        size = len(data)
        if size > self.limit_bytes:
            return
        with self._lock:
            found = self._chunks.get(chunk_id)
            if found is not None and (found[1] or not whole):
                self._chunks.move_to_end(chunk_id)
                return
            spares = self._spare.get(size)
            copy = spares.pop() if spares else None
            if copy is None:
                self._bytes += size
            else:
                self._spare_bytes -= size
        if copy is None:
            copy = np.empty(size, dtype=np.uint8)
        copy[:] = np.frombuffer(data, dtype=np.uint8)
        stale = whole and content_id(copy.data) != chunk_id  # the caller's buffer changed
        with self._lock:
            found = self._chunks.get(chunk_id)
            if stale or (found is not None and (found[1] or not whole)):  # or another thread put it meanwhile
                self._release(copy)
            else:
                if found is not None:  # the sample, now superseded by the bytes
                    self._cached_bytes -= len(found[0])
                    self._release(found[0])
                self._chunks[chunk_id] = (copy, whole)
                self._chunks.move_to_end(chunk_id)
                self._cached_bytes += size
            self._shrink()

    def retire(self, chunk_ids: Iterable[str]) -> None:
        """Drop these chunks (superseded bases) and keep their buffers for reuse. Call it only
        when no task still reads them."""
        with self._lock:
            for chunk_id in chunk_ids:
                found = self._chunks.pop(chunk_id, None)
                if found is not None:
                    self._cached_bytes -= len(found[0])
                    self._release(found[0])
            self._shrink()

    def _release(self, data: np.ndarray) -> None:
        """Keep a buffer that no entry holds as a spare. Under the lock."""
        self._spare.setdefault(len(data), []).append(data)
        self._spare_bytes += len(data)

    def _shrink(self) -> None:
        for size in sorted(self._spare, reverse=True):  # the largest spares go first
            spares = self._spare[size]
            while spares and (self._bytes > self.limit_bytes or self._spare_bytes > self._cached_bytes):
                spares.pop()
                self._bytes -= size
                self._spare_bytes -= size
        while self._bytes > self.limit_bytes and self._chunks:
            old, _ = self._chunks.popitem(last=False)[1]
            self._bytes -= len(old)
            self._cached_bytes -= len(old)
