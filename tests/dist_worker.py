"""A rank of the distributed tests (run by tests/test_distributed.py through torchrun).

    dist_worker.py save URL    # 4 ranks: dcp.save of sharded and replicated DTensors, then
                               # ckptstore.distributed.commit of per-rank states
    dist_worker.py load URL    # N ranks: dcp.load of the DCP commit, resharded to N
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

import ckptstore
from ckptstore.distributed import StoreReader, StoreWriter, commit


def reference() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(64, generator=g), "r": torch.randn(4096, generator=g)}


def main() -> None:
    mode, url, out = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ref = reference()
    store = ckptstore.open(url, chunk_size_bytes=1024, inline_threshold_bytes=128)
    result: dict = {"rank": rank}
    if mode == "save":
        state = {
            "model": {
                "w": distribute_tensor(ref["w"], mesh, [Shard(0)]),  # each rank holds 16 rows
                "b": distribute_tensor(ref["b"], mesh, [Shard(0)]),
                "r": distribute_tensor(ref["r"], mesh, [Replicate()]),  # the same bytes on every rank
            },
            "step": 7,
        }
        writer = StoreWriter(store, message="dcp save", metadata={"step": 7})
        dcp.save(state, storage_writer=writer)
        if writer.commit is not None:
            result["dcp_commit"] = writer.commit.id
        own = {"local": torch.full((512,), float(rank)), "replicated": ref["r"], "rank": rank}
        made = commit(store, own, message="multi-rank", metadata={"step": 8})
        result["multi_commit"] = made.id
    else:
        state = {
            "model": {
                "w": distribute_tensor(torch.zeros(64, 32), mesh, [Shard(0)]),
                "b": distribute_tensor(torch.zeros(64), mesh, [Shard(0)]),
                "r": distribute_tensor(torch.zeros(4096), mesh, [Replicate()]),
            },
            "step": 0,
        }
        dcp.load(state, storage_reader=StoreReader(store, sys.argv[4]))
        result["equal"] = all(torch.equal(state["model"][k].full_tensor(), ref[k]) for k in ref) and state["step"] == 7
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
