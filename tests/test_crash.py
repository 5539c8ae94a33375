"""Crash consistency of commits: a child process commits and is SIGKILLed.

* At every enumerated step of the commit protocol: the child wraps its opened store's object
  store, catalog and SQLite connection (from outside ckptstore; no test hooks in production
  code), a first run counts the calls one commit makes, then one child per (call, before or
  after) kills itself there. The call that moves the branch ref is the commit point: the
  commit must have landed exactly when the kill came after it.
* At random moments: the forker SIGKILLs a child that commits in a loop after a random delay.

After every kill, in the parent: a fresh ``ckptstore.open`` works (the killed child's SQLite
catalog included) and sees every commit; every branch's first-parent log is exactly the
commits the model says landed, and nothing else; every ref (branches, ``latest``, ``best``,
a user tag) checks out bit-exact to the state its commit was derived from (seed, step); the
catalog agrees with the object store (commits, parents, metrics, refs, the chunk index of
every stored manifest); ``fsck()`` finds nothing but orphans (``read_data=True`` before each
store is retired, and a catalog rebuilt from scratch sees everything); and the next commit
succeeds and moves every ref to itself.

The child processes live in ``tests/crash_child.py``. ``CKPTSTORE_SOAK=1`` enumerates every
layer of every scenario three times over on local stores and the object store's calls of
every scenario on S3, and makes 1,000 random kills on local stores and 100 on S3.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from crash_child import OPEN, WIDE_CHUNK_BYTES, commit_state, eval_loss
from forker import Forker
from soak import SOAK
from states import assert_same

import ckptstore

CHILD = str(Path(__file__).with_name("crash_child.py"))

#: Enumeration passes over every crash point of every scenario (local, S3).
ENUM_PASSES = {"local": 3 if SOAK else 1, "s3": 1}
#: The layers whose calls are crash points, per backend and scenario. The catalog is SQLite
#: on local disk whatever the backend, and a catalog method's boundaries are those of its SQL
#: statements. The soak takes every layer of every local scenario and the object store's
#: calls of every S3 one. The default run takes the object store's calls and the SQL
#: statements of one local scenario and the object store's calls of two more; on S3 (moto is slower) the kills just before and just after
#: the branch ref moves.
ALL_LAYERS = ("object", "catalog", "sql", "end")
ENUM_LAYERS = {
    "local": {
        "next": ALL_LAYERS if SOAK else ("object", "sql", "end"),
        "recommit": ALL_LAYERS if SOAK else (),
        "new-branch": ALL_LAYERS if SOAK else ("object", "end"),
        "wide": ALL_LAYERS if SOAK else (),
        "delta": ALL_LAYERS if SOAK else ("object", "end"),
    },
    "s3": {
        "next": ("object", "end") if SOAK else ("object:commit-point",),
        "recommit": ("object", "end") if SOAK else (),
        "new-branch": ("object", "end") if SOAK else (),
        "wide": ("object", "end") if SOAK else (),
        "delta": ("object", "end") if SOAK else (),
    },
}
#: Random-moment kills (local, S3), and kills on one store before a fresh one is made.
RANDOM_KILLS = {"local": 1000 if SOAK else 30, "s3": 100 if SOAK else 2}
RANDOM_ROUND = 25
#: Enumerated kills on one store before a fresh one is made (the checks grow with the store).
ENUM_ROUND = {"next": 25, "recommit": 25, "new-branch": 25, "wide": 6, "delta": 25}
TAGS = ["stable"]


# --------------------------------------------------------------------------------------------
# The model: what the store must hold


@dataclass
class Model:
    url: str
    options: dict
    seed: int
    chains: dict[str, list[str]] = field(default_factory=dict)  # branch -> ids, oldest first
    origin: dict[str, tuple[int, int, bool]] = field(default_factory=dict)  # id -> (step, source, wide)
    timeline: list[str] = field(default_factory=list)  # every landed commit, in order
    step: int = 0  # the next step number
    wide: bool = False  # the store's commits are wide states, in WIDE_CHUNK_BYTES chunks
    delta: bool = False  # the store keeps changed float chunks as deltas against the head's

    def expected_state(self, commit_id: str) -> dict:
        _, source, wide = self.origin[commit_id]
        return commit_state(self.seed, source, wide=wide)

    def open(self):
        return ckptstore.open(self.url, storage_options=self.options)


def _read_commit_chain(store, head: str | None, stop: str | None, limit: int) -> list:
    """Commits from ``head`` back to (not including) ``stop`` along first parents, oldest
    first; at most ``limit`` of them."""
    out = []
    cid = head
    while cid != stop:
        assert cid is not None, f"the branch no longer reaches its previous head {stop}"
        assert len(out) < limit, f"more new commits than were attempted: {[c.id for c in out]}"
        commit = store.read_commit(cid)
        out.append(commit)
        cid = commit.parents[0] if commit.parents else None
    return out[::-1]


def reconcile(store, model: Model, branch: str, attempts: list[tuple[int, int, bool]], reported: list[str]) -> list[str]:
    """Find the commits that landed on ``branch`` since the model's head, in order: they must
    be a prefix of ``attempts`` ((step, source, wide) each) that includes every ``reported``
    one, and each must check out bit-exact. Adds them to the model; returns their ids."""
    old_head = model.chains[branch][-1] if model.chains.get(branch) else None
    head = store.branches().get(branch)
    new = _read_commit_chain(store, head, old_head, len(attempts))
    assert [c.id for c in new[: len(reported)]] == reported, "a commit the child reported is not in the branch's history"
    assert len(new) >= len(reported)
    for commit, (step, source, wide) in zip(new, attempts):
        assert commit.metadata == {"step": step, "source": source}, (commit.metadata, step, source)
        assert commit.metrics == {"eval_loss": eval_loss(step)}
        assert commit.parents == ((old_head,) if old_head else ()), commit.parents
        assert_same(commit_state(model.seed, source, wide=wide), store.checkout(commit.id))
        model.chains.setdefault(branch, []).append(commit.id)
        model.origin[commit.id] = (step, source, wide)
        model.timeline.append(commit.id)
        old_head = commit.id
    return [c.id for c in new]


_commits: dict = {}
_manifest_chunks: dict = {}


def catalog_problems(store) -> list[str]:
    """Where the catalog disagrees with the object store: commits it lacks or invents, and for
    each commit its manifest, parents and metrics; and, where the catalog keeps a chunk index
    (schema 2, which GC trusted), for every stored manifest it indexes, exactly the manifest's
    chunks."""
    problems = []
    stored = {key.rsplit("/", 1)[-1] for key in store.objects.list("commits/")}
    indexed = store.catalog.commit_ids()
    problems += [f"commit {c} is stored but not in the catalog" for c in sorted(stored - indexed)]
    problems += [f"commit {c} is in the catalog but not stored" for c in sorted(indexed - stored)]
    rows = {row["id"]: row for row in store.catalog.commit_rows()}
    for cid in sorted(stored & indexed):
        if cid not in _commits:
            _commits[cid] = store.read_commit(cid)  # immutable, and its id is its checksum
        commit = _commits[cid]
        row = rows[cid]
        if row["manifest"] != commit.manifest:
            problems.append(f"commit {cid}: catalog manifest {row['manifest']}, object {commit.manifest}")
        if row["metrics"] != commit.metrics:
            problems.append(f"commit {cid}: catalog metrics {row['metrics']}, object {commit.metrics}")
        for parent in commit.parents:
            if cid not in store.catalog.children(parent):
                problems.append(f"commit {cid}: the catalog lacks its parent {parent}")
    chunk_index = getattr(store.catalog, "manifest_chunks", None)  # catalog schema 2 only
    for key in store.objects.list("manifests/") if chunk_index is not None else []:
        manifest_id = key.rsplit("/", 1)[-1]
        cached = chunk_index(manifest_id)
        if cached is None:
            continue
        if manifest_id not in _manifest_chunks:
            _manifest_chunks[manifest_id] = store.get_manifest(manifest_id).chunk_sizes()  # delta bases included
        actual = _manifest_chunks[manifest_id]
        if cached != actual:
            problems.append(f"manifest {manifest_id}: the catalog's chunk index lists {len(cached)} of its {len(actual)} chunks"
                            if set(cached) < set(actual) else f"manifest {manifest_id}: the catalog's chunk index is wrong")  # fmt: skip
    return problems


class CatalogFindings:
    """Catalog disagreements, each noted once with the kill that first showed it."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.found: list[str] = []

    def note(self, where: str, problems: list[str]) -> None:
        new = [p for p in problems if p not in self.seen]
        self.seen.update(new)
        if new:
            self.found.append(f"after {where}: " + "; ".join(new[:3]))

    def assert_none(self) -> None:
        assert not self.found, f"{len(self.found)} kills left the catalog disagreeing with the object store after a fresh open:\n" + "\n".join(self.found[:40])


def check_store(store, model: Model, *, landed: int, read_data: bool = False) -> list[str]:
    """Everything that must hold after a kill, given that ``landed`` commits landed in it.
    Returns where the catalog disagrees with the object store (the callers collect these, so
    that one run lists every crash point that leaves the catalog wrong)."""
    branches = store.branches()
    assert branches == {b: chain[-1] for b, chain in model.chains.items()}, "branches differ from the model"
    tags = store.tags()
    # Before the kill every tag was on the newest commit; the kill may have come between a
    # branch update and a tag update, leaving the tag one commit behind.
    allowed = set(model.timeline[-1:]) if landed == 0 else set(model.timeline[-2:])
    for name in ("latest", "best", *TAGS):
        assert tags.get(name) in allowed, f"tag {name} is at {tags.get(name)}, expected one of {sorted(allowed)}"
    assert set(tags) == {"latest", "best", *TAGS}, tags
    for target in sorted(set(branches.values()) | set(tags.values())):
        assert_same(model.expected_state(target), store.checkout(target))
    for branch, chain in model.chains.items():
        assert [c.id for c in store.log(branch)] == chain[::-1], f"the log of {branch} differs from the model"
    report = store.fsck(read_data=read_data)
    assert report.ok, "fsck: " + "; ".join(map(str, report.problems[:5]))
    odd = [key for key in report.orphans if key.split("/", 1)[0] not in ("commits", "manifests", "chunks")]
    assert not odd, f"orphans that no crashed commit can leave: {odd}"
    return catalog_problems(store)


def next_commit(store, model: Model, branch: str = "main") -> str:
    """Commit the next step on ``branch`` in this (the parent) process; it must succeed, land
    on the head, check out, and move every tag to itself."""
    step, wide = model.step, model.wide
    model.step += 1
    head = model.chains.get(branch, [None])[-1]
    commit = store.commit(
        commit_state(model.seed, step, wide=wide), branch=branch, message=f"step {step}",
        metadata={"step": step, "source": step}, metrics={"eval_loss": eval_loss(step)}, tags=TAGS,
    )  # fmt: skip
    assert commit.parents == ((head,) if head else ())
    model.chains.setdefault(branch, []).append(commit.id)
    model.origin[commit.id] = (step, step, wide)
    model.timeline.append(commit.id)
    assert store.resolve(branch) == commit.id
    tags = store.tags()
    assert all(tags[name] == commit.id for name in ("latest", "best", *TAGS)), tags
    assert_same(model.expected_state(commit.id), store.checkout(branch))
    return commit.id


def new_model(backend: str, scratch: Path, request, name: str, *, wide: bool = False, delta: bool = False) -> Model:
    """A fresh store with two commits on main, and its model. A ``wide`` store has
    WIDE_CHUNK_BYTES chunks and wide states (so that every wide commit after them writes the
    same number of new chunks); a ``delta`` store is made with ``delta="on"``."""
    if backend == "local":
        url, options = str(scratch / name), {}
    else:
        url, options = request.getfixturevalue("s3_url")
        url = f"{url}-{name}"
    model = Model(url, options, seed=random.randrange(1 << 30), wide=wide, delta=delta)
    settings = {**OPEN, "chunk_size_bytes": WIDE_CHUNK_BYTES} if wide else dict(OPEN)
    if delta:
        settings["delta"] = "on"
    with ckptstore.open(url, storage_options=options, **settings) as store:
        for _ in range(2):
            next_commit(store, model)
    return model


def rebuilt_catalog_sees_everything(model: Model, scratch: Path) -> None:
    """The catalog is a cache: thrown away, it is rebuilt from the object store on open."""
    if model.options:
        store = ckptstore.open(model.url, storage_options=model.options, cache_dir=str(scratch / f"cache-{uuid.uuid4().hex}"))
    else:
        shutil.rmtree(os.path.join(model.url, ".catalog"))
        store = model.open()
    with store:
        for branch, chain in model.chains.items():
            assert [c.id for c in store.log(branch)] == chain[::-1]
        assert not catalog_problems(store)
        report = store.fsck(read_data=True)
        assert report.ok, "fsck: " + "; ".join(map(str, report.problems[:5]))


# --------------------------------------------------------------------------------------------
# Kills at every enumerated step of the commit protocol


def _op_class(line: str) -> str:
    """An op log line without its number and ids: what kind of step it is."""
    layer, _, what = line.split(" ", 2)
    what = re.sub(r"refs/heads/b[0-9]+", "refs/heads/b*", what)  # new-branch: one per trial
    return layer + " " + re.sub(r"([0-9a-f]{2}/)?[0-9a-f]{16,}", "*", what)


def _read_ops(path: Path) -> list[str]:
    """The complete lines of an op log (a killed child may have left half of its last one)."""
    return path.read_text().split("\n")[:-1] if path.exists() else []


def _job(model: Model, scenario: str, oplog: Path) -> tuple[dict, str, tuple[int, int, bool]]:
    """The child's job for one commit of ``scenario``, its branch and its (step, source, wide)."""
    step = model.step
    model.step += 1
    branch, source, wide, open_ = "main", step, False, {}
    if scenario == "recommit":
        source = model.origin[model.chains["main"][0]][1]  # every chunk and the manifest exist
    elif scenario == "new-branch":
        branch = f"b{step}"
    elif scenario == "wide":
        wide, open_ = True, {"chunk_size_bytes": WIDE_CHUNK_BYTES}
    go = {
        "job": "commit", "url": model.url, "options": model.options, "seed": model.seed, "step": step,
        "source": source, "wide": wide, "branch": branch, "tags": TAGS, "open": open_, "oplog": str(oplog),
    }  # fmt: skip
    return go, branch, (step, source, wide)


def _crash_points(ops: list[str], scenario: str, layers: tuple[str, ...]) -> list[tuple[str, int, str]]:
    points = []
    chunk_puts = [i for i, line in enumerate(ops) if _op_class(line) == "object put_if_absent chunks/*"]
    for i, line in enumerate(ops):
        layer, n = line.split(" ", 2)[:2]
        commit_point = layer == "object" and " refs/heads/" in line
        if layer == "end" or not (layer in layers or (commit_point and "object:commit-point" in layers)):
            continue
        if layer == "sql" and line.split(" ", 2)[2].lower().startswith(("select", "pragma")):
            continue  # a read changes nothing: the kill before it is the kill before the next write
        if scenario == "wide" and i in chunk_puts and i not in (chunk_puts[0], chunk_puts[-1]):
            continue  # 130 writes of the same step: the first and the last stand for them
        points.append((layer, int(n), "before"))
        if layer != "sql":  # "after" a statement is "before" the next one
            points.append((layer, int(n), "after"))
    if "end" in layers:
        points.append(("end", 0, "after"))
    return points


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_commit_killed_at_every_crash_point(backend, tmp_path, scratch, request):
    """For each scenario (a commit with new chunks; a re-commit of a stored state; the first
    commit of a new branch; a commit whose manifest lists more than 100 chunks, more than one
    batch of catalog inserts; a commit in a store that keeps changed chunks as deltas against the
    head's), count the calls one commit makes, then SIGKILL one child per
    call (object store writes and deletes, catalog methods, SQL statements), before and
    after it. The commit has landed exactly when the kill came after the branch ref moved."""
    forker = Forker([sys.executable, CHILD, "forker"], tmp_path)
    catalog = CatalogFindings()
    kills, by_layer, timings = 0, Counter(), []
    started = time.monotonic()
    try:
        for pass_ in range(ENUM_PASSES[backend]):
            for scenario, layers in ENUM_LAYERS[backend].items():
                if not layers:
                    continue
                scenario_started = time.monotonic()
                model = new_model(backend, scratch, request, f"enum-{pass_}-{scenario}", wide=scenario == "wide", delta=scenario == "delta")
                # The counting run: an uninterrupted commit, its calls logged.
                oplog = tmp_path / f"count-{pass_}-{scenario}.log"
                go, branch, attempt = _job(model, scenario, oplog)
                rc, _, out = forker.run(go)
                assert rc == 0, (rc, out, forker.errors())
                ops = [line for line in _read_ops(oplog) if not line.startswith("end ")]
                classes = [_op_class(line) for line in ops]
                ref_update = _op_class(f"object 0 put_if_version refs/heads/{branch}")
                assert classes.count(ref_update) == 1, classes
                commit_point = classes.index(ref_update)
                with model.open() as store:
                    assert len(reconcile(store, model, branch, [attempt], [out[-1].split()[2]])) == 1
                    catalog.note(f"{scenario}: the counting run", check_store(store, model, landed=1))
                points = _crash_points(ops, scenario, layers)
                assert len(points) >= 2, points

                for trial_number, (layer, n, when) in enumerate(points):
                    if trial_number and trial_number % ENUM_ROUND[scenario] == 0:  # keep the checks quick
                        rebuilt_catalog_sees_everything(model, scratch)
                        model = new_model(
                            backend, scratch, request, f"enum-{pass_}-{scenario}-{trial_number}", wide=scenario == "wide", delta=scenario == "delta"
                        )  # fmt: skip
                    oplog = tmp_path / "trial.log"
                    go, branch, attempt = _job(model, scenario, oplog)
                    go["kill"] = [layer, n, when]
                    rc, _, out = forker.run(go)
                    where = f"{scenario}: kill {when} {layer} call {n}"
                    assert rc == -signal.SIGKILL, (where, rc, out, forker.errors())
                    kills += 1
                    by_layer[layer] += 1
                    trial = _read_ops(oplog)
                    if layer == "end":
                        index = len(ops)
                        assert trial[-1].startswith("end "), where
                    else:
                        # The kill came where the counting run says this call is.
                        mine = [line for line in trial if line.split(" ", 2)[:2] == [layer, str(n)]]
                        assert len(mine) == 1, (where, trial[-3:])
                        index = next(i for i, line in enumerate(ops) if line.split(" ", 2)[:2] == [layer, str(n)])
                        assert _op_class(mine[0]) == classes[index], (where, mine[0], classes[index])
                    expect_landed = index > commit_point or (index == commit_point and when == "after")
                    with model.open() as store:
                        landed = reconcile(store, model, branch, [attempt], [])
                        assert len(landed) == int(expect_landed), f"{where}: landed {landed}, expected {expect_landed}"
                        if scenario == "new-branch" and not landed:
                            assert branch not in store.branches()
                        catalog.note(f"{where} ({trial[-1] if trial else ''})", check_store(store, model, landed=len(landed)))
                        next_commit(store, model)
                rebuilt_catalog_sees_everything(model, scratch)
                timings.append(f"{scenario} {len(points)} kills {time.monotonic() - scenario_started:.1f} s")
    finally:
        forker.close()
    print(f"\n{backend}: {'; '.join(timings)}")
    print(f"{backend}: {kills} kills at enumerated crash points ({dict(by_layer)}) in {time.monotonic() - started:.1f} s")
    catalog.assert_none()


# --------------------------------------------------------------------------------------------
# Kills at random moments


def _landing(trial: list[str]) -> str:
    """Where in a loop child's life a kill landed, from its op log."""
    if not any(line.startswith("begin ") for line in trial):
        return "opening"
    last = trial[-1]
    if last.startswith("end "):
        return "between commits"
    if last.startswith("begin "):
        return "encoding"
    begun = max(i for i, line in enumerate(trial) if line.startswith("begin "))
    if any("put_if_version refs/heads/" in line for line in trial[begun:]):
        return "after the commit point"
    return "before the commit point"


def _loop_once(forker: Forker, model: Model, oplog: Path, catalog: CatalogFindings, *, count=None, kill_after_s=None):
    """Run a ``loop`` child (``count`` commits, or until killed ``kill_after_s`` after its
    fork), then check the store and make the next commit. Returns the child's return code,
    how long it ran, and how many commits landed that it had not reported."""
    first = model.step
    go = {
        "job": "loop", "url": model.url, "options": model.options, "seed": model.seed, "branch": "main", "tags": TAGS,
        "oplog": str(oplog), "first": first, "count": count, "kill_after_s": kill_after_s,
    }  # fmt: skip
    rc, elapsed, out = forker.run(go)
    reported = [line.split()[2] for line in out if re.fullmatch(r"done [0-9]+ [0-9a-f]{32}", line)]
    with model.open() as store:
        attempts = [(step, step, False) for step in range(first, first + len(reported) + 1)]
        landed = reconcile(store, model, "main", attempts, reported)
        model.step = first + len(landed)
        where = f"a kill {kill_after_s:.4f} s after the fork ({_landing(_read_ops(oplog))})" if kill_after_s is not None else "a loop"
        catalog.note(where, check_store(store, model, landed=len(landed)))
        next_commit(store, model)
    return rc, elapsed, len(landed) - len(reported)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_commit_loop_killed_at_random_moments(backend, tmp_path, scratch, request):
    """A child commits step after step on main until the forker SIGKILLs it, a random time
    after it was forked (within its open and its first two commits or so). Every commit it
    reported is in history, at most one more landed, and the store is whole. Every other store
    keeps changed chunks as deltas against the head's (``delta="on"``)."""
    forker = Forker([sys.executable, CHILD, "forker"], tmp_path)
    catalog = CatalogFindings()
    rng = random.Random()
    kills, rounds, landings, unreported = 0, 0, Counter(), 0
    started = time.monotonic()
    try:
        while kills < RANDOM_KILLS[backend]:
            model = new_model(backend, scratch, request, f"random-{rounds}", delta=rounds % 2 == 1)
            rounds += 1
            oplog = tmp_path / "loop.log"
            # How long opening and one commit take, uninterrupted: kills come within the
            # span of opening and about two commits.
            rc, one_s, _ = _loop_once(forker, model, oplog, catalog, count=1)
            assert rc == 0, forker.errors()
            span_s = 1.5 * one_s

            for _ in range(min(RANDOM_ROUND, RANDOM_KILLS[backend] - kills)):
                rc, _, extra = _loop_once(forker, model, oplog, catalog, kill_after_s=rng.uniform(0, span_s))
                assert rc == -signal.SIGKILL, (rc, forker.errors())
                kills += 1
                unreported += extra
                landings[_landing(_read_ops(oplog))] += 1
            with model.open() as store:
                catalog.note("end of round", check_store(store, model, landed=0, read_data=True))
            rebuilt_catalog_sees_everything(model, scratch)
    finally:
        forker.close()
    assert kills >= RANDOM_KILLS[backend]
    in_commit = landings["before the commit point"] + landings["after the commit point"]
    assert in_commit >= kills // 5, f"too few kills landed inside a commit: {dict(landings)}"
    print(
        f"\n{backend}: {kills} random kills in {rounds} stores, landed: {dict(landings)}; {unreported} commits "
        f"landed without being reported; {time.monotonic() - started:.1f} s"
    )
    catalog.assert_none()
