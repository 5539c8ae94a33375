"""Child processes for tests/test_gc_crash.py.

Run as ``python tests/gc_child.py MODE JSON_ARGS``, MODE one of ``commit`` (a committer),
``gc-loop`` (a collector running until told to stop) and ``gc-forker`` (forks collectors to
be SIGKILLed at random points). The states committed here are pure functions of their
arguments, so the parent recomputes what each commit must check out to.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback

import forker
import torch

import ckptstore
from ckptstore.errors import CollectorBusy

# --------------------------------------------------------------------------------------------
# Deterministic states

POOL_SIZE = 20
POOL_NUMEL = 1024  # 4 KiB of float32: one chunk at the tests' chunk size
PICKS = 4
FRESH_NUMEL = 1024  # one chunk
RECOMMIT_EVERY = 10  # every 10th commit re-commits an old state (its manifest and chunks)


def _randn(numel: int, *seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash_seed(*seed))
    return torch.randn(numel, generator=g)


def hash_seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


def race_state(seed: int, j: int) -> dict:
    """State number ``j`` of the committer: PICKS tensors of a small pool (so most chunks
    are dedup hits, often on chunks a collector has just found unneeded) and one fresh one."""
    picks = sorted(random.Random(hash_seed(seed, j, 7)).sample(range(POOL_SIZE), PICKS))
    return {
        "pool": {f"p{k:02d}": _randn(POOL_NUMEL, seed, 1, k) for k in picks},
        "fresh": _randn(FRESH_NUMEL, seed, 2, j),
        "j": j,
    }


def race_source(seed: int, i: int) -> int:
    """Which state commit ``i`` commits: its own, or (every RECOMMIT_EVERY-th commit) an old
    one that a collector keeping the last two has long collected."""
    if i >= 2 * RECOMMIT_EVERY and i % RECOMMIT_EVERY == RECOMMIT_EVERY // 2:
        return random.Random(hash_seed(seed, i, 11)).randrange(0, i - RECOMMIT_EVERY)
    return i


def training_state(branch: int, i: int) -> dict:
    """Commit ``i`` of branch number ``branch`` in the SIGKILL test: a model whose embedding
    changes every 5 commits (dedup across commits), a per-commit layer and an optimizer."""
    return {
        "model": {
            "embed": _randn(POOL_NUMEL, 100, branch, i // 5),
            "layer": _randn(POOL_NUMEL, 200, branch, i),
            "bias": _randn(16, 300, branch, i),
        },
        "optimizer": {
            "state": {"exp_avg": _randn(POOL_NUMEL, 400, branch, i), "exp_avg_sq": _randn(POOL_NUMEL, 500, branch, i).abs()},
            "param_groups": [{"lr": 1e-3, "step": i}],
        },
        "step": i,
    }


def kill_policy():
    """The retention policy of the SIGKILL test."""
    from ckptstore.retention import KeepBest, KeepLast, Policy

    return Policy(keep=KeepLast(3) | KeepBest(1), demote=("optimizer",), keep_whole=KeepLast(1))


def emit(record: dict, out) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()


# --------------------------------------------------------------------------------------------
# Mode "commit": commit `count` states on main, checking each right after it is made. With
# "pace_every": N and "gc_out", commit number k*N first waits (up to "pace_timeout_s") until
# the collector has finished (or failed) k runs, so collections interleave with the whole
# race however slowly the collector starts on a loaded machine.


def finished_gc_runs(path: str) -> int:
    """How many collections a ``gc-loop`` child has finished or failed, by its output file
    (a failing collector must not hold the committer up: the parent reports its errors)."""
    try:
        with open(path) as f:
            return sum('"deleted"' in line or '"error"' in line for line in f)
    except FileNotFoundError:
        return 0


def run_commit(args: dict) -> None:
    from ckptstore.errors import IntegrityError

    store = ckptstore.open(args["url"], storage_options=args["options"], chunk_size_bytes=4096, inline_threshold_bytes=256)
    seed = args["seed"]
    pace_every = args.get("pace_every", 0)
    with open(args["out"], "a") as out:
        for i in range(args["count"]):
            if pace_every and i and i % pace_every == 0:
                deadline = time.monotonic() + args.get("pace_timeout_s", 120)
                while finished_gc_runs(args["gc_out"]) < i // pace_every and time.monotonic() < deadline:
                    time.sleep(0.02)
            j = race_source(seed, i)
            state = race_state(seed, j)
            try:
                commit = store.commit(state, branch="main", metadata={"step": i, "source": j})
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
                emit({"i": i, "source": j, "ok": False, "commit_error": f"{type(exc).__name__}: {exc}"}, out)
                continue
            record = {"i": i, "id": commit.id, "source": j, "reused_chunks": commit.stats.reused_chunks}
            # The head of main is kept by any collector: it must be whole right now.
            try:
                got = store.checkout(commit.id)
                record["ok"] = (
                    got["j"] == j
                    and list(got["pool"]) == list(state["pool"])
                    and all(torch.equal(got["pool"][k].view(torch.int32), v.view(torch.int32)) for k, v in state["pool"].items())
                    and torch.equal(got["fresh"].view(torch.int32), state["fresh"].view(torch.int32))
                )
            except IntegrityError as exc:
                record["ok"] = False
                record["error"] = f"{type(exc).__name__}: {exc}"
            emit(record, out)


# --------------------------------------------------------------------------------------------
# Mode "gc-loop": collect KeepLast(2) (by default with no grace period) until the stop file
# appears


def run_gc_loop(args: dict) -> None:
    from ckptstore.retention import KeepLast

    store = ckptstore.open(args["url"], storage_options=args["options"])
    with open(args["out"], "a") as out:
        while True:
            stop = os.path.exists(args["stop"])
            started = time.monotonic()
            try:
                plan = store.gc(KeepLast(2), grace_period_s=args.get("grace_period_s", 0))
                emit({"deleted": plan.deleted_objects, "removed": len(plan.removed_commits), "spared": plan.spared_objects,
                      "elapsed_s": time.monotonic() - started}, out)  # fmt: skip
            except CollectorBusy as exc:
                emit({"busy": str(exc)}, out)
                time.sleep(0.01)
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
                emit({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, out)
            if stop:
                return


# --------------------------------------------------------------------------------------------
# Mode "gc-forker": import everything once, then for each "go JSON" line on stdin fork a
# collector (a fresh process each time, without the seconds torch takes to import). The
# collector logs every storage call to an op log before making it; with kill_at=N it SIGKILLs
# itself just before its Nth call, with kill_after_s the forker SIGKILLs it that long after
# forking it. The forker reaps it at once (so its pid is dead, as a killed collector's is)
# and answers "exit RETURNCODE SECONDS".

_OPS = ("put_if_absent", "get", "get_range", "exists", "size", "delete", "delete_many", "list", "list_info",
        "get_versioned", "put_if_version", "delete_if_version", "remove_abandoned_uploads", "reader")  # fmt: skip


def _instrument(objects, kill_at: int | None, log, started: float) -> None:
    counter = [0]

    def wrap(name, fn):
        def call(*a, **kw):
            counter[0] += 1
            if name == "delete_many":
                a = (list(a[0]),) + a[1:]
                key = ",".join(a[0][:3])
            else:
                key = a[0] if a and isinstance(a[0], str) else ""
            log.write(f"op {counter[0]} {time.monotonic() - started:.4f} {name} {key}\n")
            log.flush()
            if kill_at is not None and counter[0] >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)

        return call

    for name in _OPS:
        setattr(objects, name, wrap(name, getattr(objects, name)))


def _collect_once(go: dict, started: float) -> int:
    from ckptstore.gc import collect

    store = ckptstore.open(go["url"])
    _instrument(store.objects, go.get("kill_at"), open(go["oplog"], "w", buffering=1), started)
    print("start", flush=True)
    try:
        plan = collect(store, kill_policy(), grace_period_s=0, batch_size=go.get("batch_size", 1))
    except CollectorBusy as exc:
        print(f"busy {exc}", flush=True)
        return 3
    print(f"done {plan.deleted_objects}", flush=True)
    return 0


def run_gc_forker(args: dict) -> None:
    import ckptstore.gc  # noqa: F401 - everything a collector needs, imported before forking

    forker.serve(_collect_once)


if __name__ == "__main__":
    mode, arguments = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    {"commit": run_commit, "gc-loop": run_gc_loop, "gc-forker": run_gc_forker}[mode](arguments)
