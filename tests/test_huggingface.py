"""The transformers Trainer integration: a real Trainer on a tiny GPT-2 built from a config
commits at every save, moves ``best`` by ``metric_for_best_model``, and a second Trainer
resumes from the store with the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

import transformers

import ckptstore
from ckptstore.formats.pt import load_weights_only
from ckptstore.integrations.huggingface import CkptStoreCallback, materialize

MAX_STEPS = 12
SAVE_STEPS = 4
STOP_AT = 8
SEQ = 16
SETTINGS = {
    "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "eval_strategy": "steps", "eval_steps": SAVE_STEPS,
    "logging_steps": 1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "learning_rate": 3e-3,
    "metric_for_best_model": "eval_loss", "seed": 0, "use_cpu": True, "report_to": [], "dataloader_num_workers": 0,
    "dataloader_pin_memory": False, "disable_tqdm": True,
}  # fmt: skip


class Tokens(torch.utils.data.Dataset):
    """Deterministic random token sequences; 40 of them make 10 steps an epoch at batch 4,
    so the resume at step 8 skips batches mid-epoch and the run then crosses an epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, 64, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAfterSave(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _trainer(output_dir, callbacks, **overrides) -> transformers.Trainer:
    transformers.set_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)  # dropout 0.1
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(output_dir=str(output_dir), **{**SETTINGS, **overrides})
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(40, seed=1), eval_dataset=Tokens(16, seed=2), callbacks=callbacks)


def _by_step(trainer: transformers.Trainer, key: str) -> dict[int, float]:
    return {e["step"]: e[key] for e in trainer.state.log_history if key in e}


def test_trainer_commits_moves_best_and_resumes_exactly(tmp_path):
    # Run A: uninterrupted, lower eval_loss is better.
    store_a = ckptstore.open(str(tmp_path / "store-a"))
    callback_a = CkptStoreCallback(store_a)
    trainer_a = _trainer(tmp_path / "a", [callback_a], greater_is_better=False)
    trainer_a.train()
    losses_a, evals_a = _by_step(trainer_a, "loss"), _by_step(trainer_a, "eval_loss")
    assert sorted(losses_a) == list(range(1, MAX_STEPS + 1)) and sorted(evals_a) == [4, 8, 12]

    history = store_a.log()[::-1]
    assert [c.metadata["step"] for c in history] == [4, 8, 12] == [c.metadata["step"] for c in callback_a.commits]
    for commit in history:
        step = commit.metadata["step"]
        assert commit.message == f"checkpoint-{step}"
        assert commit.metrics["eval_loss"] == evals_a[step] and commit.metrics["loss"] == losses_a[step]
        assert {"learning_rate", "grad_norm"} <= set(commit.metrics)
    best = min(history, key=lambda c: c.metrics["eval_loss"])
    assert store_a.resolve("best") == best.id and store_a.resolve("latest") == history[-1].id
    state = store_a.checkout("latest", exclude=["model", "optimizer"])
    assert set(state) == {"scheduler", "rng_state", "trainer_state", "files"}
    assert {"config.json", "training_args.bin"} <= set(state["files"]) and state["trainer_state"]["global_step"] == 12
    assert bytes(state["files"]["config.json"].numpy()) == (tmp_path / "a" / "checkpoint-12" / "config.json").read_bytes()

    # Run B: the same run stops after committing step 8, and its folders are deleted once
    # committed; `best` follows the highest eval_loss (greater_is_better=True), and
    # load_best_model_at_end keeps the best folder until training ends.
    store_b = ckptstore.open(str(tmp_path / "store-b"))
    trainer_b = _trainer(
        tmp_path / "b", [CkptStoreCallback(store_b, keep_checkpoint_dirs=False), StopAfterSave(STOP_AT)],
        greater_is_better=True, load_best_model_at_end=True,
    )  # fmt: skip
    trainer_b.train()
    assert trainer_b.state.global_step == STOP_AT
    assert not [n for n in os.listdir(tmp_path / "b") if n.startswith("checkpoint-")]
    assert [c.metadata["step"] for c in store_b.log()] == [8, 4]
    worst = max(store_b.log(), key=lambda c: c.metrics["eval_loss"])
    assert store_b.resolve("best") == worst.id and worst.metadata["step"] == 4  # eval_loss falls 4 -> 8

    # A fresh Trainer resumes from the store: checkpoint-8 and the best (model-only) folder.
    callback_c = CkptStoreCallback(store_b, keep_checkpoint_dirs=False)
    path = callback_c.materialize(str(tmp_path / "b"))
    assert path == str(tmp_path / "b" / "checkpoint-8")
    written = json.loads((tmp_path / "b" / "checkpoint-8" / "trainer_state.json").read_text())
    assert written["global_step"] == 8 and written["best_model_checkpoint"] == str(tmp_path / "b" / "checkpoint-4")
    assert os.path.exists(tmp_path / "b" / "checkpoint-4" / "model.safetensors")
    load_weights_only(os.path.join(path, "rng_state.pth"))  # what the Trainer loads, safely
    trainer_c = _trainer(tmp_path / "b", [callback_c], greater_is_better=True, load_best_model_at_end=True)
    trainer_c.train(resume_from_checkpoint=path)
    assert trainer_c.state.global_step == MAX_STEPS
    assert not [n for n in os.listdir(tmp_path / "b") if n.startswith("checkpoint-")]  # materialized ones too
    losses_c = _by_step(trainer_c, "loss")
    assert {s: losses_c[s] for s in range(STOP_AT + 1, MAX_STEPS + 1)} == {s: losses_a[s] for s in range(STOP_AT + 1, MAX_STEPS + 1)}
    assert _by_step(trainer_c, "eval_loss")[12] == evals_a[12]
    log_b = store_b.log()
    assert [c.metadata["step"] for c in log_b] == [12, 8, 4] and log_b[0].parents == (log_b[1].id,)
    assert log_b[0].metrics["eval_loss"] == evals_a[12] and store_b.resolve("best") == worst.id
    final_a = store_a.checkout("latest", include=["model", "optimizer"])
    final_c = store_b.checkout("latest", include=["model", "optimizer"])
    assert final_a["model"].keys() == final_c["model"].keys()
    assert all(torch.equal(final_a["model"][k], final_c["model"][k]) for k in final_a["model"])
    assert all(
        torch.equal(final_a["optimizer"]["state"][i][k], final_c["optimizer"]["state"][i][k])
        for i in final_a["optimizer"]["state"] for k in ("exp_avg", "exp_avg_sq")
    )  # fmt: skip
    # load_best_model_at_end loaded the materialized best (step 4) into the model.
    best_weights = store_b.checkout("best", include=["model"])["model"]
    model_c = trainer_c.model.state_dict()
    assert all(torch.equal(model_c[k], v) for k, v in best_weights.items())


def test_materialize_without_the_ref_and_from_an_older_commit(tmp_path, monkeypatch):
    assert materialize(ckptstore.open("memory://empty"), None, str(tmp_path)) is None
    store = ckptstore.open(str(tmp_path / "store"))
    assert CkptStoreCallback(store).materialize(str(tmp_path)) is None
    trainer = _trainer(tmp_path / "run", [CkptStoreCallback(store)], max_steps=SAVE_STEPS * 2)
    trainer.train()
    monkeypatch.setenv("CKPTSTORE_REF", "main~1")
    path = materialize(store, None, str(tmp_path / "restored"))
    assert path == str(tmp_path / "restored" / "checkpoint-4")
    original = tmp_path / "run" / "checkpoint-4"
    for name in ("config.json", "generation_config.json", "training_args.bin"):
        assert (tmp_path / "restored" / "checkpoint-4" / name).read_bytes() == (original / name).read_bytes(), name
    ours, theirs = (json.loads((d / "trainer_state.json").read_text()) for d in (tmp_path / "restored" / "checkpoint-4", original))
    assert theirs["best_model_checkpoint"] == str(original) and ours["best_model_checkpoint"] == path  # step 4 is the best
    assert {**ours, "best_model_checkpoint": None} == {**theirs, "best_model_checkpoint": None}
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        ours, theirs = load_weights_only(os.path.join(path, name)), load_weights_only(str(original / name))
        assert _same(ours, theirs), name


def _same(a, b) -> bool:
    """Equal values of the same types, tensors and arrays compared exactly."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "dtype") and hasattr(a, "shape"):  # numpy
        return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())
    return a == b
