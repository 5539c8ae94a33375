"""Deterministic training states for tests, and an exact comparison of two states."""

from __future__ import annotations

import math
import random
import struct
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ckptstore.codec import torch_dtypes


class TinyNet(torch.nn.Module):
    """Embedding tied to the output layer, a LayerNorm, a BatchNorm and dropout."""

    def __init__(self, vocab: int = 64, dim: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.hidden = torch.nn.Linear(dim, dim)
        self.bn = torch.nn.BatchNorm1d(dim)
        self.drop = torch.nn.Dropout(0.1)
        self.out = torch.nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(tokens))
        h = self.drop(torch.relu(self.bn(self.hidden(h))))
        return self.out(h)


def trained(seed: int = 0, steps: int = 3) -> tuple[TinyNet, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(steps):
        tokens = torch.randint(0, 64, (16,))
        loss = torch.nn.functional.cross_entropy(model(tokens), tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def every_dtype(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, dtype in torch_dtypes().items():
        itemsize = torch.empty(0, dtype=dtype).element_size()
        raw = torch.randint(0, 256, (5 * 3 * itemsize,), dtype=torch.uint8, generator=g)
        if dtype is torch.bool:
            raw = raw % 2
        out[name] = raw.view(dtype).reshape(5, 3)
    return out


def full_state(seed: int = 0) -> dict[str, Any]:
    """Everything acceptance asks for: model, AdamW after steps, scheduler, RNG states, every
    dtype, odd tensors (0-d, empty, non-contiguous, shared storage, larger than a chunk) and
    nested Python values."""
    model, opt, sched = trained(seed)
    random.seed(seed)
    np.random.seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    base = torch.arange(200, dtype=torch.float32)
    shared_a = base[10:60]
    shared_b = base[40:140].view(10, 10)
    big = torch.randn(50_000, generator=g)  # 200 kB: several chunks at the test chunk size
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "numpy_generator": np.random.default_rng(seed).bit_generator.state,
            "python": random.getstate(),
        },
        "dtypes": every_dtype(seed),
        "odd": {
            "scalar": torch.tensor(3.5, dtype=torch.float64),
            "empty": torch.empty(0, 7),
            "transposed": torch.randn(6, 4, generator=g).t(),
            "strided": torch.randn(10, 10, generator=g)[::2, 1::3],
            "shared_a": shared_a,
            "shared_b": shared_b,
            "same_object": (big, big),
            "big": big,
            "param": torch.nn.Parameter(torch.ones(3)),
        },
        "values": {
            "step": 1234,
            "epoch": 2.5,
            "name": "run-ü-🚀",
            "flags": [True, False, None],
            "pair": (1, (2.0, "x")),
            "by_int": {0: "zero", -7: [1, 2], 2**40: b"\x00\xff"},
            "huge": 2**100,
            "negative_huge": -(2**70),
            "floats": [float("nan"), float("inf"), -0.0, 5e-324],
            "ordered": OrderedDict([("b", 1), ("a", 2)]),
            "array": np.arange(12, dtype=np.int16).reshape(3, 4),
            "np_scalar": np.float32(0.25),
            "dtype": torch.bfloat16,
            "device": torch.device("cpu"),
            "size": torch.Size([2, 3]),
            "empty_dict": {},
            "empty_tuple": (),
        },
    }


def _storage_key(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.numel():
        return t.untyped_storage().data_ptr()
    return None


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Assert ``b`` equals ``a`` exactly: types, dtypes, shapes, bytes, key order, and that
    tensors sharing storage in ``a`` share it in ``b`` (and only those)."""
    _compare(a, b, path)
    ta, tb = {}, {}
    _collect_tensors(a, "", ta)
    _collect_tensors(b, "", tb)
    assert ta.keys() == tb.keys()
    for p in ta:
        for q in ta:
            if p < q:
                tied_a = _storage_key(ta[p]) is not None and _storage_key(ta[p]) == _storage_key(ta[q])
                tied_b = _storage_key(tb[p]) is not None and _storage_key(tb[p]) == _storage_key(tb[q])
                assert tied_a == tied_b, f"{p} and {q}: tied {tied_a} before, {tied_b} after"
                assert (ta[p] is ta[q]) == (tb[p] is tb[q]), f"{p} and {q}: object identity differs"


def _collect_tensors(value: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(value, torch.Tensor):
        out[path] = value
    elif isinstance(value, dict):
        for k, v in value.items():
            _collect_tensors(v, f"{path}/{k}", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _collect_tensors(v, f"{path}/{i}", out)


def _compare(a: Any, b: Any, path: str) -> None:
    assert type(a) is type(b), f"{path}: type {type(a).__name__} became {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert a.requires_grad == b.requires_grad, f"{path}: requires_grad"
        ab = a.detach().contiguous().reshape(-1).view(torch.uint8)
        bb = b.detach().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(ab, bb), f"{path}: bytes differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), f"{path}: array differs"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{path}: numpy scalar differs"
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], f"{path}: keys {list(a)} vs {list(b)}"
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), f"{path}: _metadata"
        for k in a:
            _compare(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{path}/{i}")
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b)), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"
