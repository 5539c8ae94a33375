"""torch.distributed.checkpoint through a store, as a user drives it: ``dcp.save`` /
``dcp.load`` of a BERT's weights and AdamW state (a ``transformers`` model built from a
config) on 2 gloo ranks (real processes) and in one process, a fine-tuning re-save with
``delta="on"``, and an export that ``AutoModel.from_pretrained`` loads. Nothing mocked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

import ckptstore
from ckptstore.dcp_layout import DcpSave
from ckptstore.errors import ComponentsUnavailable, InvalidOption, InvalidRefName, NotExportable, UnsupportedValue
from ckptstore.integrations.distributed import StoreReader, StoreWriter
from ckptstore.integrations.training import BRANCH_ENV, REF_ENV
from ckptstore.layout import manifest_key
from tests.dist_worker import BERT_CONFIG, bert_training_state, change_one_percent
from tests.test_distributed import _torchrun

transformers = pytest.importorskip("transformers")

#: The acceptance bound: a re-save with 1% of the elements changed adds at most this share
#: of the state's bytes to the store.
MAX_GROWTH = 0.05


@pytest.fixture(autouse=True)
def _no_resume_env(monkeypatch):
    monkeypatch.delenv(REF_ENV, raising=False)
    monkeypatch.delenv(BRANCH_ENV, raising=False)


def _state(model, opt) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def _tensors(model, opt) -> dict[str, torch.Tensor]:
    """Every tensor of a model and optimizer state, by a flat name."""
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        out.update({f"optimizer.{i}.{k}": v for k, v in s.items()})
    return out


def _fresh_target():
    """A model and optimizer of the same shapes whose values differ from the saved ones."""
    model, opt = bert_training_state()
    with torch.no_grad():
        for t in _tensors(model, opt).values():
            t.fill_(-7)
    return model, opt


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dcp_loaded(reader: StoreReader) -> dict[str, torch.Tensor]:
    """The model's and optimizer's tensors after ``dcp.load`` through ``reader`` into a fresh
    model and optimizer (whose values all differ from any saved)."""
    model, opt = _fresh_target()
    state = _state(model, opt)
    dcp.load(state, storage_reader=reader)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return _tensors(model, opt)


def _export_loads_bit_exact(store, rev: str, directory: Path, expected) -> None:
    """``store.export`` of a DCP commit: the model's weights under their own names, which
    ``AutoModel.from_pretrained`` loads (with the config written beside them) bit-exact."""
    assert store.export(rev, str(directory)) == ["model.safetensors"]
    weights = load_file(str(directory / "model.safetensors"))
    assert _equal(weights, expected.state_dict())  # the model's names and bytes, nothing else
    transformers.BertConfig(**BERT_CONFIG).save_pretrained(str(directory))
    loaded = transformers.AutoModel.from_pretrained(str(directory))
    assert _equal(loaded.state_dict(), expected.state_dict())


def test_dcp_on_two_ranks_delta_resave_export_and_resume(tmp_path, monkeypatch):
    url = str(tmp_path / "store")
    result = _torchrun(2, "bert", url, tmp_path=tmp_path)[0]
    store = ckptstore.open(url, create=False)
    first, second = store.get_commit(result["first"]), store.get_commit(result["second"])

    # The options landed on the commits; the second's parent is the branch head, so diff works.
    assert (second.branch, second.message, second.metadata, second.metrics) == ("ft", "second", {"step": 2}, {"eval_loss": 1.5})
    assert first.parents == () and second.parents == (first.id,)
    assert store.tags()["first"] == first.id and store.tags()["tuned"] == second.id and store.tags()["best"] == second.id
    assert store.branches()["ft"] == second.id
    changed = {c.path for c in store.diff(first.id, second.id).changed}
    assert any("encoder.layer.0.attention.self.query.weight" in p for p in changed)

    # The optimizer state moved from rank 1 to rank 0 between the saves, and the re-save
    # still stored deltas: 1% of the elements changed, a few % of the state's bytes added.
    optimizer_ranks = lambda c: {
        rank for key, (rank, _) in DcpSave.of(store.manifest_of(c), key=manifest_key(c.manifest)).record.stored.items() if key.startswith("optimizer.")
    }  # noqa: E731
    assert optimizer_ranks(first) == {0, 1} and optimizer_ranks(second) == {0}
    growth = result["du_second"] - result["du_first"]
    print(f"2 ranks: state {second.stats.logical_bytes} bytes, re-save added {growth} ({growth / second.stats.logical_bytes:.1%})")
    assert second.stats.delta_chunks > 0
    assert growth <= MAX_GROWTH * second.stats.logical_bytes

    # Export: each weight whole from both ranks' shards, under the model's own names.
    expected_model, expected_opt = bert_training_state()
    change_one_percent(expected_model, expected_opt, seed=2)
    _export_loads_bit_exact(store, second.id, tmp_path / "export", expected_model)

    # dcp.load in one process (resharded from 2), from the job's branch by default; a later
    # commit on another branch (it moves `latest`) changes nothing.
    store.commit({"other": torch.ones(3)}, branch="other")
    monkeypatch.setenv(BRANCH_ENV, "ft")
    assert _equal(_dcp_loaded(StoreReader(store)), _tensors(expected_model, expected_opt))

    # Rank 0 saving alone (no_dist=True) stored only its half of each sharded weight:
    # DCP accepts that, but the tensors cannot be made whole, and the export says so.
    with pytest.raises(NotExportable, match="cannot be reassembled: its stored chunks hold") as exc:
        store.export(result["partial"], str(tmp_path / "partial"))
    assert exc.value.path.startswith("model/")
    assert not (tmp_path / "partial").exists()


def test_dcp_in_one_process_delta_resave_export_and_branch_rule(tmp_path):
    store = ckptstore.open(str(tmp_path / "store"))
    model, opt = bert_training_state()
    dcp.save(_state(model, opt), storage_writer=StoreWriter(store, delta="on", message="first"))
    before = store.du().physical_bytes
    change_one_percent(model, opt, seed=2)
    writer = StoreWriter(store, delta="on", message="second", metrics={"eval_loss": 1.0})
    dcp.save(_state(model, opt), storage_writer=writer)
    second = writer.commit
    growth = store.du().physical_bytes - before
    print(f"1 process: state {second.stats.logical_bytes} bytes, re-save added {growth} ({growth / second.stats.logical_bytes:.1%})")
    assert second.branch == "main" and second.parents == (store.log("main")[1].id,)
    assert 0 < second.stats.delta_chunks and growth <= MAX_GROWTH * second.stats.logical_bytes
    assert store.fsck(read_data=True).ok  # every delta reads back through its chain

    _export_loads_bit_exact(store, "main", tmp_path / "export", model)
    # Single files follow the same rule: the model's weights, whole, under their names.
    store.export("main", str(tmp_path / "model.pt"))
    assert _equal(torch.load(tmp_path / "model.pt", weights_only=True), model.state_dict())
    store.export("main", str(tmp_path / "exp_avg.safetensors"), component="optimizer/state", include=["*/exp_avg"])
    assert _equal(load_file(str(tmp_path / "exp_avg.safetensors")), {f"{i}.exp_avg": s["exp_avg"] for i, s in opt.state_dict()["state"].items()})

    # Another branch's DCP save after ours moves `latest`; StoreReader() still loads main's head.
    other_model, other_opt = _fresh_target()
    dcp.save(_state(other_model, other_opt), storage_writer=StoreWriter(store, branch="sweep"))
    assert store.tags()["latest"] != second.id
    assert _equal(_dcp_loaded(StoreReader(store)), _tensors(model, opt))

    # GC next to DCP deltas: collecting the first save, whose chunks are the bases of the
    # second's deltas, keeps every chunk the second reads through; it loads and exports as before.
    first_id = store.log("main")[1].id
    plan = store.gc(ckptstore.KeepLast(1), grace_period_s=0)
    assert first_id in plan.removed_commits and plan.deleted_objects > 0
    assert store.fsck(read_data=True).ok
    assert _equal(_dcp_loaded(StoreReader(store, second.id)), _tensors(model, opt))
    _export_loads_bit_exact(store, second.id, tmp_path / "export-after-gc", model)


def test_dcp_exports_that_cannot_be_named_or_made_whole_are_refused(tmp_path):
    store = ckptstore.open(str(tmp_path / "store"))
    model, opt = bert_training_state()
    dcp.save(_state(model, opt), storage_writer=StoreWriter(store, branch="full"))
    # The optimizer's param_groups are not tensors (DCP saved them as bytes).
    with pytest.raises(NotExportable, match="not tensors .*: optimizer/param_groups/") as exc:
        store.export("full", str(tmp_path / "opt"), component="optimizer")
    assert exc.value.path.startswith("optimizer/param_groups")
    with pytest.raises(ComponentsUnavailable, match="'scheduler'"):
        store.export("full", str(tmp_path / "sched"), component="scheduler")
    # Saved without flattening: DCP records no planner_data, so the nesting of the names is
    # unknown (the model's state dict went in as one bytes item).
    dcp.save(
        {"model": model.state_dict(), "w": torch.ones(4)},
        storage_writer=StoreWriter(store, branch="flat"),
        planner=DefaultSavePlanner(flatten_state_dict=False),
    )
    with pytest.raises(NotExportable, match="without planner_data"):
        store.export("flat", str(tmp_path / "flat"))
    for path in ("opt", "sched", "flat"):
        assert not (tmp_path / path).exists()


def test_store_writer_options_are_checked_before_anything_is_written(tmp_path):
    store = ckptstore.open(str(tmp_path / "store"))
    store.tag("keep", at=store.commit({"x": torch.ones(2)}).id)
    objects = sorted(p for p in (tmp_path / "store").rglob("*") if ".catalog" not in p.parts)
    with pytest.raises(InvalidOption, match="delta"):
        StoreWriter(store, delta="sometimes")
    with pytest.raises(InvalidRefName):
        StoreWriter(store, tags=["latest"])
    with pytest.raises(InvalidRefName):
        StoreWriter(store, branch="keep")  # a tag's name
    with pytest.raises(UnsupportedValue):
        StoreWriter(store, metadata={"f": object()})
    with pytest.raises(TypeError):
        StoreWriter(store, delta_mode="on")  # type: ignore[call-arg]
    assert sorted(p for p in (tmp_path / "store").rglob("*") if ".catalog" not in p.parts) == objects


def test_store_reader_follows_ckptstore_ref_then_branch(tmp_path, monkeypatch):
    store = ckptstore.open(str(tmp_path / "store"))
    made = {}
    for branch, value in (("main", 1.0), ("a", 2.0), ("b", 3.0)):
        writer = StoreWriter(store, branch=branch)
        dcp.save({"w": torch.full((8,), value)}, storage_writer=writer)
        made[branch] = writer.commit.id
    loaded = lambda: (dcp.load(state := {"w": torch.zeros(8)}, storage_reader=StoreReader(store)), state["w"][0].item())[1]  # noqa: E731
    assert loaded() == 1.0  # the default branch, not `latest` (b)
    monkeypatch.setenv(BRANCH_ENV, "a")
    assert loaded() == 2.0
    monkeypatch.setenv(REF_ENV, made["b"])
    assert loaded() == 3.0
    assert StoreReader(store, "main").rev == "main"  # an explicit rev wins
