"""Leases: the garbage collector's exclusive lease, and the markers writers hold while they
write.

A collector must never delete an object that a writer has just found stored and decided to
reuse. The two exclude each other with two objects (Dekker's handshake, which holds on
strongly consistent storage, as local disks, memory and S3 are)::

    writer:     create locks/writers/ID    then read locks/gc:     wait while it is live and sweeping
    collector:  mark locks/gc sweeping     then list locks/writers: if any writer is live,
                                           unmark and wait

Whichever goes second sees the other, so a collector deletes only while no writer is between
its first "already stored?" check and its ref update.

**Liveness never depends on a pid alone or on a local clock.** Each record names its holder
by a :class:`ProcessIdentity` (boot id, pid namespace, pid, process start time) and carries
``ttl_s``: its holder rewrites it (a heartbeat, :class:`Heartbeat`) well within that time. A
record is dead when

- its holder is *known dead*: the judge runs on the same kernel boot, in the same pid
  namespace, and that pid is gone or belongs to a newer process (only then can a pid be
  judged; a sidecar container with the same hostname cannot), or
- it is *stale*: the storage's clock (:meth:`~ckptstore.backends.ObjectStore.clock_s`)
  is more than ``ttl_s`` past the record's modification time, which the storage stamped with
  that same clock. No wall clock of any process is compared with storage time.

A holder that could not renew in time may have been judged dead: a writer checks
(:meth:`WriterMarker.check`) right before it moves its ref, and a collector right before it
deletes, that its last renewal is younger than a third of the ttl; a writer whose marker a
collector removed learns so from its next heartbeat. Either then starts over instead of
acting. Wherever a process reads the storage's clock to judge a record (a collector always;
a writer when it finds a collector sweeping), a wall clock more than the ttl away from the
storage's is refused (:class:`~ckptstore.errors.ClockSkew`): commit times and retention by
age would be wrong on such a machine.

``locks/gc`` also stops two collectors at once: it is taken by compare-and-swap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .backends import ObjectInfo, ObjectStore
from .errors import (
    CkptStoreError,
    ClockSkew,
    CollectorBusy,
    ObjectNotFound,
    PreconditionFailed,
    WriterExpired,
)
from .layout import LEASE_KEY, WRITERS_PREFIX, writer_marker_key
from .records import decode_record, encode_record

log = logging.getLogger("ckptstore.lease")

#: How long a record outlives its holder's last heartbeat; holders renew every third of it.
#: A holder acts (a ref update, a batch of deletions) only within a third of the ttl of its
#: last renewal, and a request with its retries (an S3 request: up to 5 attempts of at most
#: 5 s to connect and 20 s per answer) must end within the other two thirds, or it could land
#: after its record was judged dead: so the ttl is several minutes, not seconds.
DEFAULT_LEASE_TTL_S = 300.0
DEFAULT_MARKER_TTL_S = 300.0
#: The ttl of a record written before records carried one (ckptstore 0.1 writer markers).
LEGACY_RECORD_TTL_S = 3600.0
#: Slack on comparisons with storage times: S3 stamps times to the second.
CLOCK_RESOLUTION_S = 1.0


# --------------------------------------------------------------------------------------------
# Who holds a record


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _start_ticks(pid: int) -> str | None:
    """Process ``pid``'s start time (clock ticks since boot, /proc/PID/stat field 22), if this
    process's /proc shows its own pid namespace."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None or _proc_shows_own_namespace() is False:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _proc_shows_own_namespace() -> bool | None:
    """Whether /proc is mounted for this process's pid namespace (after ``unshare -p``
    without a new /proc, /proc/PID names processes of another namespace)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return None


@dataclass(frozen=True)
class ProcessIdentity:
    """A process, named so that another process can tell whether it is certainly dead:
    ``boot`` (the kernel's boot id), ``pid_namespace``, ``pid`` and ``start`` (its start
    time). ``host`` is for people only: containers share hostnames."""

    host: str
    pid: int
    boot: str | None = None
    pid_namespace: str | None = None
    start: str | None = None

    @classmethod
    def current(cls) -> ProcessIdentity:
        pid = os.getpid()
        try:
            namespace: str | None = os.readlink("/proc/self/ns/pid")
        except OSError:
            namespace = None
        return cls(socket.gethostname(), pid, _read_text("/proc/sys/kernel/random/boot_id"), namespace, _start_ticks(pid))

    def to_doc(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "boot": self.boot, "pidns": self.pid_namespace, "start": self.start}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ProcessIdentity:
        def text(name: str) -> str | None:
            value = doc.get(name)
            return value if isinstance(value, str) else None

        pid = doc.get("pid")
        return cls(str(doc.get("host", "?")), pid if type(pid) is int else -1, text("boot"), text("pidns"), text("start"))

    def known_dead(self) -> bool:
        """Whether this process is certainly gone, as this process can tell: only on the same
        boot and in the same pid namespace (a pid means nothing across namespaces)."""
        me = _current_identity()
        if self.boot is None or self.pid_namespace is None or self.pid <= 0:
            return False
        if (self.boot, self.pid_namespace) != (me.boot, me.pid_namespace):
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        start = _start_ticks(self.pid)
        return start is not None and self.start is not None and start != self.start

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


_IDENTITY: ProcessIdentity | None = None


def _current_identity() -> ProcessIdentity:
    global _IDENTITY
    if _IDENTITY is None or _IDENTITY.pid != os.getpid():  # a forked child is another process
        _IDENTITY = ProcessIdentity.current()
    return _IDENTITY


def _ttl_of(doc: dict[str, Any], default_s: float) -> float:
    ttl = doc.get("ttl_s")
    return float(ttl) if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and 0 < ttl < 1e9 else default_s


def storage_now(objects: ObjectStore, *, ttl_s: float) -> float:
    """The storage's clock, after checking that this process's wall clock is within
    ``ttl_s`` of it (else :class:`ClockSkew`)."""
    before = time.time()
    now = objects.clock_s()
    after = time.time()
    skew = min(abs(now - before), abs(now - after)) if not before <= now <= after else 0.0
    if skew > ttl_s + CLOCK_RESOLUTION_S:
        raise ClockSkew(
            f"this machine's clock is {skew:.0f} s {'behind' if now > after else 'ahead of'} the clock of "
            f"{objects.url} (more than the {ttl_s:g} s that leases allow); synchronise it (NTP) and retry"
        )
    return now


# --------------------------------------------------------------------------------------------
# Heartbeats


class Heartbeat:
    """One daemon thread per process that rewrites held records (compare-and-swap) so they
    stay fresh. A record is renewed once a third of its ttl has passed since its last
    renewal; one that is gone (a collector judged its holder dead, or another process
    deleted it) is dropped and marked lost."""

    _instance: Heartbeat | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._held: weakref.WeakSet[HeldRecord] = weakref.WeakSet()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    @classmethod
    def get(cls) -> Heartbeat:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    @classmethod
    def _forget_after_fork(cls) -> None:  # a child holds none of its parent's records
        cls._instance = None
        cls._instance_lock = threading.Lock()

    def hold(self, record: HeldRecord) -> None:
        with self._wake:
            self._held.add(record)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ckptstore-heartbeat", daemon=True)
                self._thread.start()
            self._wake.notify()

    def release(self, record: HeldRecord) -> None:
        with self._wake:
            self._held.discard(record)

    def _run(self) -> None:
        while True:
            with self._wake:
                records = list(self._held)
                due = min((r.next_renewal_s() for r in records), default=time.monotonic() + 60.0)
                pause_s = due - time.monotonic()
                if pause_s > 0:
                    self._wake.wait(min(pause_s, 60.0))
                    continue
            for record in records:
                if record.next_renewal_s() <= time.monotonic():
                    record.renew_if_held()


os.register_at_fork(after_in_child=Heartbeat._forget_after_fork)


class HeldRecord:
    """A record this process holds and keeps fresh: written with compare-and-swap, renewed
    by the :class:`Heartbeat` (or by its owner), its last successful renewal remembered on
    this process's monotonic clock. Thread-safe."""

    def __init__(self, objects: ObjectStore, key: str, *, ttl_s: float) -> None:
        self.objects = objects
        self.key = key
        self.ttl_s = ttl_s
        self.identity = _current_identity()
        self.version: str | None = None
        self.lost = False
        self.renewed_at_s = -1e18  # monotonic
        self._retry_at_s = -1e18  # after a failed renewal, not before this (monotonic)
        self._renewals = 0
        self._lock = threading.RLock()

    def doc(self) -> dict[str, Any]:
        """The record's fields (subclasses add theirs)."""
        return {**self.identity.to_doc(), "ttl_s": self.ttl_s, "renewals": self._renewals, "written_at_s": time.time()}

    def write(self, *, expected: str | None) -> None:
        """Write the record if it is at version ``expected`` (``None``: absent);
        :class:`PreconditionFailed` otherwise. A held record not renewed for two thirds of
        its ttl has *lapsed*: others may have judged it dead already, so it is never renewed
        again (:attr:`lost`; the holder must start over with a new one)."""
        with self._lock:
            started = time.monotonic()
            if self.version is not None and expected == self.version and (self.lost or started - self.renewed_at_s > self.ttl_s * 2 / 3):
                self._lapse()
                raise PreconditionFailed(f"{self.key} lapsed: it was not renewed in time", key=self.key)
            self._renewals += 1
            self.version = self.objects.put_if_version(self.key, encode_record(self.doc()), version=expected)
            self.renewed_at_s = started
            self.lost = False

    def _lapse(self) -> None:
        """Stop holding the record, and remove it (at the version this process wrote) so
        that nobody takes it for live any longer. Never raises."""
        if not self.lost:
            log.warning("%s lapsed: it was not renewed within %g s", self.key, self.ttl_s * 2 / 3)
        self.lost = True
        Heartbeat.get().release(self)
        if self.version is not None:
            with contextlib.suppress(CkptStoreError):
                self.objects.delete_if_version(self.key, version=self.version)

    def next_renewal_s(self) -> float:
        return max(self.renewed_at_s + self.ttl_s / 3, self._retry_at_s)

    def renew_if_held(self) -> None:
        """Rewrite the record at the version this process wrote; mark it lost if it is gone
        or changed. A failure to reach the store is retried at the next beat."""
        with self._lock:
            if self.version is None or self.lost:
                return
            try:
                self.write(expected=self.version)
            except (PreconditionFailed, ObjectNotFound):
                if not self.lost:
                    log.warning("%s was removed or taken over while held", self.key)
                self.lost = True
                Heartbeat.get().release(self)
            except CkptStoreError as exc:
                self._retry_at_s = time.monotonic() + min(1.0, self.ttl_s / 20)  # not in a tight loop
                log.warning("could not renew %s (retrying): %s", self.key, exc)

    def fresh(self) -> bool:
        """Whether this record is surely not judged dead yet: renewed within a third of its
        ttl, and not lost. Check right before acting on what the record protects."""
        with self._lock:
            return not self.lost and time.monotonic() - self.renewed_at_s < self.ttl_s / 3


@dataclass(frozen=True)
class RecordState:
    """What a record says of its holder and whether it is alive now."""

    key: str
    holder: ProcessIdentity
    ttl_s: float
    age_s: float
    version: str | None
    doc: dict[str, Any]

    @property
    def live(self) -> bool:
        return self.age_s <= self.ttl_s and not self.holder.known_dead()


def judge(info: ObjectInfo, data: bytes | None, version: str | None, *, now_s: float, default_ttl_s: float) -> RecordState:
    """The state of the record ``info`` (``data``: its bytes; a record that cannot be decoded
    lives out ``default_ttl_s`` from its modification time), with its age on the storage's
    clock ``now_s``."""
    try:
        doc = decode_record(data, info.key) if data is not None else {}
    except CkptStoreError:
        doc = {}
    return RecordState(info.key, ProcessIdentity.from_doc(doc), _ttl_of(doc, default_ttl_s), now_s - info.modified_s, version, doc)


def read_record_state(objects: ObjectStore, key: str, *, now_s: float | None = None, default_ttl_s: float) -> RecordState | None:
    """The state of one record, or ``None`` if there is none."""
    try:
        data, version = objects.get_versioned(key)
    except ObjectNotFound:
        return None
    try:
        info = objects.info(key)  # after the read: a renewal meanwhile only makes it look younger
    except ObjectNotFound:
        return None  # removed since
    now = storage_now(objects, ttl_s=default_ttl_s) if now_s is None else now_s
    return judge(info, data, version, now_s=now, default_ttl_s=default_ttl_s)


# --------------------------------------------------------------------------------------------
# The collector's lease


@dataclass(frozen=True)
class LeaseState:
    """What ``locks/gc`` says: who holds it, whether it is deleting now, and whether it is
    alive (held by a process not known dead, renewed within its ttl)."""

    holder: str
    identity: ProcessIdentity
    sweeping: bool
    live: bool
    age_s: float
    ttl_s: float

    @property
    def pid(self) -> int:
        return self.identity.pid

    @property
    def host(self) -> str:
        return self.identity.host


def read_lease(objects: ObjectStore, *, now_s: float | None = None) -> tuple[LeaseState | None, str | None]:
    """The current lease and its version; ``(None, None)`` if there is none. A lease that
    cannot be decoded lives out the default ttl from its modification time, then reads as
    expired (so it can be taken over)."""
    state = read_record_state(objects, LEASE_KEY, now_s=now_s, default_ttl_s=DEFAULT_LEASE_TTL_S)
    if state is None:
        return None, None
    doc = state.doc
    return LeaseState(str(doc.get("holder", "?")), state.holder, doc.get("sweeping") is True, state.live, state.age_s, state.ttl_s), state.version


class CollectorLease(HeldRecord):
    """The exclusive lease of one garbage collector (``locks/gc``), kept fresh by the
    heartbeat while held."""

    def __init__(self, objects: ObjectStore, *, ttl_s: float = DEFAULT_LEASE_TTL_S) -> None:
        super().__init__(objects, LEASE_KEY, ttl_s=ttl_s)
        self.holder = uuid.uuid4().hex
        self.sweeping = False

    def doc(self) -> dict[str, Any]:
        # expires_at_s: for ckptstore 0.1 writers, which compare it with their own clock
        return {**super().doc(), "holder": self.holder, "sweeping": self.sweeping, "expires_at_s": time.time() + self.ttl_s}

    def acquire(self) -> None:
        """Take the lease; raise :class:`CollectorBusy` if a live collector holds it, or
        :class:`ClockSkew` if this machine's clock is far from the storage's. A lease whose
        holder is known dead, or that is stale, is taken over."""
        deadline = time.monotonic() + 3.0
        while True:
            current, version = read_lease(self.objects, now_s=storage_now(self.objects, ttl_s=self.ttl_s))
            if current is not None and current.live:
                raise CollectorBusy(
                    f"another garbage collector ({current.identity}) holds the lease {LEASE_KEY}, "
                    f"renewed {max(0.0, current.age_s):.0f} s ago (it lapses {current.ttl_s:g} s after its last renewal)"
                )
            try:
                self.write(expected=version)
            except PreconditionFailed:
                # Another collector won, or the lease's lock file is held (or was left by a
                # process killed mid-update, which the store breaks after a moment): look again.
                if time.monotonic() > deadline:
                    raise CollectorBusy(f"another garbage collector took the lease {LEASE_KEY} first") from None
                time.sleep(0.1)
                continue
            Heartbeat.get().hold(self)
            return

    def renew(self, *, sweeping: bool) -> None:
        """Extend the lease and set whether this collector is deleting. Raises
        :class:`CollectorBusy` if the lease was lost (it lapsed and was taken over)."""
        with self._lock:
            previous = self.sweeping
            self.sweeping = sweeping
            try:
                if self.lost or self.version is None:
                    raise PreconditionFailed("lease lost", key=LEASE_KEY)
                self.write(expected=self.version)
            except PreconditionFailed:
                self.sweeping = previous
                self.lost = True
                raise CollectorBusy(f"the garbage collector lease {LEASE_KEY} was lost (it lapsed and was taken over)") from None

    def release(self) -> None:
        """Give the lease up. Idempotent; never raises: a lease that cannot be deleted (the
        store failing) is left to lapse after its ttl, and the error that ended the
        collection, if any, is the one the caller sees."""
        Heartbeat.get().release(self)
        with self._lock:
            if self.version is not None and not self.lost:
                try:
                    self.objects.delete_if_version(LEASE_KEY, version=self.version)
                except (PreconditionFailed, ObjectNotFound):
                    pass
                except CkptStoreError as exc:
                    log.warning("could not release the GC lease (it lapses by itself): %s", exc)
            self.version = None


# --------------------------------------------------------------------------------------------
# Writers


class WriterMarker(HeldRecord):
    """``locks/writers/ID``: a writer between its first "already stored?" check and its ref
    update, kept fresh by the heartbeat until :meth:`release`."""

    def __init__(self, objects: ObjectStore, *, ttl_s: float = DEFAULT_MARKER_TTL_S) -> None:
        super().__init__(objects, writer_marker_key(uuid.uuid4().hex), ttl_s=ttl_s)
        self.started_at_s = time.time()

    def doc(self) -> dict[str, Any]:
        return {**super().doc(), "started_at_s": self.started_at_s}

    @classmethod
    def create(cls, objects: ObjectStore, *, ttl_s: float = DEFAULT_MARKER_TTL_S) -> WriterMarker:
        """Create a marker (create-only) and keep it fresh."""
        marker = cls(objects, ttl_s=ttl_s)
        marker.write(expected=None)
        Heartbeat.get().hold(marker)
        return marker

    def check(self) -> None:
        """Raise :class:`WriterExpired` unless the marker is surely still honoured: a
        writer calls it right before the ref update that publishes what it wrote."""
        if not self.fresh():
            with contextlib.suppress(CkptStoreError):
                self.renew_if_held()  # a slow beat, not a lost marker?
            if not self.fresh():
                raise WriterExpired(
                    f"writer marker {self.key} was not renewed in time (this process paused, or the store "
                    "could not be reached); a garbage collector may have judged it dead, so nothing was published"
                )

    def release(self) -> None:
        """Delete the marker. Idempotent; never raises (an undeletable marker goes stale)."""
        Heartbeat.get().release(self)
        with self._lock:
            if self.version is not None and not self.lost:
                with contextlib.suppress(CkptStoreError):
                    self.objects.delete(self.key)
            self.version = None
            self.lost = True


def wait_while_collector_sweeps(objects: ObjectStore, marker: WriterMarker, *, poll_s: float = 0.05, max_poll_s: float = 1.0) -> None:
    """Return once no live collector is deleting. The lease is read after ``marker`` was
    created (the handshake); while a live one sweeps, the marker is renewed (so that this
    wait cannot make it stale) and the lease read again."""
    waited = False
    while True:
        lease, _ = _read_lease_fast(objects, marker.ttl_s)
        if lease is None or not lease.sweeping or not lease.live:
            return
        if not waited:
            log.info("waiting for the garbage collector (%s) to finish a batch of deletions", lease.identity)
            waited = True
        time.sleep(poll_s)
        poll_s = min(max_poll_s, poll_s * 1.5)
        marker.renew_if_held()
        if marker.lost:
            raise WriterExpired(f"writer marker {marker.key} was removed while it waited for the garbage collector")


def _read_lease_fast(objects: ObjectStore, ttl_s: float) -> tuple[LeaseState | None, str | None]:
    """The lease, reading the storage's clock only where liveness matters (it sweeps)."""
    try:
        data, version = objects.get_versioned(LEASE_KEY)
    except ObjectNotFound:
        return None, None
    try:
        sweeping = decode_record(data, LEASE_KEY).get("sweeping") is True
    except CkptStoreError:
        sweeping = False  # an undecodable lease is not a sweeping collector's
    if not sweeping:
        return LeaseState("?", ProcessIdentity("?", -1), False, True, 0.0, DEFAULT_LEASE_TTL_S), version
    return read_lease(objects, now_s=storage_now(objects, ttl_s=ttl_s))


@contextlib.contextmanager
def writing(objects: ObjectStore, *, ttl_s: float = DEFAULT_MARKER_TTL_S) -> Iterator[WriterMarker]:
    """Hold a writer marker for the block. On entry, wait while a live collector is deleting,
    so nothing the block finds stored can be deleted before the block ends, as long as the
    marker stays fresh: call :meth:`WriterMarker.check` right before publishing."""
    marker = WriterMarker.create(objects, ttl_s=ttl_s)
    try:
        wait_while_collector_sweeps(objects, marker)
        yield marker
    finally:
        marker.release()


def writers(objects: ObjectStore, *, ttl_s: float, default_ttl_s: float = LEGACY_RECORD_TTL_S) -> tuple[list[RecordState], list[RecordState]]:
    """The live and the dead writer markers, judged on the storage's clock, read after
    each marker (a marker renewed meanwhile only looks younger; ``ttl_s`` bounds the clock
    skew allowed). A marker with no ttl of its own (an older writer's) lives ``default_ttl_s``."""
    found = []
    for key in objects.list(WRITERS_PREFIX):
        try:
            data, version = objects.get_versioned(key)
            info = objects.info(key)  # after the read: never older than the version read
        except ObjectNotFound:
            continue  # its writer finished
        found.append((info, data, version))
    now_s = storage_now(objects, ttl_s=ttl_s) if found else 0.0
    live: list[RecordState] = []
    dead: list[RecordState] = []
    for info, data, version in found:
        state = judge(info, data, version, now_s=now_s, default_ttl_s=default_ttl_s)
        (live if state.live else dead).append(state)
    return live, dead


def remove_dead_writers(objects: ObjectStore, dead: list[RecordState]) -> int:
    """Delete dead markers, each only at the version judged (one renewed since stays)."""
    removed = 0
    for state in dead:
        if state.version is None:
            continue
        with contextlib.suppress(PreconditionFailed, ObjectNotFound):
            objects.delete_if_version(state.key, version=state.version)
            removed += 1
    return removed
