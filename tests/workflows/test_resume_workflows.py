"""Resuming, as relaunched jobs do it, in real processes: a Hugging Face Trainer killed by
SIGKILL mid-run and relaunched from the store is bit-exact against an uninterrupted run; two
branches committing alternately each resume their own head although ``latest`` points at the
other's newer commit; ``Checkpointer.from_env`` creates no store to resume from; and a plain
quick-start commit and a ``Checkpointer`` commit resume each other."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore.errors import ComponentsUnavailable, StoreNotFound
from ckptstore.integrations.training import Checkpointer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from checkpointer_child import weights_digest  # noqa: E402

ENV_NAMES = ("CKPTSTORE_URL", "CKPTSTORE_REF", "CKPTSTORE_BRANCH")


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    return {**env, **settings}


def _run(script: str, *args: str, env: dict[str, str] | None = None, timeout_s: float = 180) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, str(HERE / script), *args], env=env or _env(), capture_output=True, text=True, timeout=timeout_s)
    assert run.returncode == 0, f"{script} {args} failed:\n{run.stderr[-4000:]}"
    return run


def _by_step(log_history: list[dict], key: str) -> dict[int, float]:
    return {e["step"]: e[key] for e in log_history if key in e}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# -- the Trainer, killed by SIGKILL mid-run and relaunched ----------------------------------


def test_trainer_killed_mid_run_resumes_its_branch_bit_exact(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    straight_url, killed_url = str(tmp_path / "straight"), str(tmp_path / "killed")
    child = [sys.executable, str(HERE / "trainer_child.py")]
    straight = subprocess.Popen([*child, straight_url, str(tmp_path / "out-straight"), str(tmp_path / "straight.json")], env=_env(), stderr=subprocess.PIPE, text=True)  # fmt: skip
    killed = subprocess.Popen([*child, killed_url, str(tmp_path / "out-killed"), str(tmp_path / "killed.json"), "--step-delay-s", "0.5"], env=_env(), stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        # Kill the job once its first commit has landed on its branch, mid-run.
        deadline = time.monotonic() + 150
        while killed.poll() is None and time.monotonic() < deadline:
            try:
                with ckptstore.open(killed_url, create=False) as store:
                    if "main" in store.branches():
                        break
            except StoreNotFound:
                pass
            time.sleep(0.1)
        os.kill(killed.pid, signal.SIGKILL)
        assert killed.wait(timeout=30) == -signal.SIGKILL
        _, err = straight.communicate(timeout=180)
        assert straight.returncode == 0, err[-4000:]
    finally:
        for proc in (straight, killed):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not (tmp_path / "killed.json").exists()  # it never finished

    with ckptstore.open(killed_url, create=False) as store:
        head = store.commit_of("main")
        landed = head.metadata["step"]
        assert landed in (4, 8), "killed before its first commit, or after its last"
        # Another job forks and commits a different state: `latest` now points at the sweep.
        store.branch("lr-sweep", at="main")
        sweep = store.checkout("main")
        sweep["model"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in sweep["model"].items()}
        sweep_commit = store.commit(sweep, branch="lr-sweep", message="sweep", metadata={"step": landed})
        assert store.resolve("latest") == sweep_commit.id != head.id

    # Relaunched on a new machine (a fresh output_dir): the callback materializes main's head.
    _run("trainer_child.py", killed_url, str(tmp_path / "out-relaunched"), str(tmp_path / "relaunched.json"), "--resume")
    relaunched = json.loads((tmp_path / "relaunched.json").read_text())
    straight_result = json.loads((tmp_path / "straight.json").read_text())
    assert relaunched["resumed_from"] == str(tmp_path / "out-relaunched" / f"checkpoint-{landed}")
    assert relaunched["global_step"] == straight_result["global_step"] == 12
    for key in ("loss", "grad_norm", "learning_rate", "eval_loss"):
        expected = _by_step(straight_result["log_history"], key)
        assert expected and _by_step(relaunched["log_history"], key) == expected, key  # exact floats, every step

    with ckptstore.open(straight_url, create=False) as a, ckptstore.open(killed_url, create=False) as b:
        assert [c.metadata["step"] for c in b.log("main")] == [12, 8, 4] == [c.metadata["step"] for c in a.log("main")]
        final_a = a.checkout("main", include=["model", "optimizer"])
        final_b = b.checkout("main", include=["model", "optimizer"])
        assert final_a["model"].keys() == final_b["model"].keys()
        for name, tensor in final_a["model"].items():
            assert _same_bits(tensor, final_b["model"][name]), name
        for index, moments in final_a["optimizer"]["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                assert _same_bits(moments[name], final_b["optimizer"]["state"][index][name]), (index, name)
        assert b.resolve("lr-sweep") == sweep_commit.id  # the sweep is untouched


# -- two branches committing alternately, each job restarted ---------------------------------


def test_two_branches_committing_alternately_each_resume_their_own_head(tmp_path):
    url = str(tmp_path / "store")
    runs = [("main", "1e-2", 4), ("lr-sweep", "1e-3", 6), ("main", "1e-2", 4), ("lr-sweep", "1e-3", 6), ("main", "1e-2", 4)]
    for i, (branch, lr, steps) in enumerate(runs):
        if i == 1:
            with ckptstore.open(url, create=False) as store:
                store.branch("lr-sweep", at="main")  # the sweep forks from main's head
        expected_step, expected_weights = 0, None
        if i > 0:
            with ckptstore.open(url, create=False) as store:
                head = store.commit_of(branch)
                expected_step = head.metadata["step"]
                expected_weights = weights_digest(store.checkout(head.id, include=["model"])["model"])
                if i > 1:  # the other job committed last: `latest` is not this branch's head
                    assert store.resolve("latest") != head.id and store.commit_of("latest").metadata["step"] != expected_step
        result_path = tmp_path / f"run-{i}.json"
        _run(
            "checkpointer_child.py",
            str(result_path),
            "--steps",
            str(steps),
            "--lr",
            lr,
            env=_env(CKPTSTORE_URL=url, CKPTSTORE_BRANCH=branch),
        )
        result = json.loads(result_path.read_text())
        assert result["branch"] == branch and result["resumed_at"] == expected_step, (i, result)
        if expected_weights is not None:
            assert result["restored"] == expected_weights, f"run {i} on {branch} restored other weights than its head's"
        with ckptstore.open(url, create=False) as store:
            new_head = store.commit_of(branch)
            assert new_head.metadata["step"] == expected_step + steps and new_head.metadata["lr"] == float(lr)
            assert store.resolve("latest") == new_head.id
            assert weights_digest(store.checkout(branch, include=["model"])["model"]) == result["final"]
            if i > 0:
                assert head.id in {c.id for c in store.log(branch)}  # committed on top of its own head
    with ckptstore.open(url, create=False) as store:
        assert [c.metadata["step"] for c in store.log("main")] == [12, 10, 8, 6, 4, 2]
        assert [c.metadata["step"] for c in store.log("lr-sweep")] == [16, 14, 12, 10, 8, 6, 4, 2]


# -- no silent fresh starts ------------------------------------------------------------------


def test_from_env_on_a_missing_store_creates_nothing_until_the_first_save(tmp_path):
    url = str(tmp_path / "typo" / "ckpts")
    env = _env(CKPTSTORE_URL=url, CKPTSTORE_BRANCH="main")
    fresh = _run("checkpointer_child.py", str(tmp_path / "fresh.json"), "--steps", "1", "--lr", "1e-2", "--save-every", "2", env=env)
    assert json.loads((tmp_path / "fresh.json").read_text())["resumed_at"] == 0
    assert f"no store at {url}: starting fresh" in fresh.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.json"]  # not even the parent directory
    _run("checkpointer_child.py", str(tmp_path / "saved.json"), "--steps", "2", "--lr", "1e-2", "--save-every", "2", env=env)
    with ckptstore.open(url, create=False) as store:
        assert store.commit_of("main").metadata["step"] == 2
    again = _run("checkpointer_child.py", str(tmp_path / "again.json"), "--steps", "2", "--lr", "1e-2", env=env)
    assert json.loads((tmp_path / "again.json").read_text())["resumed_at"] == 2 and "no store at" not in again.stderr


# -- the README quick-start's commits and Checkpointer's resume each other -------------------


def _parts() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    sched = torch.optim.lr_scheduler.LinearLR(opt)
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_quickstart_commit_and_checkpointer_resume_each_other(tmp_path, caplog):
    store = ckptstore.open(str(tmp_path / "ckpts"))
    model, opt, sched = _parts()
    store.commit({"model": model, "optimizer": opt, "scheduler": sched, "step": 100}, message="step 100", branch="main", metadata={"step": 100})

    # Checkpointer resumes the quick-start's commit; the RNGs are left alone, and it says so.
    fresh, fresh_opt, fresh_sched = _parts()
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="ckptstore.training"):
        run = Checkpointer(store, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
        assert run.resume() == 100 and run.user == {}
    assert torch.equal(torch.get_rng_state(), rng)
    assert "has no RNG states" in caplog.text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert fresh_sched.state_dict() == sched.state_dict()
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    # Without a `step` component the step comes from the metadata.
    store.commit({"model": model}, branch="plain", metadata={"step": 30})
    assert Checkpointer(store, branch="plain", model=fresh).resume() == 30

    # A plain checkout reads a Checkpointer commit under the same names.
    trained, trained_opt, _ = _parts()
    Checkpointer(store, model=trained, optimizer=trained_opt).save(101)
    state = store.checkout("main")
    assert state["step"] == 101 and set(state) >= {"model", "optimizer", "rng", "user"}
    plain = torch.nn.Linear(6, 3)
    plain.load_state_dict(state["model"])
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in plain.state_dict().items())
    store.restore("main", {"model": plain, "optimizer": torch.optim.AdamW(plain.parameters())})

    # A named component the commit lacks fails clearly, and nothing is restored.
    store.commit({"optimizer": opt, "step": 5}, branch="no-model")
    target, target_opt, _ = _parts()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ComponentsUnavailable, match="has no component 'model'; it has 'optimizer', 'step'") as info:
        Checkpointer(store, branch="no-model", model=target, optimizer=target_opt).resume()
    assert info.value.missing == ["model"]
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    store.close()
