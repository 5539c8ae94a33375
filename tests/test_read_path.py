"""The read path of a checkout (issue 19): chunks read ahead of the decoders, straight into
the tensors' memory.

Checked here as behaviour, not speed: every dtype and every codec (raw, zstd, byte planes,
delta chains) checks out bit-exact through it on every backend; a damaged chunk is still
refused with readahead on; readahead announces only chunks of the checkout, each once, and
never more than the pipeline's byte budget ahead of what is decoded.
"""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import pytest
import torch
from states import assert_same

import ckptstore
from ckptstore.backends.local import LocalObjectStore
from ckptstore.codec import CHAIN_PREFIX_BYTES, HEADER_SIZE, Codec, Kind, delta_chain, read_header
from ckptstore.errors import IntegrityError
from ckptstore.layout import chunk_key
from ckptstore.pipeline import ByteBudget, ChunkReader

CHUNK = 8 << 10

#: Encode whatever pays, whatever the machine's speed (where the store chooses by timing).
ALWAYS = {"compression": "always"} if "compression" in inspect.signature(ckptstore.open).parameters else {}


def state_of(step: int) -> dict[str, torch.Tensor]:
    """Tensors of every dtype, each many chunks long: floats that byte planes compress,
    integers that zstd compresses, random bytes that stay raw; ``step`` moves the floats a
    little (a delta against the step before pays)."""
    g = torch.Generator().manual_seed(0)
    n = 24 << 10
    out: dict[str, torch.Tensor] = {}
    base = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    moved = base * (1 + 1e-3 * step)
    for name, dtype in (("f64", torch.float64), ("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
        out[name] = moved.to(dtype)
    out["c64"] = torch.complex(moved.float(), -moved.float())
    out["i64"] = torch.arange(n, dtype=torch.int64) // 7
    out["i32"] = (torch.arange(n, dtype=torch.int32) % 300).to(torch.int32)
    out["i16"] = (torch.arange(n) % 5).to(torch.int16)
    out["u8"] = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)  # raw
    out["bool"] = torch.arange(n) % 3 == 0
    out["f8"] = (moved * 10).to(torch.float8_e4m3fn) if hasattr(torch, "float8_e4m3fn") else moved.half()
    out["tied"] = out["f32"]
    out["view_t"] = out["f32"][: 96 * 128].view(96, 128).t()
    return out


def stored_codecs(store: ckptstore.Store) -> set[str]:
    """The codecs of the stored chunks (a delta's as ``delta/`` and its residual's)."""
    found = set()
    for key in store.objects.list("chunks/"):
        prefix = store.objects.get_range(key, 0, CHAIN_PREFIX_BYTES)
        codec, _, _ = read_header(prefix, key=key, kind=Kind.CHUNK)
        residual = delta_chain(memoryview(prefix)[HEADER_SIZE:], key=key)[1] if codec is Codec.DELTA else None
        found.add(f"delta/{residual.name}" if residual is not None else codec.name)
    return found


def test_every_dtype_and_codec_checks_out_bit_exact_on_every_backend(store_url) -> None:
    url, options = store_url
    store = ckptstore.open(url, storage_options=options, chunk_size_bytes=CHUNK, inline_threshold_bytes=1024, compression_level=3, delta="on",
                           threads=4, max_inflight_bytes=6 * CHUNK, **ALWAYS)  # fmt: skip
    commits = [store.commit(state_of(step), message=f"step {step}").id for step in range(3)]
    assert stored_codecs(store) >= {"RAW", "ZSTD", "GROUPED", "delta/GROUPED"}
    manifest = store.manifest_of(store.commit_of(commits[-1]))
    assert max(len(ref.bases) for blob in manifest.blobs for ref in blob.chunks or ()) == 2  # a chain of two bases
    store.close()

    reopened = ckptstore.open(url, storage_options=options, threads=4, max_inflight_bytes=6 * CHUNK)
    for step, commit in enumerate(commits):
        out = reopened.checkout(commit)
        assert_same(state_of(step), out)
        assert out["tied"].untyped_storage().data_ptr() == out["f32"].untyped_storage().data_ptr()
    reopened.close()


class RecordingStore(LocalObjectStore):
    """A local store that logs the hints it is given, in order (the test adds the chunk
    reads' starts and ends to the same log)."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def will_read(self, key: str) -> None:
        with self.lock:
            self.events.append(("hint", key))
        super().will_read(key)


def test_readahead_stays_within_the_byte_budget_and_announces_each_chunk_once(tmp_path: Path, monkeypatch) -> None:
    budget = 5 * CHUNK
    store = ckptstore.open(
        str(tmp_path / "s"),
        chunk_size_bytes=CHUNK,
        inline_threshold_bytes=1024,
        compression_level=3,
        threads=3,
        max_inflight_bytes=budget,
        **ALWAYS,
    )
    state = {f"t{i}": torch.randn(16 << 10, generator=torch.Generator().manual_seed(i)) for i in range(6)}  # 48 chunks
    commit = store.commit(state)
    store.close()

    objects = RecordingStore(str(tmp_path / "s"))
    reader = ChunkReader(objects)
    read_into = ChunkReader.read_into
    staged = {"now": 0, "peak": 0}
    acquire, release = ByteBudget.acquire, ByteBudget.release

    def logged_read_into(self, ref, target, **kw):
        with objects.lock:
            objects.events.append(("start", chunk_key(ref.id)))
        read_into(self, ref, target, **kw)
        with objects.lock:
            objects.events.append(("done", chunk_key(ref.id)))

    def counted_acquire(self, n):
        acquire(self, n)
        with objects.lock:
            staged["now"] += n
            staged["peak"] = max(staged["peak"], staged["now"])

    def counted_release(self, n):
        with objects.lock:
            staged["now"] -= n
        release(self, n)

    monkeypatch.setattr(ChunkReader, "read_into", logged_read_into)
    monkeypatch.setattr(ByteBudget, "acquire", counted_acquire)
    monkeypatch.setattr(ByteBudget, "release", counted_release)
    reading = ckptstore.open(str(tmp_path / "s"), threads=3, max_inflight_bytes=budget)
    reading.objects = objects
    reading.pipeline._objects = objects
    reading.pipeline.reader = reader
    out = reading.checkout(commit.id)
    assert_same(state, out)

    manifest = reading.manifest_of(commit)
    wanted = {chunk_key(ref.id): ref.size for blob in manifest.blobs for ref in blob.chunks or ()}
    assert len(wanted) == 48
    hints = [key for kind, key in objects.events if kind == "hint"]
    assert hints, "a checkout with several workers reads ahead"
    assert set(hints) <= set(wanted), "only the checkout's own chunks are announced (whole objects, nothing past them)"
    assert len(hints) == len(set(hints)), "each chunk is announced once"
    assert staged["peak"] <= budget
    # At every moment, the chunks announced or being read and not yet decoded fit in the
    # budget (a hint that arrives once its chunk is being read, or read, holds nothing more).
    pending: set[str] = set()
    started: set[str] = set()
    for kind, key in objects.events:
        if kind == "start":
            started.add(key)
        if kind == "start" or (kind == "hint" and key not in started):
            pending.add(key)
        elif kind == "done":
            pending.discard(key)
        assert sum(wanted[k] for k in pending) <= budget, f"after {kind} {key}: {len(pending)} chunks ahead"


def test_readahead_hint_is_harmless(tmp_path: Path) -> None:
    objects = LocalObjectStore(str(tmp_path / "o"))
    objects.will_read("chunks/ab/missing")  # nothing to read ahead: no error, nothing created
    assert objects.list() == []
    objects.put_if_absent("chunks/ab/x", b"0123456789")
    objects.will_read("chunks/ab/x")
    assert objects.get("chunks/ab/x") == b"0123456789"


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove"])
def test_damaged_chunk_is_refused_with_readahead_on(tmp_path: Path, damage: str) -> None:
    store = ckptstore.open(
        str(tmp_path / "s"),
        chunk_size_bytes=CHUNK,
        inline_threshold_bytes=1024,
        compression_level=3,
        threads=4,
        max_inflight_bytes=4 * CHUNK,
        **ALWAYS,
    )
    state = state_of(0)
    commit = store.commit(state)
    manifest = store.manifest_of(commit)
    refs = [ref for blob in manifest.blobs for ref in blob.chunks or ()]
    victim = refs[len(refs) * 2 // 3]
    path = tmp_path / "s" / chunk_key(victim.id)
    data = path.read_bytes()
    path.chmod(0o644)
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 7])
    elif damage == "flip":
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 0x10]) + data[-99:])
    else:
        path.unlink()
    with pytest.raises(IntegrityError) as info:
        store.checkout(commit.id)
    assert victim.id in str(info.value)
    store.close()
