"""Child processes for tests/test_combination_soak.py.

``python tests/soak_child.py commit JSON`` is one run of the committer: it opens the store,
prints ``ready``, and commits ``soak_state`` after ``soak_state`` (what each step does,
:func:`step_plan`, is a pure function of the seed and the step number: fine-tuning steps,
rollbacks, blocking or asynchronous commits, a second branch forked afresh now and then),
until ``run_s`` has passed or the stop file exists. After each commit that returned (for an
asynchronous one, once ``result()`` returned) it checks the commit out bit-exact (it is its
branch's head, which every collector keeps) and appends a line to its log. A new run resumes
after the last step its log holds. Its last commit is asynchronous and not awaited: the
process then ends normally (``exit 0``), and a done-callback logs that commit (or its error)
once it has landed, if it ever does.

``python tests/soak_child.py gc-forker`` imports everything once, then for each ``go JSON``
line on stdin (:mod:`forker`) forks a collector that runs ``store.gc(KeepLast(N))`` a few
times, printing one JSON line for each; the forker SIGKILLs it ``kill_after_s`` after the
fork.

Every state is a pure function of (seed, line, state number), recorded in each commit's
metadata, so the parent recomputes what every commit, reported or not, must check out to.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any

import forker
import torch
from gc_child import hash_seed
from states import assert_same

import ckptstore
from ckptstore.errors import CkptStoreError, CollectorBusy, IntegrityError

#: Store settings: 4 KiB chunks, so each tensor of some KiB is a blob of several chunks.
OPEN = {"chunk_size_bytes": 4096, "inline_threshold_bytes": 256, "delta": "on", "delta_keyframe_interval": 4}
LINES = {"main": 0, "side": 1}  # each branch commits its own line of states
#: Mean time between two commits ("training"): a collector deletes only while no commit is
#: being written, so one that never pauses would starve it.
TRAIN_S = 0.05

# --------------------------------------------------------------------------------------------
# Deterministic states and plans


def _randn(numel: int, *seed: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(hash_seed(*seed)))


def soak_state(seed: int, line: int, number: int) -> dict:
    """State ``number`` of ``line``: weights that every state of the seed shares, each
    nudged by a relative 1e-3 (fine-tuning: every float32 changes in its low mantissa bytes,
    a quarter of the bfloat16 values by one unit, so deltas pay), an embedding that changes
    every 8 states (reused chunks), an optimizer moment and plain values."""
    nudge = lambda name, numel: 1 + 1e-3 * _randn(numel, seed, 10 + name, line, number)  # noqa: E731
    w1 = _randn(4096, seed, 1) * nudge(1, 4096)  # 16 KiB: 4 chunks
    w2 = (_randn(4096, seed, 2) * nudge(2, 4096)).to(torch.bfloat16)  # 8 KiB: 2 chunks
    return {
        "model": {
            "w1": w1,
            "w2": w2,
            "embed": _randn(1024, seed, 3, line, number // 8),  # 4 KiB: 1 chunk
            "bias": _randn(16, seed, 4, line, number),  # inline
        },
        "optimizer": {"exp_avg": 1e-3 * _randn(2048, seed, 5, line, number), "step": number},  # 2 chunks
        "line": line,
        "number": number,
    }


def step_plan(seed: int, step: int) -> dict[str, Any]:
    """What the committer does at ``step``: on which branch, whether it commits the step's
    own state or rolls back to the state of the commit ``back`` commits before its branch's
    head, blocking or not, and with which delta mode ("on", the store's, or "auto"), and how
    long it "trains" before the next step.

    Three steps in eight go to ``side``, mostly forked afresh from ``main`` at the first of
    them (a sweep restarted): the old ``side`` commits, and their delta chains, become
    garbage at once, and these steps often go back to what ``side`` held before."""
    rng = random.Random(hash_seed(seed, step, 99))
    phase = step % 8
    branch = "side" if phase >= 5 else "main"
    return {
        "branch": branch,
        "fork": phase == 5 and rng.random() < 0.5,
        "rollback": step >= 4 and rng.random() < (0.6 if phase >= 5 else 0.25),
        "back": rng.randint(1, 4),
        "blocking": rng.random() < 0.6,
        "delta": "auto" if rng.random() < 0.2 else None,
        "train_s": rng.uniform(0, 2 * TRAIN_S),
    }


# --------------------------------------------------------------------------------------------
# Mode "commit"


class Log:
    """The committer's log: one JSON line per event, appended with one write(2) on a file
    opened O_APPEND, so a SIGKILL never leaves half a line. Left open until the process ends
    (the done-callback of the last commit writes to it during interpreter shutdown)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode())


def read_log(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _old_deltas_reused(store, commit, previous: dict[str, set[str]]) -> int | None:
    """How many delta chunks ``commit`` reused from older commits: chunks stored as deltas
    that neither its parent has nor were written now (a delta written now has the parent's
    chunk at its place as its base). ``None`` if the parent's chunks are not known."""
    if not commit.parents:
        return None
    parent = commit.parents[0]
    if parent not in previous:
        try:
            previous[parent] = store.manifest_of(store.get_commit(parent)).chunk_ids()
        except (CkptStoreError, OSError):
            return None
    had = previous[parent]
    manifest = store.manifest_of(commit)
    previous[commit.id] = manifest.chunk_ids()
    return sum(1 for blob in manifest.blobs for c in blob.chunks if c.bases and c.id not in had and c.bases[0] not in had)


def run_commit(args: dict) -> None:
    seed, run = args["seed"], args["run"]
    records = read_log(args["log"])
    step = max((r.get("step", r.get("final_submitted", -1)) for r in records), default=-1) + 1
    # The commits each branch held, oldest first, as far as the log knows (id, line, number):
    # what a rollback commits again when no revision reaches the commit it goes back to.
    history: dict[str, list[tuple[str, int, int]]] = {b: [] for b in LINES}
    for r in records:
        if "id" in r:
            history[r["branch"]].append((r["id"], r["line"], r["number"]))
    before_fork = None  # what side held before it was last forked afresh
    old_deltas: dict[str, tuple[str, ...]] = {}  # its delta chunks and their chains
    log = Log(args["log"])
    store = ckptstore.open(args["url"], storage_options=args["options"] or None)
    forker.say("ready")
    deadline = time.monotonic() + args["run_s"]
    previous: dict[str, set[str]] = {}
    pending = None  # (future, record) of an asynchronous commit not yet resolved

    def report(commit, record: dict) -> None:
        record = {**record, "id": commit.id, "delta_chunks": commit.stats.delta_chunks, "reused_chunks": commit.stats.reused_chunks}
        try:
            record["old_deltas_reused"] = _old_deltas_reused(store, commit, previous)
        except (CkptStoreError, OSError) as exc:
            record["old_deltas_reused"] = None
            record["manifest_error"] = f"{type(exc).__name__}: {exc}"
        try:  # the head of its branch, which every collector keeps: whole right now
            assert_same(soak_state(seed, record["line"], record["number"]), store.checkout(commit.id))
            record["verified"] = True
        except (CkptStoreError, AssertionError) as exc:
            record["verified"] = False
            record["verify_error"] = f"{type(exc).__name__}: {exc}"[:500]
        log.write(record)
        history[record["branch"]].append((commit.id, record["line"], record["number"]))

    def resolve_pending() -> None:
        nonlocal pending
        if pending is not None:
            future, record = pending
            pending = None
            try:
                report(future.result(), record)
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
                log.write({**record, "commit_error": f"{type(exc).__name__}: {exc}"})

    while True:
        last = time.monotonic() >= deadline or os.path.exists(args["stop"])
        plan = step_plan(seed, step)
        branch, line = plan["branch"], LINES[plan["branch"]]
        resolve_pending()
        record = {"run": run, "step": step, "branch": branch, "line": line, "number": step, "rollback": False}
        state = None
        if branch == "main":
            before_fork = None
        elif plan["fork"] or branch not in store.branches():
            before_fork = history[branch][-1] if history[branch] else None
            old_deltas = _delta_chains(store, before_fork[0]) if before_fork else {}
            store.branch(branch, at="main", force=True)  # side's old commits are garbage now
            record["forked"] = True
        if plan["rollback"]:
            record["rollback"] = True
            if before_fork is not None and old_deltas:
                # Go back while a collector is deleting what side held, if it ever leaves a
                # delta stored without its base (one in its chain deleted first).
                record["timed_into_gap"] = _wait_for_a_gap(store, old_deltas, timeout_s=args["gap_wait_s"])
                old_deltas = {}
            state, (old_line, old_number) = _rollback_state(store, branch, plan["back"], history[branch], before_fork, record)
            record["line"], record["number"] = old_line, old_number
        if state is None:
            state = soak_state(seed, record["line"], record["number"])
        elif not _same(state, soak_state(seed, record["line"], record["number"])):
            log.write({**record, "checkout_mismatch": record["from_checkout"]})
            state = soak_state(seed, record["line"], record["number"])
        metadata = {"step": step, "line": record["line"], "number": record["number"], "seed": seed, "run": run}
        options = {"branch": branch, "metadata": metadata, "delta": plan["delta"]}
        if last:
            # The run ends: commit asynchronously and let the process end without waiting.
            record["final"] = True
            future = store.commit(state, blocking=False, **options)
            future.add_done_callback(lambda f, record=record: _log_final(log, f, record))
            log.write({"final_submitted": step, "run": run})
            return
        try:
            if plan["blocking"]:
                report(store.commit(state, **options), record)
            else:
                pending = (store.commit(state, blocking=False, **options), {**record, "async": True})
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            log.write({**record, "commit_error": f"{type(exc).__name__}: {exc}"})
        step += 1
        time.sleep(plan["train_s"])


def _delta_chains(store, commit_id: str) -> dict[str, tuple[str, ...]]:
    """The delta chunks of a commit and the bases each one needs; empty if it is gone."""
    try:
        manifest = store.manifest_of(store.get_commit(commit_id))
    except (LookupError, IntegrityError):
        return {}
    return {c.id: c.bases for blob in manifest.blobs for c in blob.chunks if c.bases}


def _wait_for_a_gap(store, chains: dict[str, tuple[str, ...]], *, timeout_s: float) -> bool:
    """Watch the store's chunks (one listing at a time) until one of the delta chunks of
    ``chains`` is stored while a base it needs is not, and return True; False once none of
    them is stored any more, or after ``timeout_s``. A collector that deletes what needs a
    chunk before that chunk never leaves such a gap."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stored = {key.rsplit("/", 1)[-1] for key in store.objects.list("chunks/")}
        deltas = [c for c in chains if c in stored]
        if any(not set(chains[c]) <= stored for c in deltas):
            return True
        if not deltas:
            return False
        time.sleep(0.002)
    return False


def _rollback_state(store, branch: str, back: int, history: list, before_fork: tuple | None, record: dict) -> tuple[dict | None, tuple[int, int]]:
    """The state a rollback commits again, and its (line, number): right after ``side`` was
    forked afresh, what it held before (a sweep going back to its old checkpoint, which no
    revision reaches any more: by id); else the commit ``back`` before the branch's head
    (``store.checkout("main~K")``). Checked out while a collector may be deleting it, when
    it is still stored; else ``None``, to recompute the state from what the log says."""
    record["before_fork"] = before_fork is not None
    try:
        if before_fork is not None:
            old_id, line, number = before_fork
            old = store.get_commit(old_id)
        else:
            old = store.commit_of(f"{branch}~{back}")
            line, number = old.metadata["line"], old.metadata["number"]
        state = store.checkout(old.id)
        record["from_checkout"] = old.id
        return state, (line, number)
    except (LookupError, IntegrityError):  # collected, or being collected (UnknownRef and others)
        if before_fork is not None:
            return None, (before_fork[1], before_fork[2])
        if len(history) >= back:
            return None, history[-back][1:]
        return None, (LINES[branch], max(0, record["step"] - back))


def _same(a: Any, b: Any) -> bool:
    try:
        assert_same(a, b)
        return True
    except AssertionError:
        return False


def _log_final(log: Log, future, record: dict) -> None:
    """Done-callback of the run's last commit, which nobody waits for."""
    try:
        commit = future.result()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        log.write({**record, "commit_error": f"{type(exc).__name__}: {exc}"})
        return
    log.write({**record, "id": commit.id, "delta_chunks": commit.stats.delta_chunks, "reused_chunks": commit.stats.reused_chunks})


# --------------------------------------------------------------------------------------------
# Mode "gc-forker": one collection per job, through the API


def _collect(go: dict, started: float) -> None:
    """A collector process: ``rounds`` collections in a row, each ``store.gc(KeepLast(n))``
    or, with ``batch_size``, the same collection deleting in batches of that many objects
    (default 1,000), so that the moments between two batches, where commits go on, come
    often in a store this small. One JSON line for each."""
    from ckptstore.gc import collect
    from ckptstore.retention import KeepLast

    store = ckptstore.open(go["url"], storage_options=go["options"] or None)
    for _ in range(go["rounds"]):
        try:
            if go["batch_size"] is None:
                plan = store.gc(KeepLast(go["keep_last"]), grace_period_s=0)
            else:
                plan = collect(store, KeepLast(go["keep_last"]), grace_period_s=0, batch_size=go["batch_size"])
        except CollectorBusy as exc:
            forker.say(json.dumps({"busy": str(exc)}))
            time.sleep(0.05)
            continue
        forker.say(json.dumps({"deleted": plan.deleted_objects, "removed": len(plan.removed_commits), "elapsed_s": plan.elapsed_s}))


def run_gc_forker(args: dict) -> None:
    import ckptstore.gc  # noqa: F401 - everything a collector needs, imported before forking
    import ckptstore.retention  # noqa: F401

    forker.serve(_collect)


if __name__ == "__main__":
    mode, arguments = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    {"commit": run_commit, "gc-forker": run_gc_forker}[mode](arguments)
