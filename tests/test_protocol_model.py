"""The writer/collector protocol, checked exhaustively (the model: tests/protocol_model.py).

ef55ec3's protocol shows defects 1, 3, 4 and 5 of issue 16, each with only the environment step
it needs and of the kind expected; the new protocol shows none with every environment step on;
and each mechanism of the new protocol, set back to ef55ec3's, brings its defect back, so each
is what closes it. The new protocol exactly as first specified has the violations this model
found (docs/protocol-model.md), each closed by one amendment.

``CKPTSTORE_SOAK=1`` adds the larger configurations (every pid namespace assignment, two writers,
two collectors, two-chunk commits in batches of two). ``python tests/protocol_model.py`` runs the
same checks and prints their state counts.
"""

from __future__ import annotations

from dataclasses import fields

import protocol_model as pm
import pytest
from soak import SOAK

CHECKS = pm.checks(soak=SOAK)


def _select(prefix: str, *, expect_violation: bool) -> list[pm.Check]:
    return [c for c in CHECKS if c.name.startswith(prefix) and (c.expect is not None) == expect_violation]


def _run(c: pm.Check) -> pm.Result:
    result = pm.check(c.protocol, c.config)
    print(f"{c.name}: {result.summary()}")
    return result


def _assert_counterexample(c: pm.Check, result: pm.Result) -> None:
    assert result.violation is not None, f"{c.name}: no counterexample in {result.states:,} states"
    found = pm.kinds(result)
    assert c.expect in found, f"{c.name}: expected a counterexample showing {c.expect!r}, got {sorted(found)}:\n{result.trace()}"
    assert "undecided" not in found, f"{c.name}: the counterexample relies on an age the cap leaves undecided:\n{result.trace()}"


@pytest.mark.parametrize("c", _select("ef55ec3, defect", expect_violation=True), ids=lambda c: c.name)
def test_old_protocol_has_the_defect(c: pm.Check) -> None:
    _assert_counterexample(c, _run(c))


def test_old_protocol_without_any_defect_trigger_is_clean() -> None:
    """The control: ef55ec3 with no delta, one pid namespace, no skew and no DCP finds
    nothing, so each defect above comes from its own trigger."""
    (c,) = _select("ef55ec3 without", expect_violation=False)
    result = _run(c)
    assert result.violation is None, result.trace()
    assert result.states > 100


def test_old_defect_traces_are_of_their_kind() -> None:
    """Defect 3 puts writer and collector in different pid namespaces, defect 4 skews a clock,
    defect 5 has the rank release its marker before the coordinator publishes, and defect 1
    needs none of these: each counterexample shows its own cause and no other."""
    causes = {"namespaces", "skew", "rank released", "reused broken delta"}
    for c in _select("ef55ec3, defect", expect_violation=True):
        found = pm.kinds(_run(c)) & causes
        assert found == {c.expect}, f"{c.name}: {sorted(found)}"


@pytest.mark.slow
@pytest.mark.parametrize("c", _select("new:", expect_violation=False) + _select("soak, new:", expect_violation=False), ids=lambda c: c.name)
def test_new_protocol_has_no_violation(c: pm.Check) -> None:
    result = _run(c)
    assert result.violation is None, result.trace()
    assert result.states > c.min_states, f"{c.name}: only {result.states:,} states: the model explores less than it should"


@pytest.mark.parametrize("c", _select("new, ", expect_violation=True), ids=lambda c: c.name)
def test_each_new_mechanism_closes_its_defect(c: pm.Check) -> None:
    """One mechanism of the new protocol set back to ef55ec3's (or, for the chain check and
    the amendments, to the protocol as first written) brings its counterexample back."""
    _assert_counterexample(c, _run(c))


def test_every_new_mechanism_is_shown_necessary() -> None:
    flipped = {f.name for c in CHECKS if c.name.startswith("new, ") for f in fields(pm.Protocol) if getattr(c.protocol, f.name) != getattr(pm.NEW, f.name)}
    mechanisms = {f.name for f in fields(pm.Protocol) if getattr(pm.NEW, f.name) != getattr(pm.OLD, f.name)}
    assert flipped == mechanisms


@pytest.mark.parametrize("c", _select("as written:", expect_violation=True), ids=lambda c: c.name)
def test_protocol_as_first_written_has_the_violations_found(c: pm.Check) -> None:
    _assert_counterexample(c, _run(c))


def test_structural_invariant_as_stated_fails_for_late_writes() -> None:
    """ "An object that exists has every object it needs" cannot hold for what a writer writes
    after a collector gave up on it (its chunk and commit writes are not fenced, only its
    ref update): such objects are garbage, spared by the structural check."""
    (c,) = _select("as stated", expect_violation=True)
    _assert_counterexample(c, _run(c))


def test_split_pid_namespaces_add_no_state_to_the_new_protocol() -> None:
    """With the new identity rule another pid namespace only takes "known dead" away (the
    judge waits for staleness instead), so every state reachable with the writer and the
    collector in different namespaces is reachable in one: the one-namespace checks cover
    both. Both walks are complete, so the split one is itself checked clean."""
    config = pm.Config(pm.OLD_STATE, pm.OLD_TWO, lost_answers=0, check_structure=True)
    one = pm.reachable(pm.NEW, config, (0, 0), (0, 0))
    split = pm.reachable(pm.NEW, config, (0, 1), (0, 0))
    print(f"one namespace: {len(one):,} states; split: {len(split):,}")
    assert len(split) > 5_000
    assert split <= one
    model = pm.Model(pm.NEW, config, (0, 1), (0, 0))
    assert all(model.store_problem(s.store) is None for s in split)


def test_wall_clock_skew_changes_nothing_in_the_new_protocol() -> None:
    """No step of the new protocol reads a wall clock: skewing the clocks by more than the
    ttl, either way, reaches exactly the same states."""
    config = pm.Config(pm.OLD_STATE, pm.OLD_TWO, crashes=0, lost_answers=0)
    plain = pm.reachable(pm.NEW, config, (0, 0), (0, 0))
    assert len(plain) > 1_000
    assert pm.reachable(pm.NEW, config, (0, 0), (3, -3)) == plain
    assert pm.reachable(pm.NEW, config, (0, 0), (-3, 3)) == plain


def test_a_counterexample_reads_as_a_trace() -> None:
    """Numbered steps, each followed by the store and every process after it."""
    (c,) = [c for c in CHECKS if c.name.startswith("ef55ec3, defect 3")]
    text = _run(c).trace()
    lines = text.splitlines()
    assert lines[0] == "the branch head W.0 is not readable"
    assert "W in pid namespace 0" in lines[2] and "G in pid namespace 1" in lines[2]
    assert lines[3] == "  0. start" and lines[4].lstrip().startswith("t=0 head=C2 chunks: a x;")
    assert any("G: lists markers: W#0 abandoned" in line for line in lines)
    assert lines[-2].startswith(" ") and "G: deletes chunk a" in lines[-2]
