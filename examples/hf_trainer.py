"""Train a tiny GPT-2 with the Hugging Face Trainer, commit every save to a store, and resume
from the store when rerun.

    pip install -e '.[huggingface]'
    python examples/hf_trainer.py ckpts-hf --steps 24 --stop-after 12   # stops after step 12's commit
    python examples/hf_trainer.py ckpts-hf --steps 24                   # resumes at step 12 from the store
    ckpt --store ckpts-hf log --oneline

The model is built from a config (nothing is downloaded) and the data are random token
sequences. Checkpoint folders are deleted once committed, so a rerun really resumes from the
store: ``materialize`` writes the branch's head (or ``$CKPTSTORE_REF``) back as a ``checkpoint-N``
folder for ``trainer.train(resume_from_checkpoint=...)``. The losses after a resume are the
ones an uninterrupted run logs, dropout and shuffling included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch
import transformers

import ckptstore
from ckptstore.integrations.huggingface import CkptStoreCallback

SEQ = 32


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        # A learnable pattern: each sequence counts up from a random start, modulo the vocabulary.
        start = torch.randint(0, 128, (n, 1), generator=g)
        self.ids = (start + torch.arange(SEQ)) % 128

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAfter(transformers.TrainerCallback):
    """Simulates an interrupted job: stops training after the save at ``step``."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def print_log(store: ckptstore.Store) -> None:
    """Like ``ckpt log --oneline``: newest first, with the refs that point at each commit."""
    names: dict[str, list[str]] = {}
    for name, commit_id in store.branches().items():
        names.setdefault(commit_id, []).append(name)
    for name, commit_id in store.tags().items():
        names.setdefault(commit_id, []).append(f"tag: {name}")
    for c in store.log():
        refs = f" ({', '.join(names[c.id])})" if c.id in names else ""
        shown = " ".join(f"{k}={c.metrics[k]:.4f}" for k in ("loss", "eval_loss") if k in c.metrics)
        print(f"{c.short_id}{refs} step {c.metadata.get('step')} {shown} [{c.stats.new_bytes / 1e6:.2f} MB new]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store", nargs="?", default=os.environ.get("CKPTSTORE_URL", "ckpts-hf"))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--save-steps", type=int, default=6)
    parser.add_argument("--stop-after", type=int, default=None, help="stop after the save of this step (an interrupted job)")
    parser.add_argument("--output-dir", default=None, help="the Trainer's output_dir (default: a temporary directory)")
    args = parser.parse_args()

    store = ckptstore.open(args.store)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="hf-trainer-")
    transformers.set_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    training_args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=args.steps, save_steps=args.save_steps, eval_strategy="steps",
        eval_steps=args.save_steps, logging_steps=args.save_steps, per_device_train_batch_size=8,
        learning_rate=2e-3, metric_for_best_model="eval_loss", greater_is_better=False, seed=0, use_cpu=True,
        report_to=[], dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True,
    )  # fmt: skip
    callback = CkptStoreCallback(store, keep_checkpoint_dirs=False)
    trainer = transformers.Trainer(
        model=model, args=training_args, train_dataset=RandomTokens(256, seed=1), eval_dataset=RandomTokens(32, seed=2),
        callbacks=[callback, StopAfter(args.stop_after)],
    )  # fmt: skip

    resume = callback.materialize(output_dir)  # None when the branch has no commit yet
    done = store.commit_of(callback.ref).metadata["step"] if resume else 0
    if done >= args.steps:  # a Trainer resumed at max_steps would still take one more step
        print(f"{callback.ref} is already at step {done}: nothing to train\n")
    else:
        print(f"resuming from {resume}" if resume else f"starting fresh; committing to {store.url}", flush=True)
        trainer.train(resume_from_checkpoint=resume)
        print(f"stopped at step {trainer.state.global_step} of {args.steps}; {len(callback.commits)} commits this run\n")
    print_log(store)
    best = store.commit_of("best")
    print(f"\nbest: {best.short_id} at step {best.metadata['step']} (eval_loss {best.metrics['eval_loss']:.4f})")
    if args.output_dir is None:
        shutil.rmtree(output_dir, ignore_errors=True)  # the store holds every checkpoint


if __name__ == "__main__":
    main()
