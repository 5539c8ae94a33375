"""Garbage collection racing a committer, and garbage collection killed at random points.

* A commit process and a GC process run concurrently on one store (local, and S3 on moto)
  for 200 commits: no commit ever references a missing chunk, and fsck is clean after.
* SIGKILL of GC at random points (20 times or more) leaves a store where every kept commit
  checks out, and a rerun of GC finishes the job.

Deterministic cases beside them: a commit landing while GC lists the store, a collection
interrupted after some commit deletions, and a second collection keeping what the first kept.

The child processes live in ``tests/gc_child.py``. ``CKPTSTORE_SOAK=1`` runs 1,000 commits
and 200 kills.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from forker import Forker
from gc_child import kill_policy, race_source, race_state, training_state
from soak import SOAK
from states import assert_same

import ckptstore
from ckptstore.errors import CollectorBusy, ComponentsUnavailable
from ckptstore.gc import collect
from ckptstore.layout import DELETION_ORDER, LEASE_KEY, WRITERS_PREFIX
from ckptstore.retention import KeepBest, KeepLast, Policy

CHILD = str(Path(__file__).with_name("gc_child.py"))
RACE_COMMITS = 1000 if SOAK else 200
#: The committer waits for one more finished (or failed) collection every RACE_PACE commits.
RACE_PACE = 25
KILLS = 200 if SOAK else 20
#: Kills on one copy of the store (each later one interrupts a rerun) before it is rebuilt.
KILLS_PER_ROUND = 3
#: Objects per deletion batch of the killed collector: one, so that kills land between
#: deletions (each batch renews the lease twice and re-reads refs and commits).
KILL_BATCH = 1
OPEN = {"chunk_size_bytes": 4096, "inline_threshold_bytes": 256}


def _child_env(tmp_path: Path, name: str) -> dict[str, str]:
    return {**os.environ, "CKPTSTORE_CACHE_DIR": str(tmp_path / f"cache-{name}")}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _managed_keys(store) -> set[str]:
    """Every object GC may delete (commits, records, manifests, chunks)."""
    return {key for prefix in DELETION_ORDER for key in store.objects.list(prefix)}


def _stored_commits(store) -> set[str]:
    return {key.rsplit("/", 1)[-1] for key in store.objects.list("commits/")}


# --------------------------------------------------------------------------------------------
# (2) A committer and a collector racing on one store


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_commits_racing_gc_never_reference_a_missing_chunk(backend, tmp_path, request):
    """One process commits RACE_COMMITS states on main, mostly chunks of a small pool (dedup
    hits on chunks a collector has just found unneeded) and now and then an old state again
    (its manifest and chunks long collected), checking each commit right after making it.
    Another collects KeepLast(2) with no grace period in a loop until the first is done; the
    committer waits for one more finished collection every RACE_PACE commits."""
    url, options = (str(tmp_path / "store"), {}) if backend == "local" else request.getfixturevalue("s3_url")
    ckptstore.open(url, storage_options=options, **OPEN)  # create it once, before the race
    seed = random.randrange(1 << 30)
    commits_out, gc_out, stop = tmp_path / "commits.jsonl", tmp_path / "gc.jsonl", tmp_path / "stop"
    common = {"url": url, "options": options}
    committer = subprocess.Popen(
        [sys.executable, CHILD, "commit", json.dumps({**common, "count": RACE_COMMITS, "seed": seed, "out": str(commits_out),
                                            "gc_out": str(gc_out), "pace_every": RACE_PACE})],
        env=_child_env(tmp_path, "committer"), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    collector = subprocess.Popen(
        [sys.executable, CHILD, "gc-loop", json.dumps({**common, "stop": str(stop), "out": str(gc_out), "grace_period_s": 0})],
        env=_child_env(tmp_path, "collector"), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _, committer_err = committer.communicate(timeout=3600 if SOAK else 900)
    finally:
        if committer.poll() is None:
            committer.kill()
            committer.communicate()
        stop.touch()  # the collector runs once more, then exits
        _, collector_err = collector.communicate(timeout=600)
    assert committer.returncode == 0, committer_err
    assert collector.returncode == 0, collector_err

    made = _read_jsonl(commits_out)
    runs = _read_jsonl(gc_out)
    failures = []
    # What the committer saw: every commit made, and whole right after it was made.
    assert [r["i"] for r in made] == list(range(RACE_COMMITS))
    commit_errors = [r for r in made if "commit_error" in r]
    if commit_errors:
        failures.append(f"{len(commit_errors)} commits failed, first: {commit_errors[0]}")
    broken = [r for r in made if "commit_error" not in r and not r["ok"]]
    if broken:
        failures.append(f"{len(broken)} commits did not check out right after they were made, first: {broken[0]}")
    # What the collector saw: no error but a busy lease.
    gc_errors = [r for r in runs if "error" in r]
    if gc_errors:
        failures.append(f"{len(gc_errors)} of {len(runs)} gc runs raised, first: {gc_errors[0]['error']}")
    finished = [r for r in runs if "deleted" in r]
    assert len(finished) >= RACE_COMMITS // RACE_PACE, f"only {len(finished)} gc runs finished: {runs[:5]}"
    # The race was real: collections deleted objects while commits reused old chunks.
    assert sum(r["deleted"] for r in finished) > 0 and sum(r["removed"] > 0 for r in finished) >= 1, finished
    assert sum(r.get("reused_chunks", 0) for r in made) > 0

    store = ckptstore.open(url, storage_options=options)
    by_id = {r["id"]: r for r in made if "id" in r}
    last = made[-1]
    if "id" in last:
        assert store.resolve("main") == last["id"]
        assert store.resolve("latest") == last["id"]
        assert_same(race_state(seed, race_source(seed, last["i"])), store.checkout("main"))
    # Every commit still in the store, and every commit main's log reaches, checks out.
    stored = _stored_commits(store)
    try:
        history = [c.id for c in store.log("main")]
    except ckptstore.IntegrityError as exc:
        history = []
        failures.append(f"the log of main does not read: {exc}")
    assert set(history) <= stored
    for cid in sorted(stored):
        r = by_id.get(cid)
        if r is None:
            failures.append(f"the store holds commit {cid}, which the committer did not report")
            continue
        try:
            assert_same(race_state(seed, r["source"]), store.checkout(cid))
        except ckptstore.IntegrityError as exc:
            failures.append(f"commit {cid} (#{r['i']}) does not check out: {exc}")
    report = store.fsck(read_data=True)
    if not report.ok:
        failures.append("fsck: " + "; ".join(map(str, report.problems[:5])))
    assert not failures, "\n".join(failures)

    # With the committer gone, one more collection leaves the two newest commits and no orphans.
    assert len(history) >= 2
    plan = store.gc(KeepLast(2), grace_period_s=0)
    assert sorted(_stored_commits(store)) == sorted(plan.kept_commits) == sorted(history[:2])
    report = store.fsck(read_data=True)
    assert report.ok and not report.orphans, (report.problems, report.orphans)


def test_a_commit_landing_while_gc_lists_the_store_does_not_fail_it(tmp_path):
    """The race above, made deterministic: a commit lands (branch moved) after the collector
    has listed the store's objects and before it reads the refs."""
    url = str(tmp_path / "store")
    store = ckptstore.open(url, **OPEN)
    writer = ckptstore.open(url, **OPEN)
    for i in range(4):
        writer.commit(race_state(1, i), metadata={"step": i})
    landed = []
    list_info = store.objects.list_info

    def list_info_then_commit(prefix: str = ""):
        found = list_info(prefix)
        if prefix == DELETION_ORDER[-1] and not landed:  # the last prefix planning lists
            landed.append(writer.commit(race_state(1, 99), metadata={"step": 99}))
        return found

    store.objects.list_info = list_info_then_commit
    store.gc(KeepLast(2), grace_period_s=0)
    assert landed
    assert_same(race_state(1, 99), store.checkout(landed[0].id))
    assert store.fsck(read_data=True).ok


# --------------------------------------------------------------------------------------------
# (3) SIGKILL of the collector at random points

MAIN_COMMITS = 20
EXP_COMMITS = 10
EXP_FORK = 8  # branch exp starts at main's commit 8


def _build_store(root: Path) -> dict[str, tuple[int, int]]:
    """30 commits with an optimizer on two branches (exp shares main's first 9 commits), and
    tags. Returns commit id -> (branch number, index) of what training_state committed.

    Eval losses fall along each branch but for two commits: main's commit 12, the best of
    all (the ``best`` tag), and exp's commit 3, the best of exp's history, which no tag
    reaches: KeepBest keeps it while the commits around it go.
    """
    store = ckptstore.open(str(root), **OPEN)
    origin = {}
    main = []
    for i in range(MAIN_COMMITS):
        loss = 0.5 if i == 12 else 10.0 - 0.1 * i
        c = store.commit(training_state(0, i), branch="main", metadata={"step": i}, metrics={"eval_loss": loss})
        origin[c.id] = (0, i)
        main.append(c.id)
    store.branch("exp", at=main[EXP_FORK])
    exp = []
    for i in range(EXP_COMMITS):
        loss = 1.0 if i == 3 else 9.0 - 0.1 * i
        c = store.commit(training_state(1, i), branch="exp", metadata={"step": EXP_FORK + 1 + i}, metrics={"eval_loss": loss})
        origin[c.id] = (1, i)
        exp.append(c.id)
    store.tag("release-1", at=main[10])
    store.tag("exp-start", at=exp[1])
    store.close()
    return origin


def _wait_out_stampless_locks(root: Path) -> int:
    """Wait until every lock file a killed process left before it wrote its stamp (pid, host)
    is old enough to be broken (LocalObjectStore breaks an unstamped lock only after 1 s: its
    creator may be alive and about to stamp it). Returns how many there were."""
    found = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.startswith(".") and name.endswith(".lock"):
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                if st.st_size == 0:
                    found += 1
                    time.sleep(max(0.0, st.st_mtime + 1.1 - time.time()))
    return found


def _collection(url: Path, oplog: Path, *, kill_at: int | None = None, kill_after_s: float | None = None) -> dict:
    """A job for ``gc_child.py gc-forker``: collect ``url`` in a fresh process, which
    SIGKILLs itself before its ``kill_at``-th storage call, or is SIGKILLed ``kill_after_s``
    after it was forked."""
    return {"url": str(url), "oplog": str(oplog), "kill_at": kill_at, "kill_after_s": kill_after_s, "batch_size": KILL_BATCH}


def _phases(oplog: list[str]) -> list[str]:
    """The phase of collect() each storage call of an op log was made in: ``lease`` (taking
    it), ``plan``, ``records`` (shallow marks, demotion records), ``delete`` (the batches,
    with their lease renewals and re-reads), ``finish`` (clean-up after the last batch).
    Told apart by the lease writes: acquire, renew after planning, first sweeping renew."""
    phases, lease_writes, phase = [], 0, "lease"
    for line in oplog:
        _, _, _, name, *rest = line.split(" ")
        key = rest[0] if rest else ""
        phases.append(phase)
        if name == "put_if_version" and key == LEASE_KEY:
            lease_writes += 1
            phase = {1: "plan", 2: "records"}.get(lease_writes, "delete" if phase != "finish" else "finish")
        elif name == "remove_abandoned_uploads":
            phase = "finish"
    return phases


def _check_kept(store, origin, dry, *, finished: bool) -> None:
    """Every commit the plan keeps checks out bit-exact (demoted ones without the dropped
    components; whole, they are either still whole or refused), every ref target whole."""
    for cid in dry.kept_commits:
        expected = training_state(*origin[cid])
        dropped = dry.demoted_commits.get(cid)
        if dropped:
            partial = {k: v for k, v in expected.items() if k not in dropped}
            assert_same(partial, store.checkout(cid, exclude=list(dropped)))
            try:
                whole = store.checkout(cid)
            except ComponentsUnavailable:
                pass
            else:
                assert not finished, f"demoted commit {cid} still checks out whole after gc finished"
                assert_same(expected, whole)
        else:
            assert_same(expected, store.checkout(cid))
    targets = {**store.branches(), **store.tags()}
    assert set(targets.values()) <= set(dry.kept_commits)
    for name, cid in sorted(targets.items()):
        assert_same(training_state(*origin[cid]), store.checkout(name))


def _check_finished(store, origin, dry, reference_keys: set[str]) -> None:
    """A collection ran to the end: the store is what an uninterrupted one leaves."""
    assert _stored_commits(store) == set(dry.kept_commits)
    assert _managed_keys(store) == reference_keys
    assert not store.objects.exists(LEASE_KEY) and not store.objects.list(WRITERS_PREFIX)
    _check_kept(store, origin, dry, finished=True)
    report = store.fsck(read_data=True)
    assert report.ok and not report.orphans, (report.problems, report.orphans)


@pytest.mark.slow
def test_gc_killed_at_random_points_leaves_kept_commits_whole_and_a_rerun_finishes(tmp_path, scratch):
    """SIGKILL a collector KILLS times at random points: just before a random storage call of
    planning, record writing or deletion on a fresh copy of the store, then at a random time
    within the span of a full collection while it reruns on what the killed one left. After
    each kill every commit the plan keeps, and every ref target, checks out bit-exact; after
    KILLS_PER_ROUND kills a rerun finishes, and leaves what an uninterrupted collection does.
    """
    rng = random.Random()
    template, reference, work = scratch / "template", scratch / "reference", scratch / "work"
    forker = Forker([sys.executable, CHILD, "gc-forker"], tmp_path, env=_child_env(tmp_path, "collector"))  # it imports torch while the store is built
    try:
        origin = _build_store(template)
        policy = kill_policy()
        with ckptstore.open(str(template)) as store:
            dry = store.gc(policy, dry_run=True, grace_period_s=0)
            refs = {**store.branches(), **store.tags()}
        # The plan has every kind of work: commits to remove, to demote, to graft onto their
        # nearest kept ancestors; and it keeps exp's best, which only history reaches.
        assert dry.removed_commits and dry.demoted_commits and dry.shallow_commits
        assert (1, 3) in {origin[c] for c in dry.kept_commits}
        assert {"commits", "manifests", "chunks"} <= set(dry.counts())

        # One uninterrupted run: its duration, its storage calls, and what it leaves.
        shutil.copytree(template, reference)
        rc, full_span_s, out = forker.run(_collection(reference, tmp_path / "reference.log"))
        assert rc == 0 and out[-1].startswith("done "), (rc, out, forker.errors())
        reference_ops = (tmp_path / "reference.log").read_text().splitlines()
        reference_phases = _phases(reference_ops)
        with ckptstore.open(str(reference)) as store:
            reference_keys = _managed_keys(store)
            _check_finished(store, origin, dry, reference_keys)
        ops_in = {p: [i + 1 for i, q in enumerate(reference_phases) if q == p] for p in ("plan", "records", "delete")}
        assert all(ops_in.values()), {p: len(v) for p, v in ops_in.items()}

        kills, completed, reruns, unstamped = 0, 0, 0, 0
        landed: dict[str, int] = {}
        round_kills, fresh = 0, True
        while kills < KILLS or not fresh:
            if fresh:
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(template, work)
            oplog = tmp_path / f"run-{kills}-{completed}.log"
            if fresh:
                # First run on a fresh copy: kill it just before a random storage call of
                # one phase, in turn, so that planning and record writing get their share.
                phase = ("plan", "records", "delete")[(kills // KILLS_PER_ROUND) % 3]
                rc, _, out = forker.run(_collection(work, oplog, kill_at=rng.choice(ops_in[phase])))
            else:
                # Later runs take over the dead collector's lease; kill at a random time.
                rc, _, out = forker.run(_collection(work, oplog, kill_after_s=rng.uniform(0, full_span_s)))
            assert rc != 3, f"the lease of the killed collector was not taken over: {out[-1:]}"
            fresh = False
            if rc == -signal.SIGKILL:
                kills += 1
                round_kills += 1
                ops = oplog.read_text().splitlines() if oplog.exists() else []
                where = _phases(ops)[-1] if ops else "open"  # killed before its first storage call
                landed[where] = landed.get(where, 0) + 1
                with ckptstore.open(str(work)) as store:
                    assert {**store.branches(), **store.tags()} == refs
                    _check_kept(store, origin, dry, finished=False)
                    report = store.fsck(read_data=True)
                    assert report.ok, (where, [str(p) for p in report.problems])
                    for branch in store.branches():
                        store.log(branch)
                unstamped += _wait_out_stampless_locks(work)
                if round_kills < KILLS_PER_ROUND:
                    continue
                # A rerun (the dead holder's lease is taken over at once) finishes the job.
                with ckptstore.open(str(work)) as store:
                    try:
                        store.gc(policy, grace_period_s=0)
                    except CollectorBusy as exc:
                        pytest.fail(f"the rerun could not take over the killed collector's lease: {exc}")
                    reruns += 1
                    _check_finished(store, origin, dry, reference_keys)
            else:
                assert rc == 0 and out[-1].startswith("done "), (rc, out[-3:], forker.errors())
                completed += 1
                with ckptstore.open(str(work)) as store:
                    _check_finished(store, origin, dry, reference_keys)
            round_kills, fresh = 0, True
    finally:
        forker.close()

    assert kills >= KILLS
    # Kills landed in every phase that writes or deletes.
    assert {"plan", "records", "delete"} <= set(landed), landed
    print(
        f"\n{kills} kills by phase {landed}; {reruns} reruns finished in the parent, {completed} in a child; "
        f"a full gc took {full_span_s:.2f} s; {unstamped} kills left an unstamped lock file"
    )


# --------------------------------------------------------------------------------------------
# A collection must keep what the one before it kept


def test_gc_twice_keeps_what_the_first_kept(tmp_path):
    """KeepBest keeps an old commit whose newer neighbours go. Once they are deleted no ref
    reaches it: the next collection with the same policy must still keep it, and fsck must
    not call it an orphan."""
    store = ckptstore.open(str(tmp_path / "store"), **OPEN)
    store.commit(training_state(0, 0), branch="main", metrics={"eval_loss": 0.1})  # the store's best
    losses = [5.0, 4.0, 1.0, 3.0, 2.9, 2.8, 2.7, 2.6]
    exp = [store.commit(training_state(1, i), branch="exp", metrics={"eval_loss": loss}).id for i, loss in enumerate(losses)]
    policy = Policy(keep=KeepLast(2) | KeepBest(1), demote=("optimizer",), keep_whole=KeepLast(1))
    first = store.gc(policy, grace_period_s=0)
    assert exp[2] in first.kept_commits  # exp's best, not tagged
    second = store.gc(policy, dry_run=True, grace_period_s=0)
    assert sorted(second.kept_commits) == sorted(first.kept_commits)
    report = store.fsck(read_data=True)
    assert report.ok and not report.orphans, report.orphans


def test_gc_interrupted_mid_deletion_leaves_a_consistent_store(scratch):
    """A collection that stops after deleting some commit objects (a crash, simulated here by
    an exception from the object store) leaves a store that fsck finds healthy and whose
    branches' logs still read: commits must not lose their parents before they go themselves.
    """

    class Crash(Exception):
        pass

    template = scratch / "template"
    _build_store(template)
    policy = kill_policy()
    with ckptstore.open(str(template)) as store:
        removed = len(store.gc(policy, dry_run=True, grace_period_s=0).removed_commits)
    assert removed >= 10
    for stop_after in range(1, removed):
        work = scratch / f"work-{stop_after}"
        shutil.copytree(template, work)
        with ckptstore.open(str(work)) as store:
            deleted, delete_many = [], store.objects.delete_many

            def crashing_delete_many(keys, delete_many=delete_many, deleted=deleted, stop_after=stop_after):
                for key in keys:
                    if key.startswith("commits/") and len(deleted) == stop_after:
                        raise Crash(key)
                    delete_many([key])
                    deleted.append(key)

            store.objects.delete_many = crashing_delete_many
            with pytest.raises(Crash):
                collect(store, policy, grace_period_s=0, batch_size=1)
        with ckptstore.open(str(work)) as store:
            report = store.fsck(read_data=True)
            assert report.ok, f"after {stop_after} of {removed} commit deletions: " + "; ".join(map(str, report.problems))
            for branch in store.branches():
                store.log(branch)  # raises IntegrityError if it walks into a missing parent
