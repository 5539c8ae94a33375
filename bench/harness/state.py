"""The states the benchmarks measure: a GPT-2-shaped model (a real ``torch.nn.Module``,
lm_head tied to wte) with an AdamW optimizer that has taken 2 real steps (so ``exp_avg`` and
``exp_avg_sq`` exist), its bf16 cast, and synthetic random states; walks over their tensors.

Imports torch: import it in child processes (and single-process scripts) only."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class GPT2Shape(NamedTuple):
    vocab: int
    n_positions: int
    d_model: int
    n_layer: int
    n_head: int
    batch: int  # of the 2 training steps
    seq: int


SIZES = {
    "gpt2": GPT2Shape(50257, 1024, 768, 12, 12, 1, 128),  # GPT-2 small, 124M parameters
    "gpt2-medium": GPT2Shape(50257, 1024, 1024, 24, 16, 1, 128),
    "tiny": GPT2Shape(5000, 256, 256, 4, 4, 1, 64),
}


class Conv1D(nn.Module):
    """GPT-2's layout: weight is (in, out)."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf).normal_(0.0, 0.02))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


class Attention(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.d, self.n_head = d, n_head
        self.c_attn = Conv1D(d, 3 * d)
        self.c_proj = Conv1D(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        d, n_head = self.d, self.n_head
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, n_head, d // n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc = Conv1D(d, 4 * d)
        self.c_proj = Conv1D(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = Attention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, shape: GPT2Shape) -> None:
        super().__init__()
        d = shape.d_model
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(shape.vocab, d),
                "wpe": nn.Embedding(shape.n_positions, d),
                "h": nn.ModuleList([Block(d, shape.n_head) for _ in range(shape.n_layer)]),
                "ln_f": nn.LayerNorm(d),
            }
        )
        nn.init.normal_(self.transformer.wte.weight, 0.0, 0.02)
        nn.init.normal_(self.transformer.wpe.weight, 0.0, 0.01)
        self.lm_head = nn.Linear(d, shape.vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1))
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def build_state(size: str, seed: int) -> tuple[dict, nn.Module]:
    """A GPT-2-shaped model and an AdamW optimizer after 2 real steps; returns
    ``({"model": sd, "optimizer": osd}, model)``. The same ``size`` and ``seed`` give the same
    state."""
    shape = SIZES[size]
    torch.manual_seed(seed)
    model = GPT2(shape)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    for _ in range(2):
        idx = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1))
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, shape.vocab), idx[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    return state, model


def iter_tensors(state: dict) -> Iterator[tuple[tuple, torch.Tensor]]:
    """(key path, tensor) for every tensor in a ``{"model", "optimizer"}`` state, in a fixed
    order (aliases included)."""
    for name, t in state["model"].items():
        yield ("model", name), t
    for pid in sorted(state["optimizer"]["state"]):
        for k, t in state["optimizer"]["state"][pid].items():
            yield ("optimizer", "state", pid, k), t


def get_path(state: dict, path: Any) -> Any:
    obj = state
    for k in path:
        obj = obj[k]
    return obj


def unique_storage_bytes(tensors: Any) -> int:
    """Bytes of the storages under ``tensors`` (a state, or an iterable of tensors), each
    storage once (a tied weight counts once)."""
    if isinstance(tensors, dict):
        tensors = (t for _, t in iter_tensors(tensors))
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def pick_changed(state: dict) -> tuple[list[tuple], int]:
    """1% of the (non-alias, non-scalar) tensors by count, at least 1, evenly spaced over the
    fixed order of :func:`iter_tensors`; and the number of candidates."""
    seen: set[int] = set()
    candidates = []
    for path, t in iter_tensors(state):
        if t.dim() == 0 or not t.is_floating_point():
            continue
        if t.untyped_storage().data_ptr() in seen:
            continue  # the tied lm_head.weight alias
        seen.add(t.untyped_storage().data_ptr())
        candidates.append(path)
    k = max(1, round(0.01 * len(candidates)))
    picks = sorted({int((i + 0.5) * len(candidates) / k) for i in range(k)})
    return [candidates[i] for i in picks], len(candidates)


def describe(state: dict) -> dict:
    """What a parent needs to know of a state without loading it: its logical bytes, tensor
    count, and the 1% of tensors a "1%-changed" re-commit changes."""
    changed, n_candidates = pick_changed(state)
    return {
        "logical_bytes": unique_storage_bytes(state),
        "n_tensors": sum(1 for _ in iter_tensors(state)),
        "n_candidates": n_candidates,
        "changed": [list(p) for p in changed],
        "changed_bytes": sum(get_path(state, p).nbytes for p in changed),
        "changed_shapes": [list(get_path(state, p).shape) for p in changed],
    }


def flatten_for_safetensors(state: dict, **metadata: str) -> tuple[dict, dict]:
    """Flat ``{name: contiguous tensor}`` (each storage once: the tied lm_head.weight is
    dropped and recorded in metadata) and string metadata: the aliases, the optimizer's
    param_groups, and ``metadata``."""
    flat: dict = {}
    seen: dict[int, str] = {}
    aliases = {}
    for name, t in state["model"].items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            aliases[f"model.{name}"] = seen[ptr]
            continue
        seen[ptr] = f"model.{name}"
        flat[f"model.{name}"] = t.contiguous()
    for pid in sorted(state["optimizer"]["state"]):
        for k, t in state["optimizer"]["state"][pid].items():
            flat[f"optimizer.state.{pid}.{k}"] = t.contiguous()
    meta = {"aliases": json.dumps(aliases), "param_groups": json.dumps(state["optimizer"]["param_groups"]), **metadata}
    return flat, meta


def states_equal(a: dict, b: dict) -> bool:
    """Same tensor paths, and each tensor the same dtype, shape and values."""
    ta, tb = dict(iter_tensors(a)), dict(iter_tensors(b))
    if ta.keys() != tb.keys():
        return False
    return all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in ((ta[k], tb[k]) for k in ta))


def tie_preserved(state: dict) -> bool:
    """lm_head.weight and wte still share one storage."""
    model = state["model"]
    return model["lm_head.weight"].untyped_storage().data_ptr() == model["transformer.wte.weight"].untyped_storage().data_ptr()


def to_bf16(state: dict) -> dict:
    """The same state with every floating tensor of rank ≥ 1 cast to bf16 (model and Adam
    moments; the 0-d ``step`` counters stay fp32); the lm_head/wte tie is kept."""
    memo: dict[int, Any] = {}

    def cast(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() == 0:
            return t
        if id(t) not in memo:
            memo[id(t)] = t.to(torch.bfloat16)
        return memo[id(t)]

    model = {k: cast(v) for k, v in state["model"].items()}
    ptrs = {}
    for k, v in state["model"].items():  # ties by storage, not only by object identity
        p = v.untyped_storage().data_ptr()
        if p in ptrs:
            model[k] = model[ptrs[p]]
        else:
            ptrs[p] = k
    opt = {"state": {pid: {k: cast(v) for k, v in s.items()} for pid, s in state["optimizer"]["state"].items()},
           "param_groups": state["optimizer"]["param_groups"]}  # fmt: skip
    return {"model": model, "optimizer": opt}


def empty_like_state(state: dict) -> dict:
    """A state of the same structure with uninitialised tensors (ties kept), for DCP load."""
    memo: dict[int, Any] = {}

    def alloc(t: torch.Tensor) -> torch.Tensor:
        p = t.untyped_storage().data_ptr()
        if p not in memo:
            memo[p] = torch.empty_like(t)
        return memo[p]

    return {
        "model": {k: alloc(v) for k, v in state["model"].items()},
        "optimizer": {
            "state": {pid: {k: alloc(v) for k, v in s.items()} for pid, s in state["optimizer"]["state"].items()},
            "param_groups": state["optimizer"]["param_groups"],
        },
    }


def perturb_all(state: dict, change: Any) -> None:
    """``change`` every tensor in place (each storage once), so a commit has to write all of
    it again."""
    seen: set[int] = set()
    with torch.no_grad():
        for _, t in iter_tensors(state):
            p = t.untyped_storage().data_ptr()
            if p in seen:
                continue
            seen.add(p)
            change(t)


def synthetic_state(total_bytes: int, tensor_bytes: int, seed: int) -> dict:
    """``{"t000": ..., ...}``: fp32 N(0, 1) tensors of ``tensor_bytes`` each (random, so
    incompressible); tensor i comes from its own generator seeded ``seed + i``."""
    n = max(1, total_bytes // tensor_bytes)
    out = {}
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        out[f"t{i:03d}"] = torch.randn(tensor_bytes // 4, generator=g)
    return out


def touch_every_page(flat: dict) -> dict:
    """Read one byte of every page of every tensor (of a state loaded with mmap, so that all
    of it is read from the file, as a checkout reads it all); returns ``flat``."""
    page = os.sysconf("SC_PAGE_SIZE")
    touched = 0
    for t in flat.values():
        if t.numel():
            b = t.reshape(-1).view(torch.uint8)
            touched += int(b[::page].sum()) + int(b[-1])
    return flat
