"""A rank of the distributed tests (run by tests/test_distributed.py through torchrun).

dist_worker.py save URL    # 4 ranks: dcp.save of sharded and replicated DTensors, then
                           # ckptstore.integrations.distributed.commit of per-rank states
dist_worker.py load URL    # N ranks: dcp.load of the DCP commit, resharded to N
dist_worker.py bert URL    # 2 ranks (tests/workflows/test_dcp_workflow.py): a BERT's weights
                           # sharded, its AdamW state replicated; dcp.save, 1% changed,
                           # dcp.save again with delta="on"; then rank 0 alone saves its shards
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

import ckptstore
from ckptstore.integrations.distributed import StoreReader, StoreWriter, commit


def reference() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(64, generator=g), "r": torch.randn(4096, generator=g)}


#: A BERT small enough for a test, with matrices above the store's inline threshold (as a real
#: model's are), so its bytes are in chunks, not in the manifest.
BERT_CONFIG = dict(vocab_size=2000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, max_position_embeddings=128)


def bert_training_state() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A BERT built from :data:`BERT_CONFIG` (seed 0) and its AdamW state after one step on
    seeded gradients: the same bytes in every process (nothing but seeded draws and
    elementwise arithmetic)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(**BERT_CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    return model, opt


def change_one_percent(model: torch.nn.Module, opt: torch.optim.Optimizer, *, seed: int) -> None:
    """Nudge 1% of the elements (seeded, spread over the tensor) of every float weight and
    optimizer moment, as a short fine-tuning between two saves might."""
    g = torch.Generator().manual_seed(seed)
    moments = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    with torch.no_grad():
        for t in [*model.state_dict().values(), *moments]:
            if t.is_floating_point() and t.numel():
                flat = t.view(-1)
                flat[torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 100)]] += 0.01


def main() -> None:
    mode, url, out = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ref = reference()
    store = ckptstore.open(url) if mode == "bert" else ckptstore.open(url, chunk_size_bytes=1024, inline_threshold_bytes=128)
    result: dict = {"rank": rank}
    if mode == "bert":
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

        model, opt = bert_training_state()  # the same on every rank
        sharded = lambda: {k: distribute_tensor(v.detach(), mesh, [Shard(0)]) for k, v in model.state_dict().items()}  # noqa: E731
        first = StoreWriter(store, branch="ft", delta="on", message="first", metadata={"step": 1}, metrics={"eval_loss": 2.0}, tags=["first"])
        dcp.save({"model": sharded(), "optimizer": opt.state_dict()}, storage_writer=first)
        if rank == 0:
            result["first"], result["du_first"] = first.commit.id, store.du().physical_bytes
        change_one_percent(model, opt, seed=2)
        second = StoreWriter(store, branch="ft", delta="on", message="second", metadata={"step": 2}, metrics={"eval_loss": 1.5}, tags=["tuned"])
        # This planner gives every replicated item (the optimizer state) to rank 0, where the
        # first save spread them over both ranks: their delta bases are found all the same.
        dcp.save(
            {"model": sharded(), "optimizer": opt.state_dict()},
            storage_writer=second,
            planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True),
        )
        shards = sharded()  # distributing is collective: every rank takes part
        if rank == 0:
            result["second"], result["du_second"] = second.commit.id, store.du().physical_bytes
            alone = StoreWriter(store, branch="partial", message="rank 0 alone")
            dcp.save({"model": shards}, storage_writer=alone, no_dist=True)  # only rank 0's shards
            result["partial"] = alone.commit.id
    elif mode == "save":
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
        revs = sys.argv[4].split(",")  # one for every rank, or one for each in turn
        try:
            dcp.load(state, storage_reader=StoreReader(store, revs[rank % len(revs)]))
        except BaseException as exc:  # DCP re-raises a rank's error on every rank (a CheckpointException, a BaseException)
            result["error"] = str(exc)
        else:
            result["equal"] = all(torch.equal(state["model"][k].full_tensor(), ref[k]) for k in ref) and state["step"] == 7
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
