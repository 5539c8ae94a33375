"""Legacy ``torch.save`` files (``_use_new_zipfile_serialization=False``, the format of old hub
``pytorch_model.bin`` files) import with ``weights_only=True`` and check out bit-exact; a file
that really needs more than ``weights_only`` (a pickled class of its own) is refused, naming
the file and saying so."""

from __future__ import annotations

import collections
import json

import pytest
import torch

import ckptstore
from ckptstore.errors import InvalidCheckpoint


class Custom:
    """A class of this test module: unpickling it would run code outside torch's allowlist."""

    def __init__(self) -> None:
        self.weight = torch.ones(3)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "encoder.weight": torch.randn(16, 8, generator=g), "encoder.bias": torch.randn(16, generator=g),
        "head.weight": torch.randn(4, 16, generator=g).to(torch.bfloat16), "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.rand(5, generator=g) > 0.5,
    }  # fmt: skip


def _bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)) for k in a
    )


def _legacy_save(obj: object, path) -> None:
    torch.save(obj, str(path), _use_new_zipfile_serialization=False)
    assert not path.read_bytes().startswith(b"PK\x03\x04")  # really the legacy (non-zip) format


def test_a_legacy_pt_file_imports_and_checks_out_bit_exact(tmp_path):
    state = {"model": _state(), "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
    path = tmp_path / "legacy.pt"
    _legacy_save(state, path)
    store = ckptstore.open(str(tmp_path / "store"))
    commit = store.import_checkpoint(str(path))
    out = store.checkout(commit.id)
    assert _bit_exact(out["model"], state["model"])
    assert out["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert torch.equal(out["optimizer"]["state"][0]["step"], state["optimizer"]["state"][0]["step"])


def test_a_legacy_pytorch_model_bin_directory_imports_whole(tmp_path):
    """An old hub model folder: ``pytorch_model.bin`` (legacy format, an OrderedDict as
    ``model.state_dict()`` returns) beside ``config.json``; both come back, the weights
    bit-exact, through checkout and through export."""
    src = tmp_path / "old-model"
    src.mkdir()
    state = collections.OrderedDict(_state())
    _legacy_save(state, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 16}))
    store = ckptstore.open(str(tmp_path / "store"))
    commit = store.import_checkpoint(str(src))
    out = store.checkout(commit.id)
    assert _bit_exact(out["model"], state)
    assert set(out["files"]) == {"config.json"}  # the weights are the model, not a file
    assert bytes(out["files"]["config.json"].numpy()) == (src / "config.json").read_bytes()
    store.export(commit.id, str(tmp_path / "export"))
    safetensors_torch = pytest.importorskip("safetensors.torch")
    assert _bit_exact(safetensors_torch.load_file(str(tmp_path / "export" / "model.safetensors")), state)
    assert (tmp_path / "export" / "config.json").read_bytes() == (src / "config.json").read_bytes()


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_a_file_that_needs_more_than_weights_only_is_refused_naming_it(tmp_path, legacy):
    path = tmp_path / "custom.pt"
    if legacy:
        _legacy_save({"model": Custom()}, path)
    else:
        torch.save({"model": Custom()}, str(path))
    store = ckptstore.open(str(tmp_path / "store"))
    with pytest.raises(InvalidCheckpoint, match="weights_only") as info:
        store.import_checkpoint(str(path))
    assert info.value.path == str(path) and str(path) in str(info.value)
    assert "Custom" in str(info.value)  # what torch refused, not a complaint about mmap
    assert store.branches() == {}
