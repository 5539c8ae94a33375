"""Importing a whole Trainer ``output_dir``: a real Trainer run with 6 checkpoints, evaluated at
each save, becomes 6 commits chained in step order, with ``metadata.step``, the metrics its
``trainer_state.json`` logged at each step, and ``best`` on ``best_model_checkpoint``; the
retention policy ``KeepBest(1)`` keeps that commit; what the checkpoints share is stored once.
The same through ``ckpt import OUTPUT_DIR``, and ``ckpt import`` of several paths."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
from click.testing import CliRunner

import ckptstore
from ckptstore import KeepBest
from ckptstore.cli import cli
from ckptstore.errors import RefExists

SEQ = 16
SAVES = 6
SAVE_STEPS = 2


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, 512, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(output_dir, *, max_steps: int, callbacks=()) -> transformers.Trainer:
    """The run's Trainer: only the last block's MLP and the final layer norm train (a fifth
    of the weights; eval_loss is lowest at step 8 and then turns back up)."""
    transformers.set_seed(0)
    config = transformers.GPT2Config(vocab_size=512, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith(("transformer.h.1.mlp", "transformer.ln_f"))
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, save_steps=SAVE_STEPS, eval_strategy="steps",
        eval_steps=SAVE_STEPS, logging_steps=1, metric_for_best_model="eval_loss", save_total_limit=None,
        per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=0.05, seed=0, use_cpu=True,
        report_to=[], dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True,
    )  # fmt: skip
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(48, seed=1), eval_dataset=Tokens(8, seed=2), callbacks=list(callbacks))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """A Trainer ``output_dir`` with checkpoint-2 ... checkpoint-12, each evaluated; what the
    checkpoints share is most of each (see :func:`_trainer`)."""
    output_dir = tmp_path_factory.mktemp("run") / "output"
    _trainer(output_dir, max_steps=SAVES * SAVE_STEPS).train()
    return str(output_dir)


def _trainer_state(run: str) -> dict:
    with open(os.path.join(run, f"checkpoint-{SAVES * SAVE_STEPS}", "trainer_state.json")) as f:
        return json.load(f)


def _logged(state: dict, step: int) -> dict[str, float]:
    return {k: float(v) for e in state["log_history"] if e.get("step") == step for k, v in e.items() if k not in ("step", "epoch")}


def test_import_run_makes_one_commit_per_checkpoint_with_metrics_and_best(tmp_path, run):
    steps = [SAVE_STEPS * (i + 1) for i in range(SAVES)]
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint-")) == sorted(f"checkpoint-{s}" for s in steps)
    state = _trainer_state(run)
    best_step = int(os.path.basename(state["best_model_checkpoint"]).split("-")[1])
    evals = {s: _logged(state, s)["eval_loss"] for s in steps}
    assert best_step == min(evals, key=evals.get) and best_step != steps[-1]  # the run is one where the best is not the newest

    # Tensors this small would be inlined into each manifest (64 KiB): store them as chunks.
    store = ckptstore.open(str(tmp_path / "store"), inline_threshold_bytes=256)
    commits = store.import_run(run, branch="trainer-run")
    assert [c.metadata["step"] for c in commits] == steps
    assert [c.message for c in commits] == [f"checkpoint-{s}" for s in steps]
    assert commits[0].parents == () and all(c.parents == (p.id,) for p, c in zip(commits, commits[1:]))
    assert [c.id for c in store.log("trainer-run")] == [c.id for c in reversed(commits)]
    for commit, step in zip(commits, steps):
        assert commit.metrics == _logged(state, step)
        assert {"loss", "eval_loss", "learning_rate", "grad_norm"} <= set(commit.metrics)
    by_step = dict(zip(steps, commits))
    assert store.resolve("best") == by_step[best_step].id

    # What the checkpoints share (the frozen four fifths of the weights, the config,
    # training_args.bin) is stored once: each later commit stores what training changed, the
    # MLP and its optimizer state, and reuses the rest.
    one = commits[0].stats.logical_bytes
    frozen = sum(
        t.nbytes
        for name, t in store.checkout(commits[0].id, include=["model"])["model"].items()
        if not name.startswith(("transformer.h.1.mlp", "transformer.ln_f"))
    )
    assert frozen > 0.5 * one
    assert all(c.stats.reused_bytes >= frozen and c.stats.new_bytes < 0.5 * one for c in commits[1:])
    assert store.du().physical_bytes < 3.5 * one  # not 6x

    # Retention keeps the best, and the head; the rest go.
    store.gc(KeepBest(1), grace_period_s=0)
    assert [c.metadata["step"] for c in store.log("trainer-run")] == [steps[-1], best_step]
    assert store.resolve("best") == by_step[best_step].id and store.fsck(read_data=True).ok

    # The branch has commits now: importing the run onto it again is refused unless asked.
    before = store.branches()
    with pytest.raises(RefExists, match="trainer-run"):
        store.import_run(run, branch="trainer-run")
    assert store.branches() == before
    again = store.import_run(run, branch="trainer-run", append=True)
    assert again[0].parents == (commits[-1].id,) and [c.metadata["step"] for c in again] == steps
    assert all(c.stats.new_chunks == 0 for c in again if c.metadata["step"] in (best_step, steps[-1]))  # kept: all there


def test_ckpt_import_takes_an_output_dir_and_several_paths(tmp_path, run):
    url = str(tmp_path / "store")
    runner = CliRunner()
    result = runner.invoke(cli, ["--store", url, "import", run, "--branch", "run-1", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    made = json.loads(result.output)
    assert [c["step"] for c in made] == [SAVE_STEPS * (i + 1) for i in range(SAVES)]
    assert [c["metrics"]["eval_loss"] for c in made] == [_logged(_trainer_state(run), c["step"])["eval_loss"] for c in made]

    # Two paths, in order: two checkpoint folders go onto one branch as two commits.
    first, second = os.path.join(run, "checkpoint-4"), os.path.join(run, "checkpoint-8")
    result = runner.invoke(cli, ["--store", url, "import", first, second, "--branch", "picked", "--tag", "picked-last"])
    assert result.exit_code == 0, result.output
    store = ckptstore.open(url, create=False)
    log = store.log("picked")
    assert [c.metadata["step"] for c in log] == [8, 4] and log[0].parents == (log[1].id,)
    assert log[0].metrics == _logged(_trainer_state(run), 8) and store.resolve("picked-last") == log[0].id
    assert len(result.output.strip().splitlines()) == 2

    # A run after another path, or onto a branch with commits, needs --append; nothing is imported otherwise.
    heads = store.branches()
    for args in ([first, run, "--branch", "fresh"], [run, "--branch", "run-1"]):
        result = runner.invoke(cli, ["--store", url, "import", *args])  # main() prints it as "ckpt: error: ...", exit 1
        assert isinstance(result.exception, RefExists) and "--append" in str(result.exception)
    assert ckptstore.open(url, create=False).branches() == heads
    result = runner.invoke(cli, ["--store", url, "import", first, run, "--branch", "fresh", "--append"])
    assert result.exit_code == 0, result.output
    assert [c.metadata["step"] for c in ckptstore.open(url, create=False).log("fresh")][::-1] == [4] + [SAVE_STEPS * (i + 1) for i in range(SAVES)]


def test_a_migrated_run_goes_on_training_from_the_store_as_from_its_folders(tmp_path, run):
    """After import_run, the Hugging Face callback resumes the imported branch's head and the
    run goes on exactly as it would from its own last ``checkpoint-N`` folder; its commits
    chain onto the imported history."""
    from ckptstore.integrations.huggingface import CkptStoreCallback

    last = SAVES * SAVE_STEPS
    store = ckptstore.open(str(tmp_path / "store"))
    imported = store.import_run(run, branch="migrated")
    callback = CkptStoreCallback(store, branch="migrated")
    resumed = _trainer(tmp_path / "resumed", max_steps=last + 2 * SAVE_STEPS, callbacks=[callback])
    folder = callback.materialize(str(tmp_path / "resumed"))
    assert folder is not None and folder.endswith(f"checkpoint-{last}")
    resumed.train(resume_from_checkpoint=folder)

    straight = _trainer(tmp_path / "straight", max_steps=last + 2 * SAVE_STEPS)
    straight.train(resume_from_checkpoint=os.path.join(run, f"checkpoint-{last}"))

    a, b = resumed.model.state_dict(), straight.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [c.metadata["step"] for c in callback.commits] == [last + SAVE_STEPS, last + 2 * SAVE_STEPS]
    assert callback.commits[0].parents == (imported[-1].id,)
    losses = lambda trainer: [e["loss"] for e in trainer.state.log_history if "loss" in e and e["step"] > last]  # noqa: E731
    assert losses(resumed) == losses(straight) and len(losses(resumed)) == 2 * SAVE_STEPS
