"""End to end on a local store: train, commit every few steps, fork, resume.

    python examples/quickstart.py [STORE_DIR]

Trains a small model, commits every 5 steps with its loss as a metric, forks a branch from
the best commit, trains the fork with a lower learning rate, then checks out and restores
both lines in place and shows the history. Run it again and it resumes `main` where the
last run stopped.
"""

from __future__ import annotations

import sys

import torch

import ckptstore


def make_run(lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def train(model, opt, steps: int, start: int) -> float:
    g = torch.Generator().manual_seed(start)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x = torch.randn(64, 32, generator=g)
        y = x[:, :1] * 2 - x[:, 1:2]
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def main(path: str) -> None:
    store = ckptstore.open(path, best_metric="eval_loss")
    model, opt = make_run(lr=1e-2)
    step = 0
    if "main" in store.branches():
        state = store.restore("main", {"model": model, "optimizer": opt})
        step = state["step"]
        print(f"resumed main at step {step} from {store.resolve('main')[:12]}")

    for _ in range(4):
        loss = train(model, opt, steps=5, start=step)
        step += 5
        c = store.commit({"model": model, "optimizer": opt, "step": step}, message=f"step {step}", metadata={"step": step}, metrics={"eval_loss": loss})
        print(f"commit {c.short_id} step {step:3d} loss {loss:.4f} new {c.stats.new_bytes:7d} B of {c.stats.logical_bytes} B")

    # Fork from the best checkpoint and train the fork with a lower learning rate.
    fork = f"low-lr-{step}"
    store.branch(fork, at="best")
    fmodel, fopt = make_run(lr=1e-3)
    fstate = store.restore(fork, {"model": fmodel, "optimizer": fopt})
    for group in fopt.param_groups:
        group["lr"] = 1e-3
    loss = train(fmodel, fopt, steps=5, start=fstate["step"])
    c = store.commit(
        {"model": fmodel, "optimizer": fopt, "step": fstate["step"] + 5},
        branch=fork,
        message="fine-tune at lr 1e-3",
        metrics={"eval_loss": loss},
    )
    print(f"forked {fork} from best at step {fstate['step']}, committed {c.short_id}")

    # Check out both lines and compare.
    diff = store.diff("main", fork)
    print(f"main vs {fork}: {len(diff.changed)} tensors changed ({diff.changed_bytes} B)")
    restored = store.checkout("main")
    assert all(torch.equal(restored["model"][k], v) for k, v in model.state_dict().items())
    print("\nbranches:", {name: cid[:12] for name, cid in store.branches().items()})
    print("tags:    ", {name: cid[:12] for name, cid in store.tags().items()})
    print("log main:")
    for commit in store.log("main", limit=5):
        print(f"  {commit.short_id}  {commit.message:12s}  {commit.metrics}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ckpts")
