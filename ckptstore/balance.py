"""The encoding balance: whether a commit spends CPU on encoding a chunk, or writes it raw
(``compression="auto"``), from measured speeds of the sink and the CPU. See
:class:`EncodingBalance`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .codec import Codec


class _Rate:
    """An amount per second as the ratio of two exponentially weighted sums (with each new
    sample, the earlier ones weigh ``decay`` times as much): recent samples count most, and a
    sample of almost no seconds cannot make it infinite."""

    def __init__(self, decay: float = 0.8) -> None:
        self.decay = decay
        self.amount = 0.0
        self.seconds = 0.0

    def add(self, amount: float, seconds: float) -> None:
        self.amount = self.amount * self.decay + amount
        self.seconds = self.seconds * self.decay + max(0.0, seconds)

    @property
    def per_s(self) -> float | None:
        """``None`` until something was measured; infinite if it took no time."""
        if self.amount <= 0:
            return None
        return self.amount / self.seconds if self.seconds > 0 else float("inf")


class EncodingBalance:
    """Chooses, chunk by chunk, whether a commit spends CPU on encoding (``compression="auto"``).

    It measures how fast the sink takes bytes (see :meth:`writing`), what the CPU spends per
    raw byte on the rest of a chunk's work (hashing, sampling, the write's own system calls),
    and what encoding costs per raw byte (CPU time, per codec and value size). A commit keeps
    two clocks: the CPU seconds of the work chosen so far spread over the cores (at most
    ``writers``, the threads), and the seconds the sink needs for the bytes chosen so far;
    it finishes at about the later of the two. A chunk whose encoding pays (see
    :func:`~ckptstore.codec.encode_object`) is encoded where that makes the later clock
    earlier than writing it raw would: where the sink is the bottleneck and the cores have
    time to spare. Until the sink and that encoding have both been measured, the chunk is
    encoded (a probe). Measurements carry over from one commit to the next (recent ones count
    most); the clocks start again with each commit. Thread-safe."""

    def __init__(self, *, cores: int, writers: int) -> None:
        self.cores = max(1, min(cores, writers))
        self.writers = max(1, writers)
        self._lock = threading.Lock()
        self._sink = _Rate()  # stored bytes per second of writing
        self._work = _Rate()  # raw bytes per CPU second of a chunk's work besides encoding
        self._encode: dict[tuple[Codec, int], _Rate] = {}  # raw bytes per CPU second of encoding
        self._cpu_clock_s = 0.0
        self._sink_clock_s = 0.0

    def start_commit(self) -> None:
        with self._lock:
            self._cpu_clock_s = self._sink_clock_s = 0.0

    def choose(self, size_bytes: int, group: int, codec: Codec, stored_fraction: float) -> bool:
        """Whether to encode a chunk of ``size_bytes`` whose encoding as ``codec`` would store
        ``stored_fraction`` of it; the choice is added to the clocks."""
        with self._lock:
            sink, work, encode = self._sink.per_s, self._work.per_s, self._encode.get((codec, group))
            encode_per_s = encode.per_s if encode is not None else None
            work_s = size_bytes / work / self.cores if work else 0.0  # (0 until measured)
            if sink is None or encode_per_s is None:  # a probe
                self._cpu_clock_s += work_s
                return True
            encode_s = size_bytes / encode_per_s / self.cores
            raw_finish = max(self._cpu_clock_s + work_s, self._sink_clock_s + size_bytes / sink)
            encoded_finish = max(self._cpu_clock_s + work_s + encode_s, self._sink_clock_s + stored_fraction * size_bytes / sink)
            encoded = encoded_finish < raw_finish
            self._cpu_clock_s += work_s + (encode_s if encoded else 0.0)
            self._sink_clock_s += (stored_fraction if encoded else 1.0) * size_bytes / sink
            return encoded

    def worked(self, size_bytes: int, cpu_s: float, *, encoded: tuple[Codec, int, float] | None = None) -> None:
        """Record a chunk's CPU seconds besides encoding, and ``(codec, group, cpu_s)`` of
        its encoding if it was encoded."""
        with self._lock:
            self._work.add(size_bytes, cpu_s)
            if encoded is not None:
                codec, group, encode_s = encoded
                self._encode.setdefault((codec, group), _Rate()).add(size_bytes, encode_s)

    @contextmanager
    def writing(self, stored_bytes: int) -> Iterator[None]:
        """Time one write of ``stored_bytes``, made by this thread inside the block, into the
        sink's speed: its seconds off the CPU (its CPU seconds, copying into the page cache
        say, count on the CPU clock) over the ``writers`` that may write at once. A sink that
        serves one write at a time keeps every writer waiting, and the sum comes to its
        busy time; one that serves many is credited with them."""
        started_s, started_cpu_s = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            waited_s = max(0.0, (time.perf_counter() - started_s) - (time.thread_time() - started_cpu_s))
            with self._lock:
                self._sink.add(stored_bytes, waited_s / self.writers)
