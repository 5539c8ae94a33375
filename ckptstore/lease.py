"""Leases: the garbage collector's exclusive lease, and the markers writers hold while they
write.

A collector must never delete an object that a writer has just found stored and decided to
reuse. The two exclude each other with two objects and no clock (Dekker's handshake, which
holds on strongly consistent storage, as local disks and S3 are)::

    writer:     create locks/writers/ID    then read locks/gc:     wait while it says sweeping
    collector:  mark locks/gc sweeping     then list locks/writers: if any writer is live,
                                           unmark and wait

Whichever goes second sees the other, so a collector deletes only while no writer is between
its first "already stored?" check and its ref update. Both objects say who holds them (host,
pid); one whose holder died on this host, or that is older than its time limit, is ignored,
so a killed process never blocks the store for long.

``locks/gc`` also stops two collectors at once: it is taken by compare-and-swap, names its
holder and expires ``ttl_s`` after its last renewal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import msgpack

from .codec import Kind, decode_object, encode_object_bytes
from .errors import CkptStoreError, CollectorBusy, ObjectNotFound, PreconditionFailed
from .objectstore import ObjectStore, pid_alive

log = logging.getLogger("ckptstore.lease")

LEASE_KEY = "locks/gc"
WRITERS_PREFIX = "locks/writers/"


def _encode(record: dict) -> bytes:
    return encode_object_bytes(Kind.RECORD, msgpack.packb(record, use_bin_type=True), compression_level=None)


def _decode(data: bytes, key: str) -> dict:
    doc = msgpack.unpackb(decode_object(data, key=key, kind=Kind.RECORD, max_raw_size=1 << 16), raw=False)
    if not isinstance(doc, dict):
        raise ValueError(f"record {key} is not a map")
    return doc


def _holder_dead(record: dict) -> bool:
    """Whether the process named by a record is known to be dead (only knowable on this host)."""
    return record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int) and not pid_alive(record["pid"])


@dataclass(frozen=True)
class LeaseState:
    """What ``locks/gc`` says: who holds it, until when, and whether it is deleting now."""

    holder: str
    host: str
    pid: int
    expires_at_s: float
    sweeping: bool

    @property
    def live(self) -> bool:
        return time.time() < self.expires_at_s and not _holder_dead(asdict(self))


def read_lease(objects: ObjectStore) -> tuple[LeaseState | None, str | None]:
    """The current lease and its version; ``(None, None)`` if there is none. A lease that
    cannot be decoded reads as an expired one (so it can be taken over)."""
    try:
        data, version = objects.get_versioned(LEASE_KEY)
    except ObjectNotFound:
        return None, None
    try:
        doc = _decode(data, LEASE_KEY)
        state = LeaseState(str(doc["holder"]), str(doc["host"]), int(doc["pid"]), float(doc["expires_at_s"]), bool(doc["sweeping"]))
    except (CkptStoreError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        log.warning("garbage collector lease is unreadable (%s); treating it as expired", exc)
        state = LeaseState("?", "?", -1, 0.0, False)
    return state, version


class CollectorLease:
    """The exclusive lease of one garbage collector (``locks/gc``). Not thread-safe: one
    collector, one thread."""

    def __init__(self, objects: ObjectStore, *, ttl_s: float = 300.0) -> None:
        self._objects = objects
        self.ttl_s = ttl_s
        self.holder = uuid.uuid4().hex
        self._version: str | None = None
        self.sweeping = False

    def _write(self, *, sweeping: bool, expected: str | None) -> None:
        record = {
            "holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
            "expires_at_s": time.time() + self.ttl_s, "sweeping": sweeping,
        }  # fmt: skip
        self._version = self._objects.put_if_version(LEASE_KEY, _encode(record), version=expected)
        self.sweeping = sweeping

    def acquire(self) -> None:
        """Take the lease; raise :class:`CollectorBusy` if a live collector holds it. An
        expired lease, or one whose holder died on this host, is taken over."""
        deadline = time.monotonic() + 3.0
        while True:
            current, version = read_lease(self._objects)
            if current is not None and current.live:
                raise CollectorBusy(
                    f"another garbage collector (pid {current.pid} on {current.host}) holds the lease "
                    f"{LEASE_KEY} for {max(0.0, current.expires_at_s - time.time()):.0f} s more"
                )
            try:
                self._write(sweeping=False, expected=version)
                return
            except PreconditionFailed:
                # Another collector won, or the lease's lock file is held (or was left by a
                # process killed mid-update, which the store breaks after a moment): look again.
                if time.monotonic() > deadline:
                    raise CollectorBusy(f"another garbage collector took the lease {LEASE_KEY} first") from None
                time.sleep(0.1)

    def renew(self, *, sweeping: bool) -> None:
        """Extend the lease and set whether this collector is deleting. Raises
        :class:`CollectorBusy` if the lease was lost (it expired and was taken over)."""
        try:
            self._write(sweeping=sweeping, expected=self._version)
        except PreconditionFailed:
            raise CollectorBusy(f"the garbage collector lease {LEASE_KEY} was lost (expired and taken over)") from None

    def release(self) -> None:
        """Give the lease up. Idempotent; never raises: a lease that cannot be deleted (the
        store failing) is left to expire after its TTL, and the error that ended the
        collection, if any, is the one the caller sees."""
        if self._version is not None:
            try:
                self._objects.delete_if_version(LEASE_KEY, version=self._version)
            except (PreconditionFailed, ObjectNotFound):
                pass
            except CkptStoreError as exc:
                log.warning("could not release the GC lease (it expires by itself): %s", exc)
            self._version = None


@dataclass(frozen=True)
class WriterMarker:
    """One ``locks/writers/ID`` object: a writer between its first dedup check and its ref
    update."""

    key: str
    host: str
    pid: int
    age_s: float


def writers(objects: ObjectStore, *, timeout_s: float) -> tuple[list[WriterMarker], list[WriterMarker]]:
    """The live and the abandoned writer markers. A marker is abandoned if its process died
    on this host or it is older than ``timeout_s``."""
    live, abandoned = [], []
    now = time.time()
    for info in objects.list_info(WRITERS_PREFIX):
        try:
            doc = _decode(objects.get(info.key), info.key)
            marker = WriterMarker(info.key, str(doc["host"]), int(doc["pid"]), now - info.modified_s)
            dead = _holder_dead(doc)
        except ObjectNotFound:
            continue  # its writer finished
        except (CkptStoreError, ValueError, KeyError, TypeError, msgpack.UnpackException):
            marker, dead = WriterMarker(info.key, "?", -1, now - info.modified_s), False
        (abandoned if dead or marker.age_s > timeout_s else live).append(marker)
    return live, abandoned


@contextlib.contextmanager
def writing(objects: ObjectStore, *, poll_s: float = 0.05) -> Iterator[None]:
    """Hold a writer marker for the block. On entry, wait while a live collector is deleting,
    so nothing the block finds stored can be deleted before the block ends."""
    key = f"{WRITERS_PREFIX}{uuid.uuid4().hex}"
    objects.put_if_absent(key, _encode({"host": socket.gethostname(), "pid": os.getpid(), "started_at_s": time.time()}))
    try:
        waited = False
        while True:
            lease, _ = read_lease(objects)
            if lease is None or not lease.sweeping or not lease.live:
                break
            if not waited:
                log.info("waiting for the garbage collector to finish a batch of deletions")
                waited = True
            time.sleep(poll_s)
        yield
    finally:
        with contextlib.suppress(CkptStoreError):
            objects.delete(key)
