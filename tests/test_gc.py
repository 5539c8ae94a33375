"""Retention, garbage collection, demotion, shallow history, fsck and the collector lease.

The state machine drives random commits, branches, tags, metrics and policies through a
store and, after every collection, checks the acceptance criterion against a model kept by
the test: everything protected checks out bit-exact, nothing unprotected and older than the
grace period remains, and fsck is clean. Focused tests follow, one behaviour each.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import operator
import os
import subprocess
import sys
import threading
import time
import uuid

import fsspec
import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from states import TinyNet, assert_same, trained

import ckptstore
from ckptstore.codec import HEADER_SIZE
from ckptstore.errors import CollectorBusy, ComponentsUnavailable, PolicyMatchesNothing, UnknownRef, WriterExpired
from ckptstore.gc import collect
from ckptstore.layout import LEASE_KEY, WRITERS_PREFIX, chunk_key, commit_key, demotion_key, manifest_key, shallow_key
from ckptstore.lease import (
    CollectorLease,
    Heartbeat,
    read_lease,
    writing,
)
from ckptstore.records import grafted_parents
from ckptstore.retention import (
    AnyOf,
    CommitInfo,
    KeepBest,
    KeepEveryNSteps,
    KeepLast,
    KeepNewerThan,
    Policy,
    policy_for,
)

CHUNK = 4096
INLINE = 256  # small tensors take the chunked path, as in test_store.py
GC_PREFIXES = ("commits/", "shallow/", "demotions/", "manifests/", "chunks/")

_g = torch.Generator().manual_seed(1234)
#: Tensors reused across commits (as model weights in some, optimizer state in others), so
#: chunks are shared between commits and between components.
SHARED = [torch.randn(1500, generator=_g) for _ in range(3)]


def open_store(url: str, **kwargs) -> ckptstore.Store:
    return ckptstore.open(url, chunk_size_bytes=CHUNK, inline_threshold_bytes=INLINE, **kwargs)


def memory_url(name: str) -> str:
    return f"memory://{name}-{uuid.uuid4().hex}"


def make_state(seed: int, shared: int = 0, alias: bool = False) -> dict:
    """A small training state: a model and an "optimizer" component, each multi-chunk, with
    a pool tensor in each and optionally an optimizer entry sharing a model tensor's storage."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1200, generator=g)
    model = {"shared": SHARED[shared % 3], "w": w, "b": torch.randn(8, generator=g)}
    optimizer = {"exp_avg": torch.randn(1000, generator=g), "frozen": SHARED[(shared + 1) % 3], "step": torch.tensor(seed)}
    if alias:
        optimizer["w_view"] = w[100:700]  # another tensor on model/w's storage: one blob, two prefixes
    return {"model": model, "optimizer": optimizer, "step": seed}


def without(state: dict, prefixes) -> dict:
    return {k: v for k, v in state.items() if k not in prefixes}


def gc_listing(store) -> set[str]:
    return {key for prefix in GC_PREFIXES for key in store.objects.list(prefix)}


def sizes(store) -> dict[str, int]:
    return {info.key: info.size_bytes for prefix in GC_PREFIXES for info in store.objects.list_info(prefix)}


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def needed_objects(store, kept, demoted, shallow=None) -> set[str]:
    """Every object the kept commits need, worked out from their manifests: commit,
    manifest, the chunks of every blob some non-dropped tensor uses and the delta bases of
    those chunks, demotion records, and a
    shallow record for each kept commit whose own parent is gone (or each of ``shallow``)."""
    kept = set(kept)
    out: set[str] = set()
    for cid in kept:
        commit = store.get_commit(cid)
        out |= {commit_key(cid), manifest_key(commit.manifest)}
        manifest = store.get_manifest(commit.manifest)
        dropped = tuple(demoted.get(cid, ()))
        blobs = {e.blob for e in manifest.tensors if not any(_under(e.path, p) for p in dropped)}
        out |= {chunk_key(c.id) for i in blobs for c in manifest.blobs[i].chunks}
        out |= {chunk_key(b) for i in blobs for c in manifest.blobs[i].chunks for b in c.bases}  # what deltas need
        if dropped:
            out.add(demotion_key(cid))
        if (cid in shallow) if shallow is not None else any(p not in kept for p in commit.parents):
            out.add(shallow_key(cid))
    return out


def commit_bytes(store, cids, listing_sizes) -> int:
    """Stored bytes of the objects (commit, manifest, every chunk) a set of commits needs."""
    keys: set[str] = set()
    for cid in cids:
        commit = store.get_commit(cid)
        manifest = store.get_manifest(commit.manifest)
        keys |= {commit_key(cid), manifest_key(commit.manifest)} | {chunk_key(c) for c in manifest.chunk_ids()}
    return sum(listing_sizes[k] for k in keys)


def age_local_store(root: str, seconds: float) -> None:
    """Backdate every object file of a local store (the catalog and hidden files aside)."""
    past = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                os.utime(os.path.join(dirpath, name), (past, past))


# ============================================================================================
# The state machine
# ============================================================================================

BRANCHES = ("main", "exp", "sweep/a", "sweep/b")
TAGS = ("v1", "v2", "keep")
PATTERNS = ("main", "sweep/*", "*", "exp", "nomatch")

rule_strategy = st.one_of(
    st.builds(KeepLast, st.integers(0, 4)),
    st.builds(KeepBest, st.integers(0, 3), metric=st.just("eval_loss"), greater_is_better=st.sampled_from([None, False, True])),
    st.builds(KeepEveryNSteps, st.integers(1, 25)),
    st.builds(KeepNewerThan, st.sampled_from([0.0, 3600.0])),  # deterministic ages only
)
rules_strategy = st.lists(rule_strategy, min_size=1, max_size=3).map(lambda rs: functools.reduce(operator.or_, rs))
policy_strategy = st.builds(
    Policy,
    keep=st.one_of(rules_strategy, rules_strategy, st.none()),
    demote=st.sampled_from([("optimizer",), ()]),
    keep_whole=st.none() | rules_strategy,
    max_total_bytes=st.one_of(st.none(), st.none(), st.integers(0, 120_000)),
)
# Mostly policies that remove or demote something; sometimes none (keep what branches reach).
retention_strategy = st.one_of(
    rules_strategy,
    policy_strategy,
    st.dictionaries(st.sampled_from(PATTERNS), policy_strategy | rules_strategy, min_size=1, max_size=3),
    st.none(),
)
state_params = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "shared": st.integers(0, 2),
        "alias": st.booleans(),
        "step": st.integers(0, 60),
        "loss": st.sampled_from([1.0, 0.5, 2.0, 1.5, None, math.nan]),  # ties are likely
        "reuse": st.booleans(),
    }
)


def my_policy_for(retention, branch):
    """The spec of ``policy_for``, written out independently."""
    if retention is None:
        return None
    if isinstance(retention, Policy):
        return retention
    if isinstance(retention, (KeepLast, KeepBest, KeepEveryNSteps, KeepNewerThan, AnyOf)):
        return Policy(keep=retention)
    for pattern, value in retention.items():
        if fnmatch.fnmatchcase(branch, pattern):
            return value if isinstance(value, Policy) else Policy(keep=value)
    return None


def keep_last_n(rule) -> int:
    """How many newest commits a rule is sure to select (from its KeepLast parts)."""
    if isinstance(rule, KeepLast):
        return rule.n
    if isinstance(rule, AnyOf):
        return max(keep_last_n(r) for r in rule.rules)
    return 0


def retention_has_budget(retention) -> bool:
    if isinstance(retention, Policy):
        return retention.max_total_bytes is not None
    if isinstance(retention, dict):
        return any(retention_has_budget(v) for v in retention.values())
    return False


class GcMachine(RuleBasedStateMachine):
    """A store and a model of it: every commit's exact state, parents (as committed, and as
    history follows them once GC removed some: the nearest kept ancestors), creation time,
    step and metrics; which commits are stored, and what GC dropped from each."""

    store_options: dict = {}

    def __init__(self) -> None:
        super().__init__()
        self.url = memory_url("gc-machine")
        self.store = open_store(self.url, **self.store_options)
        self.order: list[str] = []  # every commit ever made, in creation order
        self.states: dict[str, dict] = {}
        self.info: dict[str, CommitInfo] = {}
        self.own_parents: dict[str, tuple[str, ...]] = {}
        self.parents: dict[str, list[str]] = {}  # as history follows them
        self.alive: set[str] = set()
        self.demoted: dict[str, tuple[str, ...]] = {}
        self.branches: dict[str, str] = {}
        self.user_tags: dict[str, str] = {}
        self.latest: str | None = None
        self.best: tuple[str, float] | None = None
        self.collections = 0
        self.consistent = True  # False while a collection's checks are under way (or failed)

    def alive_ordered(self) -> list[str]:
        return [c for c in self.order if c in self.alive]

    def history(self, head: str) -> list[str]:
        """Every ancestor of ``head`` (itself included) along history's parents, newest first."""
        seen, stack = set(), [head]
        while stack:
            cid = stack.pop()
            if cid not in seen:
                seen.add(cid)
                stack.extend(self.parents[cid])
        return sorted(seen, key=lambda c: self.info[c].created_at_s, reverse=True)

    def chain(self, head: str) -> list[str]:
        """First parents from ``head``: what ``log`` lists."""
        out = [head]
        while self.parents[out[-1]]:
            out.append(self.parents[out[-1]][0])
        return out

    # -- rules ---------------------------------------------------------------------------

    @initialize(data=st.data(), count=st.integers(2, 6))
    def start(self, data, count):
        for _ in range(count):
            self._commit(data, "main", data.draw(state_params, label="commit"))

    @rule(data=st.data(), branch=st.sampled_from(BRANCHES), count=st.integers(1, 4))
    def commit(self, data, branch, count):
        for _ in range(count):
            self._commit(data, branch, data.draw(state_params, label="commit"))

    def _commit(self, data, branch, params):
        alive = self.alive_ordered()
        if params["reuse"] and alive:
            # The exact state of an earlier commit: same manifest, possibly one GC demoted.
            state = self.states[data.draw(st.sampled_from(alive), label="reused state of")]
        else:
            state = make_state(params["seed"], params["shared"], params["alias"])
        loss = params["loss"]
        metrics = {} if loss is None else {"eval_loss": loss}
        commit = self.store.commit(state, branch=branch, metadata={"step": params["step"]}, metrics=metrics)
        if commit.stats.delta_chunks:
            event("commit stored deltas")
        assert commit.parents == ((self.branches[branch],) if branch in self.branches else ())
        self.order.append(commit.id)
        self.states[commit.id] = state
        self.info[commit.id] = CommitInfo(commit.id, commit.created_at.timestamp(), params["step"], dict(metrics))
        self.own_parents[commit.id] = commit.parents
        self.parents[commit.id] = list(commit.parents)
        self.alive.add(commit.id)
        self.branches[branch] = commit.id
        self.latest = commit.id
        if loss is not None and not math.isnan(loss) and (self.best is None or self.best[1] > loss):
            self.best = (commit.id, loss)

    @precondition(lambda self: self.alive)
    @rule(data=st.data(), name=st.sampled_from(BRANCHES))
    def branch(self, data, name):
        target = data.draw(st.sampled_from(self.alive_ordered()), label="branch at")
        self.store.branch(name, at=target, force=True)
        self.branches[name] = target

    @precondition(lambda self: self.alive)
    @rule(data=st.data(), name=st.sampled_from(TAGS))
    def tag(self, data, name):
        target = data.draw(st.sampled_from(self.alive_ordered()), label="tag at")
        self.store.tag(name, at=target, force=True)
        self.user_tags[name] = target

    @precondition(lambda self: self.branches or self.user_tags)
    @rule(data=st.data())
    def delete_ref(self, data):
        choices = [("branch", b) for b in sorted(self.branches)] + [("tag", t) for t in sorted(self.user_tags)]
        kind, name = data.draw(st.sampled_from(choices), label="delete")
        if kind == "branch":
            self.store.delete_branch(name, force=True)
            del self.branches[name]
        else:
            self.store.delete_tag(name)
            del self.user_tags[name]

    @rule(retention=retention_strategy, batch_size=st.sampled_from([1000, 1, 4]), dry_first=st.booleans())
    def gc(self, retention, batch_size, dry_first):
        self._gc(retention, batch_size, dry_first)

    @rule(
        retention=st.builds(Policy, keep=st.none() | rules_strategy, demote=st.just(("optimizer",)), keep_whole=st.none() | rules_strategy),
        pattern=st.none() | st.sampled_from(PATTERNS),
    )
    def gc_demoting(self, retention, pattern):
        self._gc(retention if pattern is None else {pattern: retention}, 1000, False)

    # -- collection and its checks ---------------------------------------------------------

    def expected(self, retention, branches, targets):
        """What a collection must do, from the model (the spec written out; the rules'
        selections are the library's, checked on their own below):
        ``(must keep, newly demoted {id: prefixes}, kept whole, may keep)``. A commit is kept
        if any branch keeps it, and loses a component only if every branch keeping it drops
        it (a branch keeping it whole drops nothing). Without a size budget the two bounds
        are equal; with one, what the budgeted branches select may go, and the demotions are
        not predicted (``None``)."""
        now = time.time()
        drops: dict[str, list[tuple[str, ...]]] = {t: [()] for t in targets}
        may_keep: set[str] = set()
        if retention is None:
            for target in targets:
                for c in self.history(target):
                    drops.setdefault(c, []).append(())
        for b, head in branches.items():
            history = self.history(head)
            policy = my_policy_for(retention, b)
            if policy is None:
                for c in history:
                    drops.setdefault(c, []).append(())
                continue
            infos = [self.info[c] for c in history]
            selected = set(history) if policy.keep is None else policy.keep.select(infos, now_s=now)
            selected_whole = selected
            if policy.demote:
                selected_whole = selected & (set() if policy.keep_whole is None else policy.keep_whole.select(infos, now_s=now))
            if policy.max_total_bytes is None:
                for c in selected:
                    drops.setdefault(c, []).append(() if c in selected_whole else policy.demote)
            else:
                may_keep |= selected
        kept = set(drops)
        if retention_has_budget(retention):
            return kept, None, None, kept | may_keep
        dropped = {c: set.intersection(*(set(d) for d in ds)) for c, ds in drops.items()}
        newly = {c: p for c, p in dropped.items() if p}
        return kept, newly, {c for c in kept if not dropped[c]}, kept

    def refusals(self, retention, branches) -> list[str]:
        """The rules that match no commit of any branch they govern (the collection must
        refuse then): a KeepBest when no commit of those branches has a number for its metric
        (KeepEveryNSteps always matches: every commit here has a step)."""
        governed: dict[Policy, list[str]] = {}
        for b, head in branches.items():
            policy = my_policy_for(retention, b)
            if policy is not None:
                governed.setdefault(policy.resolved(best_metric="eval_loss", greater_is_better=None), []).extend(self.history(head))
        out = []
        for policy, commits in governed.items():
            has_loss = any(not math.isnan(self.info[c].metrics.get("eval_loss", math.nan)) for c in commits)
            for kept in (policy.keep, policy.keep_whole):
                for r in (kept.rules if isinstance(kept, AnyOf) else (kept,)) if kept is not None else ():
                    if isinstance(r, KeepBest) and r.n and not has_loss:
                        out.append(repr(r))
        return out

    def _gc(self, retention, batch_size, dry_first):
        self.consistent = False
        self._collect_and_check(retention, batch_size, dry_first)
        self.consistent = True

    def _collect_and_check(self, retention, batch_size, dry_first):
        store = self.store
        before_alive = set(self.alive)
        before_demoted = dict(self.demoted)
        branches = store.branches()
        tags = store.tags()
        targets = set(branches.values()) | set(tags.values())
        listing_before = set(store.objects.list(""))
        refused = self.refusals(retention, branches)
        if refused:  # nothing may be deleted, and a dry run says why
            event("gc refused a rule that matches nothing")
            assert store.gc(retention, dry_run=True, grace_period_s=0).warnings
            with pytest.raises(PolicyMatchesNothing):
                store.gc(retention, grace_period_s=0)
            assert set(store.objects.list("")) == listing_before
            assert not store.objects.exists(LEASE_KEY), "the collector kept its lease"
            return
        must_keep, newly_demoted, whole, may_keep = self.expected(retention, branches, targets)

        dry = None
        if dry_first:
            dry = store.gc(retention, dry_run=True, grace_period_s=0)
            assert not dry.executed and dry.deleted_objects == 0
            assert set(store.objects.list("")) == listing_before, "a dry run changed the store"

        if batch_size == 1000:
            plan = store.gc(retention, grace_period_s=0)
        else:
            plan = collect(store, retention, grace_period_s=0, batch_size=batch_size)
        self.collections += 1
        kept, removed = set(plan.kept_commits), set(plan.removed_commits)
        event("gc removed commits" if removed else "gc removed no commit")
        if plan.demoted_commits:
            event("gc with demoted commits")
        if any(plan.shallow_commits.values()):
            event("gc grafted history across removed commits")
        if any(c in before_demoted for c in removed):
            event("gc removed a demoted commit")

        if dry is not None:
            assert (dry.kept_commits, dry.removed_commits) == (plan.kept_commits, plan.removed_commits)
            assert dry.demoted_commits == plan.demoted_commits
            assert dry.shallow_commits == plan.shallow_commits
            assert [i.key for i in dry.deletions] == [i.key for i in plan.deletions]

        # The plan accounts for every commit, and did what it planned.
        assert plan.executed
        assert kept | removed == before_alive and not kept & removed
        assert plan.young_objects == 0 and plan.spared_objects == 0 and not plan.unreadable_commits
        assert plan.deleted_objects == len(plan.deletions)
        assert plan.freed_bytes == plan.planned_bytes
        assert set(plan.demoted_commits) <= kept
        assert not store.objects.exists(LEASE_KEY), "the collector kept its lease"

        # The policy's semantics, from the model.
        assert must_keep <= kept <= may_keep, (sorted(must_keep - kept), sorted(kept - may_keep))
        for cid, prefixes in before_demoted.items():  # demotion is permanent
            if cid in kept:
                assert set(prefixes) <= set(plan.demoted_commits[cid])
        newly = {c: set(p) - set(before_demoted.get(c, ())) for c, p in plan.demoted_commits.items()}
        newly = {c: p for c, p in newly.items() if p}
        if newly_demoted is not None:
            expect = {c: set(p) - set(before_demoted.get(c, ())) for c, p in newly_demoted.items()}
            assert newly == {c: p for c, p in expect.items() if p}
            assert not newly.keys() & whole
        for cid in targets:
            assert cid not in newly, "a branch head or tagged commit was demoted"
        for b, head in branches.items():  # KeepLast, checked without the library's rules
            policy = my_policy_for(retention, b)
            if policy is not None and policy.max_total_bytes is None:
                n = len(self.history(head)) if policy.keep is None else keep_last_n(policy.keep)
                assert set(self.history(head)[:n]) <= kept, f"branch {b}: the {n} newest commits must be kept"

        # Refs are untouched.
        assert store.branches() == branches and store.tags() == tags
        assert targets <= kept

        # Update the model: history now skips what was removed.
        def nearest(ps, seen):
            out = []
            for p in ps:
                if p in seen:
                    continue
                seen.add(p)
                out.extend([p] if p in kept else nearest(self.parents[p], seen))
            return out

        before_parents = self.parents
        self.parents = {c: (nearest(ps, set()) if c in kept else ps) for c, ps in before_parents.items()}
        assert plan.shallow_commits == {c: self.parents[c] for c in kept if self.parents[c] != before_parents[c]}
        self.alive = kept
        self.demoted = {c: tuple(p) for c, p in plan.demoted_commits.items()}

        # Removed commits are gone for good.
        for cid in removed:
            assert not store.objects.exists(commit_key(cid))
            with pytest.raises(UnknownRef):
                store.resolve(cid)

        # Nothing a kept commit does not need remains (grace period 0), and all it needs does.
        grafted = {c for c in kept if list(self.own_parents[c]) != self.parents[c]}
        assert gc_listing(store) == needed_objects(store, kept, self.demoted, grafted)
        for cid in kept:
            record = grafted_parents(store.objects, cid)
            assert (record is None) == (cid not in grafted)
            if record is not None:
                assert record[0] == self.parents[cid]
            assert store.parents_of(store.get_commit(cid)) == self.parents[cid]

        # History (log, ~N) goes on across what was removed, and ends where the model's does.
        for b, head in branches.items():
            chain = self.chain(head)
            assert [c.id for c in store.log(b)] == chain
            assert store.resolve(f"{b}~{len(chain) - 1}") == chain[-1]
            with pytest.raises(UnknownRef):
                store.resolve(f"{b}~{len(chain)}")

        self._check_checkouts(targets)
        report = store.fsck(read_data=True)
        assert report.ok, [str(p) for p in report.problems]
        assert report.orphans == []

    def _check_checkouts(self, targets: set[str]) -> None:
        for cid in self.alive_ordered():
            state = self.states[cid]
            dropped = self.demoted.get(cid, ())
            if dropped:
                with pytest.raises(ComponentsUnavailable) as excinfo:
                    self.store.checkout(cid)
                assert isinstance(excinfo.value, KeyError)
                assert excinfo.value.dropped == sorted(dropped)
                assert_same(without(state, dropped), self.store.checkout(cid, exclude=list(dropped)))
            else:
                assert_same(state, self.store.checkout(cid))
        for cid in targets:
            assert cid in self.alive
            if cid not in self.demoted:
                assert_same(self.states[cid], self.store.checkout(cid))

    @invariant()
    def refs_match_model(self):
        assert self.store.branches() == self.branches
        expected = dict(self.user_tags)
        if self.latest is not None:
            expected["latest"] = self.latest
        if self.best is not None:
            expected["best"] = self.best[0]
        assert self.store.tags() == expected

    def teardown(self):
        try:
            if self.alive and self.consistent:
                self._check_checkouts(set(self.branches.values()) | set(self.user_tags.values()))
                report = self.store.fsck()
                assert report.ok, [str(p) for p in report.problems]
        finally:
            self.store.close()
            fs = fsspec.filesystem("memory")
            root = "/" + self.url.split("://", 1)[1]
            if fs.exists(root):
                fs.rm(root, recursive=True)


class DeltaGcMachine(GcMachine):
    """The same machine with every changed float chunk stored as a delta against the
    parent's (a keyframe every 3 commits): GC must keep every base a kept delta needs."""

    store_options = {"delta": "on", "delta_keyframe_interval": 3}


_MACHINE_SETTINGS = settings(
    max_examples=25,
    stateful_step_count=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestGcMachine = GcMachine.TestCase
TestGcMachine.settings = _MACHINE_SETTINGS
TestDeltaGcMachine = DeltaGcMachine.TestCase
TestDeltaGcMachine.settings = _MACHINE_SETTINGS


# ============================================================================================
# Rules on hand-built histories
# ============================================================================================

NOW = 10_000.0


def history(*specs) -> list[CommitInfo]:
    """``(step, metrics)`` specs, newest first, one second apart; ids c0 (newest), c1…"""
    return [CommitInfo(f"c{i}", NOW - 1 - i, step, metrics) for i, (step, metrics) in enumerate(specs)]


def plain(n: int) -> list[CommitInfo]:
    return history(*[(None, {})] * n)


def test_keep_last():
    h = plain(5)
    assert KeepLast(2).select(h, now_s=NOW) == {"c0", "c1"}
    assert KeepLast(0).select(h, now_s=NOW) == set()
    assert KeepLast(9).select(h, now_s=NOW) == {c.id for c in h}
    assert KeepLast(1).select([], now_s=NOW) == set()
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError):
            KeepLast(bad)


def test_keep_best_both_directions_ignoring_nan_and_missing():
    h = history(
        (None, {"eval_loss": 0.5, "accuracy": 0.9}),  # c0
        (None, {"eval_loss": math.nan, "accuracy": math.nan}),  # c1
        (None, {}),  # c2
        (None, {"eval_loss": 0.2, "accuracy": 0.4}),  # c3
        (None, {"eval_loss": 0.9, "accuracy": 0.95}),  # c4
        (None, {"eval_loss": 0.2, "accuracy": 0.1}),  # c5: ties c3 on loss, older
    )
    # Names ending in "loss": lower is better; ties go to the newer commit.
    assert KeepBest(1).select(h, now_s=NOW) == {"c3"}
    assert KeepBest(2).select(h, now_s=NOW) == {"c3", "c5"}
    assert KeepBest(3, "eval_loss").select(h, now_s=NOW) == {"c3", "c5", "c0"}
    # Any other name: higher is better.
    assert KeepBest(2, "accuracy").select(h, now_s=NOW) == {"c4", "c0"}
    # Explicit direction overrides the name.
    assert KeepBest(1, "eval_loss", greater_is_better=True).select(h, now_s=NOW) == {"c4"}
    assert KeepBest(1, "accuracy", greater_is_better=False).select(h, now_s=NOW) == {"c5"}
    # NaN and missing values are never selected, however many are asked for.
    assert KeepBest(10).select(h, now_s=NOW) == {"c0", "c3", "c4", "c5"}
    assert KeepBest(10, "accuracy", greater_is_better=False).select(h, now_s=NOW) == {"c0", "c3", "c4", "c5"}
    assert KeepBest(3, "perplexity").select(h, now_s=NOW) == set()
    assert KeepBest(0).select(h, now_s=NOW) == set()
    with pytest.raises(ValueError):
        KeepBest(-1)


def test_keep_every_n_steps_keeps_first_commit_of_each_window():
    h = history(
        (31, {}),  # c0: window 3
        (None, {}),  # c1: no step, never selected
        (25, {}),  # c2: window 2
        (22, {}),  # c3: window 2, earliest step there
        (12, {}),  # c4: window 1 (a later commit at the same step: not first)
        (12, {}),  # c5: window 1, same step as c4 but older
        (10, {}),  # c6: window 1, lowest step
        (3, {}),  # c7: window 0
        (0, {}),  # c8: window 0, step 0
    )
    assert KeepEveryNSteps(10).select(h, now_s=NOW) == {"c0", "c3", "c6", "c8"}
    assert KeepEveryNSteps(1).select(h, now_s=NOW) == {"c0", "c2", "c3", "c5", "c6", "c7", "c8"}
    assert KeepEveryNSteps(100).select(h, now_s=NOW) == {"c8"}
    # Without c6, the first commit of window 1 is the older of the two at step 12.
    assert KeepEveryNSteps(10).select([c for c in h if c.id != "c6"], now_s=NOW) == {"c0", "c3", "c5", "c8"}
    for bad in (0, -5, 2.0):
        with pytest.raises(ValueError):
            KeepEveryNSteps(bad)


def test_keep_newer_than():
    h = [CommitInfo("new", NOW - 5), CommitInfo("edge", NOW - 60), CommitInfo("old", NOW - 3600)]
    assert KeepNewerThan(60).select(h, now_s=NOW) == {"new"}
    assert KeepNewerThan(60.5).select(h, now_s=NOW) == {"new", "edge"}
    assert KeepNewerThan(0).select(h, now_s=NOW) == set()
    assert KeepNewerThan(10**9).select(h, now_s=NOW) == {"new", "edge", "old"}
    for bad in (-1, math.nan):
        with pytest.raises(ValueError):
            KeepNewerThan(bad)


def test_rules_compose_with_or():
    h = history((15, {"eval_loss": 3.0}), (10, {"eval_loss": 1.0}), (5, {"eval_loss": 2.0}), (0, {}))
    a, b, c = KeepLast(1), KeepBest(1), KeepEveryNSteps(100)
    combined = a | b | c
    assert isinstance(combined, AnyOf) and combined.rules == (a, b, c)  # flattened
    assert (a | (b | c)).rules == (a, b, c)
    # c0 is the newest, c1 the best, c3 the first of steps 0-99.
    assert combined.select(h, now_s=NOW) == {"c0", "c1", "c3"}
    assert (KeepLast(2) | KeepLast(1)).select(h, now_s=NOW) == {"c0", "c1"}
    assert (KeepLast(1) | KeepEveryNSteps(10)).select(h, now_s=NOW) == {"c0", "c1", "c3"}
    with pytest.raises(TypeError):
        KeepLast(1) | 3  # noqa: B018


def test_policy_select_demote_and_keep_whole():
    h = plain(5)
    p = Policy(keep=KeepLast(4), demote=("optimizer",), keep_whole=KeepLast(2) | KeepBest(1))
    kept, whole = p.select(h, now_s=NOW)
    assert kept == {"c0", "c1", "c2", "c3"} and whole == {"c0", "c1"}
    # keep_whole never adds commits that keep does not keep.
    kept, whole = Policy(keep=KeepLast(1), demote="optimizer", keep_whole=KeepLast(3)).select(h, now_s=NOW)
    assert (kept, whole) == ({"c0"}, {"c0"})
    # No keep_whole: every kept commit is demoted.
    assert Policy(keep=KeepLast(2), demote=("optimizer",)).select(h, now_s=NOW) == ({"c0", "c1"}, set())
    # No demotion: every kept commit is whole; keep=None keeps all.
    assert Policy(keep=KeepLast(2)).select(h, now_s=NOW) == ({"c0", "c1"}, {"c0", "c1"})
    everything = {c.id for c in h}
    assert Policy().select(h, now_s=NOW) == (everything, everything)
    # Prefixes are normalised; a string is one prefix.
    assert Policy(demote="optimizer").demote == ("optimizer",)
    assert Policy(demote=("/optimizer/", "ema/")).demote == ("optimizer", "ema")
    with pytest.raises(ValueError):
        Policy(demote=("/",))
    with pytest.raises(ValueError):
        Policy(max_total_bytes=-1)


def test_policy_for_matches_branch_patterns_first_match_wins():
    assert policy_for(None, "main") is None
    assert policy_for(KeepLast(2), "any") == Policy(keep=KeepLast(2))
    p = Policy(keep=KeepLast(1), demote=("optimizer",))
    assert policy_for(p, "any") is p
    mapping = {"main": p, "sweep/*": KeepLast(3), "*": KeepBest(1)}
    assert policy_for(mapping, "main") is p
    assert policy_for(mapping, "sweep/a") == Policy(keep=KeepLast(3))
    assert policy_for(mapping, "other") == Policy(keep=KeepBest(1))
    assert policy_for({"sweep/*": p}, "main") is None  # unmatched: keep everything
    assert policy_for({"Main": p}, "main") is None  # case-sensitive
    assert policy_for({"*": KeepLast(1), "main": p}, "main") == Policy(keep=KeepLast(1))  # order matters
    with pytest.raises(TypeError):
        policy_for({"*": 3}, "main")


# ============================================================================================
# Collection on a store
# ============================================================================================


def test_dry_run_changes_nothing():
    store = open_store(memory_url("dry"))
    ids = [store.commit(make_state(i, i), metadata={"step": i}).id for i in range(4)]
    store.branch("side", at=ids[1])
    store.delete_branch("side")
    everything = {key: store.objects.get(key) for key in store.objects.list("")}
    plan = store.gc(Policy(keep=KeepLast(1), demote=("optimizer",)), dry_run=True, grace_period_s=0)
    assert not plan.executed and plan.deleted_objects == 0 and plan.freed_bytes == 0
    assert plan.removed_commits == sorted(ids[:3]) and plan.kept_commits == [ids[3]]
    assert plan.deletions and plan.planned_bytes > 0
    assert plan.counts()["commits"] == 3
    assert plan.summary().startswith("would remove 3 commits")
    assert {key: store.objects.get(key) for key in store.objects.list("")} == everything
    for i, cid in enumerate(ids):
        assert_same(make_state(i, i), store.checkout(cid))
    assert store.fsck().ok


def test_default_grace_period_deletes_nothing_right_after_commits(tmp_path):
    root = str(tmp_path / "store")
    store = open_store(root)
    ids = [store.commit(make_state(i, i), metadata={"step": i}).id for i in range(3)]
    before = gc_listing(store)
    plan = store.gc(KeepLast(1))
    assert plan.executed and plan.deletions == [] and plan.deleted_objects == 0
    assert plan.removed_commits == [] and set(plan.kept_commits) == set(ids)  # young commits are kept
    assert gc_listing(store) == before
    for i, cid in enumerate(ids):
        assert_same(make_state(i, i), store.checkout(cid))

    # A fresh unneeded object is left alone (and counted); once older than the grace period
    # it goes, with the commits the policy no longer keeps.
    age_local_store(root, 2 * 3600)
    stray = chunk_key("ab" * 16)
    store.objects.put_if_absent(stray, b"not needed by anything")
    report = store.fsck()
    assert report.ok and report.orphans == [stray]
    plan = store.gc(KeepLast(1))
    assert plan.removed_commits == sorted(ids[:2]) and plan.young_objects == 1
    assert stray in gc_listing(store) and commit_key(ids[0]) not in gc_listing(store)
    assert_same(make_state(2, 2), store.checkout("main"))
    age_local_store(root, 2 * 3600)
    plan = store.gc(KeepLast(1))
    assert [i.key for i in plan.deletions] == [stray] and plan.young_objects == 0
    report = store.fsck(read_data=True)
    assert report.ok and report.orphans == []


def test_demoted_commit_keeps_id_and_history_and_the_rest_of_its_state():
    store = open_store(memory_url("demote"))
    runs = [trained(seed=i, steps=2) for i in range(3)]
    ids = [store.commit({"model": m, "optimizer": o, "step": i}, metadata={"step": i}).id for i, (m, o, _) in enumerate(runs)]
    optimizer_chunks = {}
    for cid in ids:
        manifest = store.get_manifest(store.get_commit(cid).manifest)
        optimizer_chunks[cid] = {chunk_key(c.id) for e in manifest.tensors if e.path.startswith("optimizer/") for c in manifest.blobs[e.blob].chunks}
        assert optimizer_chunks[cid]
    calls = []
    policy = Policy(keep=None, demote=("optimizer",), keep_whole=KeepLast(1))
    plan = store.gc(policy, grace_period_s=0, progress=lambda *a: calls.append(a))
    assert plan.demoted_commits == {ids[0]: ("optimizer",), ids[1]: ("optimizer",)}
    assert plan.removed_commits == [] and plan.shallow_commits == {}
    assert calls and calls[-1] == ("delete", len(plan.deletions), len(plan.deletions))
    assert plan.summary().startswith("removed 0 commits, demoted 2, kept 3")
    listing = gc_listing(store)
    assert listing == needed_objects(store, ids, plan.demoted_commits)
    head_manifest = store.get_manifest(store.get_commit(ids[2]).manifest)
    dropped_only = (optimizer_chunks[ids[0]] | optimizer_chunks[ids[1]]) - {chunk_key(c) for c in head_manifest.chunk_ids()}
    assert dropped_only and not dropped_only & listing
    assert optimizer_chunks[ids[2]] <= listing

    # Same ids, same history.
    assert [c.id for c in store.log("main")] == ids[::-1]
    for i, cid in enumerate(ids[:2]):
        assert store.resolve(cid) == cid and store.resolve(cid[:10]) == cid
        with pytest.raises(ComponentsUnavailable) as excinfo:
            store.checkout(cid)
        assert isinstance(excinfo.value, KeyError)
        assert excinfo.value.dropped == ["optimizer"] and "'optimizer'" in str(excinfo.value)
        with pytest.raises(ComponentsUnavailable):
            store.checkout(cid, include=["optimizer/state"])
        model, _, _ = runs[i]
        got = store.checkout(cid, exclude=["optimizer"])
        assert got.keys() == {"model", "step"} and got["step"] == i
        assert_same(model.state_dict(), got["model"])
        assert_same(model.state_dict(), store.checkout(cid, include="model")["model"])
        fresh = TinyNet()
        state = store.restore(cid, {"model": fresh})
        assert state["step"] == i
        assert_same(model.state_dict(), fresh.state_dict())
        assert fresh.out.weight is fresh.embed.weight
        with pytest.raises(ComponentsUnavailable):
            store.restore(cid, {"model": TinyNet(), "optimizer": torch.optim.AdamW(TinyNet().parameters())})
    model, opt, _ = runs[2]
    assert_same({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 2}, store.checkout("main"))
    report = store.fsck(read_data=True)
    assert report.ok and report.orphans == [], [str(p) for p in report.problems]

    # Collecting again changes nothing; a later policy that keeps all whole cannot undo it.
    again = store.gc(policy, grace_period_s=0)
    assert again.deletions == [] and again.demoted_commits == plan.demoted_commits
    assert store.gc(None, grace_period_s=0).demoted_commits == plan.demoted_commits
    with pytest.raises(ComponentsUnavailable):
        store.checkout(ids[0])


def test_history_skips_removed_commits_and_ends_where_nothing_older_is_kept():
    store = open_store(memory_url("grafts"))
    ids = [store.commit(make_state(i), metadata={"step": i * 100}).id for i in range(6)]
    policy = KeepLast(1) | KeepEveryNSteps(300)  # steps 0 and 300, and the head (500)
    plan = store.gc(policy, grace_period_s=0)
    assert plan.kept_commits == sorted([ids[0], ids[3], ids[5]])
    assert plan.shallow_commits == {ids[5]: [ids[3]], ids[3]: [ids[0]]}
    # Commits keep their own parents; history follows the recorded nearest kept ancestors.
    assert store.get_commit(ids[5]).parents == (ids[4],)
    assert store.parents_of(store.get_commit(ids[5])) == [ids[3]]
    assert grafted_parents(store.objects, ids[3])[0] == [ids[0]]
    assert grafted_parents(store.objects, ids[0]) is None
    assert [c.id for c in store.log("main")] == [ids[5], ids[3], ids[0]]
    assert store.log(limit=2)[1].id == ids[3]
    assert store.resolve("main~1") == store.resolve("main^") == ids[3]
    assert store.resolve("main~2") == store.resolve("main^^") == store.resolve(f"{ids[3]}~1") == ids[0]
    for rev in ("main~3", f"{ids[0]}^"):
        with pytest.raises(UnknownRef):
            store.resolve(rev)
    for gone in (ids[1], ids[2], ids[4]):
        with pytest.raises(UnknownRef):
            store.checkout(gone)
    assert_same(make_state(0), store.checkout("main~2"))
    report = store.fsck(read_data=True)
    assert report.ok and report.orphans == [], [str(p) for p in report.problems]

    # The same policy again keeps what it kept: the thinned history is still the branch's.
    again = store.gc(policy, grace_period_s=0)
    assert again.kept_commits == plan.kept_commits and again.deletions == [] and again.shallow_commits == {}

    # Removing a commit history was grafted onto moves the graft to the next kept ancestor.
    plan = store.gc(KeepLast(1) | KeepEveryNSteps(1000), grace_period_s=0)
    assert plan.removed_commits == [ids[3]] and plan.shallow_commits == {ids[5]: [ids[0]]}
    assert [c.id for c in store.log()] == [ids[5], ids[0]]
    assert store.objects.list("shallow/") == [shallow_key(ids[5])]
    # And where nothing older is kept, history ends.
    plan = store.gc(KeepLast(1), grace_period_s=0)
    assert plan.removed_commits == [ids[0]] and plan.shallow_commits == {ids[5]: []}
    assert [c.id for c in store.log()] == [ids[5]]
    with pytest.raises(UnknownRef) as excinfo:
        store.resolve("main~1")
    assert excinfo.value.suggestions == []
    # A new commit on top links to the kept head as usual.
    ids.append(store.commit(make_state(6), metadata={"step": 600}).id)
    assert [c.id for c in store.log()] == [ids[6], ids[5]]
    with pytest.raises(UnknownRef) as excinfo:
        store.resolve("main~2")
    assert excinfo.value.suggestions == ["main~1"]
    report = store.fsck(read_data=True)
    assert report.ok and report.orphans == []


def test_max_total_bytes_drops_oldest_unprotected_commits_never_heads_or_tags():
    store = open_store(memory_url("budget"))
    ids = [store.commit({"w": torch.randn(2000), "shared": SHARED[0]}, metadata={"step": i}).id for i in range(6)]
    store.tag("pin", at=ids[1])
    listing_sizes = sizes(store)
    budget = commit_bytes(store, {ids[1], ids[3], ids[4], ids[5]}, listing_sizes) - 1

    plan = store.gc(Policy(max_total_bytes=budget), dry_run=True, grace_period_s=0)
    # Oldest first: ids[0] goes, ids[1] is tagged, then ids[2] and ids[3] until it fits.
    assert plan.kept_commits == sorted([ids[1], ids[4], ids[5]])
    assert commit_bytes(store, plan.kept_commits, listing_sizes) <= budget
    assert commit_bytes(store, plan.kept_commits + [ids[3]], listing_sizes) > budget  # no more dropped than needed
    # A budget the whole history fits in drops nothing.
    roomy = store.gc(Policy(max_total_bytes=commit_bytes(store, ids, listing_sizes)), dry_run=True, grace_period_s=0)
    assert roomy.removed_commits == []

    # Budget 0: only the head (also `latest`) and the tag are left; both check out whole.
    plan = store.gc(Policy(keep=KeepLast(6), max_total_bytes=0), grace_period_s=0)
    assert plan.kept_commits == sorted([ids[1], ids[5]])
    assert gc_listing(store) == needed_objects(store, plan.kept_commits, {})
    for cid in (ids[1], ids[5]):
        assert store.checkout(cid)["w"].numel() == 2000
    assert store.fsck(read_data=True).ok


def test_per_branch_policies_and_unmatched_branches_keep_everything():
    store = open_store(memory_url("per-branch"))
    main = [store.commit(make_state(i), metadata={"step": i * 10}, metrics={"eval_loss": 5.0 - i}).id for i in range(4)]
    store.branch("sweep/a", at=main[0])
    sweep = [store.commit(make_state(100 + i), branch="sweep/a", metrics={"eval_loss": [0.5, 3.0, 2.0][i]}).id for i in range(3)]
    store.branch("exp", at=main[1])
    exp = [store.commit(make_state(200 + i), branch="exp").id for i in range(2)]
    retention = {"sweep/*": KeepBest(1), "main": KeepEveryNSteps(20) | KeepLast(1)}
    plan = store.gc(retention, grace_period_s=0)
    # main keeps steps 0 and 20 and its head; sweep/a keeps its best and its head; exp
    # matches no pattern and keeps all its history (main[0], main[1] included).
    assert set(plan.kept_commits) == {main[0], main[1], main[2], main[3], sweep[0], sweep[2], *exp}
    assert plan.removed_commits == [sweep[1]]
    assert plan.shallow_commits == {sweep[2]: [sweep[0]]}  # its history skips sweep[1]
    assert [c.id for c in store.log("sweep/a")] == [sweep[2], sweep[0], main[0]]
    assert store.resolve("best") == sweep[0]
    report = store.fsck(read_data=True)
    assert report.ok and report.orphans == []


@pytest.mark.s3
def test_gc_on_s3(s3_url):
    url, options = s3_url
    store = ckptstore.open(url, storage_options=options, chunk_size_bytes=CHUNK, inline_threshold_bytes=INLINE)
    states = [make_state(i, i) for i in range(3)]
    ids = [store.commit(s, metadata={"step": i}).id for i, s in enumerate(states)]
    plan = store.gc(Policy(keep=KeepLast(2), demote=("optimizer",), keep_whole=KeepLast(1)), grace_period_s=0)
    assert plan.removed_commits == [ids[0]] and plan.shallow_commits == {ids[1]: []}
    assert plan.demoted_commits == {ids[1]: ("optimizer",)}
    assert plan.deleted_objects == len(plan.deletions) > 0
    assert gc_listing(store) == needed_objects(store, plan.kept_commits, plan.demoted_commits)
    assert not store.objects.exists(LEASE_KEY)
    assert [c.id for c in store.log()] == [ids[2], ids[1]]
    assert_same(states[2], store.checkout("main"))
    assert_same(without(states[1], ["optimizer"]), store.checkout(ids[1], exclude=["optimizer"]))
    with pytest.raises(ComponentsUnavailable):
        store.checkout(ids[1])
    report = store.fsck(read_data=True)
    assert report.ok and report.orphans == [], [str(p) for p in report.problems]
    # A second handle sees the same.
    other = ckptstore.open(url, storage_options=options)
    assert [c.id for c in other.log()] == [ids[2], ids[1]]
    with pytest.raises(UnknownRef):
        other.resolve(ids[0])


def test_gc_without_retention_keeps_every_commit_a_tag_reaches():
    # Store.gc: "None to keep every commit a branch or tag reaches"; a policy keeps only the
    # tagged commit itself.
    store = open_store(memory_url("tag-reach"))
    store.commit(make_state(0))
    store.branch("side", at="main")
    side = [store.commit(make_state(10 + i), branch="side").id for i in range(2)]
    store.tag("release", at=side[1])
    store.delete_branch("side")
    main = store.resolve("main")
    plan = store.gc(None, grace_period_s=0)
    assert plan.removed_commits == [] and plan.deletions == []
    assert [c.id for c in store.log("release")] == [side[1], side[0], main]
    plan = store.gc(KeepLast(1), grace_period_s=0)
    assert plan.removed_commits == [side[0]] and plan.shallow_commits == {side[1]: [main]}
    assert [c.id for c in store.log("release")] == [side[1], main]
    assert store.fsck(read_data=True).ok


# ============================================================================================
# fsck
# ============================================================================================


def _rewrite(objects, key, data: bytes) -> None:
    objects.delete(key)
    objects.put_if_absent(key, data)


def _one_commit_store(name: str):
    store = open_store(memory_url(name))
    g = torch.Generator().manual_seed(7)
    state = {"model": {"w": torch.randn(3000, generator=g)}, "optimizer": {"m": torch.randn(3000, generator=g)}}
    commit = store.commit(state)
    manifest = store.get_manifest(commit.manifest)
    entry = next(e for e in manifest.tensors if e.path == "optimizer/m")
    key = chunk_key(manifest.blobs[entry.blob].chunks[1].id)
    assert store.fsck(read_data=True).ok
    return store, commit, key


def test_fsck_names_a_deleted_chunk_with_its_commit_and_key_path():
    store, commit, key = _one_commit_store("fsck-missing")
    store.objects.delete(key)
    report = store.fsck()
    assert not report.ok
    [problem] = report.problems
    assert (problem.kind, problem.key, problem.commit, problem.path) == ("chunk", key, commit.id, "optimizer/m")
    assert "missing" in problem.message and key in str(problem) and "optimizer/m" in str(problem)
    with pytest.raises(ckptstore.IntegrityError):
        store.checkout()
    assert_same(store.checkout(exclude=["optimizer"]), store.checkout(include=["model"]))


def test_fsck_detects_a_truncated_chunk_without_reading_data():
    store, commit, key = _one_commit_store("fsck-truncated")
    _rewrite(store.objects, key, store.objects.get(key)[:-10])
    report = store.fsck()
    assert report.chunks_read == 0
    [problem] = report.problems
    assert (problem.kind, problem.key, problem.commit, problem.path) == ("chunk", key, commit.id, "optimizer/m")
    # Cut inside the header: the header check names it.
    _rewrite(store.objects, key, store.objects.get(key)[: HEADER_SIZE - 4])
    [problem] = store.fsck().problems
    assert problem.key == key and "truncated" in problem.message


def test_fsck_finds_a_flipped_body_byte_only_when_reading_data():
    store, commit, key = _one_commit_store("fsck-flip")
    data = bytearray(store.objects.get(key))
    data[HEADER_SIZE + 100] ^= 0x01
    _rewrite(store.objects, key, bytes(data))
    assert store.fsck().ok
    report = store.fsck(read_data=True)
    assert report.chunks_read > 0
    [problem] = report.problems
    assert (problem.kind, problem.key, problem.commit, problem.path) == ("chunk", key, commit.id, "optimizer/m")
    assert store.fsck(read_data=True, read_data_subset=1.0).problems == [problem]
    with pytest.raises(ValueError):
        store.fsck(read_data=True, read_data_subset=0)


def test_fsck_reports_a_deleted_parent_unless_marked_shallow():
    store = open_store(memory_url("fsck-parent"))
    a = store.commit(make_state(0))
    b = store.commit(make_state(1))
    store.objects.delete(commit_key(a.id))
    report = store.fsck()
    parent = [p for p in report.problems if p.kind == "parent"]
    assert len(parent) == 1 and parent[0].commit == b.id and parent[0].key == commit_key(a.id)
    # What GC does instead leaves fsck clean.
    store2 = open_store(memory_url("fsck-parent-gc"))
    store2.commit(make_state(0))
    store2.commit(make_state(1))
    store2.gc(KeepLast(1), grace_period_s=0)
    assert store2.fsck(read_data=True).ok


def test_fsck_catalog_mismatch_and_repair():
    store = open_store(memory_url("fsck-catalog"))
    a = store.commit(make_state(0))
    store.catalog.set_ref("heads", "ghost", a.id)
    phantom = "f" * 32
    row = {"id": phantom, "manifest": "0" * 32, "message": "", "created_at": 0.0, "branch": "main", "step": None,
           "logical_bytes": 0, "new_bytes": 0, "object": b"x"}  # fmt: skip
    store.catalog.add_commit(row, [], {})
    report = store.fsck()
    kinds = {(p.kind, p.commit) for p in report.problems}
    assert ("catalog", phantom) in kinds and any(p.kind == "catalog" and "ghost" in p.message for p in report.problems)
    assert not report.catalog_repaired
    repaired = store.fsck(repair=True)
    assert repaired.ok and repaired.catalog_repaired
    assert store.fsck().ok
    assert store.catalog.refs("heads") == {"main": a.id} and phantom not in store.catalog.commit_ids()


def test_fsck_without_repair_reports_a_commit_missing_from_the_catalog_and_changes_nothing():
    store = open_store(memory_url("fsck-catalog-missing"))
    a = store.commit(make_state(0))
    store.catalog.remove_commits([a.id])
    for _ in range(2):  # checking does not repair the catalog behind the report's back
        report = store.fsck()
        assert [(p.kind, p.commit) for p in report.problems] == [("catalog", a.id)]
    assert store.fsck(repair=True).catalog_repaired
    assert store.fsck().ok and a.id in store.catalog.commit_ids()


# ============================================================================================
# The collector lease and writer markers
# ============================================================================================


def test_second_collector_is_busy_while_the_lease_is_held():
    store = open_store(memory_url("lease-busy"))
    store.commit(make_state(0))
    store.commit(make_state(1))
    first = CollectorLease(store.objects, ttl_s=300)
    first.acquire()
    with pytest.raises(CollectorBusy):
        CollectorLease(store.objects).acquire()
    before = gc_listing(store)
    with pytest.raises(CollectorBusy):
        store.gc(KeepLast(1), grace_period_s=0)
    assert gc_listing(store) == before
    state, _ = read_lease(store.objects)
    assert state.holder == first.holder and state.live and not state.sweeping
    first.release()
    first.release()  # idempotent
    assert store.gc(KeepLast(1), grace_period_s=0).removed_commits


def test_expired_lease_is_taken_over():
    store = open_store(memory_url("lease-expired"))
    first = CollectorLease(store.objects, ttl_s=0.05)
    first.acquire()
    assert read_lease(store.objects)[0].live
    Heartbeat.get().release(first)  # as if its process paused: no more renewals
    time.sleep(0.15)
    assert not read_lease(store.objects)[0].live
    second = CollectorLease(store.objects, ttl_s=300)
    second.acquire()
    with pytest.raises(CollectorBusy):
        first.renew(sweeping=True)  # the first collector learns it lost the lease
    first.release()  # must not release the second's lease
    assert read_lease(store.objects)[0].holder == second.holder
    second.release()
    assert read_lease(store.objects) == (None, None)


def test_lease_of_a_dead_holder_is_taken_over(tmp_path):
    root = str(tmp_path / "store")
    store = open_store(root)
    store.commit(make_state(0))
    store.commit(make_state(1))
    code = (
        "import os, sys\n"
        "from ckptstore.backends import open_object_store\n"
        "from ckptstore.lease import CollectorLease\n"
        "CollectorLease(open_object_store(sys.argv[1]), ttl_s=3600).acquire()\n"
        "os._exit(0)  # killed: never releases\n"
    )
    subprocess.run([sys.executable, "-c", code, root], check=True, timeout=120)
    state, _ = read_lease(store.objects)
    assert state.pid != os.getpid() and state.ttl_s == 3600 and state.age_s < 600
    assert not state.live  # its holder is known dead (same boot, same pid namespace), however fresh
    plan = store.gc(KeepLast(1), grace_period_s=0)
    assert plan.executed and len(plan.removed_commits) == 1
    assert read_lease(store.objects) == (None, None)


def test_collector_waits_for_a_live_writer(tmp_path):
    root = str(tmp_path / "store")
    store = open_store(root)
    ids = [store.commit(make_state(i, i)).id for i in range(3)]
    age_local_store(root, 2 * 3600)  # old enough to collect under the default grace period
    before = gc_listing(store)
    outcome = {}

    def collector():
        try:
            outcome["plan"] = store.gc(KeepLast(1))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc

    with writing(store.objects):
        thread = threading.Thread(target=collector)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive(), f"gc finished while a writer was live: {outcome}"
        # Records may be written, but nothing is deleted while the writer is live.
        assert before <= gc_listing(store)
        lease, _ = read_lease(store.objects)
        assert lease is not None and lease.live
    thread.join(30)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome
    plan = outcome["plan"]
    assert plan.removed_commits == sorted(ids[:2]) and plan.deleted_objects > 0
    assert not store.objects.exists(commit_key(ids[0]))
    assert store.objects.list("locks/") == []
    assert_same(make_state(2, 2), store.checkout("main"))
    assert store.fsck(read_data=True).ok


def test_writer_marker_holds_gc_whatever_the_grace_period_until_it_lapses():
    store = open_store(memory_url("writer-timeout"))
    ids = [store.commit(make_state(i, i)).id for i in range(3)]
    outcome = {}

    def collector(**kwargs):
        try:
            outcome["plan"] = store.gc(KeepLast(1), grace_period_s=0, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc

    before = gc_listing(store)
    with writing(store.objects, ttl_s=0.3) as marker:  # renewed every 0.1 s while held
        thread = threading.Thread(target=collector)
        thread.start()
        thread.join(1.0)  # several times the marker's ttl: a live writer is never judged dead
        assert thread.is_alive(), f"gc(grace_period_s=0) ignored a live writer: {outcome}"
        assert before <= gc_listing(store)
        marker.check()  # still honoured: it may publish
    thread.join(30)
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert outcome["plan"].removed_commits == sorted(ids[:2])

    # A marker whose holder stopped renewing it (a paused or hung process) lapses after its
    # ttl: gc goes ahead and removes it, and the writer learns it may not publish.
    store.commit(make_state(3))
    with writing(store.objects, ttl_s=0.3) as marker:
        Heartbeat.get().release(marker)  # as if its process paused
        time.sleep(0.4)
        started = time.monotonic()
        plan = store.gc(KeepLast(1), grace_period_s=0)
        assert time.monotonic() - started < 5
        assert plan.removed_commits == [ids[2]]
        assert store.objects.list(WRITERS_PREFIX) == []
        with pytest.raises(WriterExpired):
            marker.check()
    assert store.fsck(read_data=True).ok
