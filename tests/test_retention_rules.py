"""Retention as meant (issue 17, items 3 and 4): per-branch policies over shared history, a
budget next to demotion, and KeepBest by the store's own metric, refusing when it matches
nothing."""

from __future__ import annotations

import pytest
import torch
from states import assert_same

import ckptstore
from ckptstore import KeepBest, KeepEveryNSteps, KeepLast, Policy
from ckptstore.errors import PolicyMatchesNothing


def state(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {
        "model": {"w": torch.randn(2048, generator=g)},
        "optimizer": {"m": torch.randn(2048, generator=g)},
        "scheduler": {"lr": torch.randn(2048, generator=g)},
    }


def test_per_branch_demotions_over_shared_history_drop_only_what_every_keeper_drops(tmp_path):
    """main drops the optimizer, sweep the scheduler: commits before the fork, kept by both,
    lose neither; commits of one branch lose what that branch's policy drops."""
    store = ckptstore.open(str(tmp_path / "s"))
    shared = [store.commit(state(i)).id for i in range(3)]
    store.branch("sweep", at="main")
    only_main = [store.commit(state(10 + i)).id for i in range(2)]
    only_sweep = [store.commit(state(20 + i), branch="sweep").id for i in range(2)]
    plan = store.gc(
        {"main": Policy(keep=KeepLast(10), demote=("optimizer",)), "sweep": Policy(keep=KeepLast(10), demote=("scheduler",))},
        grace_period_s=0,
    )
    assert not plan.removed_commits
    for cid in shared:
        assert store.dropped_components(cid) == (), cid
        assert_same(state(shared.index(cid)), store.checkout(cid))
    assert store.dropped_components(only_main[0]) == ("optimizer",)
    assert store.dropped_components(only_sweep[0]) == ("scheduler",)
    for head in (only_main[-1], only_sweep[-1]):
        assert store.dropped_components(head) == ()  # branch heads stay whole
    assert store.fsck(read_data=True).ok


def test_a_commit_one_branchs_budget_drops_keeps_what_the_other_branch_keeps(tmp_path):
    """Demotions are worked out after the size budget: a commit main's budget drops, that
    sweep keeps (dropping only the scheduler), keeps its optimizer."""
    store = ckptstore.open(str(tmp_path / "s"))
    shared = [store.commit(state(i)).id for i in range(3)]
    store.branch("sweep", at="main")
    store.commit(state(10))
    store.commit(state(21), branch="sweep")
    policies = {
        "main": Policy(keep=KeepLast(10), demote=("optimizer",), max_total_bytes=1),  # only the head fits
        "sweep": Policy(keep=KeepLast(10), demote=("scheduler",)),
    }
    plan = store.gc(policies, grace_period_s=0)
    assert not plan.removed_commits  # sweep keeps the shared history
    for cid in shared:
        assert store.dropped_components(cid) == ("scheduler",), cid
        got = store.checkout(cid, exclude=["scheduler"])
        assert_same({k: v for k, v in state(shared.index(cid)).items() if k != "scheduler"}, got)


def test_keep_best_follows_the_stores_metric_and_direction(tmp_path):
    """On a store whose best follows eval_accuracy (higher is better), KeepBest(3) keeps the
    three most accurate commits, as ``best`` does; the CLI's --keep-best likewise."""
    from ckptstore.cli import main as ckpt

    url = str(tmp_path / "s")
    store = ckptstore.open(url, best_metric="eval_accuracy", greater_is_better=True)
    accuracy = [0.50, 0.91, 0.40, 0.88, 0.95, 0.30, 0.20]
    ids = [store.commit(state(i), metrics={"eval_accuracy": a, "eval_loss": float(i)}).id for i, a in enumerate(accuracy)]
    best3 = {ids[i] for i in sorted(range(len(ids)), key=lambda i: -accuracy[i])[:3]}
    plan = store.gc(KeepBest(3) | KeepLast(1), grace_period_s=0, dry_run=True)
    assert set(plan.kept_commits) == best3 | {ids[-1]}
    ckpt(["--store", url, "gc", "--keep-best", "3", "--keep-last", "1", "--grace-period", "0s"])  # exits only on error
    assert set(ckptstore.open(url).catalog.commit_ids()) == best3 | {ids[-1]}


def test_a_rule_that_matches_nothing_refuses_to_collect(tmp_path):
    """KeepBest of a metric no commit has (a typo) or KeepEveryNSteps with no steps would
    keep nothing, silently: the collection refuses with a typed error and deletes nothing;
    a dry run says so loudly."""
    store = ckptstore.open(str(tmp_path / "s"))
    ids = [store.commit(state(i), metrics={"eval_loss": 1.0 / (i + 1)}).id for i in range(4)]
    before = set(store.objects.list(""))
    for rule in (KeepBest(3, metric="eval_los") | KeepLast(1), KeepEveryNSteps(100) | KeepLast(1)):
        dry = store.gc(rule, grace_period_s=0, dry_run=True)
        assert dry.warnings and "WARNING" in dry.summary()
        with pytest.raises(PolicyMatchesNothing) as info:
            store.gc(rule, grace_period_s=0)
        assert isinstance(info.value, ValueError)
        assert set(store.objects.list("")) >= before
    assert [c.id for c in store.log()] == list(reversed(ids))
    # A rule that matches on some branch is fine, even where other branches lack the metric.
    store.commit(state(9), branch="fresh")
    plan = store.gc(KeepBest(1) | KeepLast(1), grace_period_s=0)
    assert plan.executed and not plan.warnings
