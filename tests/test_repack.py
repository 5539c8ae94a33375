"""Repack: raw chunks re-encoded in place, every commit still bit-exact, with concurrent
commits, checkouts and a collector in real processes, and after a SIGKILL mid-run."""

from __future__ import annotations

import inspect
import json
import signal
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner
from repack_child import CHUNK_SIZE_BYTES, check_commit, state
from states import assert_same

import ckptstore
from ckptstore.cli import cli
from ckptstore.codec import HEADER_SIZE, Codec, Kind, read_header
from ckptstore.layout import chunk_key
from ckptstore.repack import reachable_commits

CHILD = str(Path(__file__).resolve().parent / "repack_child.py")


def bf16_state(seed: int = 0) -> dict:
    """A bf16 model and its Adam moments, as a training job holds them."""
    g = torch.Generator().manual_seed(seed)
    weights = {f"layer{i}.weight": (torch.randn(64 << 10, generator=g) * 0.05).to(torch.bfloat16) for i in range(4)}
    moments = {f"exp_avg.{i}": (torch.randn(64 << 10, generator=g) * 1e-3).to(torch.bfloat16) for i in range(4)}
    return {"model": weights, "optimizer": moments, "step": seed}


def chunk_bytes(store: ckptstore.Store) -> int:
    return sum(info.size_bytes for info in store.objects.list_info("chunks/"))


def codecs(store: ckptstore.Store) -> dict[str, Codec]:
    return {key: read_header(store.objects.get_range(key, 0, HEADER_SIZE), key=key, kind=Kind.CHUNK)[0] for key in store.objects.list("chunks/")}


def needed_chunks(store: ckptstore.Store) -> set[str]:
    return {c.id for cid in reachable_commits(store) for blob in store.manifest_of(store.get_commit(cid)).blobs for c in blob.chunks}


def commit_raw_history(url: str, steps: int) -> list[str]:
    store = ckptstore.open(url, compression_level=None, chunk_size_bytes=CHUNK_SIZE_BYTES)
    ids = [store.commit(state(step), metadata={"step": step}).id for step in range(steps)]
    store.close()
    return ids


def test_repack_shrinks_a_raw_bf16_state_to_what_compression_stores(tmp_path):
    raw = ckptstore.open(str(tmp_path / "raw"), compression_level=None, chunk_size_bytes=64 << 10)
    first = raw.commit(bf16_state(0))
    second = raw.commit(bf16_state(1))
    before = chunk_bytes(raw)
    assert set(codecs(raw).values()) == {Codec.RAW}

    report = raw.repack()
    after = chunk_bytes(raw)
    assert report.rewritten_chunks == len(codecs(raw)) and report.saved_bytes == before - after
    assert after < 0.75 * before
    # What a commit that always compresses stores for the same states (where the store has no
    # compression mode yet: the default rule, which byte-planes bf16 at compression_level=3).
    always = {"compression": "always"} if "compression" in inspect.signature(ckptstore.open).parameters else {}
    packed = ckptstore.open(str(tmp_path / "packed"), chunk_size_bytes=64 << 10, **always)
    packed.commit(bf16_state(0))
    packed.commit(bf16_state(1))
    assert after <= 1.02 * chunk_bytes(packed)

    for commit, seed in ((first, 0), (second, 1)):
        assert_same(bf16_state(seed), raw.checkout(commit.id))
    assert raw.fsck(read_data=True).ok


def test_repack_is_idempotent_and_a_dry_run_changes_nothing(tmp_path):
    store = ckptstore.open(str(tmp_path), compression_level=None, chunk_size_bytes=64 << 10)
    store.commit(bf16_state(0))
    listing = {info.key: info.size_bytes for info in store.objects.list_info("chunks/")}
    plan = store.repack(dry_run=True)
    assert plan.dry_run and plan.rewritten_chunks == len(listing) and plan.saved_bytes > 0
    assert {info.key: info.size_bytes for info in store.objects.list_info("chunks/")} == listing
    assert not store.objects.list("locks/writers/")

    done = store.repack()
    assert (done.rewritten_chunks, done.stored_bytes_after) == (plan.rewritten_chunks, plan.stored_bytes_after)
    repacked = {info.key: store.objects.get(info.key) for info in store.objects.list_info("chunks/")}
    again = store.repack()
    assert again.rewritten_chunks == 0 and again.chunks == len(listing)
    assert {key: store.objects.get(key) for key in repacked} == repacked
    assert not store.objects.list("locks/writers/")


def test_repack_of_chosen_commits_leaves_deltas_and_other_commits_alone(tmp_path):
    url = str(tmp_path)
    ids = commit_raw_history(url, 2)
    store = ckptstore.open(url, compression_level=3, delta="on", chunk_size_bytes=CHUNK_SIZE_BYTES)
    third = store.commit(state(2), metadata={"step": 2})
    assert third.stats.delta_chunks > 0
    deltas = {k: store.objects.get(k) for k, c in codecs(store).items() if c is Codec.DELTA}
    first_chunks = {c.id for blob in store.manifest_of(store.get_commit(ids[0])).blobs for c in blob.chunks}

    report = store.repack([ids[1][:12]])
    assert report.commits == 1 and report.rewritten_chunks > 0
    after = codecs(store)
    assert {k: store.objects.get(k) for k in deltas} == deltas  # chains untouched
    only_first = first_chunks - {c.id for blob in store.manifest_of(store.get_commit(ids[1])).blobs for c in blob.chunks}
    assert only_first and all(after[chunk_key(c)] is Codec.RAW for c in only_first)
    for cid in [*ids, third.id]:
        check_commit(store, cid)
    assert store.fsck(read_data=True).ok


def test_repack_concurrent_with_commits_checkouts_and_gc(tmp_path):
    """Real processes: a committer (raw commits, and byte-planed deltas on them), a reader
    checking every commit it reaches bit for bit, a collector dropping all but the last 3,
    and repack over and over."""
    url = str(tmp_path)
    commit_raw_history(url, 2)
    seconds = "8"
    children = {
        "commit": subprocess.Popen([sys.executable, CHILD, "commit", url, "24"], stdout=subprocess.PIPE, text=True),
        "checkout": subprocess.Popen([sys.executable, CHILD, "checkout", url, seconds], stdout=subprocess.PIPE, text=True),
        "gc": subprocess.Popen([sys.executable, CHILD, "gc", url, seconds], stdout=subprocess.PIPE, text=True),
        "repack": subprocess.Popen([sys.executable, CHILD, "repack", url, seconds], stdout=subprocess.PIPE, text=True),
    }
    outputs = {name: child.communicate(timeout=120)[0] for name, child in children.items()}
    codes = {name: child.returncode for name, child in children.items()}
    assert codes == dict.fromkeys(children, 0), outputs
    assert int(outputs["repack"].split()[-1]) > 0, outputs  # it did rewrite chunks meanwhile
    assert int(outputs["gc"].split()[-1]) > 0 and int(outputs["checkout"].split()[-1]) > 0, outputs

    store = ckptstore.open(url, chunk_size_bytes=CHUNK_SIZE_BYTES)
    reached = reachable_commits(store)
    assert store.get_commit(store.resolve("main")).metadata["step"] == 23
    for cid in reached:
        check_commit(store, cid)
    assert store.fsck(read_data=True).ok
    # Once the collector and repack are done with them, the chunks left raw are repacked.
    store.gc(ckptstore.KeepLast(3), grace_period_s=0)
    store.repack()
    found = codecs(store)
    assert Codec.RAW not in {found[chunk_key(c)] for c in needed_chunks(store)}
    for cid in reachable_commits(store):
        check_commit(store, cid)
    assert store.fsck(read_data=True).ok


def test_a_killed_repack_leaves_every_commit_whole(tmp_path):
    url = str(tmp_path)
    ids = commit_raw_history(url, 3)
    child = subprocess.Popen([sys.executable, CHILD, "repack-slow", url], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(5):  # some chunks rewritten, more to go
            assert child.stdout.readline() == "chunk\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    store = ckptstore.open(url, chunk_size_bytes=CHUNK_SIZE_BYTES)
    found = codecs(store)
    assert Codec.RAW in found.values() and set(found.values()) != {Codec.RAW}  # killed half way
    for cid in ids:
        check_commit(store, cid)
    assert store.fsck(read_data=True).ok
    report = store.repack()  # a rerun finishes
    assert report.rewritten_chunks > 0 and report.changed_chunks == 0
    for cid in ids:
        check_commit(store, cid)
    assert store.fsck(read_data=True).ok


def test_ckpt_repack_and_du_through_the_cli(tmp_path):
    url = str(tmp_path)
    store = ckptstore.open(url, compression_level=None, chunk_size_bytes=64 << 10)
    store.commit(bf16_state(0))
    stored_raw = chunk_bytes(store)
    runner = CliRunner()

    du = runner.invoke(cli, ["--store", url, "du"])
    assert du.exit_code == 0, du.output
    line = next(line for line in du.output.splitlines() if line.startswith("raw"))
    assert "chunks stored raw" in line and "ckpt repack would save about" in line
    usage = json.loads(runner.invoke(cli, ["--store", url, "du", "--json"]).output)
    assert usage["raw_chunk_bytes"] == stored_raw and usage["raw_chunks"] == len(store.objects.list("chunks/"))
    estimate = usage["repack_saving_bytes"]

    dry = runner.invoke(cli, ["--store", url, "repack", "--dry-run"])
    assert dry.exit_code == 0 and dry.output.startswith("would rewrite"), dry.output
    assert chunk_bytes(store) == stored_raw
    done = json.loads(runner.invoke(cli, ["--store", url, "repack", "main", "--json"]).output)
    assert done["rewritten_chunks"] == usage["raw_chunks"] and done["saved_bytes"] == stored_raw - chunk_bytes(store)
    assert abs(estimate - done["saved_bytes"]) < 0.1 * done["saved_bytes"]  # du's estimate is close

    after = runner.invoke(cli, ["--store", url, "du"])
    assert not any(line.startswith("raw") for line in after.output.splitlines())
    assert json.loads(runner.invoke(cli, ["--store", url, "du", "--json"]).output)["raw_chunks"] == 0
    unknown = runner.invoke(cli, ["--store", url, "repack", "nosuchbranch"])
    assert unknown.exit_code != 0
