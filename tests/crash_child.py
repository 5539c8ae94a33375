"""Child processes for tests/test_crash.py (commits that are SIGKILLed) and
tests/test_concurrency.py (writers racing on one branch).

``python tests/crash_child.py writer JSON`` is one racing writer: it opens the store, prints
``ready``, waits for the ``go`` file, then commits ``writer_state(writer, i)`` for i in
range(count) on the default branch, printing ``{"i": i, "id": ...}`` after each.

``python tests/crash_child.py forker`` imports torch and ckptstore once, then for each
``go JSON`` line on stdin forks a fresh process (without the seconds torch takes to import)
that opens the store and runs one job:

``commit``
    One commit of ``commit_state(seed, source)``. The opened store is instrumented from the
    outside, without hooks in ckptstore: its object store's mutating calls (``object``), its
    catalog's mutating methods (``catalog``) and the SQL statements its SQLite connection runs
    (``sql``, through ``sqlite3.Connection.set_trace_callback``) are counted and logged to an
    op log, and with ``kill = [layer, n, when]`` the process SIGKILLs itself just ``before``
    or ``after`` the ``n``-th call of that layer (``sql``: before only). ``["end", 0,
    "after"]`` kills it after the commit returned, before the process exits.
``loop``
    Commits ``commit_state(seed, step)`` for step = ``first``, ``first + 1``, ... until it is
    killed (or ``count`` commits are made), printing ``done STEP ID`` after each. The forker
    SIGKILLs it ``kill_after_s`` after forking it.

The forker reaps the child at once (so its pid is dead, as a killed writer's is) and answers
``exit RETURNCODE SECONDS``.

Every state committed here is a pure function of its arguments, so the parent recomputes
what each commit must check out to.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import forker
import torch
from forker import say

import ckptstore

#: Store settings of every open in these tests: small chunks so small tensors span several.
OPEN = {"chunk_size_bytes": 4096, "inline_threshold_bytes": 256}
#: The chunk size of the ``wide`` states: their manifest lists more than 100 chunks (more than
#: one batch of catalog inserts; catalog schema 2 indexed every manifest's chunks).
WIDE_CHUNK_BYTES = 512
WIDE_CHUNKS = 90

#: ObjectStore methods that change the store.
MUTATING = ("put_if_absent", "put_if_version", "delete_if_version", "delete", "delete_many", "remove_abandoned_uploads")
#: Catalog methods that change the catalog.
CATALOG_MUTATING = ("add_commit", "remove_commits", "add_manifest_chunks", "set_ref", "replace_refs", "clear")


# --------------------------------------------------------------------------------------------
# Deterministic states


def hash_seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


def _randn(numel: int, *seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash_seed(*seed))
    return torch.randn(numel, generator=g)


def commit_state(seed: int, source: int, *, wide: bool = False) -> dict:
    """State number ``source``: an embedding every state shares (always a dedup hit), a layer
    of two chunks and an optimizer moment of one chunk that are new in every state, an inlined
    bias and plain values. ``wide`` adds a tensor of WIDE_CHUNKS chunks (at WIDE_CHUNK_BYTES)."""
    state = {
        "model": {
            "embed": _randn(1024, seed, 1),
            "layer": _randn(2048, seed, 2, source),
            "bias": _randn(16, seed, 3, source),
        },
        "optimizer": {
            "state": {"exp_avg": _randn(1024, seed, 4, source)},
            "param_groups": [{"lr": 1e-3, "step": source}],
        },
        "step": source,
    }
    if wide:
        state["wide"] = _randn(WIDE_CHUNKS * WIDE_CHUNK_BYTES // 4, seed, 5, source)
    return state


def eval_loss(step: int) -> float:
    """Falls with every step, so each commit moves ``best``."""
    return 1e6 - step


def writer_state(writer: int, i: int) -> dict:
    """Commit ``i`` of racing writer ``writer``: two chunks of its own, three every commit
    shares, an inlined bias and plain values."""
    return {
        "weights": _randn(2000, 10, writer, i),
        "shared": torch.ones(3000),
        "bias": _randn(8, 11, writer, i),
        "writer": writer,
        "i": i,
    }


def writer_loss(writer: int, i: int) -> float:
    """A loss distinct for every (writer, i) of the tests (checked there): one best commit."""
    return float((writer * 1009 + i * 7919) % 100_003)


# --------------------------------------------------------------------------------------------
# Instrumentation (from outside the store: wrappers on the opened store's instances)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def instrument(store, log, kill: list | None) -> None:
    """Count and log the mutating calls of ``store`` (object store, catalog, SQL); SIGKILL
    this process at ``kill = [layer, n, when]``."""
    lock = threading.Lock()
    counters = {"object": 0, "catalog": 0, "sql": 0}
    layer_k, n_k, when_k = kill if kill else (None, None, None)

    def enter(layer: str, what: str) -> int:
        with lock:
            counters[layer] += 1
            n = counters[layer]
            log.write(f"{layer} {n} {what}\n")
            log.flush()
        if layer == layer_k and n == n_k and when_k == "before":
            _die()
        return n

    def leave(layer: str, n: int) -> None:
        if layer == layer_k and n == n_k and when_k == "after":
            _die()

    def wrap(layer: str, name: str, fn):
        def call(*args, **kwargs):
            if name == "delete_many":
                args = (list(args[0]),) + args[1:]
            key = args[0] if args and isinstance(args[0], str) else ""
            n = enter(layer, f"{name} {key}".rstrip())
            out = fn(*args, **kwargs)
            leave(layer, n)
            return out

        return call

    for name in MUTATING:
        setattr(store.objects, name, wrap("object", name, getattr(store.objects, name)))
    for name in CATALOG_MUTATING:
        if hasattr(store.catalog, name):  # add_manifest_chunks: catalog schema 2 only
            setattr(store.catalog, name, wrap("catalog", name, getattr(store.catalog, name)))

    def trace(statement: str) -> None:
        enter("sql", " ".join(statement.split()[:3]))

    store.catalog.db.set_trace_callback(trace)


# --------------------------------------------------------------------------------------------
# Jobs


def _open(go: dict):
    return ckptstore.open(go["url"], storage_options=go["options"], **{**OPEN, **go.get("open", {})})


def run_commit(go: dict) -> None:
    store = _open(go)
    with open(go["oplog"], "w") as log:
        instrument(store, log, go.get("kill"))
        state = commit_state(go["seed"], go["source"], wide=go.get("wide", False))
        step = go["step"]
        commit = store.commit(
            state, branch=go["branch"], message=f"step {step}", metadata={"step": step, "source": go["source"]},
            metrics={"eval_loss": eval_loss(step)}, tags=go.get("tags", ()),
        )  # fmt: skip
        log.write(f"end 0 {commit.id}\n")
        log.flush()
    say(f"done {step} {commit.id}")
    if go.get("kill") == ["end", 0, "after"]:
        _die()
    store.close()


def run_loop(go: dict) -> None:
    store = _open(go)
    with open(go["oplog"], "w") as log:
        instrument(store, log, None)
        step = go["first"]
        while go.get("count") is None or step < go["first"] + go["count"]:
            log.write(f"begin {step}\n")
            log.flush()
            commit = store.commit(
                commit_state(go["seed"], step), branch=go["branch"], message=f"step {step}",
                metadata={"step": step, "source": step}, metrics={"eval_loss": eval_loss(step)}, tags=go.get("tags", ()),
            )  # fmt: skip
            log.write(f"end {step} {commit.id}\n")
            log.flush()
            say(f"done {step} {commit.id}")
            step += 1
    store.close()


JOBS = {"commit": run_commit, "loop": run_loop}


def run_writer(args: dict) -> None:
    store = _open(args)
    say("ready")
    while not os.path.exists(args["go"]):  # every writer starts at once
        time.sleep(0.001)
    writer = args["writer"]
    for i in range(args["count"]):
        commit = store.commit(
            writer_state(writer, i), message=f"w{writer}-{i}", metadata={"writer": writer, "i": i},
            metrics={"eval_loss": writer_loss(writer, i)},
        )  # fmt: skip
        say(json.dumps({"i": i, "id": commit.id}))
    store.close()


def run_forker() -> None:
    # Everything a job needs, imported before forking (s3fs only imported: no session and no
    # event loop exist before the fork).
    import s3fs  # noqa: F401

    import ckptstore.fsck
    import ckptstore.gc  # noqa: F401

    forker.serve(lambda go, started: JOBS[go["job"]](go))


if __name__ == "__main__":
    if sys.argv[1:] == ["forker"]:
        run_forker()
    elif len(sys.argv) == 3 and sys.argv[1] == "writer":
        run_writer(json.loads(sys.argv[2]))
    else:
        raise SystemExit("usage: crash_child.py forker | crash_child.py writer JSON")
