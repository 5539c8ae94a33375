"""Fork and sweep: train on `main`, then branch two variants from `best` and train each.

    python examples/fork_sweep.py ckpts

Each variant starts from the best checkpoint of `main` (model, optimizer, RNG states), on a
branch of its own (`sweep/lr-...`), without copying a byte: a branch is a ref.
"""

from __future__ import annotations

import sys

import torch

import ckptstore
from ckptstore.integrations.training import Checkpointer


def make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def batches(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(64, 8, generator=g)
        yield x, x.sum(1, keepdim=True).sin()


def train(run: Checkpointer, model, optimizer, *, start: int, steps: int, seed: int) -> None:
    for step, (x, y) in enumerate(batches(seed, steps), start=start + 1):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            with torch.no_grad():
                x, y = next(batches(999, 1))
                eval_loss = torch.nn.functional.mse_loss(model(x), y).item()
            commit = run.save(step, metrics={"eval_loss": eval_loss})
            print(f"  {run.branch or 'main'} step {step}: eval_loss {eval_loss:.4f} ({commit.id[:12]})")


def main() -> None:
    store = ckptstore.open(sys.argv[1] if len(sys.argv) > 1 else "ckpts")
    model, optimizer = make_model()
    run = Checkpointer(store, model=model, optimizer=optimizer)
    print("main:")
    train(run, model, optimizer, start=run.resume(), steps=40, seed=1)
    best = store.commit_of("best")
    print(f"best is {best.id[:12]} at step {best.metadata['step']} (eval_loss {best.metrics['eval_loss']:.4f})")
    for lr in (0.01, 0.1):
        name = f"sweep/lr-{lr}"
        if name not in store.branches():
            store.branch(name, at=best.id)  # zero-copy fork (not at "best": the sweep moves it)
        model, optimizer = make_model()
        variant = Checkpointer(store, ref=name, branch=name, model=model, optimizer=optimizer)
        start = variant.resume()  # the best checkpoint, or where this variant left off
        for group in optimizer.param_groups:
            group["lr"] = lr
        print(f"{name} from step {start}:")
        train(variant, model, optimizer, start=start, steps=20, seed=2)
    print("branches:", {name: cid[:12] for name, cid in store.branches().items()})
    print("try: ckpt --store", store.url, "log --graph")


if __name__ == "__main__":
    main()
