"""Combination soak: the features that each keep their promise alone, all at once on one store.

A committer process commits with ``delta="on"`` (now and then ``"auto"``) and 4 KiB chunks,
mixing fine-tuning steps (deltas), rollbacks (``commit(checkout("main~K"))``, or the state
recomputed when that commit is gone: old chunks, deltas among them, reused), asynchronous
commits (the last of each run still pending when the process ends normally), and a second
branch, mostly forked afresh from ``main`` (its old commits, delta chains and all, garbage at
once) and then rolled back to what it held before. Beside it, collectors run in a loop:
``ckpt gc --keep-last 1 --grace-period 0s`` (the real CLI) in one process after another, and
``store.gc(KeepLast(n), grace_period_s=0)`` (the API; also with deletion batches of a few
objects, so that commits land between batches often) in processes forked from one that has
imported everything. Each side is SIGKILLed at random moments and started again (the
committer resumes its sequence from its log).

Checked: every reported commit checked out bit-exact right after it was made; every run that
exited 0 reported its last commit; and at the end, after a last ``gc`` without a policy,
every commit still stored (reported or not) and every branch head checks out bit-exact, and
``fsck --read-data`` finds no problem. The states are pure functions of (seed, line,
number), recorded in each commit's metadata; the children live in ``tests/soak_child.py``.

It runs for SOAK_SECONDS per backend, and on until it has done MIN_WORK (so a slow machine
cannot pass without having tried the combination); ``CKPTSTORE_SOAK=1`` for
``CKPTSTORE_SOAK_SECONDS`` (default 600). ``CKPTSTORE_SOAK_SEED`` replays a seed's plan (the
kill times depend on timing too).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from forker import Forker
from soak import SOAK
from soak_child import OPEN, read_log, soak_state
from states import assert_same

import ckptstore
from ckptstore.errors import CollectorBusy, IntegrityError
from ckptstore.gc import GcPlan

CHILD = str(Path(__file__).with_name("soak_child.py"))
SOAK_SECONDS = float(os.environ.get("CKPTSTORE_SOAK_SECONDS", "600")) if SOAK else 15.0
#: Chance that a committer run, or a collection, is SIGKILLed (besides the ones forced early,
#: so that even a short run kills each side).
COMMITTER_KILL_P = 0.5
COLLECTOR_KILL_P = 0.3
#: The least work a soak must do before it stops (and to pass): a soak that did nothing, or
#: never hit the combination it is for, proves nothing. On S3 (moto) a step takes seconds,
#: not tens of milliseconds: less of the slowest kinds there.
_WORK = {
    "commits": 20, "delta_chunks_written": 1, "rollbacks_reusing_old_deltas": 1, "rollbacks_after_a_fork": 6, "async_commits": 1, "side_commits": 1,
    "committer_kills": 1, "committer_normal_exits": 1, "gc_kills": 1, "gc_that_deleted": 3, "cli_gc_finished": 1,
}  # fmt: skip
MIN_WORK = {"local": _WORK, "s3": {**_WORK, "commits": 12, "rollbacks_after_a_fork": 0}}
#: A run goes on past its time until it has done MIN_WORK, but not past this (moto is slow).
MAX_SECONDS = {"local": SOAK_SECONDS * (1.5 if SOAK else 6), "s3": SOAK_SECONDS * (1.5 if SOAK else 12)}
#: How many collections one API collector process runs (at random between the two), and at
#: most how long each loop waits before its next process: moto serves requests from one
#: Python process, and collectors that never pause would starve the committer there.
GC_ROUNDS = {"local": (4, 40), "s3": (2, 10)}
GC_PAUSE_S = {"local": {"api": 0.05, "cli": 0.5}, "s3": {"api": 0.3, "cli": 3.0}}
#: The longest the API's collector waits for the CLI's to get a turn (see ``cli_waiting``).
CLI_TURN_WAIT_S = 30.0
#: The first rollback after ``side`` is forked afresh waits up to this long for a collector
#: to leave one of side's old delta chunks stored without its base (then goes back at once).
GAP_WAIT_S = {"local": 0.5, "s3": 3.0}
#: Objects per deletion batch of an API collection (None: ``store.gc``'s own, 1,000). Commits
#: go on between two batches; with small ones that happens often in a small store.
API_BATCH_SIZES = (None, 1, 1, 2, 4)


def _child_env(tmp_path: Path, name: str, options: dict) -> dict[str, str]:
    """A child's environment: its own catalog cache, unbuffered output, the ckptstore this
    test imports (of this checkout, not whichever one is installed), and for the CLI the S3
    endpoint and credentials in ``CKPTSTORE_STORAGE_OPTIONS``, where it reads them."""
    path = os.pathsep.join([str(Path(ckptstore.__file__).parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "CKPTSTORE_CACHE_DIR": str(tmp_path / f"cache-{name}"), "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    env.pop("CKPTSTORE_STORAGE_OPTIONS", None)
    env.pop("CKPTSTORE_URL", None)
    if options:
        env["CKPTSTORE_STORAGE_OPTIONS"] = json.dumps(options)
    return env


def _stored_commits(store) -> set[str]:
    return {key.rsplit("/", 1)[-1] for key in store.objects.list("commits/")}


class Soak:
    """The committer and the two collector loops, each driven by a thread of the test, and
    what they did."""

    def __init__(self, url: str, options: dict, tmp_path: Path, seed: int, *, backend: str) -> None:
        self.url, self.options, self.tmp_path, self.seed = url, options, tmp_path, seed
        self.gc_rounds, self.gc_pause_s, self.gap_wait_s = GC_ROUNDS[backend], GC_PAUSE_S[backend], GAP_WAIT_S[backend]
        self.log = tmp_path / "commits.jsonl"
        self.stop_file = tmp_path / "stop"
        self.stop = threading.Event()
        #: Set while the CLI's collector has found the lease taken twice in a row: the API's
        #: loop then waits (up to CLI_TURN_WAIT_S) for it to get a turn, so that on a slow
        #: backend a CLI collection still finishes.
        self.cli_waiting = threading.Event()
        self.runs: list[dict] = []  # committer runs: run, rc, killed, stderr tail
        self.collections: list[dict] = []  # kind, killed; deleted, removed, elapsed_s; or busy, or error
        self.errors: list[str] = []  # a thread that failed
        self.short_at_time: dict[str, str] | None = None  # what was missing when the time was up

    # -- the committer ---------------------------------------------------------------------

    def committer(self) -> None:
        rng = random.Random(self.seed * 2 + 1)
        env = _child_env(self.tmp_path, "committer", {})
        run = 0
        while not self.stop.is_set():
            kill = run == 1 or (run > 1 and rng.random() < COMMITTER_KILL_P)
            run_s = rng.uniform(3.0, 12.0)
            kill_after_s = rng.uniform(0.2, 1.0) * run_s if kill else None
            args = {"url": self.url, "options": self.options, "seed": self.seed, "run": run, "log": str(self.log),
                    "stop": str(self.stop_file), "run_s": run_s, "gap_wait_s": self.gap_wait_s}  # fmt: skip
            stderr_path = self.tmp_path / f"committer-{run}.stderr"
            with open(stderr_path, "w") as stderr:
                argv = [sys.executable, CHILD, "commit", json.dumps(args)]
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
                planned = proc.stdout.readline() == "ready\n" and kill_after_s is not None  # killed mid-run
                killed = False
                try:
                    proc.wait(timeout=kill_after_s if planned else run_s + 300)
                except subprocess.TimeoutExpired:
                    proc.kill()  # our own child
                    proc.wait()
                    killed = planned
                    if not planned:
                        self.errors.append(f"committer run {run} did not end within {run_s + 300:.0f} s")
            self.runs.append({"run": run, "rc": proc.returncode, "killed": killed, "stderr": stderr_path.read_text()[-3000:]})
            run += 1

    # -- the collector ---------------------------------------------------------------------

    def api_collector(self) -> None:
        """``store.gc(KeepLast(n))`` in a loop, each in a fresh process forked from one that
        has imported everything (so a collection starts in milliseconds), now and then
        SIGKILLed at a random moment of it."""
        rng = random.Random(self.seed * 3 + 2)
        forker = Forker([sys.executable, CHILD, "gc-forker"], self.tmp_path, env=_child_env(self.tmp_path, "collector-api", {}))
        try:
            self._collect_in_a_loop(rng, "api", lambda kill_after_s: self._collect_api(forker, rng, kill_after_s))
        finally:
            forker.close()

    def cli_collector(self) -> None:
        """``ckpt gc --keep-last 1 --grace-period 0s`` in a loop, now and then SIGKILLed.
        Beside the API's loop: where the two overlap, one waits for the other's lease."""
        env = _child_env(self.tmp_path, "collector-cli", self.options)
        self._collect_in_a_loop(random.Random(self.seed * 3 + 3), "cli", lambda kill_after_s: self._collect_cli(env, kill_after_s))

    def _collect_in_a_loop(self, rng: random.Random, kind: str, collect_once) -> None:
        spans: list[float] = []  # how long the collector processes that were not killed ran
        busy_in_a_row = 0
        while not self.stop.is_set():
            waited_until = time.monotonic() + CLI_TURN_WAIT_S
            while kind == "api" and self.cli_waiting.is_set() and not self.stop.is_set() and time.monotonic() < waited_until:
                time.sleep(0.1)
            typical_s = sorted(spans)[len(spans) // 2] if spans else (0.5 if kind == "api" else 2.5)
            forced = kind == "api" and len(spans) >= 2 and not any(c["killed"] for c in self.collections if c["kind"] == kind)
            kill_after_s = None
            if forced:  # well inside the shortest collection so far: on a slow backend they vary 5-fold
                kill_after_s = rng.uniform(0.2, 0.8) * min(spans)
            elif rng.random() < COLLECTOR_KILL_P:  # the CLI: mostly after its imports
                kill_after_s = (rng.uniform(0, 1.2) if kind == "api" else rng.uniform(0.7, 1.1)) * typical_s
            rc, elapsed_s, entries = collect_once(kill_after_s)
            if rc == 0:
                spans.append(elapsed_s)
            if kind == "cli":
                busy_in_a_row = busy_in_a_row + 1 if any("busy" in e for e in entries) else 0
                (self.cli_waiting.set if busy_in_a_row >= 2 else self.cli_waiting.clear)()
            self.collections += entries
            # A killed collector is restarted after a moment, a finished one at once.
            time.sleep(rng.uniform(0.3, 2.0) if rc == -9 else rng.uniform(0, self.gc_pause_s[kind]))

    def _collect_api(self, forker: Forker, rng: random.Random, kill_after_s: float | None) -> tuple[int, float, list[dict]]:
        go = {"url": self.url, "options": self.options, "keep_last": rng.choice([1, 1, 2]), "batch_size": rng.choice(API_BATCH_SIZES),
              "rounds": rng.randint(*self.gc_rounds), "kill_after_s": kill_after_s}  # fmt: skip
        rc, elapsed_s, out = forker.run(go)
        entries = [{"kind": "api", "killed": False, **json.loads(line)} for line in out if line.startswith("{")]
        if rc == -9:
            entries.append({"kind": "api", "killed": True})
        elif rc != 0:
            entries.append({"kind": "api", "killed": False, "error": f"exit {rc}: {out[-3:]} {forker.errors()[-2000:]}"})
        return rc, elapsed_s, entries

    def _collect_cli(self, env: dict, kill_after_s: float | None) -> tuple[int, float, list[dict]]:
        argv = [sys.executable, "-m", "ckptstore", "--store", self.url, "gc", "--keep-last", "1", "--grace-period", "0s", "--json"]
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        try:
            out, err = proc.communicate(timeout=kill_after_s if kill_after_s is not None else 600)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child
            out, err = proc.communicate()
        entry = {"kind": "cli", "killed": proc.returncode == -9}
        if proc.returncode == 0:
            plan = json.loads(out)
            entry.update(deleted=plan["deleted_objects"], removed=len(plan["removed_commits"]), elapsed_s=plan["elapsed_s"])
        elif proc.returncode == 1 and ("lease" in err or "garbage collector" in err):
            entry["busy"] = err.strip()
        elif proc.returncode != -9:
            entry["error"] = f"exit {proc.returncode}: {err.strip()[-2000:]}"
        return proc.returncode, time.monotonic() - started, [entry]

    # -- both ------------------------------------------------------------------------------

    def progress(self) -> dict[str, int]:
        """How much of each kind of work the soak has done so far."""
        records = [r for r in read_log(str(self.log)) if "id" in r]
        return {
            "commits": len(records),
            "delta_chunks_written": sum(r["delta_chunks"] for r in records),
            "rollbacks_reusing_old_deltas": sum(bool(r["rollback"] and r.get("old_deltas_reused")) for r in records),
            "rollbacks_after_a_fork": sum(bool(r.get("before_fork")) for r in records),
            "rollbacks_timed_into_a_gap": sum(bool(r.get("timed_into_gap")) for r in records),
            "async_commits": sum(bool(r.get("async") or r.get("final")) for r in records),
            "side_commits": sum(r["branch"] == "side" for r in records),
            "committer_kills": sum(r["killed"] for r in self.runs),
            "committer_normal_exits": sum(r["rc"] == 0 for r in self.runs),
            "gc_kills": sum(c["killed"] for c in self.collections),
            "gc_that_deleted": sum(c.get("deleted", 0) > 0 for c in self.collections),
            "cli_gc_finished": sum(c["kind"] == "cli" and "deleted" in c for c in self.collections),
        }

    def run(self, seconds: float, max_seconds: float, least: dict[str, int]) -> None:
        """Run both sides for ``seconds``, and on until the soak has done the ``least`` work
        (at most ``max_seconds``: on a loaded machine everything is slower), then stop them."""

        def guarded(side):
            try:
                side()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(f"{side.__name__}: {type(exc).__name__}: {exc}")

        sides = (self.committer, self.api_collector, self.cli_collector)
        threads = [threading.Thread(target=guarded, args=(side,), daemon=True) for side in sides]
        started = time.monotonic()
        for t in threads:
            t.start()
        while not self.errors:
            time.sleep(0.5)
            elapsed_s = time.monotonic() - started
            if elapsed_s >= seconds:
                short = _shortfall(self.progress(), least)
                self.short_at_time = self.short_at_time if self.short_at_time is not None else short
                if not short or elapsed_s >= max_seconds:
                    break
        self.stop.set()
        self.stop_file.touch()  # the committer's run ends with its last, unawaited commit
        for t in threads:
            t.join(timeout=900)
            assert not t.is_alive(), "a side of the soak did not stop"


def _shortfall(progress: dict[str, int], least: dict[str, int]) -> dict[str, str]:
    """The kinds of work the soak has done less of than ``least`` (a MIN_WORK)."""
    return {k: f"{progress[k]} < {n}" for k, n in least.items() if progress[k] < n}


def _final_gc(store) -> GcPlan:
    """A collection without a policy (removes only what no ref reaches), retried while the
    lease of a killed collector is still held."""
    deadline = time.monotonic() + 400
    while True:
        try:
            return store.gc(grace_period_s=0)
        except CollectorBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _spread(values: list[float]) -> str:
    """Median and maximum, for the summary."""
    values = sorted(values)
    return f"median {values[len(values) // 2]:.2f}, max {values[-1]:.2f}" if values else "none"


def _check_commit(store, cid: str, seed: int) -> str | None:
    """Check out a stored commit bit-exact against the state its metadata names; ``None``
    if it does, else what is wrong."""
    try:
        commit = store.get_commit(cid)
        meta = commit.metadata
        assert meta["seed"] == seed, f"seed {meta['seed']}"
        assert_same(soak_state(seed, meta["line"], meta["number"]), store.checkout(cid))
    except IntegrityError as exc:
        return f"unreadable: {exc}"
    except AssertionError as exc:
        return f"differs: {exc}"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_committer_with_deltas_rollbacks_and_async_commits_next_to_a_killed_gc_loop(backend, tmp_path, request):
    seed = int(os.environ.get("CKPTSTORE_SOAK_SEED") or random.randrange(1 << 30))
    print(f"\ncombination soak ({backend}): seed {seed}, {SOAK_SECONDS:g} s")
    if backend == "local":
        url, options = str(request.getfixturevalue("scratch") / "store"), {}
    else:
        url, options = request.getfixturevalue("s3_url")
    ckptstore.open(url, storage_options=options or None, **OPEN).close()  # created once, with delta on

    soak = Soak(url, options, tmp_path, seed, backend=backend)
    started = time.monotonic()
    soak.run(SOAK_SECONDS, MAX_SECONDS[backend], MIN_WORK[backend])
    soaked_s = time.monotonic() - started

    store = ckptstore.open(url, storage_options=options or None)
    final = _final_gc(store)
    records = read_log(str(soak.log))
    failures = list(soak.errors)

    # What the children saw.
    reported = [r for r in records if "id" in r]
    for r in records:
        if "commit_error" in r:
            failures.append(f"commit of step {r['step']} (run {r['run']}) failed: {r['commit_error']}")
        if "checkout_mismatch" in r:
            failures.append(f"rollback at step {r['step']}: commit {r['checkout_mismatch']} checked out to other bytes")
    not_whole = [r for r in reported if r.get("verified") is False]
    for r in not_whole[:5]:
        failures.append(f"commit {r['id']} (step {r['step']}) did not check out right after it was made: {r['verify_error']}")
    for run in soak.runs:
        if run["rc"] not in (0, -9):
            failures.append(f"committer run {run['run']} exited {run['rc']}: {run['stderr']}")
        if run["rc"] == 0:
            finals = [r for r in records if r.get("run") == run["run"] and r.get("final")]
            if not any("id" in r for r in finals):
                missing = finals or "no callback"
                failures.append(f"committer run {run['run']} exited 0, but its last (asynchronous) commit was not reported: {missing}")
    for c in soak.collections:
        if "error" in c:
            failures.append(f"{c['kind']} gc failed: {c['error']}")

    # What the store holds.
    stored = _stored_commits(store)
    by_id = {r["id"]: r for r in reported}
    unreadable, differing = [], []
    for cid in sorted(stored):
        problem = _check_commit(store, cid, seed)
        if problem is not None:
            (unreadable if problem.startswith("unreadable") else differing).append((cid, problem))
        r = by_id.get(cid)
        if r is not None and problem is None:
            meta = store.get_commit(cid).metadata
            if (meta["line"], meta["number"], meta["step"]) != (r["line"], r["number"], r["step"]):
                differing.append((cid, f"metadata {meta} is not what step {r['step']} reported"))
    for cid, problem in (unreadable + differing)[:10]:
        r = by_id.get(cid)
        failures.append(f"commit {cid} ({'step ' + str(r['step']) if r else 'not reported'}): {problem}")
    heads = store.branches()
    for name, cid in sorted(heads.items()):
        problem = _check_commit(store, cid, seed)
        if problem is not None:
            failures.append(f"the head of {name}, {cid}: {problem}")
    report = store.fsck(read_data=True)
    if not report.ok:
        failures.append(f"fsck: {len(report.problems)} problems: " + "; ".join(map(str, report.problems[:5])))

    collections = [c for c in soak.collections if "deleted" in c]
    summary = {
        "soaked_s": round(soaked_s, 1),
        "short_when_the_time_was_up": soak.short_at_time,
        **soak.progress(),
        "reported_still_stored": len(stored & set(by_id)),
        "reported_removed_by_gc": len(set(by_id) - stored),
        "stored_commits_checked": len(stored),
        "stored_not_reported": len(stored - set(by_id)),
        "unreadable": len(unreadable),
        "differing": len(differing),
        "unreadable_when_made": len(not_whole),
        "committer_runs": len(soak.runs),
        "gc_runs": {kind: sum(c["kind"] == kind for c in soak.collections) for kind in ("api", "cli")},
        "gc_kills_by_kind": {kind: sum(c["killed"] and c["kind"] == kind for c in soak.collections) for kind in ("api", "cli")},
        "gc_busy": sum("busy" in c for c in soak.collections),
        "gc_seconds": {kind: _spread([c["elapsed_s"] for c in collections if c["kind"] == kind]) for kind in ("api", "cli")},
        "objects_deleted": sum(c["deleted"] for c in collections) + final.deleted_objects,
        "rollbacks": sum(r["rollback"] for r in reported),
        "rollbacks_from_checkout": sum("from_checkout" in r for r in reported),
        "fsck": report.summary(),
    }
    print(json.dumps(summary, indent=1))
    headline = (f"{len(failures)} failures (seed {seed}): {len(not_whole)} reported commits unreadable when made, "
                f"{len(unreadable)} stored commits unreadable and {len(differing)} different at the end")  # fmt: skip
    assert not failures, headline + "\n" + "\n".join(failures[:30])

    # The run did real work: a soak that does nothing cannot pass.
    shortfall = _shortfall(summary, MIN_WORK[backend])
    assert not shortfall, f"the soak did too little: {shortfall}"
