"""Training integration: bit-exact resume after SIGKILL, RNG capture, auto-resume."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import ckptstore
from ckptstore.integrations.training import Checkpointer, ResumableRandomSampler, capture_rng_state, restore_rng_state

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_resume.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_killed_and_resumed_run_is_bitwise_identical_to_a_straight_run(tmp_path):
    """Losses at every step and the final weights, with dropout and a shuffled loader."""
    straight = _run("straight", "--steps", "24", "--save-every", "4", "--log", "straight.jsonl", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    killed = _run("resumed", "--steps", "24", "--save-every", "4", "--kill-after", "12", "--log", "resumed.jsonl", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # a real SIGKILL, right after the commit
    assert "step 12:" in killed.stdout and "step 16:" not in killed.stdout
    again = _run("resumed", "--steps", "24", "--save-every", "4", "--log", "resumed.jsonl", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed at step 12" in again.stdout
    a = [json.loads(line) for line in (tmp_path / "straight.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == list(range(1, 25)) == [r["step"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exact floats, every step
    with ckptstore.open(str(tmp_path / "straight"), create=False) as s1, ckptstore.open(str(tmp_path / "resumed"), create=False) as s2:
        w1, w2 = s1.checkout("latest"), s2.checkout("latest")
        for name in ("model", "optimizer", "scheduler", "sampler"):
            assert repr(w1[name].keys()) == repr(w2[name].keys())
        for key, t in w1["model"].items():
            assert torch.equal(t.view(torch.uint8), w2["model"][key].view(torch.uint8)), key
        assert w1["sampler"] == w2["sampler"] and w1["step"] == w2["step"] == 24


def test_rng_states_round_trip_through_a_store():
    store = ckptstore.open("memory://rng")
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    store.commit({"rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(store.checkout()["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_resume_on_an_empty_store_starts_fresh_and_changes_nothing():
    store = ckptstore.open("memory://fresh-start")
    model = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = Checkpointer(store, model=model)
    assert run.resume() == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_reads_the_ref_and_branch_from_the_environment(monkeypatch):
    store = ckptstore.open("memory://env-resume")
    model = torch.nn.Linear(3, 2)
    run = Checkpointer(store, model=model)
    run.user["note"] = "first"
    first = run.save(5)
    with torch.no_grad():
        model.weight.add_(1)
    run.save(10)
    store.tag("good", at=first.id)
    monkeypatch.setenv("CKPTSTORE_REF", "good")
    monkeypatch.setenv("CKPTSTORE_BRANCH", "retry")
    fresh = torch.nn.Linear(3, 2)
    other = Checkpointer(store, model=fresh)
    assert other.resume() == 5 and other.user == {"note": "first"}
    assert torch.equal(fresh.weight, store.checkout(first.id)["model"]["weight"])
    commit = other.save(6)
    assert commit.branch == "retry" and store.branches()["retry"] == commit.id
    assert commit.metadata["step"] == 6


def test_sampler_resumes_mid_epoch():
    data = list(range(10))
    a = ResumableRandomSampler(data, seed=7)
    it = iter(a)
    head = [next(it) for _ in range(4)]
    b = ResumableRandomSampler(data, seed=0)
    b.load_state_dict(a.state_dict())
    rest_a, rest_b = list(it), list(iter(b))
    assert rest_a == rest_b and sorted(head + rest_a) == data
    assert list(iter(a)) == list(iter(b)) != head + rest_a  # the next epoch: same, reshuffled


def test_from_env_opens_the_store_named_by_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CKPTSTORE_URL", str(tmp_path / "from-env"))
    model = torch.nn.Linear(2, 2)
    run = Checkpointer.from_env(model=model)
    run.save(3)
    again = Checkpointer.from_env(model=torch.nn.Linear(2, 2))
    assert again.store.url == str(tmp_path / "from-env") and again.resume() == 3


def test_the_former_module_names_are_the_same_modules():
    """``ckptstore.training`` and ``ckptstore.distributed``, the names before the move into
    ``integrations/``, still import, as the very same modules (one set of classes)."""
    import ckptstore.distributed
    import ckptstore.integrations.distributed
    import ckptstore.integrations.training
    import ckptstore.training
    from ckptstore.distributed import StoreWriter
    from ckptstore.training import Checkpointer as Former

    assert ckptstore.training is ckptstore.integrations.training and Former is Checkpointer
    assert ckptstore.distributed is ckptstore.integrations.distributed and StoreWriter is ckptstore.integrations.distributed.StoreWriter
