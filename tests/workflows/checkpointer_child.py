"""A plain PyTorch training job that resumes through the environment, for the resume workflow
tests: the store is ``$CKPTSTORE_URL``, the branch ``$CKPTSTORE_BRANCH``.

    python checkpointer_child.py RESULT_JSON --steps N --lr LR [--save-every K]

It resumes with ``Checkpointer.from_env`` (RNG states included), trains N more steps at LR
(dropout on, data drawn from the restored global RNG), saves every K steps, and writes to
RESULT_JSON the step it resumed at, a digest of the weights it restored and of its final
weights. ckptstore's log lines go to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging

import torch

from ckptstore.integrations.training import Checkpointer


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and raw bytes of a state dict's tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--save-every", type=int, default=2)
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr)
    with Checkpointer.from_env(model=model, optimizer=optimizer) as run:
        start = run.resume()
        restored = weights_digest(model.state_dict())
        for group in optimizer.param_groups:
            group["lr"] = opts.lr
        for step in range(start + 1, start + opts.steps + 1):
            x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % opts.save_every == 0:
                run.save(step, metadata={"lr": opts.lr})
        branch = run.branch
    with open(opts.result, "w", encoding="utf-8") as f:
        json.dump({"branch": branch, "resumed_at": start, "restored": restored, "final": weights_digest(model.state_dict())}, f)


if __name__ == "__main__":
    main()
