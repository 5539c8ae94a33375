"""A Hugging Face Trainer job, as a user would write it, for the resume workflow tests.

    python trainer_child.py STORE OUTPUT_DIR RESULT_JSON [--resume] [--step-delay-s S]

A tiny GPT-2 built from a config (dropout on) trains for 12 steps, saving (and so committing
through ``CkptStoreCallback`` to ``$CKPTSTORE_BRANCH``, else the store's default branch)
every 4. With ``--resume`` it first materializes the callback's ref and passes it as
``resume_from_checkpoint``, as a relaunched job does. ``--step-delay-s`` sleeps after each
step, so that a parent can kill the job mid-run. At the end it writes the Trainer's
``log_history`` and the checkpoint it resumed from to RESULT_JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers

import ckptstore
from ckptstore.integrations.huggingface import CkptStoreCallback

MAX_STEPS = 12
SAVE_STEPS = 4
SEQ = 16


class Tokens(torch.utils.data.Dataset):
    """Deterministic random token sequences: 40 make 10 steps an epoch at batch 4, so a
    resume lands mid-epoch and the run crosses an epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, 64, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StepDelay(transformers.TrainerCallback):
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.delay_s)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("output_dir")
    parser.add_argument("result")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step-delay-s", type=float, default=0.0)
    opts = parser.parse_args()

    store = ckptstore.open(opts.store)
    callback = CkptStoreCallback(store)
    resume_from = callback.materialize(opts.output_dir) if opts.resume else None
    transformers.set_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2))
    args = transformers.TrainingArguments(
        output_dir=opts.output_dir, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, eval_strategy="steps", eval_steps=SAVE_STEPS,
        logging_steps=1, per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=3e-3, seed=0,
        use_cpu=True, report_to=[], dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True,
    )  # fmt: skip
    callbacks = [callback] + ([StepDelay(opts.step_delay_s)] if opts.step_delay_s else [])
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(40, seed=1), eval_dataset=Tokens(16, seed=2), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume_from)
    store.close()
    with open(opts.result, "w", encoding="utf-8") as f:
        json.dump({"resumed_from": resume_from, "global_step": trainer.state.global_step, "log_history": trainer.state.log_history}, f)


if __name__ == "__main__":
    main()
