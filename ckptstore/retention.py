"""Retention policies: which commits of a branch to keep, and which to keep only in part.

A policy is evaluated on one branch's history (newest first). Rules select commits to keep
and compose with ``|`` (a commit is kept if any rule keeps it)::

    policy = Policy(
        keep=KeepLast(3) | KeepBest(1, metric="eval_loss") | KeepEveryNSteps(1000),
        demote=("optimizer",),          # kept commits outside keep_whole lose these components
        keep_whole=KeepLast(3),
        max_total_bytes=200 << 30,      # then drop the oldest kept commits until this fits
    )
    store.gc(policy)                                   # every branch
    store.gc({"main": policy, "sweep/*": KeepLast(1)})  # per branch (first matching pattern)

Whatever a policy says, branch heads and tagged commits (``latest`` and ``best`` included)
are kept whole, and so is every commit younger than the collector's grace period. This
module only decides; :mod:`ckptstore.gc` plans and deletes.
"""

from __future__ import annotations

import fnmatch
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import InvalidOption, InvalidOptionType


@dataclass(frozen=True)
class CommitInfo:
    """What a rule may look at: a commit's id, time, step and metrics."""

    id: str
    created_at_s: float
    step: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


def greater_is_better_for(metric: str, greater_is_better: bool | None) -> bool:
    """The direction of ``metric``: as given, else lower is better for names ending in
    ``loss`` (as the Hugging Face Trainer decides) and higher for the rest."""
    return (not metric.endswith("loss")) if greater_is_better is None else greater_is_better


class Rule(ABC):
    """Selects commits to keep from one branch's history (newest first)."""

    @abstractmethod
    def select(self, history: Sequence[CommitInfo], *, now_s: float) -> set[str]: ...

    def resolved(self, *, best_metric: str, greater_is_better: bool | None) -> Rule:
        """This rule with the store's settings filled in where it leaves them open."""
        return self

    def unmatched(self, histories: Sequence[Sequence[CommitInfo]]) -> list[str]:
        """Why this rule can match no commit of these histories (a metric or step none of
        them has), if it is so; empty if it may match."""
        return []

    def __or__(self, other: Rule) -> Rule:
        if not isinstance(other, Rule):
            return NotImplemented
        mine = self.rules if isinstance(self, AnyOf) else (self,)
        theirs = other.rules if isinstance(other, AnyOf) else (other,)
        return AnyOf(mine + theirs)


@dataclass(frozen=True)
class AnyOf(Rule):
    """Keeps what any of ``rules`` keeps (what ``a | b`` builds)."""

    rules: tuple[Rule, ...]

    def select(self, history: Sequence[CommitInfo], *, now_s: float) -> set[str]:
        out: set[str] = set()
        for rule in self.rules:
            out |= rule.select(history, now_s=now_s)
        return out

    def resolved(self, *, best_metric: str, greater_is_better: bool | None) -> Rule:
        return AnyOf(tuple(r.resolved(best_metric=best_metric, greater_is_better=greater_is_better) for r in self.rules))

    def unmatched(self, histories: Sequence[Sequence[CommitInfo]]) -> list[str]:
        return [why for rule in self.rules for why in rule.unmatched(histories)]


def _check_count(name: str, n: int) -> None:
    if type(n) is not int or n < 0:
        raise InvalidOption(name, f"must be a non-negative int, not {n!r}")


@dataclass(frozen=True)
class KeepLast(Rule):
    """Keeps the ``n`` newest commits."""

    n: int

    def __post_init__(self) -> None:
        _check_count("KeepLast.n", self.n)

    def select(self, history: Sequence[CommitInfo], *, now_s: float) -> set[str]:
        return {c.id for c in history[: self.n]}


@dataclass(frozen=True)
class KeepBest(Rule):
    """Keeps the ``n`` best commits by ``metric`` (commits without it, or with NaN, are
    never selected). Ties go to the newer commit. ``metric`` defaults to the store's
    ``best_metric`` (what ``best`` follows), and the direction to the store's
    ``greater_is_better`` for that metric, else to what the name says (lower is better for a
    name ending in ``loss``). A ``KeepBest`` whose metric no commit has matches nothing: the
    collection refuses to run (:class:`~ckptstore.errors.PolicyMatchesNothing`)."""

    n: int
    metric: str | None = None
    greater_is_better: bool | None = None

    def __post_init__(self) -> None:
        _check_count("KeepBest.n", self.n)

    def resolved(self, *, best_metric: str, greater_is_better: bool | None) -> Rule:
        metric = self.metric or best_metric
        direction = self.greater_is_better if self.greater_is_better is not None else (greater_is_better if metric == best_metric else None)
        return KeepBest(self.n, metric, greater_is_better_for(metric, direction))

    def unmatched(self, histories: Sequence[Sequence[CommitInfo]]) -> list[str]:
        metric = self.metric or "eval_loss"
        if self.n and not any(metric in c.metrics and not math.isnan(c.metrics[metric]) for h in histories for c in h):
            return [f"the rule keeping the {self.n} best commits by {metric!r} matches no commit: none has that metric"]
        return []

    def select(self, history: Sequence[CommitInfo], *, now_s: float) -> set[str]:
        metric = self.metric or "eval_loss"  # a collection resolves it first (the store's metric)
        sign = 1.0 if greater_is_better_for(metric, self.greater_is_better) else -1.0
        scored = [(sign * c.metrics[metric], -age, c.id) for age, c in enumerate(history) if metric in c.metrics and not math.isnan(c.metrics[metric])]
        scored.sort(reverse=True)
        return {commit_id for _, _, commit_id in scored[: self.n]}


@dataclass(frozen=True)
class KeepEveryNSteps(Rule):
    """Keeps the first commit of every window of ``n`` training steps (by the ``step`` in
    the commit's metadata): with ``n=1000``, steps 0, 1000, 2000… or the earliest commit
    after each. Commits without a step are not selected."""

    n: int

    def __post_init__(self) -> None:
        if type(self.n) is not int or self.n < 1:
            raise InvalidOption("KeepEveryNSteps.n", f"must be a positive int, not {self.n!r}")

    def unmatched(self, histories: Sequence[Sequence[CommitInfo]]) -> list[str]:
        if not any(c.step is not None for h in histories for c in h):
            return [f"KeepEveryNSteps({self.n}) matches no commit: none has an int metadata['step']"]
        return []

    def select(self, history: Sequence[CommitInfo], *, now_s: float) -> set[str]:
        first: dict[int, CommitInfo] = {}
        for c in history:
            if c.step is None:
                continue
            window = c.step // self.n
            held = first.get(window)
            if held is None or (c.step, c.created_at_s) < (held.step, held.created_at_s):
                first[window] = c
        return {c.id for c in first.values()}


@dataclass(frozen=True)
class KeepNewerThan(Rule):
    """Keeps the commits created less than ``max_age_s`` seconds ago."""

    max_age_s: float

    def __post_init__(self) -> None:
        if not self.max_age_s >= 0:
            raise InvalidOption("KeepNewerThan.max_age_s", f"must be non-negative, not {self.max_age_s!r}")

    def select(self, history: Sequence[CommitInfo], *, now_s: float) -> set[str]:
        return {c.id for c in history if now_s - c.created_at_s < self.max_age_s}


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What to keep of a branch.

    ``keep``: the commits to keep (``None`` keeps them all). ``demote``: key-path prefixes
    (``"optimizer"``) dropped from kept commits that ``keep_whole`` does not select (``None``:
    none is kept whole); a demoted commit keeps its id and its other components.
    ``max_total_bytes``: after the rules, drop the oldest kept commits (never a branch head
    or tagged commit) until the objects the policy's commits need fit in this many bytes.
    """

    keep: Rule | None = None
    demote: tuple[str, ...] = ()
    keep_whole: Rule | None = None
    max_total_bytes: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.demote, str):
            object.__setattr__(self, "demote", (self.demote,))
        object.__setattr__(self, "demote", tuple(p.strip("/") for p in self.demote))
        if any(not p for p in self.demote):
            raise InvalidOption("Policy.demote", "prefixes must be non-empty key paths such as 'optimizer'")
        if self.max_total_bytes is not None and self.max_total_bytes < 0:
            raise InvalidOption("Policy.max_total_bytes", f"must be non-negative, not {self.max_total_bytes!r}")

    def resolved(self, *, best_metric: str, greater_is_better: bool | None) -> Policy:
        """This policy with the store's settings filled in (see :meth:`Rule.resolved`)."""

        def fill(rule: Rule | None) -> Rule | None:
            return None if rule is None else rule.resolved(best_metric=best_metric, greater_is_better=greater_is_better)

        return Policy(keep=fill(self.keep), demote=self.demote, keep_whole=fill(self.keep_whole), max_total_bytes=self.max_total_bytes)

    def unmatched(self, histories: Sequence[Sequence[CommitInfo]]) -> list[str]:
        """Why a rule of this policy can match no commit of these histories (see
        :meth:`Rule.unmatched`)."""
        return [why for rule in (self.keep, self.keep_whole) if rule is not None for why in rule.unmatched(histories)]

    def select(self, history: Sequence[CommitInfo], *, now_s: float) -> tuple[set[str], set[str]]:
        """``(kept, kept_whole)`` for one branch's history, before the size budget."""
        kept = {c.id for c in history} if self.keep is None else self.keep.select(history, now_s=now_s)
        if not self.demote:
            return kept, set(kept)
        whole = set() if self.keep_whole is None else self.keep_whole.select(history, now_s=now_s)
        return kept, kept & whole


#: What ``Store.gc`` accepts: one policy (or rule) for every branch, or branch-name patterns
#: (``fnmatch``; the first match wins) to policies. Branches that no pattern matches keep
#: everything.
Retention = Policy | Rule | Mapping[str, Policy | Rule] | None


def as_policy(value: Policy | Rule) -> Policy:
    if isinstance(value, Policy):
        return value
    if isinstance(value, Rule):
        return Policy(keep=value)
    raise InvalidOptionType("retention", f"expected a retention Policy or Rule, not {type(value).__name__}")


def policy_for(retention: Retention, branch: str) -> Policy | None:
    """The policy that governs ``branch`` (``None``: keep its whole history)."""
    if retention is None:
        return None
    if isinstance(retention, (Policy, Rule)):
        return as_policy(retention)
    for pattern, policy in retention.items():
        if fnmatch.fnmatchcase(branch, pattern):
            return as_policy(policy)
    return None
