"""Train a small model, commit every few steps, survive ``kill -9``, resume bit-exact.

    python examples/train_resume.py ckpts --steps 40 --save-every 5      # trains, commits
    python examples/train_resume.py ckpts --steps 40 --kill-after 20     # dies by SIGKILL at step 20
    python examples/train_resume.py ckpts --steps 40                     # resumes from main's head

The store URL may also come from $CKPTSTORE_URL, the ref to resume from from $CKPTSTORE_REF
(default: the head of the branch it commits to, $CKPTSTORE_BRANCH or main).
The run is deterministic (CPU, deterministic algorithms): the losses after a resume are the
ones the uninterrupted run prints, bit for bit, dropout and shuffling included.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import torch

import ckptstore
from ckptstore.integrations.training import Checkpointer, ResumableRandomSampler


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def dataset(n: int = 256) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4] * 2 + 0.1 * torch.randn(n, 4, generator=g)).argmax(1)
    return torch.utils.data.TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store", nargs="?", default=os.environ.get("CKPTSTORE_URL", "ckpts"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--kill-after", type=int, default=None, help="SIGKILL this process right after committing this step")
    parser.add_argument("--log", default=None, help="append {step, loss} lines (JSON) here")
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    data = dataset()
    sampler = ResumableRandomSampler(data, seed=0)
    # The loader's own generator: creating a loader iterator otherwise draws a seed from the
    # global RNG, and a resumed run creates one at a different step than an uninterrupted one.
    loader = torch.utils.data.DataLoader(data, batch_size=32, sampler=sampler, generator=torch.Generator())

    store = ckptstore.open(args.store)
    run = Checkpointer(store, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler)
    step = run.resume()
    print(f"{'resumed at' if step else 'starting at'} step {step}", flush=True)
    batches = iter(loader)
    while step < args.steps:
        try:
            x, y = next(batches)
        except StopIteration:  # next epoch: the sampler reshuffles
            batches = iter(loader)
            continue
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
        if step % args.save_every == 0 or step == args.steps:
            commit = run.save(step, metrics={"train_loss": loss.item()})
            print(f"step {step}: loss {loss.item():.6f}, committed {commit.id[:12]}", flush=True)
            if step == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    print(f"done at step {step}; latest is {store.tags()['latest'][:12]}")


if __name__ == "__main__":
    main()
