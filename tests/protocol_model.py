"""An explicit-state model of the writer/collector protocol, checked over every interleaving.

Writers (a plain ``commit``, and the DCP rank + coordinator pair), one or two collectors and
an environment (crashes, pauses, storage-clock ticks, per-process wall-clock skew, pid
namespaces, lost answers) take steps on one small store. :func:`check` walks every reachable
state breadth-first with a visited set, so the walk is exhaustive within the bounds of a
:class:`Config` (chunks, processes, storage time, crashes, pauses, lost answers, restarts),
and the first violation it meets comes with a shortest trace to it. Both protocols are points
of one model: each field of :class:`Protocol` is one mechanism, its old value first, so
flipping one field shows which mechanism closes which defect.

Checked in every reachable state: every ref target is readable (its commit object, every chunk
it records and every chunk of their chains exist, each stored with the chain recorded); with
``Config.check_structure``, every stored object has everything it needs (a commit every chunk
it records, a delta its whole chain), except objects written late by a writer that a collector
had already judged abandoned (garbage: see docs/protocol-model.md). At every report: the commit
a writer reports is readable.

States hold no absolute time: every timestamp is an age (ticks before now), clamped at a cap
above every age the protocol compares, so two situations that differ only by when they happened
are one state and the walk covers unbounded time. A comparison that the clamp leaves undecided
(the difference of two ages, one of them clamped) takes both outcomes: the walk then covers a
superset of the real behaviours, so "no violation" stays true. Fields that no later step reads
are reset (a finished process keeps only its status; object ages once no collector will plan
again), which keeps the walk small without losing any behaviour.

``python tests/protocol_model.py`` runs the default checks and prints their state counts;
``--soak`` the larger configurations; ``--trace`` prints every counterexample.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

# -- protocols ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """One point in the design space. Each field is one mechanism; its default is the
    protocol at ef55ec3, the other value the new protocol's."""

    #: Order of deletions: key-sorted batches (a delta's base may go first), or commits
    #: first, then chunks by descending chain length, no batch mixing lengths.
    delete_order: str = "by_key"  # | "dependents_first"
    #: Planning keeps the whole chain of every chunk that remains (a young delta keeps its
    #: old base).
    chain_closure: bool = False
    #: What a writer checks before it reuses a stored chunk: nothing; that every chunk of its
    #: chain exists; or that each is stored with the chain the delta records, as a reader
    #: reads it ("chain_exact").
    reuse_check: str = "none"  # | "chain_exists" | "chain_exact"
    #: Who is known dead: a pid not alive in the judge's namespace on the same hostname; or
    #: the same (boot id, pid namespace, pid, start time) with that process gone.
    identity: str = "host_pid"  # | "boot_ns_pid_start"
    #: Liveness by time: an expiry the collector stamps with its wall clock, compared with the
    #: judge's wall clock, and markers never renewed (aged by the collector's clock); or
    #: heartbeats well within the ttl, judged by storage time only.
    clock: str = "local_wall"  # | "storage_heartbeat"
    #: A writer publishes, and a collector deletes, only atomically with a check that its own
    #: record is still its and fresh (last heartbeat younger than the ttl).
    fence: bool = False
    #: DCP: a rank's marker is released at the end of write_data, or held until the
    #: coordinator has published (the coordinator, rank 0, holds its own too).
    dcp_marker: str = "released_after_write"  # | "held_until_publish"
    # -- amendments this model shows the new protocol needs (docs/protocol-model.md) --
    #: A heartbeat that succeeds more than ttl after the previous successful one fences its
    #: holder for good (a writer starts over, a collector has lost its lease): another process
    #: may have judged the record stale in the gap and acted on it.
    gap_fences: bool = False
    #: A holder counts a heartbeat whose answer was lost and found on retry as made when it
    #: sent it ("request"), not when the retry answered ("response").
    heartbeat_time: str = "response"  # | "request"
    #: A delete resent after a lost answer is a new act: it repeats the freshness check,
    #: atomically, rather than being resent blindly.
    fence_resent_deletes: bool = False
    #: DCP: the coordinator takes its marker in the collective that plans the save, before any
    #: rank starts, so its marker (and its fence check) covers every rank's existence checks.
    dcp_coordinator_marker_first: bool = False

    def flipped(self, name: str) -> Protocol:
        """This protocol with mechanism ``name`` set back to its value at ef55ec3."""
        return replace(self, **{name: getattr(OLD, name)})

    def describe(self) -> str:
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != getattr(OLD, f.name)]
        return ", ".join(changed) or "the protocol at ef55ec3"


#: The protocol at ef55ec3 (lease.py, gc.py, store.py, pipeline.py, distributed.py).
OLD = Protocol()
#: The new protocol exactly as first specified for issue 16 (docs/protocol-model.md).
AS_WRITTEN = Protocol(
    delete_order="dependents_first",
    chain_closure=True,
    reuse_check="chain_exists",
    identity="boot_ns_pid_start",
    clock="storage_heartbeat",
    fence=True,
    dcp_marker="held_until_publish",
)
#: The new protocol with the amendments this model shows it needs.
NEW = replace(
    AS_WRITTEN,
    reuse_check="chain_exact",
    gap_fences=True,
    heartbeat_time="request",
    fence_resent_deletes=True,
    dcp_coordinator_marker_first=True,
)


# -- configuration -----------------------------------------------------------------------------

Chain = tuple[str, ...]
Refs = tuple[tuple[str, Chain], ...]


@dataclass(frozen=True)
class Scenario:
    """The store a run starts from: chunks ``(name, chain, age or None: old)``, commits
    ``(id, refs)`` (old) and the branch head."""

    name: str
    chunks: tuple[tuple[str, Chain, int | None], ...]
    commits: tuple[tuple[str, Refs], ...]
    head: str


@dataclass(frozen=True)
class Proc:
    """One process. ``writer``: ``Store.commit`` (marker, lease, head, chunks, commit object,
    ref). ``rank``: a DCP rank's ``write_data`` (marker, lease, chunks, results). ``coord``:
    the DCP coordinator (rank 0, no chunks of its own) whose ``finish`` publishes the rank's
    chunks. ``collector``: ``gc.collect``."""

    kind: str
    name: str
    target: tuple[str, ...] = ()  # the chunks of the state it commits, by position
    delta: bool = True  # a changed chunk becomes a delta against the head's at its position


@dataclass(frozen=True)
class Config:
    scenario: Scenario
    processes: tuple[Proc, ...]
    batch_size: int = 1
    #: Ticks. A running holder rewrites its record every tick (the heartbeat period), so its
    #: record is never more than a tick old; a record is stale when older than ttl ticks.
    ttl: int = 2
    writer_timeout: int = 2  # old protocol: a marker older than this is abandoned
    grace: int = 0  # objects at most this old are kept
    max_chain: int = 2
    crashes: int = 1  # crashes in one run (any process, between any two of its steps)
    pauses: int = 1  # pauses in one run (a paused process neither steps nor heartbeats)
    lost_answers: int = 1  # lost answers in one run (heartbeats, ref updates, deletes)
    restarts: int = 1  # times a fenced writer starts over
    commit_objects: int = 3  # commit objects one writer may write (a ref conflict re-parents)
    #: Pid namespace of each process; every assignment listed is checked. ``None``: every
    #: assignment (the first process in namespace 0).
    namespaces: tuple[tuple[int, ...], ...] | None = None
    #: Wall-clock skew of each process (ticks ahead of storage time); every assignment listed.
    skews: tuple[tuple[int, ...], ...] = ()
    #: The processes (by name) that crashes, pauses and lost answers may hit; ``None``: all.
    faulty: tuple[str, ...] | None = None
    check_structure: bool = False
    #: The structural check spares objects a writer wrote after a collector had judged its
    #: marker abandoned (garbage: no ref reaches them, no reuse check passes them).
    structure_spares_late: bool = True
    #: Ages are clamped at the largest threshold compared + this; the smaller, the fewer
    #: states and the more comparisons left undecided (which then take both outcomes).
    cap_margin: int = 1

    def environments(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        n = len(self.processes)
        namespaces = self.namespaces or tuple((0, *rest) for rest in itertools.product((0, 1), repeat=n - 1))
        return [(ns, skew) for ns in namespaces for skew in self.skews or ((0,) * n,)]


# -- state -------------------------------------------------------------------------------------


class Lease(NamedTuple):
    tenure: tuple[int, int]  # (collector, acquisition)
    age: int
    sweeping: bool


class Store(NamedTuple):
    chunks: tuple[tuple[str, Chain, int, bool], ...]  # sorted (name, stored chain, age, late)
    commits: tuple[tuple[str, Refs, int, bool], ...]  # sorted (id, refs, age, late)
    head: str | None
    lease: Lease | None
    markers: tuple[tuple[tuple[int, int], int], ...]  # sorted ((process, attempt), age)


class W(NamedTuple):
    """A writer, DCP rank or DCP coordinator."""

    status: str  # run | paused | crashed | done | failed
    pc: tuple
    attempt: int  # its marker is (index, attempt)
    marker: bool  # holds its marker and heartbeats it
    head: str | None
    base: Refs  # the head's chunks: delta bases by position
    refs: Refs
    commit: str | None
    made: int  # commit objects written
    hb_sent: int  # age of its last rewrite
    #: Age of its last successful heartbeat as it counts it; while an answer is outstanding,
    #: its age when that rewrite was sent (so it stays exact while the answer is awaited).
    hb_ok: int
    hb_lost: int | None  # age of a rewrite whose answer was lost
    fenced: bool
    delivered: bool  # DCP rank: results handed to the coordinator
    late: bool  # ghost: a collector judged this attempt's marker abandoned


class C(NamedTuple):
    """A collector."""

    status: str  # run | paused | crashed | done | busy | lost
    pc: tuple
    tenure: int
    plan: tuple[tuple[tuple[str, str], ...], ...]  # batches of keys ("C", id) / ("K", chunk)
    known: frozenset
    protected: frozenset
    judged: tuple[tuple[int, int], ...]  # markers judged abandoned (unchanged since)
    t_snap: int  # age of the renewal before its listing of markers
    hb_sent: int
    hb_ok: int
    hb_lost: int | None
    lost: bool


class State(NamedTuple):
    lost_left: int
    crashes_left: int
    pauses_left: int
    store: Store
    procs: tuple


def _fast_replace(self: tuple, **changes: object) -> tuple:
    """``_replace`` without its generality (it is most of the walk's time otherwise)."""
    values = list(self)
    index = self._index
    for name, value in changes.items():
        values[index[name]] = value
    return tuple.__new__(type(self), values)


for _cls in (Lease, Store, W, C, State):
    _cls._index = {name: i for i, name in enumerate(_cls._fields)}
    _cls._replace = _fast_replace

PAUSED, STOPPED = "paused", "paused while time passed"
ACTIVE = ("run", PAUSED, STOPPED)
TICK = "storage clock ticks"
W_DONE = W("done", ("done",), 0, False, None, (), (), None, 0, 0, 0, None, False, False, False)
C_DONE = C("done", ("done",), 0, (), frozenset(), frozenset(), (), 0, 0, 0, None, False)


def _get(items: tuple, key: object) -> tuple | None:
    for item in items:
        if item[0] == key:
            return item
    return None


def _put(items: tuple, item: tuple) -> tuple:
    return tuple(sorted([i for i in items if i[0] != item[0]] + [item]))


def _drop(items: tuple, keys: Iterable[object]) -> tuple:
    keys = set(keys)
    return tuple(i for i in items if i[0] not in keys)


def chunk_readable(store: Store, name: str, chain: Chain) -> bool:
    """Whether a reader finds chunk ``name`` stored as a delta through exactly ``chain``,
    every base stored in turn through the rest of it (as ``ChunkReader.read_into``)."""
    found = _get(store.chunks, name)
    if found is None or found[1] != chain:
        return False
    return not chain or chunk_readable(store, chain[0], chain[1:])


def commit_readable(store: Store, cid: str) -> bool:
    found = _get(store.commits, cid)
    return found is not None and all(chunk_readable(store, c, chain) for c, chain in found[1])


def commit_needs(store: Store, cid: str) -> set[tuple[str, str]]:
    """The keys a commit needs: itself, its chunks and their chains as it records them."""
    found = _get(store.commits, cid)
    keys = {("C", cid)}
    for c, chain in found[1] if found else ():
        keys.add(("K", c))
        keys.update(("K", b) for b in chain)
    return keys


def structure_problems(store: Store, *, spare_late: bool = True) -> list[str]:
    """Stored objects that lack something they need (``spare_late``: except those written
    late, by a writer a collector had given up on)."""
    when = lambda late: " (written late)" if late else ""  # noqa: E731
    out = [
        f"commit {cid}{when(late)} lacks a chunk or base" for cid, _, _, late in store.commits if not (late and spare_late) and not commit_readable(store, cid)
    ]
    out += [
        f"chunk {n}{_via(ch)}{when(late)} lacks its chain" for n, ch, _, late in store.chunks if not (late and spare_late) and not chunk_readable(store, n, ch)
    ]
    return out


# -- the model ---------------------------------------------------------------------------------

Step = tuple[str, State, "str | None", int]  # label, next state, reported commit, ticks


class Model:
    """The steps and invariants of one protocol over one configuration, in one environment
    (the pid namespace and wall-clock skew of each process)."""

    def __init__(self, protocol: Protocol, config: Config, namespaces: tuple[int, ...], skews: tuple[int, ...]) -> None:
        self.p = protocol
        self.cfg = config
        self.ns = namespaces
        self.skew = skews
        self.names = [q.name for q in config.processes]
        self.heartbeats = protocol.clock == "storage_heartbeat"
        self.hb_every = 1  # ticks between a running holder's heartbeats
        # Every age compared is below the cap: the largest threshold (with skew, on wall clocks).
        largest = max(config.ttl, config.writer_timeout, config.grace)
        if protocol.clock == "local_wall":
            largest += 2 * max((abs(x) for skew in config.skews for x in skew), default=0)
        self.cap = largest + config.cap_margin
        kinds = [q.kind for q in config.processes]
        self.rank_of = {i: kinds.index("rank") for i, k in enumerate(kinds) if k == "coord"}
        self.coord_of = {r: c for c, r in self.rank_of.items()}
        self.collectors = [i for i, k in enumerate(kinds) if k == "collector"]
        self.faulty = [config.faulty is None or q.name in config.faulty for q in config.processes]

    # -- start ---------------------------------------------------------------------------------

    def initial(self) -> State:
        sc = self.cfg.scenario
        store = Store(
            chunks=tuple(sorted((n, ch, self.cap if age is None else age, False) for n, ch, age in sc.chunks)),
            commits=tuple(sorted((cid, refs, self.cap, False) for cid, refs in sc.commits)),
            head=sc.head, lease=None, markers=(),
        )  # fmt: skip
        procs: list[W | C] = []
        for q in self.cfg.processes:
            if q.kind == "collector":
                procs.append(C_DONE._replace(status="run", pc=("acquire",)))
            else:
                first = ("gather",) if q.kind == "coord" and self.p.dcp_marker == "released_after_write" else ("marker",)
                procs.append(W_DONE._replace(status="run", pc=first))
        return self.canonical(State(self.cfg.lost_answers, self.cfg.crashes, self.cfg.pauses, store, tuple(procs)))

    # -- judgements ----------------------------------------------------------------------------

    def known_dead(self, s: State, holder: int, judge: int) -> bool:
        crashed = s.procs[holder].status == "crashed"
        same_ns = self.ns[holder] == self.ns[judge]
        if self.p.identity == "host_pid":  # same hostname: the pid is looked up in the judge's namespace
            return crashed or not same_ns
        return crashed and same_ns

    def older_by(self, age: int, than: int, by: int) -> tuple[bool, ...]:
        """The possible values of ``age - than > by`` (``by >= 0``) for clamped ages."""
        cap = self.cap
        if age < cap and than < cap:
            return (age - than > by,)
        if age < cap:  # than >= cap > age
            return (False,)
        if than < cap and cap - than > by:
            return (True,)
        return (True, False)  # undecided: both

    def lease_gone(self, s: State, judge: int, lease: Lease, now_age: int) -> tuple[bool, ...]:
        """Whether ``judge`` takes the lease for dead or expired; ``now_age``: the age of the
        storage time it judges by (its own record's)."""
        holder = lease.tenure[0]
        if self.known_dead(s, holder, judge):
            return (True,)
        if self.p.clock == "local_wall":  # judge's wall clock >= holder's wall clock at renewal + ttl
            return (lease.age >= self.cfg.ttl + self.skew[holder] - self.skew[judge],)
        return self.older_by(lease.age, now_age, self.cfg.ttl)

    def marker_abandoned(self, s: State, judge: int, key: tuple[int, int], age: int, now_age: int) -> tuple[bool, ...]:
        if self.known_dead(s, key[0], judge):
            return (True,)
        if self.p.clock == "local_wall":  # collector's wall clock - mtime > writer timeout
            return (age + self.skew[judge] > self.cfg.writer_timeout,)
        return self.older_by(age, now_age, self.cfg.ttl)

    def young(self, judge: int, age: int, now_age: int) -> tuple[bool, ...]:
        if self.p.clock == "local_wall":
            return (age + self.skew[judge] <= self.cfg.grace,)
        return tuple(not old for old in self.older_by(age, now_age, self.cfg.grace))

    def fresh(self, w: W | C) -> bool:
        """A holder's own check that its record is still its and fresh (the fence)."""
        bad = w.lost if isinstance(w, C) else w.fenced
        return not bad and self._since_beat(w) <= self.cfg.ttl

    def _since_beat(self, w: W | C) -> int:
        """Age of its last successful heartbeat (clamped)."""
        return w.hb_ok if w.hb_lost is None else min(self.cap, w.hb_lost + w.hb_ok)

    # -- steps ---------------------------------------------------------------------------------

    def successors(self, s: State) -> Iterator[Step]:
        for i, w in enumerate(s.procs):
            name = self.names[i]
            faulty = self.faulty[i]
            if w.status == "run":
                if isinstance(w, C):
                    for label, store, c2, lost, procs in self.collector_steps(s, i, w):
                        base = s if procs is None else s._replace(procs=procs)
                        yield f"{name}: {label}", self._with(base, i, c2, store, lost=lost), None, 0
                else:
                    for label, store, w2, lost, reported in self.writer_steps(s, i, w):
                        yield f"{name}: {label}", self._with(s, i, w2, store, lost=lost), reported, 0
                for label, store, w2, lost, procs in self.heartbeat_steps(s, i, w):
                    base = s if procs is None else s._replace(procs=procs)
                    yield f"{name}: {label}", self._with(base, i, w2, store, lost=lost), None, 0
                if s.pauses_left and faulty:
                    yield f"{name}: pauses", self._with(s, i, w._replace(status=PAUSED), pause=True), None, 0
            elif w.status == STOPPED:  # a pause no time passed in changes nothing: not resumed
                yield f"{name}: resumes", self._with(s, i, w._replace(status="run")), None, 0
            if w.status in ("run", STOPPED) and s.crashes_left and faulty:
                yield f"{name}: crashes", self._with(s, i, w._replace(status="crashed"), crash=True), None, 0
        if self.tick_allowed(s):
            yield TICK, self.canonical(self.tick(s)), None, 1

    def may_lose(self, s: State, i: int) -> bool:
        """Whether the answer to process ``i``'s write may be lost now."""
        return s.lost_left > 0 and self.faulty[i]

    def _with(self, s: State, i: int, w: W | C, store: Store | None = None, *, lost: bool = False, crash: bool = False, pause: bool = False) -> State:
        """``s`` with process ``i`` now ``w`` (the others are canonical already)."""
        procs = s.procs[:i] + (self._canonical_proc(w),) + s.procs[i + 1 :]
        if store is None:
            store = s.store
        if store is not s.store or isinstance(w, C):
            store = self._canonical_store(store, procs)
        return State(s.lost_left - lost, s.crashes_left - crash, s.pauses_left - pause, store, procs)

    def tick_allowed(self, s: State) -> bool:
        """Storage time may advance unless a running process would break a timing promise."""
        if not any(w.status in ACTIVE for w in s.procs):
            return False
        for i, w in enumerate(s.procs):
            if w.status != "run":
                continue  # a paused or dead process promises nothing
            if self.heartbeats:
                holding = w.marker if isinstance(w, W) else self._holds_lease(w)
                if holding and w.hb_lost is None and w.hb_sent + 1 > self.hb_every:
                    return False  # it rewrites its record at least every heartbeat period
            elif isinstance(w, W) and w.marker:
                m = _get(s.store.markers, (i, w.attempt))
                if m is not None and m[1] + 1 > self.cfg.writer_timeout:
                    return False  # the old contract: a commit takes less than the writer timeout
            elif isinstance(w, C) and self._holds_lease(w):
                lease = s.store.lease
                if lease is not None and lease.tenure == (i, w.tenure) and lease.age + 1 >= self.cfg.ttl:
                    return False  # the old contract: a collector renews before its lease expires
        return True

    def tick(self, s: State) -> State:
        cap = self.cap
        older = lambda age: age + 1 if age < cap else cap  # noqa: E731
        st = s.store
        store = Store(
            chunks=tuple((n, ch, older(a), late) for n, ch, a, late in st.chunks),
            commits=tuple((cid, refs, older(a), late) for cid, refs, a, late in st.commits),
            head=st.head,
            lease=None if st.lease is None else st.lease._replace(age=older(st.lease.age)),
            markers=tuple((k, older(a)) for k, a in st.markers),
        )
        procs = []
        for w in s.procs:
            if w.status in ACTIVE:
                w = w._replace(
                    status=STOPPED if w.status == PAUSED else w.status, hb_sent=older(w.hb_sent),
                    hb_ok=older(w.hb_ok) if w.hb_lost is None else w.hb_ok, hb_lost=None if w.hb_lost is None else older(w.hb_lost),
                )  # fmt: skip
                if isinstance(w, C):
                    w = w._replace(t_snap=older(w.t_snap))
            procs.append(w)
        return State(s.lost_left, s.crashes_left, s.pauses_left, store, tuple(procs))

    @staticmethod
    def _holds_lease(c: C) -> bool:
        return c.tenure > 0 and not c.lost and c.pc[0] not in ("acquire", "done")

    def canonical(self, s: State) -> State:
        """Reset what no later step reads, so equal futures are one state."""
        procs = tuple(self._canonical_proc(w) for w in s.procs)
        return State(s.lost_left, s.crashes_left, s.pauses_left, self._canonical_store(s.store, procs), procs)

    def _canonical_proc(self, w: W | C) -> W | C:
        if w.status not in ACTIVE:
            if isinstance(w, C):
                return C_DONE if w.status == "done" else C_DONE._replace(status=w.status)
            if w.delivered and w.status == "done":  # a rank whose results the coordinator may still gather
                return W_DONE._replace(delivered=True, refs=w.refs)
            return W_DONE if w.status == "done" else W_DONE._replace(status=w.status)
        if isinstance(w, W):
            if w.base and w.pc[0] not in ("check", "encode", "put", "rewrite"):
                w = w._replace(base=())
            if not w.marker:
                return w._replace(hb_sent=0, hb_ok=0, hb_lost=None) if w.hb_sent or w.hb_ok or w.hb_lost is not None else w
            return self._clamp_heartbeat(w)
        op = w.pc[0]
        if not self.heartbeats or not self._holds_lease(w):
            if w.hb_sent or w.hb_ok or w.hb_lost is not None:
                w = w._replace(hb_sent=0, hb_ok=0, hb_lost=None)
        else:
            w = self._clamp_heartbeat(w)
        if w.t_snap and op != "list":
            w = w._replace(t_snap=0)
        if w.judged and not (op == "reap" or (op in ("protect", "delete", "delete_retry", "unmark") and w.pc[1] == len(w.plan) - 1)):
            w = w._replace(judged=())  # the next listing judges afresh
        if w.plan and op in ("reap", "release"):
            w = w._replace(plan=(), known=frozenset(), protected=frozenset())
        return w

    def _canonical_store(self, store: Store, procs: tuple) -> Store:
        """Object ages matter only to planning (the grace period)."""
        cap = self.cap
        for i in self.collectors:
            if procs[i].status in ACTIVE and procs[i].pc[0] in ("acquire", "plan"):
                return store
        if all(a == cap for _, _, a, _ in store.chunks) and all(a == cap for _, _, a, _ in store.commits):
            return store
        return store._replace(
            chunks=tuple((n, ch, cap, late) for n, ch, _, late in store.chunks),
            commits=tuple((cid, refs, cap, late) for cid, refs, _, late in store.commits),
        )

    def _clamp_heartbeat(self, w: W | C) -> W | C:
        """Of ``hb_sent`` only whether it rewrote its record this period matters, and of
        ``hb_ok`` (an age, or a gap while an answer is outstanding) only whether it is beyond
        the ttl."""
        if w.hb_sent > self.hb_every:
            w = w._replace(hb_sent=self.hb_every)
        if w.hb_ok > self.cfg.ttl + 1:
            w = w._replace(hb_ok=self.cfg.ttl + 1)
        return w

    # -- heartbeats ----------------------------------------------------------------------------

    def heartbeat_steps(self, s: State, i: int, w: W | C) -> Iterator[tuple[str, Store, W | C, bool, tuple | None]]:
        """A holder's heartbeat thread, at most one rewrite of its record per tick:
        ``(label, store, itself, lost answer used, every process if it changed others)``."""
        if not self.heartbeats:
            return
        collector = isinstance(w, C)
        if not (self._holds_lease(w) if collector else w.marker):
            return
        store = s.store
        if collector:
            lease = store.lease
            ours = lease is not None and lease.tenure == (i, w.tenure)
            what = "lease"
        else:
            key = (i, w.attempt)
            ours = _get(store.markers, key) is not None
            what = "marker"
        if w.hb_lost is not None:  # the resent rewrite finds its own value, or the record gone
            if not ours:
                yield f"heartbeat resent: its {what} is gone", store, self._fence(w, stop=True), False, None
                return
            w2 = self._beat(w, request=self.p.heartbeat_time == "request")
            yield f"heartbeat resent finds its {what} (written {w.hb_lost} ticks ago)", store, w2, False, None
            return
        if w.hb_sent == 0:
            return  # rewrote it this tick already
        if not ours:
            yield f"heartbeat: its {what} is gone", store, self._fence(w, stop=True), False, None
            return
        procs = None
        if collector:
            store2 = store._replace(lease=lease._replace(age=0))
        else:  # a new version: no collector's judgement of the old one holds for it
            store2 = store._replace(markers=_put(store.markers, (key, 0)))
            if any(isinstance(c, C) and key in c.judged for c in s.procs):
                procs = tuple(c._replace(judged=tuple(k for k in c.judged if k != key)) if isinstance(c, C) else c for c in s.procs)
        yield f"heartbeat rewrites its {what}", store2, self._beat(w), False, procs
        if self.may_lose(s, i):
            yield f"heartbeat rewrites its {what}, answer lost", store2, w._replace(hb_sent=0, hb_lost=0), True, procs

    def _fence(self, w: W | C, *, stop: bool = False) -> W | C:
        if isinstance(w, C):
            return w._replace(lost=True, hb_lost=None)
        w = w._replace(fenced=True, hb_lost=None, marker=w.marker and not stop)
        if stop and w.pc == ("hold",):
            w = w._replace(status="done", pc=("done",))
        return w

    def _beat(self, w: W | C, *, request: bool = False) -> W | C:
        """A successful heartbeat, counted as made now, or (``request``: the answer to the
        rewrite outstanding) when that rewrite was sent."""
        if request and w.hb_lost is not None:
            gap, counted = w.hb_ok, w.hb_lost  # hb_ok: the age of the last success when it was sent
        else:
            gap, counted = self._since_beat(w), 0
        if self.p.gap_fences and gap > self.cfg.ttl:
            return self._fence(w)._replace(hb_sent=0)
        return w._replace(hb_sent=0, hb_ok=counted, hb_lost=None)

    def _renewal(self, c: C) -> C:
        """A lease write by the collector's own steps is a heartbeat too."""
        return self._beat(c) if self.heartbeats else c

    # -- writers, ranks, coordinators ----------------------------------------------------------

    def writer_steps(self, s: State, i: int, w: W) -> Iterator[tuple[str, Store, W, bool, str | None]]:
        q = self.cfg.processes[i]
        store = s.store
        pc = w.pc
        op = pc[0]
        if op == "marker":
            if q.kind == "rank" and self.p.dcp_coordinator_marker_first and self.p.dcp_marker == "held_until_publish":
                coord = s.procs[self.coord_of[i]]
                if coord.status in ACTIVE and not coord.marker and coord.pc == ("marker",):
                    return  # the collective that plans the save: the coordinator's marker comes first
                if coord.status not in ACTIVE and coord.status != "done":
                    yield "the save fails: the coordinator died", store, W_DONE._replace(status="failed"), False, None
                    return
            store2 = store._replace(markers=_put(store.markers, ((i, w.attempt), 0)))
            yield (
                "creates its marker",
                store2,
                w._replace(pc=("lease",), marker=True, hb_sent=0, hb_ok=0, hb_lost=None, fenced=False, late=False),
                False,
                None,
            )
        elif op == "lease":
            lease = store.lease
            nxt = {"writer": ("head",), "rank": ("check", 0), "coord": ("gather",)}[q.kind]
            if lease is None or not lease.sweeping:
                yield "reads the lease: not sweeping", store, w._replace(pc=nxt), False, None
            else:
                own = _get(store.markers, (i, w.attempt))
                gone = self.lease_gone(s, i, lease, own[1] if own is not None else 0)
                if True in gone:
                    yield (
                        f"reads the lease: sweeping, but its holder is dead or it expired{_undecided(gone)}",
                        store,
                        w._replace(pc=nxt),
                        False,
                        None,
                    )
                # else it waits while a live collector deletes: no step
        elif op == "head":
            found = _get(store.commits, store.head) if store.head else None
            yield (
                f"reads head {store.head}",
                store,
                w._replace(pc=("check", 0), head=store.head, base=found[1] if found else ()),
                False,
                None,
            )
        elif op == "check":
            k = pc[1]
            c = q.target[k]
            found = _get(store.chunks, c)
            if found is None:
                yield f"chunk {c} not stored", store, w._replace(pc=("encode", k)), False, None
            elif self.chain_ok(store, c, found[1]):
                yield f"reuses stored chunk {c}{_via(found[1])}", store, self._record(w, q, c, found[1]), False, None
            else:
                yield f"finds chunk {c}{_via(found[1])} with its chain broken", store, w._replace(pc=("rewrite", k)), False, None
        elif op == "encode":
            k = pc[1]
            c = q.target[k]
            chain: Chain = ()
            if q.delta and k < len(w.base):
                b, bchain = w.base[k]
                if b != c and len(bchain) + 1 <= self.cfg.max_chain and _get(store.chunks, b) is not None:
                    chain = (b, *bchain)
            yield f"encodes chunk {c}{_via(chain) or ' whole'}", store, w._replace(pc=("put", k, chain)), False, None
        elif op == "put":
            k, chain = pc[1], pc[2]
            c = q.target[k]
            found = _get(store.chunks, c)
            if found is None:
                store2 = store._replace(chunks=_put(store.chunks, (c, chain, 0, w.late)))
                yield f"stores chunk {c}{_via(chain)}", store2, self._record(w, q, c, chain), False, None
            elif self.chain_ok(store, c, found[1]):
                yield f"finds chunk {c}{_via(found[1])} stored meanwhile", store, self._record(w, q, c, found[1]), False, None
            else:
                yield (
                    f"finds chunk {c}{_via(found[1])} stored meanwhile, its chain broken",
                    store,
                    w._replace(pc=("rewrite", k)),
                    False,
                    None,
                )
        elif op == "rewrite":
            k = pc[1]
            c = q.target[k]
            store2 = store._replace(chunks=_put(store.chunks, (c, (), 0, w.late)))
            yield f"rewrites chunk {c} whole", store2, self._record(w, q, c, ()), False, None
        elif op == "unmark":
            if q.kind == "coord":
                rank = self.rank_of[i]
                keys = [(i, w.attempt)] + [k for k, _ in store.markers if k[0] == rank]
                yield "deletes its marker and the rank's", store._replace(markers=_drop(store.markers, keys)), W_DONE, False, None
            elif q.kind == "rank":
                yield (
                    "deletes its marker",
                    store._replace(markers=_drop(store.markers, [(i, w.attempt)])),
                    w._replace(pc=("deliver",), marker=False),
                    False,
                    None,
                )
            else:
                yield "deletes its marker", store._replace(markers=_drop(store.markers, [(i, w.attempt)])), W_DONE, False, None
        elif op == "deliver":
            if self.p.dcp_marker == "held_until_publish" and w.marker:
                yield "hands its results to the coordinator, keeps its marker", store, w._replace(pc=("hold",), delivered=True), False, None
            else:
                yield "hands its results to the coordinator", store, w._replace(status="done", pc=("done",), delivered=True), False, None
        elif op == "hold":
            if not self.heartbeats and _get(store.markers, (i, w.attempt)) is None:
                yield "finds its marker deleted: done", store, w._replace(status="done", pc=("done",), marker=False), False, None
            # with heartbeats, its heartbeat finds the marker gone
        elif op == "gather":
            rank = s.procs[self.rank_of[i]]
            if rank.delivered:
                yield "gathers the rank's results", store, w._replace(pc=("chead",), refs=rank.refs), False, None
            elif rank.status not in ACTIVE:
                yield (
                    "the save fails: the rank died",
                    store,
                    w._replace(pc=("unmark",)) if w.marker else W_DONE._replace(status="failed"),
                    False,
                    None,
                )
        elif op == "chead":
            yield f"reads head {store.head}", store, w._replace(pc=("commit",), head=store.head), False, None
        elif op == "commit":
            cid = f"{q.name}.{w.made}"
            store2 = store._replace(commits=_put(store.commits, (cid, w.refs, 0, w.late)))
            yield f"writes commit {cid} on {w.head}", store2, w._replace(pc=("cas",), commit=cid, made=w.made + 1), False, None
        elif op == "cas":
            yield from self._publish(s, i, w, q)
        elif op == "cas_retry":
            after = w._replace(pc=("unmark",)) if w.marker else W_DONE
            if store.head == w.commit:
                yield f"resent ref update finds head {w.commit}: reports it", store, after, False, w.commit
            else:
                yield from self._conflict(w, store, "resent ref update")

    def _publish(self, s: State, i: int, w: W, q: Proc) -> Iterator[tuple[str, Store, W, bool, str | None]]:
        """The fence check and the ref compare-and-swap, one atomic step."""
        store = s.store
        if self.p.fence and self.heartbeats and (w.marker or w.fenced) and not self.fresh(w):
            if q.kind == "writer" and w.attempt < self.cfg.restarts:
                again = w._replace(pc=("marker",), attempt=w.attempt + 1, marker=False, refs=(), fenced=False, hb_lost=None, late=False)
                yield "fence check fails: starts over with a new marker", store, again, False, None
            else:
                yield "fence check fails: gives up", store, W_DONE._replace(status="failed"), False, None
            return
        if store.head != w.head:
            yield from self._conflict(w, store, "ref update")
            return
        store2 = store._replace(head=w.commit)
        after = w._replace(pc=("unmark",)) if w.marker else W_DONE
        yield f"moves head {w.head} -> {w.commit}: reports it", store2, after, False, w.commit
        if self.may_lose(s, i):
            yield f"moves head {w.head} -> {w.commit}, answer lost", store2, w._replace(pc=("cas_retry",)), True, None

    def _conflict(self, w: W, store: Store, what: str) -> Iterator[tuple[str, Store, W, bool, None]]:
        if w.made < self.cfg.commit_objects:
            yield f"{what} conflicts (head is {store.head}): re-parents", store, w._replace(pc=("commit",), head=store.head), False, None
        else:
            yield (
                f"{what} conflicts: gives up",
                store,
                w._replace(pc=("unmark",)) if w.marker else W_DONE._replace(status="failed"),
                False,
                None,
            )

    def _record(self, w: W, q: Proc, c: str, chain: Chain) -> W:
        refs = (*w.refs, (c, chain))
        if len(refs) < len(q.target):
            return w._replace(refs=refs, pc=("check", len(refs)))
        if q.kind == "rank":
            return w._replace(refs=refs, pc=("unmark",) if self.p.dcp_marker == "released_after_write" else ("deliver",))
        return w._replace(refs=refs, pc=("commit",))

    def chain_ok(self, store: Store, c: str, chain: Chain) -> bool:
        if self.p.reuse_check == "none":
            return True
        if self.p.reuse_check == "chain_exists":
            return all(_get(store.chunks, b) is not None for b in chain)
        return chunk_readable(store, c, chain)

    # -- collectors ----------------------------------------------------------------------------

    def collector_steps(self, s: State, i: int, c: C) -> Iterator[tuple[str, Store, C, bool, tuple | None]]:
        """Its steps: ``(label, store, itself, lost answer used, every process if it marked
        some writer late (a ghost), else None)``."""
        store = s.store
        op = c.pc[0]
        lease = store.lease
        ours = lease is not None and lease.tenure == (i, c.tenure)
        k = c.pc[1] if len(c.pc) > 1 else 0

        def renewed(sweeping: bool) -> Store:
            return store._replace(lease=Lease((i, c.tenure), 0, sweeping))

        if op in ("mark", "unmark") and not ours:
            yield "aborts: its lease was taken over (CollectorBusy)", store, C_DONE._replace(status="lost"), False, None
        elif c.lost and op not in ("acquire", "release"):
            yield "aborts: its heartbeat found its lease lost", store, C_DONE._replace(status="lost"), False, None
        elif op == "acquire":
            if lease is None or True in self.lease_gone(s, i, lease, 0):
                taken = "takes the lease" if lease is None else f"takes over the lease of {self.names[lease.tenure[0]]}"
                c2 = c._replace(pc=("plan",), tenure=c.tenure + 1, hb_sent=0, hb_ok=0, lost=False)
                yield taken, store._replace(lease=Lease((i, c.tenure + 1), 0, False)), c2, False, None
            else:
                yield "another collector holds the lease: CollectorBusy", store, C_DONE._replace(status="busy"), False, None
        elif op == "plan":
            now_age = lease.age if ours and self.heartbeats else 0
            known = frozenset(cid for cid, *_ in store.commits)
            plans = list(self.make_plans(store, i, now_age))
            note = " (an age the cap leaves undecided: one plan per outcome)" if len(set(plans)) > 1 else ""
            for plan in plans:
                yield (
                    f"plans {_plan_text(plan)}{note}",
                    store,
                    c._replace(pc=("mark", 0) if plan else ("reap",), plan=plan, known=known),
                    False,
                    None,
                )
        elif op == "mark":
            yield "renews its lease, sweeping", renewed(True), self._renewal(c._replace(pc=("list", k), t_snap=0)), False, None
        elif op == "list":
            keys = [key for key, _ in store.markers]
            options = [self.marker_abandoned(s, i, key, age, c.t_snap) for key, age in store.markers]
            names = lambda ks: ", ".join(f"{self.names[j]}#{a}" for j, a in ks)  # noqa: E731
            note = _undecided(*options)
            for verdicts in itertools.product(*options):
                judged = tuple(key for key, gone in zip(keys, verdicts) if gone)
                live = [key for key, gone in zip(keys, verdicts) if not gone]
                if live and not ours:  # its unmarking compare-and-swap fails
                    yield (
                        f"lists markers: {names(live)} live{note}; its lease was taken over (CollectorBusy)",
                        store,
                        C_DONE._replace(status="lost"),
                        False,
                        None,
                    )
                    continue
                if live:  # it unmarks at once: between the two, writers only wait
                    c2 = self._renewal(c._replace(pc=("mark", k), judged=()))
                    yield f"lists markers: {names(live)} live{note}; unmarks sweeping and waits", renewed(False), c2, False, None
                    continue
                procs = s.procs  # ghost: the writers it gives up on write garbage from now on
                for j, attempt in judged if self.cfg.check_structure else ():
                    wj = procs[j]
                    if isinstance(wj, W) and wj.attempt == attempt and not wj.late and wj.status in ACTIVE:
                        procs = procs[:j] + (wj._replace(late=True),) + procs[j + 1 :]
                text = f"{names(judged)} abandoned" if judged else "none"
                yield (
                    f"lists markers: {text}{note}",
                    store,
                    c._replace(pc=("protect", k), judged=judged),
                    False,
                    None if procs is s.procs else procs,
                )
        elif op == "protect":
            protected = set(c.protected)
            if store.head is not None:
                protected |= commit_needs(store, store.head)
            fresh = [cid for cid, *_ in store.commits if cid not in c.known]
            for cid in fresh:
                protected |= commit_needs(store, cid)
            if self.p.chain_closure:
                protected = self._closure(store, protected)
            c2 = c._replace(pc=("delete", k), protected=frozenset(protected), known=c.known | frozenset(fresh))
            yield "re-reads refs and commits, protects what they need", store, c2, False, None
        elif op in ("delete", "delete_retry"):
            checks = self.p.fence and self.heartbeats and (op == "delete" or self.p.fence_resent_deletes)
            if checks and not self.fresh(c):
                yield "aborts: lease lost (its last renewal is too old)", store, C_DONE._replace(status="lost"), False, None
                return
            batch = [key for key in c.plan[k] if key not in c.protected]
            store2 = _delete(store, batch)
            what = ", ".join(f"{'commit' if kind == 'C' else 'chunk'} {n}" for kind, n in batch) or "nothing"
            verb = "resends its delete of" if op == "delete_retry" else "deletes"
            yield f"{verb} {what}", store2, c._replace(pc=("unmark", k)), False, None
            if op == "delete" and self.may_lose(s, i) and batch:
                yield f"deletes {what}, answer lost", store2, c._replace(pc=("delete_retry", k)), True, None
        elif op == "unmark":
            nxt = ("mark", k + 1) if k + 1 < len(c.plan) else ("reap",)
            yield "unmarks sweeping", renewed(False), self._renewal(c._replace(pc=nxt)), False, None
        elif op == "reap":
            if self.heartbeats:  # compare-and-delete the versions it judged: one renewed since stays
                gone = [key for key in c.judged if _get(store.markers, key) is not None]
            else:  # lease.writers() again, now
                gone = [key for key, age in store.markers if self.marker_abandoned(s, i, key, age, 0)[0]]
            yield (
                f"deletes the abandoned markers ({len(gone)})",
                store._replace(markers=_drop(store.markers, gone)),
                c._replace(pc=("release",)),
                False,
                None,
            )
        elif op == "release":
            yield "releases the lease", store._replace(lease=None) if ours else store, C_DONE, False, None

    def make_plans(self, store: Store, i: int, now_age: int) -> Iterator[tuple[tuple[tuple[str, str], ...], ...]]:
        """Keep the head (the retention policy: ref targets only) and young commits, what
        they need, and young objects; delete the rest, in batches. (One plan per way of
        deciding the ages the clamp leaves undecided.)"""
        objects = [("C", cid, age) for cid, _, age, _ in store.commits] + [("K", n, age) for n, _, age, _ in store.chunks]
        for verdicts in itertools.product(*(self.young(i, age, now_age) for _, _, age in objects)):
            young = {(kind, name) for (kind, name, _), y in zip(objects, verdicts) if y}
            yield self._plan(store, young)

    def _plan(self, store: Store, young: set[tuple[str, str]]) -> tuple[tuple[tuple[str, str], ...], ...]:
        kept = {store.head} if store.head is not None else set()
        kept |= {name for kind, name in young if kind == "C"}
        remaining: set[tuple[str, str]] = set()
        for cid in kept:
            remaining |= commit_needs(store, cid)
        remaining |= {key for key in young if key[0] == "K"}
        if self.p.chain_closure:
            remaining = self._closure(store, remaining)
        commits = sorted(("C", cid) for cid, *_ in store.commits if ("C", cid) not in remaining)
        chunks = [(n, ch) for n, ch, _, _ in store.chunks if ("K", n) not in remaining]
        if self.p.delete_order == "by_key":
            groups = [commits, sorted(("K", n) for n, _ in chunks)]
        else:  # dependents first: a batch never mixes kinds or chain lengths
            lengths = sorted({len(ch) for _, ch in chunks}, reverse=True)
            groups = [commits] + [sorted(("K", n) for n, ch in chunks if len(ch) == length) for length in lengths]
        n = self.cfg.batch_size
        return tuple(tuple(g[j : j + n]) for g in groups for j in range(0, len(g), n))

    @staticmethod
    def _closure(store: Store, keys: set) -> set:
        out = set(keys)
        todo = [name for kind, name in out if kind == "K"]
        while todo:
            found = _get(store.chunks, todo.pop())
            for b in found[1] if found else ():
                if ("K", b) not in out:
                    out.add(("K", b))
                    todo.append(b)
        return out

    # -- invariants ----------------------------------------------------------------------------

    def store_problem(self, store: Store) -> str | None:
        """The invariants that depend on the store alone."""
        if store.head is not None and not commit_readable(store, store.head):
            return f"the branch head {store.head} is not readable"
        if self.cfg.check_structure:
            problems = structure_problems(store, spare_late=self.cfg.structure_spares_late)
            if problems:
                return "a stored object lacks what it needs: " + "; ".join(problems)
        return None

    # -- display -------------------------------------------------------------------------------

    def view(self, s: State, now: int) -> str:
        """The store and every process, one line; ``@t``: written at storage time t."""
        st = s.store
        at = lambda age: "old" if age >= self.cap else str(now - age)  # noqa: E731
        chunks = " ".join(f"{n}{_via(ch)}{'*' if late else ''}" for n, ch, _, late in st.chunks) or "-"
        commits = " ".join(f"{cid}[{','.join(c for c, _ in refs)}]{'*' if late else ''}" for cid, refs, _, late in st.commits) or "-"
        lease = "-"
        if st.lease is not None:
            lease = f"{self.names[st.lease.tenure[0]]}@{at(st.lease.age)}{' sweeping' if st.lease.sweeping else ''}"
        markers = " ".join(f"{self.names[j]}#{a}@{at(age)}" for (j, a), age in st.markers) or "-"
        procs = "; ".join(f"{name} {_proc_text(w)}" for name, w in zip(self.names, s.procs))
        return f"t={now} head={st.head} chunks: {chunks}; commits: {commits}; lease {lease}; markers {markers} | {procs}"


def _delete(store: Store, keys: Iterable[tuple[str, str]]) -> Store:
    keys = set(keys)
    return store._replace(
        commits=tuple(c for c in store.commits if ("C", c[0]) not in keys),
        chunks=tuple(c for c in store.chunks if ("K", c[0]) not in keys),
    )


def _undecided(*options: tuple[bool, ...]) -> str:
    """A label's note where it took an outcome the age cap left undecided."""
    return " (an age the cap leaves undecided)" if any(len(o) > 1 for o in options) else ""


def _via(chain: Chain) -> str:
    return f"(delta via {','.join(chain)})" if chain else ""


def _plan_text(plan: tuple) -> str:
    return " | ".join(",".join(n for _, n in batch) for batch in plan) or "nothing to delete"


def _proc_text(w: W | C) -> str:
    """A process's program counter and what it holds: a writer the head it read and the
    chunks it recorded; a collector its batch."""
    if w.status not in ACTIVE:
        return w.status
    parts = w.pc if isinstance(w, W) else w.pc[:1]  # a collector's batch is shown below
    pc = "/".join(str(x) for x in parts if not isinstance(x, tuple))
    text = pc if w.status == "run" else f"{w.status} at {pc}"
    if isinstance(w, W):
        seen = ([f"head {w.head}"] if w.head else []) + ([f"has {' '.join(c + _via(ch) for c, ch in w.refs)}"] if w.refs else [])
        text += f" ({', '.join(seen)})" if seen and w.pc[0] not in ("gather",) else ""
        text += " fenced" if w.fenced else ""
    else:
        if w.plan and len(w.pc) > 1:
            text += f" (batch {w.pc[1] + 1} of {len(w.plan)})"
        text += " lease lost" if w.lost else ""
    return text


# -- search ------------------------------------------------------------------------------------


class Violation(NamedTuple):
    message: str
    steps: list[tuple[str, str]]  # (step, view after it)
    namespaces: tuple[int, ...]
    skews: tuple[int, ...]


@dataclass
class Result:
    protocol: Protocol
    config: Config
    states: int = 0
    transitions: int = 0
    environments: int = 0
    elapsed_s: float = 0.0
    violation: Violation | None = None

    def summary(self) -> str:
        verdict = f"VIOLATION: {self.violation.message}" if self.violation else "no violation"
        return f"{self.states:,} states, {self.transitions:,} transitions, {self.environments} environments, {self.elapsed_s:.1f} s: {verdict}"

    def trace(self) -> str:
        """The violation as numbered steps, each with the store and every process after it
        (``*``: an object written late by a writer a collector had given up on)."""
        v = self.violation
        if v is None:
            return "no violation"
        names = [q.name for q in self.config.processes]
        env = ", ".join(f"{n} in pid namespace {a} with its clock {b:+d}" for n, a, b in zip(names, v.namespaces, v.skews))
        lines = [v.message, f"protocol: {self.protocol.describe()}", f"scenario: {self.config.scenario.name}; {env}"]
        for n, (label, view) in enumerate(v.steps):
            lines += [f"{n:3d}. {label}", f"       {view}"]
        return "\n".join(lines)


def check(protocol: Protocol, config: Config, *, max_states: int = 3_000_000) -> Result:
    """Walk every reachable state of every environment of ``config`` breadth-first. Stops at
    the first violation, with a shortest trace to it."""
    result = Result(protocol, config)
    started = time.perf_counter()
    try:
        for namespaces, skews in config.environments():
            result.environments += 1
            model = Model(protocol, config, namespaces, skews)
            found = _walk(model, result, max_states)
            if found is not None:
                result.violation = Violation(*found, namespaces, skews)
                return result
    finally:
        result.elapsed_s = time.perf_counter() - started
    return result


def reachable(protocol: Protocol, config: Config, namespaces: tuple[int, ...], skews: tuple[int, ...]) -> set[State]:
    """Every state reachable in one environment (for comparing environments)."""
    model = Model(protocol, config, namespaces, skews)
    start = model.initial()
    seen = {start}
    queue = deque([start])
    while queue:
        for _, nxt, _, _ in model.successors(queue.popleft()):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


def _walk(model: Model, result: Result, max_states: int) -> tuple[str, list] | None:
    start = model.initial()
    parent: dict[State, tuple[State | None, str]] = {start: (None, "start")}
    queue = deque([start])
    store_problem: dict[Store, str | None] = {}  # the invariants of a store, once per store
    try:
        while queue:
            s = queue.popleft()
            for label, nxt, reported, _ in model.successors(s):
                result.transitions += 1
                problem = None
                if reported is not None and not commit_readable(nxt.store, reported):
                    problem = f"commit {reported} was reported but is not readable"
                link = (s, label)
                if parent.setdefault(nxt, link) is link:  # a new state
                    queue.append(nxt)
                    store = nxt.store
                    problem = problem or store_problem.get(store, "?")
                    if problem == "?":
                        problem = store_problem[store] = model.store_problem(store)
                if problem is not None:
                    return problem, _steps(model, parent, s, (label, nxt))
            if len(parent) > max_states:
                raise RuntimeError(f"more than {max_states:,} states: make the configuration smaller")
        return None
    finally:
        result.states += len(parent)


def _steps(model: Model, parent: dict, last: State, step: tuple[str, State]) -> list[tuple[str, str]]:
    path = [step]
    s: State | None = last
    while s is not None:
        prev, label = parent[s]
        path.append((label, s))
        s = prev
    steps, now = [], 0
    for label, s in reversed(path):
        now += label == TICK
        steps.append((label, model.view(s, now)))
    return steps


# -- the checks --------------------------------------------------------------------------------

#: The head moved on from ``d`` (a delta via ``a``) to ``x``; nothing kept needs ``a`` or ``d``,
#: both old; a writer commits ``d`` again (a rollback: ``commit(checkout("main~5"))``).
ROLLBACK = Scenario(
    "rollback onto a stored delta",
    chunks=(("a", (), None), ("d", ("a",), None), ("x", (), None)),
    commits=(("C3", (("x", ()),)),),
    head="C3",
)
#: The same with the removed commit still stored (commits are deleted before chunks).
ROLLBACK_WITH_COMMIT = replace(
    ROLLBACK, name="rollback onto a stored delta, its old commit still stored", commits=(("C2", (("d", ("a",)),)), *ROLLBACK.commits)
)
#: The head moved on from ``a`` to ``x``; a writer commits ``a`` again (nothing needs it).
OLD_STATE = Scenario("rollback onto an old chunk", chunks=(("a", (), None), ("x", (), None)), commits=(("C2", (("x", ()),)),), head="C2")
#: A delta just stored (by a writer that has not published yet, or died) on an old base.
YOUNG_DELTA = replace(ROLLBACK, name="a young delta on an old base", chunks=(("a", (), None), ("d", ("a",), 0), ("x", (), None)))
#: What ef55ec3's collector leaves when it dies between two batches: ``d`` without ``a``.
DANGLING = Scenario("a delta whose base is gone", chunks=(("d", ("a",), None), ("x", (), None)), commits=(("C3", (("x", ()),)),), head="C3")
#: A chain ``d -> b -> a`` whose last base is gone.
DANGLING_CHAIN = Scenario(
    "a chain whose last base is gone",
    chunks=(("b", ("a",), None), ("d", ("b", "a"), None), ("x", (), None)),
    commits=(("C3", (("x", ()),)),),
    head="C3",
)

WRITER = Proc("writer", "W", ("d",))  # commits d, as a delta against the head's chunk if d is gone
OLD_WRITER = Proc("writer", "W", ("a",))
CHAIN_WRITER = Proc("writer", "W", ("b", "a", "d"), delta=False)
SECOND_WRITER = Proc("writer", "V", ("a",))
COLLECTOR = Proc("collector", "G")
SECOND_COLLECTOR = Proc("collector", "H")
RANK = Proc("rank", "R", ("a",), delta=False)
COORDINATOR = Proc("coord", "P")

TWO, OLD_TWO, DCP = (WRITER, COLLECTOR), (OLD_WRITER, COLLECTOR), (RANK, COORDINATOR, COLLECTOR)
SKEWS = tuple(itertools.product((-3, 0, 3), repeat=2))  # more than the ttl, either way


def _quiet(processes: int, **changes: object) -> dict:
    """No crash, pause or lost answer, one pid namespace, no skew; then ``changes``."""
    return {"crashes": 0, "pauses": 0, "lost_answers": 0, "namespaces": ((0,) * processes,), **changes}


def _full(processes: int, **changes: object) -> dict:
    """Every environment step on (one of each per run), one pid namespace; then ``changes``."""
    return {"namespaces": ((0,) * processes,), **changes}


@dataclass(frozen=True)
class Check:
    """One walk: a protocol over a configuration, and what it must find. ``expect``: the kind
    of counterexample it must find (see :func:`kinds`), or ``None``: none may exist."""

    name: str
    protocol: Protocol
    config: Config
    expect: str | None = None
    #: A clean walk must visit more states than this (a model that explores nothing fails).
    min_states: int = 0
    soak: bool = False


def kinds(result: Result) -> set[str]:
    """What a counterexample shows: the environment steps it takes (``crash``, ``pause``,
    ``lost answer``); ``namespaces`` (its processes are in different pid namespaces); ``skew``
    (some wall clock is skewed); ``reused broken delta`` (a writer reused a delta after a base of
    it was deleted); ``rewritten base`` (a writer reused a delta through a base rewritten whole);
    ``dangling delta`` (a stored delta lacks its chain); ``late write`` (what lacks something
    was written by a writer after a collector gave up on it); ``rank released`` (a DCP rank deleted its
    marker before its coordinator published); ``undecided`` (it relies on an age the cap left
    undecided: not a real counterexample)."""
    v = result.violation
    if v is None:
        return set()
    labels = [label for label, _ in v.steps]
    out = set()
    for kind, needle in (("crash", ": crashes"), ("pause", ": pauses"), ("lost answer", "answer lost"), ("undecided", "undecided")):
        if any(needle in label for label in labels):
            out.add(kind)
    if len(set(v.namespaces)) > 1:
        out.add("namespaces")
    if any(v.skews):
        out.add("skew")
    rewritten = set()
    for n, label in enumerate(labels):
        if ": rewrites chunk " in label:
            rewritten.add(label.split(": rewrites chunk ", 1)[1].split()[0])
        if "reuses stored chunk" in label and "(delta via" in label:
            bases = label.split("(delta via ", 1)[1].rstrip(")").split(",")
            stored = {c.split("(")[0] for c in v.steps[n - 1][1].split("chunks: ", 1)[1].split(";", 1)[0].split()}
            if any(b not in stored for b in bases):
                out.add("reused broken delta")
            if any(b in rewritten for b in bases):
                out.add("rewritten base")
    if "lacks its chain" in v.message:
        out.add("dangling delta")
    if "(written late)" in v.message:
        out.add("late write")
    released = next((n for n, label in enumerate(labels) if label.startswith("R: deletes its marker")), None)
    published = next((n for n, label in enumerate(labels) if label.startswith("P: moves head")), None)
    if released is not None and published is not None and released < published:
        out.add("rank released")
    return out


def checks(*, soak: bool = False) -> list[Check]:
    """The default checks; with ``soak``, the larger configurations too.

    A check that must find nothing may use the smallest age cap (the walk over-approximates,
    so a clean result holds); one that must find a counterexample uses a cap wide enough that
    its shortest counterexample decides every comparison exactly."""
    exact = {"cap_margin": 2}
    out = [
        # (a) ef55ec3: each defect with only the environment step it needs.
        Check(
            "ef55ec3, defect 1: deletes in key order, a rollback reuses a delta whose base is gone",
            OLD,
            Config(ROLLBACK, TWO, **_quiet(2)),
            "reused broken delta",
        ),
        Check(
            "ef55ec3, defect 1: keeps a young delta, deletes its old base",
            OLD,
            Config(YOUNG_DELTA, TWO, **_quiet(2)),
            "reused broken delta",
        ),
        Check(
            "ef55ec3, defect 3: a collector in another pid namespace",
            OLD,
            Config(OLD_STATE, OLD_TWO, **_quiet(2, namespaces=((0, 0), (0, 1)))),
            "namespaces",
        ),
        Check("ef55ec3, defect 4: wall clocks skewed by more than the ttl", OLD, Config(OLD_STATE, OLD_TWO, **_quiet(2, skews=SKEWS)), "skew"),
        Check(
            "ef55ec3, defect 5: a DCP rank releases its marker before the publish",
            OLD,
            Config(OLD_STATE, DCP, **_quiet(3)),
            "rank released",
        ),
        Check("ef55ec3 without key order, namespaces, skew or DCP: no violation", OLD, Config(OLD_STATE, OLD_TWO, **_quiet(2))),
        # The new protocol as first specified: what this model found.
        Check(
            "as written: a writer paused past the ttl comes back, heartbeats, publishes",
            AS_WRITTEN,
            Config(OLD_STATE, OLD_TWO, **_quiet(2, pauses=1, faulty=("W",), **exact)),
            "pause",
        ),
        Check(
            "as written: a collector paused past the ttl comes back, heartbeats, deletes",
            AS_WRITTEN,
            Config(OLD_STATE, OLD_TWO, **_quiet(2, pauses=1, faulty=("G",), **exact)),
            "pause",
        ),
        Check(
            "as written: a heartbeat is counted from its late answer",
            AS_WRITTEN,
            Config(OLD_STATE, OLD_TWO, **_quiet(2, lost_answers=1, **exact)),
            "lost answer",
        ),
        Check(
            "as written: a DCP rank's marker goes stale before the coordinator takes one",
            AS_WRITTEN,
            Config(OLD_STATE, DCP, **_quiet(3, pauses=1, **exact)),
            "pause",
        ),
        Check(
            "as written: a writer reuses a chain through a base rewritten whole",
            AS_WRITTEN,
            Config(DANGLING_CHAIN, (CHAIN_WRITER, COLLECTOR), **_quiet(2)),
            "rewritten base",
        ),
        Check(
            "as stated, the invariant fails for what a fenced writer writes late",
            NEW,
            Config(ROLLBACK, TWO, check_structure=True, structure_spares_late=False, **_quiet(2, pauses=1, faulty=("W",), **exact)),
            "late write",
        ),
        # (b) The new protocol: no violation.
        Check(
            "new: rollback onto a delta, every environment step",
            NEW,
            Config(ROLLBACK, TWO, check_structure=True, restarts=0, **_full(2)),
            min_states=150_000,
        ),
        Check(
            "new: rollback onto a delta, a fenced writer starts over",
            NEW,
            Config(ROLLBACK, TWO, check_structure=True, **_full(2, lost_answers=0)),
            min_states=35_000,
        ),
        Check(
            "new: a young delta on an old base",
            NEW,
            Config(YOUNG_DELTA, TWO, check_structure=True, **_full(2, crashes=0, lost_answers=0)),
            min_states=15_000,
        ),
        Check("new: DCP", NEW, Config(OLD_STATE, DCP, check_structure=True, **_full(3, lost_answers=0)), min_states=60_000),
        Check(
            "new: a store left damaged by ef55ec3",
            NEW,
            Config(DANGLING_CHAIN, (CHAIN_WRITER, COLLECTOR), **_full(2, crashes=0, lost_answers=0)),
            min_states=40_000,
        ),
        Check(
            "new: two writers",
            NEW,
            Config(ROLLBACK, (WRITER, SECOND_WRITER, COLLECTOR), check_structure=True, **_quiet(3)),
            min_states=20_000,
        ),
        Check(
            "new: two collectors, one dies",
            NEW,
            Config(OLD_STATE, (OLD_WRITER, COLLECTOR, SECOND_COLLECTOR), check_structure=True, **_quiet(3, crashes=1)),
            min_states=12_000,
        ),
        Check(
            "new: two collectors, one paused and taken over",
            NEW,
            Config(OLD_STATE, (OLD_WRITER, COLLECTOR, SECOND_COLLECTOR), check_structure=True, **_quiet(3, pauses=1, faulty=("G",))),
            min_states=35_000,
        ),
        # (c) The new protocol with one mechanism set back: its defect returns.
        Check(
            "new, deletes in key order",
            NEW.flipped("delete_order"),
            Config(ROLLBACK, TWO, check_structure=True, **_quiet(2)),
            "dangling delta",
        ),
        Check(
            "new, no chain closure in planning",
            NEW.flipped("chain_closure"),
            Config(YOUNG_DELTA, TWO, check_structure=True, **_quiet(2)),
            "dangling delta",
        ),
        Check("new, no chain check on reuse", NEW.flipped("reuse_check"), Config(DANGLING, TWO, **_quiet(2)), "reused broken delta"),
        Check(
            "new, chain check by existence only",
            replace(NEW, reuse_check="chain_exists"),
            Config(DANGLING_CHAIN, (CHAIN_WRITER, COLLECTOR), **_quiet(2)),
            "rewritten base",
        ),
        Check(
            "new, liveness by hostname and pid",
            NEW.flipped("identity"),
            Config(OLD_STATE, OLD_TWO, **_quiet(2, namespaces=((0, 0), (0, 1)))),
            "namespaces",
        ),
        Check("new, liveness by wall clocks", NEW.flipped("clock"), Config(OLD_STATE, OLD_TWO, **_quiet(2, skews=SKEWS)), "skew"),
        Check("new, no fence check", NEW.flipped("fence"), Config(OLD_STATE, OLD_TWO, **_quiet(2, pauses=1, **exact)), "pause"),
        Check(
            "new, the DCP rank releases its marker after write_data",
            NEW.flipped("dcp_marker"),
            Config(OLD_STATE, DCP, **_quiet(3)),
            "rank released",
        ),
        Check(
            "new, a heartbeat gap does not fence (writer)",
            NEW.flipped("gap_fences"),
            Config(OLD_STATE, OLD_TWO, **_quiet(2, pauses=1, faulty=("W",), **exact)),
            "pause",
        ),
        Check(
            "new, a heartbeat gap does not fence (collector)",
            NEW.flipped("gap_fences"),
            Config(OLD_STATE, OLD_TWO, **_quiet(2, pauses=1, faulty=("G",), **exact)),
            "pause",
        ),
        Check(
            "new, a late heartbeat answer counted when it arrives",
            NEW.flipped("heartbeat_time"),
            Config(OLD_STATE, OLD_TWO, **_quiet(2, pauses=1, lost_answers=1, **exact)),
            "lost answer",
        ),
        Check(
            "new, a delete resent without the fence check",
            NEW.flipped("fence_resent_deletes"),
            Config(OLD_STATE, OLD_TWO, **_quiet(2, pauses=1, lost_answers=1, faulty=("G",), **exact)),
            "lost answer",
        ),
        Check(
            "new, the DCP coordinator takes its marker when it writes",
            NEW.flipped("dcp_coordinator_marker_first"),
            Config(OLD_STATE, DCP, **_quiet(3, pauses=1, **exact)),
            "pause",
        ),
    ]
    if soak:
        every_namespace = {"namespaces": None}
        out += [
            Check(
                "soak, new: rollback with its old commit, every environment step, every namespace",
                NEW,
                Config(ROLLBACK_WITH_COMMIT, TWO, check_structure=True, **every_namespace),
                min_states=1_000_000,
                soak=True,
            ),
            Check(
                "soak, new: DCP, every environment step, every namespace",
                NEW,
                Config(OLD_STATE, DCP, check_structure=True, **every_namespace),
                min_states=3_000_000,
                soak=True,
            ),
            Check(
                "soak, new: a young delta, every environment step",
                NEW,
                Config(YOUNG_DELTA, TWO, check_structure=True, **_full(2)),
                min_states=400_000,
                soak=True,
            ),
            Check(
                "soak, new: a store left damaged by ef55ec3, every environment step",
                NEW,
                Config(DANGLING_CHAIN, (CHAIN_WRITER, COLLECTOR), **_full(2)),
                min_states=900_000,
                soak=True,
            ),
            Check(
                "soak, new: two writers, a pause",
                NEW,
                Config(ROLLBACK, (WRITER, SECOND_WRITER, COLLECTOR), check_structure=True, **_quiet(3, pauses=1)),
                min_states=800_000,
                soak=True,
            ),
            Check(
                "soak, new: two writers, a crash",
                NEW,
                Config(ROLLBACK, (WRITER, SECOND_WRITER, COLLECTOR), check_structure=True, **_quiet(3, crashes=1)),
                min_states=90_000,
                soak=True,
            ),
            Check(
                "soak, new: two collectors, a crash and a pause",
                NEW,
                Config(OLD_STATE, (OLD_WRITER, COLLECTOR, SECOND_COLLECTOR), check_structure=True, **_full(3, lost_answers=0)),
                min_states=450_000,
                soak=True,
            ),
            Check(
                "soak, new: a two-chunk rollback, batches of two",
                NEW,
                Config(ROLLBACK, (Proc("writer", "W", ("d", "x")), COLLECTOR), batch_size=2, check_structure=True, **_full(2)),
                min_states=400_000,
                soak=True,
            ),
        ]
    return out


def run_checks(selected: Iterable[Check], *, show_traces: bool = False, out: object = sys.stdout) -> bool:
    """Run checks, print one line each (and a trace where asked or wrong); True if all pass."""
    ok_all = True
    total_states, started = 0, time.perf_counter()
    for c in selected:
        result = check(c.protocol, c.config)
        found = kinds(result)
        ok = (result.violation is None) if c.expect is None else (c.expect in found and "undecided" not in found)
        ok_all &= ok
        total_states += result.states
        verdict = "ok  " if ok else "FAIL"
        print(f"{verdict} {c.name}: {result.summary()}" + (f" [{', '.join(sorted(found))}]" if found else ""), file=out, flush=True)
        if result.violation is not None and (show_traces or not ok):
            print(result.trace(), file=out, flush=True)
    print(f"{total_states:,} states in {time.perf_counter() - started:.1f} s", file=out)
    return ok_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak", action="store_true", help="also run the larger configurations")
    parser.add_argument("--trace", action="store_true", help="print every counterexample")
    parser.add_argument("-k", default="", help="only the checks whose name contains this")
    args = parser.parse_args(argv)
    selected = [c for c in checks(soak=args.soak) if args.k in c.name]
    return 0 if run_checks(selected, show_traces=args.trace) else 1


if __name__ == "__main__":
    sys.exit(main())
