"""Sharded safetensors import and export: round trips, streaming reads, and loading an
export with safetensors and with transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckptstore
from ckptstore.errors import InvalidCheckpoint
from ckptstore.formats.safetensors import read_safetensors

safetensors_torch = pytest.importorskip("safetensors.torch")


def _every_dtype_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {
        "f32": torch.randn(33, 17),
        "bf16": torch.randn(64, 8).to(torch.bfloat16),
        "f16": torch.randn(5).half(),
        "f64": torch.randn(3, 3, dtype=torch.float64),
        "i64": torch.arange(7),
        "i8": torch.arange(-4, 5, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),  # odd length: the next tensor is unaligned
        "i32_after_bool": torch.arange(6, dtype=torch.int32),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "nan_inf": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
    }
    if hasattr(torch, "float8_e4m3fn"):
        state["f8"] = torch.randn(10).to(torch.float8_e4m3fn)
    return state


def _write_sharded(directory, state, per_shard: int) -> None:
    os.makedirs(directory, exist_ok=True)
    names = list(state)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        safetensors_torch.save_file({k: state[k] for k in group}, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def _load_dir(directory) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(safetensors_torch.load_file(os.path.join(directory, name)))
    return out


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def test_sharded_directory_round_trips_bit_exact(tmp_path):
    state = _every_dtype_state()
    _write_sharded(tmp_path / "src", state, per_shard=4)
    store = ckptstore.open(str(tmp_path / "store"), chunk_size_bytes=256, inline_threshold_bytes=64)
    commit = store.import_checkpoint(str(tmp_path / "src"))
    checked_out = store.checkout(commit.id)["model"]
    assert set(checked_out) == set(state) and all(_bits_equal(checked_out[k], state[k]) for k in state)
    files = store.export(commit.id, str(tmp_path / "out"), max_shard_size_bytes=1024)
    assert "model.safetensors.index.json" in files and len(files) > 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(files) - {"model.safetensors.index.json"}
    back = _load_dir(tmp_path / "out")
    assert set(back) == set(state) and all(_bits_equal(back[k], state[k]) for k in state)
    again = store.import_checkpoint(str(tmp_path / "out"))  # the export imports to the same bytes
    assert again.manifest == commit.manifest and again.stats.new_chunks == 0


def test_import_maps_files_instead_of_reading_them(tmp_path):
    path = str(tmp_path / "big.safetensors")
    safetensors_torch.save_file({"w": torch.randn(1 << 20), "b": torch.randn(3)}, path)
    tensors, metadata = read_safetensors(path)
    assert metadata == {}
    for t in tensors.values():  # each tensor is its own copy-on-write map of the file
        assert t.untyped_storage().nbytes() == t.nbytes
    tensors["w"].add_(1)  # private mapping: the file is untouched
    assert torch.equal(safetensors_torch.load_file(path)["w"] + 1, tensors["w"])


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda b: b[:5],  # truncated length prefix
        lambda b: (10**12).to_bytes(8, "little") + b[8:],  # header larger than the file
        lambda b: b[:8] + b"{not json" + b[17:],
        lambda b: b[: len(b) - 16],  # data shorter than the offsets say
    ],
    ids=["short-prefix", "huge-header", "bad-json", "truncated-data"],
)
def test_malformed_safetensors_is_invalid_checkpoint_naming_the_file(tmp_path, corrupt):
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_file({"w": torch.randn(64)}, str(path))
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(InvalidCheckpoint, match="m.safetensors"):
        read_safetensors(str(path))


def test_exported_model_loads_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    store = ckptstore.open(str(tmp_path / "store"), chunk_size_bytes=4096, inline_threshold_bytes=256)
    commit = store.commit({"model": model.state_dict(), "step": 1})
    out = tmp_path / "export"
    store.export(commit.id, str(out), max_shard_size_bytes=20_000)  # several shards
    config.save_pretrained(out)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
