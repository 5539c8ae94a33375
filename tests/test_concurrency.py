"""Several processes committing to one branch at once: one linear history, nothing lost.

Each writer process commits its own deterministic states (a pure function of writer and
index) to ``main``, all starting together. Afterwards the branch's first-parent log holds
exactly writers × commits commits, each writer's in its order, every one the writers reported
and no other; each checks out bit-exact; ``latest`` is the head and ``best`` the commit with
the lowest loss; fsck finds nothing but the commit objects of lost races; and the catalog the
writers shared (local) or a fresh one (S3), a catalog rebuilt from scratch (local) and every
writer's own catalog (S3: each writer stands for a machine) see the whole history.

The default run uses 3 writers × 4 commits; ``CKPTSTORE_SOAK=1`` runs 8 × 50.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crash_child import writer_loss, writer_state
from soak import SOAK
from states import assert_same

import ckptstore

CHILD = str(Path(__file__).with_name("crash_child.py"))
WRITERS, COMMITS_EACH = (8, 50) if SOAK else (3, 4)
OPEN = {"chunk_size_bytes": 4096, "inline_threshold_bytes": 256}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_concurrent_writers_build_one_linear_history(backend, tmp_path, request):
    url, options = (str(tmp_path / "store"), {}) if backend == "local" else request.getfixturevalue("s3_url")
    losses = {(w, i): writer_loss(w, i) for w in range(WRITERS) for i in range(COMMITS_EACH)}
    assert len(set(losses.values())) == len(losses)  # one best commit
    ckptstore.open(url, storage_options=options, **OPEN).close()  # create it once, before the race
    go = tmp_path / "go"
    caches = [tmp_path / f"cache-{w}" for w in range(WRITERS)]  # S3: one machine each
    procs = []
    for w in range(WRITERS):
        args = {"url": url, "options": options, "open": OPEN, "writer": w, "count": COMMITS_EACH, "go": str(go)}
        env = {**os.environ, "CKPTSTORE_CACHE_DIR": str(caches[w])}
        command = [sys.executable, CHILD, "writer", json.dumps(args)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        for proc in procs:
            line = proc.stdout.readline()
            assert line == "ready\n", (line, proc.stderr.read() if proc.poll() is not None else "")
        started = time.monotonic()
        go.touch()
        outputs = [proc.communicate(timeout=3600 if SOAK else 600) for proc in procs]
        race_s = time.monotonic() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-4000:]
    reported = {}
    for w, (out, _) in enumerate(outputs):
        records = [json.loads(line) for line in out.splitlines()]
        assert [r["i"] for r in records] == list(range(COMMITS_EACH))
        reported.update({r["id"]: (w, r["i"]) for r in records})
    assert len(reported) == WRITERS * COMMITS_EACH  # distinct commits

    # Local: the catalog every writer wrote to at once. S3: a catalog built from scratch (a
    # machine that never saw the race).
    store = ckptstore.open(url, storage_options=options, cache_dir=str(tmp_path / "fresh-cache"))
    history = store.log("main")
    assert len(history) == WRITERS * COMMITS_EACH
    assert {c.id for c in history} == set(reported), "commits a writer made are missing from history, or others are in it"
    assert not history[-1].parents
    for newer, older in itertools.pairwise(history):
        assert newer.parents == (older.id,)
    # Each writer's own commits keep their order.
    for w in range(WRITERS):
        order = [c.metadata["i"] for c in reversed(history) if c.metadata["writer"] == w]
        assert order == list(range(COMMITS_EACH))
    # Every commit in history is complete and checks out to what its writer committed.
    for commit in history:
        w, i = reported[commit.id]
        assert commit.metadata == {"writer": w, "i": i}
        assert commit.metrics == {"eval_loss": losses[(w, i)]}
        assert_same(writer_state(w, i), store.checkout(commit.id))
    assert store.resolve("latest") == history[0].id
    best = min(losses, key=losses.get)
    assert reported[store.resolve("best")] == best, "best is not the commit with the lowest loss"
    report = store.fsck(read_data=True)
    assert report.ok, [str(p) for p in report.problems[:5]]
    # The only orphans a race leaves are the commit objects of attempts that lost it.
    assert all(key.startswith("commits/") for key in report.orphans), report.orphans[:5]
    store.close()

    # S3: each writer's own catalog (each stands for a machine) sees the whole history.
    # Local: so does a catalog rebuilt from scratch.
    if backend == "local":
        shutil.rmtree(os.path.join(url, ".catalog"))
    for w in range(WRITERS) if backend == "s3" else [0]:
        with ckptstore.open(url, storage_options=options, cache_dir=str(caches[w])) as store:
            assert [c.id for c in store.log("main")] == [c.id for c in history]
    print(f"\n{backend}: {WRITERS} writers x {COMMITS_EACH} commits in {race_s:.1f} s; {len(report.orphans)} commit objects of lost races")
