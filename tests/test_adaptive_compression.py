"""compression="auto" | "always" | "never": what each stores, that ids never depend on it,
and that "auto" encodes where the sink is the bottleneck and writes raw where the encoder is."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

import msgpack
import pytest
import torch
from states import assert_same

import ckptstore
from ckptstore.balance import EncodingBalance
from ckptstore.codec import HEADER_SIZE, Codec, Kind, encode_object_bytes, read_header
from ckptstore.config import StoreConfig
from ckptstore.errors import InvalidOption
from ckptstore.ids import content_id
from ckptstore.layout import CONFIG_KEY

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from sink_limited import cap_writes  # noqa: E402  (the bench's bandwidth-limited sink)

CHUNK = 64 << 10


def bf16_state(mib: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights-like bf16 tensors (N(0, 0.02)): byte planes store them at about 0.67."""
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": (torch.randn((mib << 20) // 2 // 4, generator=g) * 0.02).to(torch.bfloat16) for i in range(4)}


def chunk_codecs(store) -> Counter:
    out: Counter = Counter()
    for key in store.objects.list("chunks/"):
        codec, _, _ = read_header(store.objects.get_range(key, 0, HEADER_SIZE), key=key, kind=Kind.CHUNK)
        out[codec] += 1
    return out


def chunk_ids(store, commit) -> list[str]:
    manifest = store.manifest_of(commit)
    return [ref.id for blob in manifest.blobs for ref in blob.chunks]


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
def test_each_mode_round_trips_bit_exact_and_is_recorded_in_the_config(tmp_path, mode):
    state = bf16_state(1)
    store = ckptstore.open(str(tmp_path / "s"), compression=mode, chunk_size_bytes=CHUNK)
    commit = store.commit(state)
    store.close()
    again = ckptstore.open(str(tmp_path / "s"))
    assert again.config.compression == mode
    assert_same(again.checkout(commit.id), state)


def test_a_config_written_before_the_setting_reads_as_auto(tmp_path):
    fields = {k: v for k, v in StoreConfig().__dict__.items() if k != "compression"}
    doc = msgpack.packb({**fields, "checksum": content_id(msgpack.packb(fields, use_bin_type=True))}, use_bin_type=True)
    os.makedirs(tmp_path / "old")
    objects = ckptstore.open(str(tmp_path / "probe")).objects  # a local object store, to write the old config with
    type(objects)(str(tmp_path / "old")).put_if_absent(CONFIG_KEY, encode_object_bytes(Kind.CONFIG, doc, compression_level=None))
    store = ckptstore.open(str(tmp_path / "old"), create=False)
    assert store.config.compression == "auto"


def test_never_stores_every_chunk_raw_and_always_compresses_bf16(tmp_path):
    state = bf16_state(2)
    raw_bytes = sum(t.nbytes for t in state.values())
    never = ckptstore.open(str(tmp_path / "never"), compression="never", chunk_size_bytes=CHUNK)
    commit = never.commit(state)
    assert set(chunk_codecs(never)) == {Codec.RAW}
    for key in never.objects.list("chunks/"):
        _, raw_size, body_size = read_header(never.objects.get_range(key, 0, HEADER_SIZE), key=key, kind=Kind.CHUNK)
        assert body_size == raw_size and never.objects.size(key) == HEADER_SIZE + raw_size
    assert sum(never.objects.size(k) for k in never.objects.list("chunks/")) == raw_bytes + HEADER_SIZE * commit.stats.new_chunks

    always = ckptstore.open(str(tmp_path / "always"), compression="always", chunk_size_bytes=CHUNK)
    commit = always.commit(state)
    assert set(chunk_codecs(always)) == {Codec.GROUPED}
    assert sum(always.objects.size(k) for k in always.objects.list("chunks/")) < 0.75 * raw_bytes
    assert_same(always.checkout(commit.id), state)


def test_auto_encodes_most_chunks_through_a_slow_sink(tmp_path):
    """A 20 MB/s sink is far slower than the encoder: after the first writes measure it,
    every chunk whose encoding pays is encoded."""
    state = bf16_state(2)  # 128 chunks: about 0.3 s through the cap
    store = ckptstore.open(str(tmp_path / "s"), chunk_size_bytes=CHUNK)
    assert store.config.compression == "auto"
    cap = cap_writes(store.objects, 20e6)
    commit = store.commit(state)
    codecs = chunk_codecs(store)
    assert codecs[Codec.GROUPED] >= 0.9 * commit.stats.new_chunks, codecs
    assert cap.taken_bytes < 0.75 * sum(t.nbytes for t in state.values())
    assert_same(store.checkout(commit.id), state)


def test_auto_writes_raw_where_encoding_is_slower_than_the_sink(tmp_path):
    """zstd at level 19 over integers runs at a few MB/s, a memory store takes GB/s: once
    both are measured, chunks go raw (the first few are encoded to measure the encoder)."""
    g = torch.Generator().manual_seed(1)
    state = {f"ids{i}": torch.randint(0, 50, (CHUNK // 4 * 16,), generator=g, dtype=torch.int32) for i in range(4)}  # 64 chunks
    store = ckptstore.open(f"memory://adaptive-{os.getpid()}", compression_level=19, chunk_size_bytes=CHUNK)
    commit = store.commit(state)
    codecs = chunk_codecs(store)
    assert codecs[Codec.RAW] >= commit.stats.new_chunks // 2, codecs
    assert codecs[Codec.ZSTD] >= 1, codecs  # the probes
    assert_same(store.checkout(commit.id), state)
    # the mix of raw and zstd objects is named as "never" names them
    never = ckptstore.open(f"memory://adaptive-never-{os.getpid()}", compression_level=19, chunk_size_bytes=CHUNK, compression="never")
    assert chunk_ids(never, never.commit(state)) == chunk_ids(store, commit)


def test_the_mode_never_changes_chunk_ids_and_commits_dedupe_across_modes(tmp_path):
    state = bf16_state(1)
    store = ckptstore.open(str(tmp_path / "s"), chunk_size_bytes=CHUNK)
    first = store.commit(state, compression="never")
    for mode in ("always", "auto"):
        again = store.commit(state, compression=mode)
        assert again.stats.new_chunks == 0 and chunk_ids(store, again) == chunk_ids(store, first)
    ids = set()
    for mode in ("auto", "always", "never"):
        other = ckptstore.open(str(tmp_path / mode), compression=mode, chunk_size_bytes=CHUNK)
        ids.add(tuple(chunk_ids(other, other.commit(state))))
    assert ids == {tuple(chunk_ids(store, first))}


def test_a_commit_mode_overrides_the_stores(tmp_path):
    state = bf16_state(1)
    store = ckptstore.open(str(tmp_path / "s"), compression="always", chunk_size_bytes=CHUNK)
    store.commit(state, compression="never")
    assert set(chunk_codecs(store)) == {Codec.RAW}
    commit = store.commit(bf16_state(1, seed=1))
    assert chunk_codecs(store)[Codec.GROUPED] == commit.stats.new_chunks == 16


def test_never_makes_no_deltas_and_a_slow_sink_makes_auto_deltas(tmp_path):
    base = bf16_state(1)
    changed = dict(base, w0=base["w0"].clone())
    changed["w0"][::64] *= 1.5  # a sparse update: the XOR against the parent is mostly zeros
    never = ckptstore.open(str(tmp_path / "never"), compression="never", delta="auto", chunk_size_bytes=CHUNK)
    never.commit(base)
    assert never.commit(changed).stats.delta_chunks == 0
    slow = ckptstore.open(str(tmp_path / "slow"), delta="auto", chunk_size_bytes=CHUNK)
    cap_writes(slow.objects, 20e6)
    slow.commit(base)
    commit = slow.commit(changed)
    assert commit.stats.delta_chunks >= 3  # of the 4 chunks of w0 that changed
    assert_same(slow.checkout(commit.id), changed)


def test_bad_mode_names_are_refused_naming_the_option(tmp_path):
    with pytest.raises(InvalidOption, match="compression") as caught:
        ckptstore.open(str(tmp_path / "s"), compression="fast")
    assert caught.value.name == "compression"
    store = ckptstore.open(str(tmp_path / "s"))
    with pytest.raises(InvalidOption, match="compression"):
        store.commit({"x": torch.zeros(4)}, compression="zstd")
    with pytest.raises(ValueError, match="compression"):
        store.commit({"x": torch.zeros(4)}, compression=True)  # type: ignore[arg-type]
    assert store.objects.list("chunks/") == [] and store.objects.list("manifests/") == []


def test_the_balance_encodes_while_the_sink_is_behind_and_not_while_the_cpu_is():
    """The rule itself, on measurements given to it: a sink of 100 MB/s against an encoder
    of 500 MB/s per core: encode; a sink of 5 GB/s: write raw, except to keep both busy."""
    n = 16 << 20

    def measured(sink_bytes_per_s: float) -> EncodingBalance:
        balance = EncodingBalance(cores=2, writers=2)
        balance.worked(n, n / 5e9, encoded=(Codec.GROUPED, 2, n / 500e6))
        with balance.writing(n):
            time.sleep(2 * n / sink_bytes_per_s)  # each of the 2 writers waits this long
        balance.start_commit()
        return balance

    slow = measured(100e6)
    assert all(slow.choose(n, 2, Codec.GROUPED, 0.67) for _ in range(50))
    fast = measured(5e9)
    choices = [fast.choose(n, 2, Codec.GROUPED, 0.67) for _ in range(50)]
    assert choices.count(False) >= 40 and choices.count(True) >= 1  # raw mostly; encoding only while the sink is behind
    unknown = EncodingBalance(cores=2, writers=2)
    assert unknown.choose(n, 2, Codec.ZSTD, 0.5)  # nothing measured yet: a probe
