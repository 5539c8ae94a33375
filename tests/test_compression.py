"""Byte-grouped and delta encodings: bit-exact round trips for every dtype and codec, bounded
delta chains, bases that survive, damaged bases that are detected."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from soak import SOAK
from states import assert_same, every_dtype

import ckptstore
from ckptstore.codec import (
    DELTA_AUTO_MAX_RATIO,
    GROUP_SIZES,
    HEADER_SIZE,
    Codec,
    DeltaBase,
    Encoded,
    Kind,
    _encode_body,
    _frame,
    _Plan,
    _plan,
    decode_into,
    decode_object,
    encode_object,
    parse_frame,
)
from ckptstore.ids import content_id
from ckptstore.layout import chunk_key
from ckptstore.recent_chunks import RecentChunks

EXAMPLES = 2000 if SOAK else 150


def _join(parts) -> bytes:
    return b"".join(bytes(p) for p in parts)


def _decode(framed: bytes, size: int, base: bytes | None = None) -> bytes:
    frame = parse_frame(framed, key="k", kind=Kind.CHUNK, max_raw_size=size)
    target = np.frombuffer(bytearray(base), dtype=np.uint8) if base is not None else np.empty(size, dtype=np.uint8)
    decode_into(frame, target, xor=base is not None, key="k")
    return target.tobytes()


def _special_floats(dtype: torch.dtype, n: int, seed: int) -> bytes:
    """Values with NaN payloads, both zeros, infinities and subnormals among normal ones."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(n, generator=g, dtype=torch.float64) * 10 ** torch.randint(-8, 8, (n,), generator=g)).to(dtype)
    raw = bytearray(t.view(torch.uint8).numpy().tobytes())
    size = t.element_size()
    specials = {
        2: [b"\x00\x80", b"\x01\x00", b"\x81\x7f", b"\xc1\xff", b"\x80\x7f", b"\x01\x7c", b"\x01\xfe"],
        4: [
            struct.pack("<f", -0.0),
            struct.pack("<I", 1),
            struct.pack("<I", 0x7FC12345),
            struct.pack("<I", 0xFF812345),
            struct.pack("<f", float("inf")),
        ],
        8: [struct.pack("<d", -0.0), struct.pack("<Q", 1), struct.pack("<Q", 0x7FF8DEADBEEF0001), struct.pack("<d", float("-inf"))],
    }.get(size, [])
    for i, value in enumerate(specials * 3):
        at = (i * 7919 % n) * size
        raw[at : at + size] = value
    return bytes(raw)


FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("codec", [Codec.RAW, Codec.ZSTD, Codec.GROUPED])
@pytest.mark.parametrize("n", [1, 3, 1000, 70_001])
def test_every_codec_round_trips_special_floats_bit_exact(dtype, codec, n):
    raw = _special_floats(dtype, n, seed=n)
    group = torch.empty(0, dtype=dtype).element_size()
    values = np.frombuffer(raw, dtype=np.uint8)
    plan = _Plan(codec, (True,) * group)
    chosen, body = _encode_body(values, plan, group=group, level=3, scratch=None)
    framed = _join(_frame(Kind.CHUNK, chosen, len(raw), body))
    assert _decode(framed, len(raw)) == raw
    # The same values, encoded the way the codec chooses, and as a delta against others.
    assert _decode(_join(encode_object(Kind.CHUNK, raw, compression_level=3, group_bytes=group).parts), len(raw)) == raw
    base = _special_floats(dtype, n, seed=n + 1)
    delta = encode_object(Kind.CHUNK, raw, compression_level=3, group_bytes=group, base=DeltaBase.of(base, (content_id(base),), group_bytes=group), delta="on")
    if len(raw) < 256:  # too small to be worth encoding at all
        assert delta.codec is Codec.RAW and _decode(_join(delta.parts), len(raw)) == raw
        return
    assert delta.codec is Codec.DELTA and delta.bases == (content_id(base),)
    assert _decode(_join(delta.parts), len(raw), base=base) == raw


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    raw=st.binary(min_size=0, max_size=5000),
    group=st.sampled_from([1, *GROUP_SIZES, 3]),
    level=st.sampled_from([None, 1, 3]),
    codec=st.sampled_from([Codec.RAW, Codec.ZSTD, Codec.GROUPED]),
    planes=st.lists(st.booleans(), min_size=8, max_size=8),
    base=st.one_of(st.none(), st.binary(min_size=0, max_size=5000)),
)
def test_any_bytes_round_trip_through_any_codec_choice(raw, group, level, codec, planes, base):
    """Any bit pattern (every NaN payload, negative zero, subnormals) of any value size comes
    back bit-exact, whichever encoding is forced or chosen, as a delta or not."""
    values = np.frombuffer(raw, dtype=np.uint8)
    forced_group = group if group in GROUP_SIZES else 2
    chosen, body = _encode_body(values, _Plan(codec, tuple(planes[:forced_group])), group=forced_group, level=level or 1, scratch=None)
    assert _decode(_join(_frame(Kind.CHUNK, chosen, len(raw), body)), len(raw)) == raw
    base_ok = base is not None and len(base) == len(raw)
    delta_base = DeltaBase.of(base, (content_id(base),), group_bytes=group) if base_ok else None
    encoded = encode_object(Kind.CHUNK, raw, compression_level=level, group_bytes=group, base=delta_base, delta="on")
    framed = _join(encoded.parts)
    if encoded.codec is Codec.DELTA:
        assert level is not None and base_ok and len(raw) >= 256
        assert _decode(framed, len(raw), base=base) == raw
    else:
        assert bytes(decode_object(framed, key="k", kind=Kind.CHUNK, max_raw_size=len(raw))) == raw


def test_byte_grouping_is_chosen_for_floats_and_beats_plain_zstd():
    g = torch.Generator().manual_seed(0)
    weights = (torch.randn(1 << 20, generator=g) * 0.02).to(torch.bfloat16)
    raw = weights.view(torch.uint8).numpy()
    grouped = encode_object(Kind.CHUNK, raw, compression_level=3, group_bytes=2)
    plain = encode_object(Kind.CHUNK, raw, compression_level=3, group_bytes=1)
    assert grouped.codec is Codec.GROUPED
    assert grouped.stored_bytes < 0.9 * plain.stored_bytes
    noise = os.urandom(1 << 20)  # incompressible: stored raw whatever the value size
    assert encode_object(Kind.CHUNK, noise, compression_level=3, group_bytes=4).codec is Codec.RAW


@pytest.mark.parametrize("group", GROUP_SIZES)
def test_a_residual_plan_gives_up_only_where_it_could_not_pay(group):
    rng = np.random.default_rng(group)
    for changed_planes in range(group + 1):  # the low planes noise, the high ones mostly zero
        values = rng.integers(0, 256, size=(4096, group), dtype=np.uint8)
        values[:, changed_planes:] *= rng.random((4096, group - changed_planes)) < 0.05
        sample = values.reshape(-1)
        full = _plan(sample, group=group, level=3, min_saving=0.2, residual=True)
        for limit in np.linspace(0, len(sample), 17):
            planned = _plan(sample, group=group, level=3, min_saving=0.2, residual=True, give_up_above=limit)
            assert planned == (full if full.estimate_bytes <= limit else None), (changed_planes, limit)


def test_auto_delta_is_kept_only_where_it_pays():
    g = torch.Generator().manual_seed(0)
    before = torch.randn(1 << 18, generator=g) * 0.02
    step = torch.randn(1 << 18, generator=g) * 1e-5  # some optimizer steps on every value
    touched = torch.rand(1 << 18, generator=g) < 0.05  # only some rows moved (an embedding)

    def encode(after: torch.Tensor, base: torch.Tensor, delta: str) -> Encoded:
        base_bytes = DeltaBase.of(base.view(torch.uint8).numpy(), ("0" * 32,), group_bytes=after.element_size())
        return encode_object(Kind.CHUNK, after.view(torch.uint8).numpy(), compression_level=3, group_bytes=after.element_size(), base=base_bytes, delta=delta)

    # bf16: the step leaves the sign, exponent and high mantissa bits: a small fraction
    bf16 = encode((before + step).bfloat16(), before.bfloat16(), "auto")
    assert bf16.codec is Codec.DELTA
    # fp32: the low mantissa bytes change whatever the step; the delta about halves the chunk,
    # kept with "on" but not worth its CPU with "auto"
    every = before + step
    halved = encode(every, before, "on")
    assert halved.codec is Codec.DELTA
    assert DELTA_AUTO_MAX_RATIO * len(every.view(torch.uint8)) < halved.stored_bytes < 0.7 * len(every.view(torch.uint8))
    assert encode(every, before, "auto").codec is not Codec.DELTA
    # fp32 with most values unchanged: far smaller, kept with "auto"
    assert encode(torch.where(touched, every, before), before, "auto").codec is Codec.DELTA
    unrelated = encode(torch.randn(1 << 18, generator=g) * 0.02, before, "auto")
    assert unrelated.codec is not Codec.DELTA and unrelated.bases == ()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda body: body[:5], "truncated"),
        (lambda body: bytes([3]) + body[1:], "group size"),
        (lambda body: body + b"x", "add up"),
        (lambda body: body[:1] + bytes([7]) + body[2:], "codec"),
    ],
)
def test_malformed_grouped_bodies_are_refused(mutate, match):
    raw = (torch.randn(4096) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    encoded = encode_object(Kind.CHUNK, raw, compression_level=3, group_bytes=2)
    assert encoded.codec is Codec.GROUPED
    body = _join(encoded.parts)[HEADER_SIZE:]
    bad = mutate(body)
    framed = _join(_frame(Kind.CHUNK, Codec.GROUPED, len(raw), [bad]))
    with pytest.raises(ckptstore.IntegrityError, match=match):
        _decode(framed, len(raw))


def test_delta_chains_are_refused_when_malformed():
    raw = bytes(1000)
    for prefix, match in [(b"", "empty"), (bytes([0]), "chain of 0"), (bytes([65]), "chain of 65"), (bytes([2]) + bytes(16), "truncated"),
                          (bytes([2]) + bytes(32) + bytes([0]), "repeats"), (bytes([1]) + bytes(16) + bytes([3]), "residual")]:  # fmt: skip
        framed = _join(_frame(Kind.CHUNK, Codec.DELTA, len(raw), [prefix]))
        with pytest.raises(ckptstore.IntegrityError, match=match):
            parse_frame(framed, key="k", kind=Kind.CHUNK, max_raw_size=len(raw))
    with pytest.raises(ckptstore.IntegrityError, match="delta"):  # only chunks may be deltas
        parse_frame(_join(_frame(Kind.MANIFEST, Codec.DELTA, 0, [bytes([1]) + bytes(17)])), key="k", kind=Kind.MANIFEST, max_raw_size=10)


# --------------------------------------------------------------------------------------------
# Through a store


def fine_tuning(steps: int, *, dtype=torch.bfloat16, lr: float = 1e-5, seed: int = 0):
    """States of a small run: weights moved by small steps, a step counter, every dtype once."""
    g = torch.Generator().manual_seed(seed)
    w = {"a": torch.randn(64, 256, generator=g) * 0.02, "b": torch.randn(3000, generator=g), "frozen": torch.randn(2048, generator=g)}
    extra = {"ids": torch.arange(5000), "mask": torch.rand(5000, generator=g) > 0.5}
    for step in range(steps):
        if step:
            w = {k: (v if k == "frozen" else v - lr * torch.sign(torch.randn(v.shape, generator=g))) for k, v in w.items()}
        yield {"model": {k: v.to(dtype) for k, v in w.items()}, "extra": extra, "step": step}


def _chain_lengths(store, commit, *, path: str | None = None) -> list[int]:
    """The chain length of every chunk of the commit, or of the tensor at ``path``."""
    manifest = store.get_manifest(commit.manifest)
    blobs = [manifest.blobs[e.blob] for e in manifest.tensors if e.path == path] if path else manifest.blobs
    return [len(c.bases) for b in blobs for c in b.chunks]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_deltas_round_trip_with_chains_bounded_by_the_keyframe_interval(tmp_path, dtype):
    store = ckptstore.open(str(tmp_path / "s"), chunk_size_bytes=8192, inline_threshold_bytes=1024, delta="on", delta_keyframe_interval=4)
    states, commits = [], []
    for state in fine_tuning(10, dtype=dtype):
        commits.append(store.commit(state))
        states.append(state)
    chains = [_chain_lengths(store, c) for c in commits]
    assert max(map(max, chains)) == 3  # delta, delta, delta, then a keyframe: 4 objects at most
    assert chains[0] == [0] * len(chains[0]) and any(chains[1])
    assert any(c.stats.delta_chunks for c in commits[1:])
    reopened = ckptstore.open(str(tmp_path / "s"))  # no cache: every base is read back
    for state, commit in zip(states, commits):
        assert_same(state, reopened.checkout(commit.id))
    assert reopened.fsck(read_data=True).ok


def test_a_checkout_reads_at_most_keyframe_interval_objects_per_chunk(tmp_path):
    store = ckptstore.open(str(tmp_path / "s"), chunk_size_bytes=8192, inline_threshold_bytes=1024, delta="on", delta_keyframe_interval=3)
    for state in fine_tuning(6):  # chains of 0, 1, 2, then 0 (a keyframe), 1, 2
        last = store.commit(state)
    manifest = store.get_manifest(last.manifest)
    chunks = sum(len(b.chunks) for b in manifest.blobs)
    opened: list[str] = []
    reader = store.objects.reader
    store.objects.reader = lambda key: (opened.append(key), reader(key))[1]  # type: ignore[method-assign]
    store.checkout(last.id)
    per_chunk = {c.id: 1 + len(c.bases) for b in manifest.blobs for c in b.chunks}
    assert len(opened) == sum(per_chunk.values()) <= 3 * chunks
    assert max(per_chunk.values()) == 3


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30], ids=["bases-read-back", "bases-cached"])
def test_the_delta_base_cache_changes_nothing_stored(tmp_path, cache_bytes):
    stores = {}
    for name in ("a", "b"):
        store = ckptstore.open(
            str(tmp_path / name),
            chunk_size_bytes=8192,
            inline_threshold_bytes=1024,
            delta="on",
            delta_base_cache_bytes=cache_bytes if name == "a" else 1 << 30,
        )
        stores[name] = [store.commit(s).manifest for s in fine_tuning(5)]
    assert stores["a"] == stores["b"]


def _auto_states():
    """bf16 weights whose deltas pay at every step; fp32 weights whose deltas do not (every
    value moves), then do (a few values move): their bases are then only sampled in memory."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * 0.02
    for step in range(5):
        if step == 1:
            w = w + 1e-5 * torch.randn(w.shape, generator=g)
        elif step:
            w = torch.where(torch.rand(w.shape, generator=g) < 0.02, w + 1e-5, w)
        yield {"bf16": w.bfloat16(), "fp32": w.clone(), "step": step}


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30], ids=["bases-read-back", "bases-cached"])
def test_auto_deltas_choose_alike_whether_bases_are_kept_sampled_or_read_back(tmp_path, cache_bytes):
    states = list(_auto_states())
    manifests = {}
    for name, cache in (("probe", cache_bytes), ("reference", 0)):
        store = ckptstore.open(
            str(tmp_path / name),
            chunk_size_bytes=8192,
            inline_threshold_bytes=1024,
            delta="auto",
            delta_keyframe_interval=3,
            delta_base_cache_bytes=cache,
            compression="always",
        )  # the codec's rule, not the sink's speed
        commits = []
        for step, state in enumerate(states):
            commits.append(store.commit(state))
            if cache:  # kept: the bytes of new chunks, deltas and keyframes ending a chain, else a sample
                after = store.get_manifest(commits[-1].manifest)
                for path, chained_from in (("bf16", 1), ("fp32", 2)):  # step 4 ends fp32's chain
                    ids = [c.id for e in after.tensors if e.path == path for c in after.blobs[e.blob].chunks]
                    whole = step == 0 or step >= chained_from
                    assert all((store.pipeline.recent.get(i) is not None) == whole for i in ids), (step, path)
                    assert all((store.pipeline.recent.get_sample(i) is not None) != whole for i in ids), (step, path)
        manifests[name] = [c.manifest for c in commits]
        assert all(_chain_lengths(store, commits[1], path="bf16")) and not any(_chain_lengths(store, commits[1], path="fp32"))
        assert all(_chain_lengths(store, commits[2], path="fp32"))  # the fp32 deltas pay once few values move
        for state, commit in zip(states, commits):
            assert_same(state, store.checkout(commit.id))
    assert manifests["probe"] == manifests["reference"]


def test_the_base_cache_keeps_bytes_or_samples_within_its_limit():
    recent = RecentChunks(limit_bytes=10_000)
    chunks = {name: np.full(3000, i, dtype=np.uint8) for i, name in enumerate("abcefgh")}
    ids = {name: content_id(data) for name, data in chunks.items()}
    for name in "abc":
        recent.put(ids[name], chunks[name])
    data = chunks["a"]
    data[:] = 99  # the caller's buffer changes: the cache holds a copy
    assert recent.get(ids["a"])[0] == 0 and recent.get_sample(ids["a"]) is None
    recent.put(content_id(np.full(3000, 7, dtype=np.uint8)), data)  # bytes that are not the id's: refused
    assert recent.get(content_id(np.full(3000, 7, dtype=np.uint8))) is None
    recent.put_sample(ids["a"], np.zeros(10, dtype=np.uint8))  # the bytes are kept, not the sample
    assert recent.get(ids["a"]) is not None and recent.get_sample(ids["a"]) is None
    recent.put_sample("d", np.arange(10, dtype=np.uint8))
    assert recent.get("d") is None and list(recent.get_sample("d")) == list(range(10))
    recent.retire([ids["a"], ids["b"]])  # spare buffers are kept only as many as there are bytes cached
    assert recent.get(ids["a"]) is None and recent._spare_bytes <= recent._cached_bytes == 3010
    recent.put(ids["e"], chunks["e"])  # reuses a spare
    assert recent._spare_bytes == 0 and recent._bytes == 6010
    for name in "fgh":  # over the limit: the least recently used go first
        recent.put(ids[name], chunks[name])
    assert recent._bytes <= 10_000 and recent.get(ids["h"]) is not None and recent.get(ids["c"]) is None
    huge = np.ones(20_000, dtype=np.uint8)
    recent.put(content_id(huge), huge)  # larger than the limit: not kept
    assert recent.get(content_id(huge)) is None


def test_delta_mode_per_commit_overrides_the_store(tmp_path):
    store = ckptstore.open(str(tmp_path / "s"), chunk_size_bytes=8192, inline_threshold_bytes=1024)
    states = list(fine_tuning(3))
    store.commit(states[0])
    off = store.commit(states[1])
    on = store.commit(states[2], delta="on")
    assert not any(_chain_lengths(store, off)) and any(_chain_lengths(store, on))
    with pytest.raises(ValueError, match="delta"):
        store.commit(states[2], delta="sometimes")
    with pytest.raises(ValueError, match="delta"):
        ckptstore.open(str(tmp_path / "t"), delta="yes")


def test_a_chunk_already_stored_as_a_delta_is_reused_with_its_chain(tmp_path):
    """A writer with deltas off that meets a chunk another writer stored as a delta records
    that chunk's chain, so GC keeps its bases."""
    url = str(tmp_path / "s")
    states = list(fine_tuning(2))
    writer = ckptstore.open(url, chunk_size_bytes=8192, inline_threshold_bytes=1024, delta="on")
    writer.commit(states[0])
    first = writer.commit(states[1])
    other = ckptstore.open(url, chunk_size_bytes=8192, inline_threshold_bytes=1024)
    again = other.commit(states[1], branch="other")
    assert again.manifest == first.manifest  # the same chunks, with the same chains
    other.delete_branch("main", force=True)
    other.delete_tag("best") if "best" in other.tags() else None
    other.gc(grace_period_s=0)
    assert_same(states[1], other.checkout("other"))
    assert other.fsck(read_data=True).ok


def test_a_damaged_base_is_detected_in_every_delta_that_needs_it(tmp_path):
    store = ckptstore.open(str(tmp_path / "s"), chunk_size_bytes=8192, inline_threshold_bytes=1024, delta="on")
    states = list(fine_tuning(3))
    commits = [store.commit(s) for s in states]
    last = store.get_manifest(commits[-1].manifest)
    ref = next(c for b in last.blobs for c in b.chunks if len(c.bases) == 2)
    base_key = chunk_key(ref.bases[-1])  # the keyframe under a chain of two
    data = bytearray(store.objects.get(base_key))
    data[-1] ^= 1
    path = os.path.join(str(tmp_path / "s"), base_key)
    os.chmod(path, 0o644)
    with open(path, "wb") as f:
        f.write(data)
    report = store.fsck(read_data=True)
    keys = {p.key for p in report.problems}
    assert base_key in keys and chunk_key(ref.id) in keys and chunk_key(ref.bases[0]) in keys
    dependent = next(p for p in report.problems if p.key == chunk_key(ref.id))
    assert base_key in dependent.message and dependent.commit and dependent.path
    with pytest.raises(ckptstore.IntegrityError) as excinfo:
        ckptstore.open(str(tmp_path / "s")).checkout(commits[-1].id)
    assert excinfo.value.key == base_key


@pytest.mark.parametrize("delta", ["on", "auto"])
def test_a_cached_base_whose_object_is_gone_is_never_used(tmp_path, delta):
    store = ckptstore.open(str(tmp_path / "s"), chunk_size_bytes=8192, inline_threshold_bytes=1024, delta=delta)
    states = list(_auto_states())
    first = store.commit(states[0])
    gone = [c.id for b in store.get_manifest(first.manifest).blobs for c in b.chunks]
    assert any(store.pipeline.recent.get(i) is not None for i in gone)  # cached, then removed (as by GC)
    store.objects.delete_many([chunk_key(i) for i in gone])
    second = store.commit(states[1])
    assert not any(_chain_lengths(store, second))  # stored whole: no delta against a missing base
    assert_same(states[1], store.checkout(second.id))


def test_a_commit_goes_on_with_keyframes_when_its_parent_is_damaged(tmp_path):
    store = ckptstore.open(str(tmp_path / "s"), chunk_size_bytes=8192, inline_threshold_bytes=1024, delta="on", delta_base_cache_bytes=0)
    states = list(fine_tuning(2))
    first = store.commit(states[0])
    manifest = store.get_manifest(first.manifest)
    victim = manifest.blobs[next(e.blob for e in manifest.tensors if e.path == "model/a")].chunks[0]
    os.remove(os.path.join(str(tmp_path / "s"), chunk_key(victim.id)))
    second = store.commit(states[1])
    assert_same(states[1], store.checkout(second.id))
    refs = {c.id: c for b in store.get_manifest(second.manifest).blobs for c in b.chunks}
    assert all(victim.id not in c.bases for c in refs.values())


def test_manifests_without_deltas_keep_the_first_format(tmp_path):
    import msgpack

    from ckptstore.codec import decode_object as unframe
    from ckptstore.layout import manifest_key

    store = ckptstore.open(str(tmp_path / "s"), chunk_size_bytes=8192, inline_threshold_bytes=1024, delta="on")
    states = list(fine_tuning(2))
    formats = []
    for state in states:
        commit = store.commit(state)
        key = manifest_key(commit.manifest)
        raw = unframe(store.objects.get(key), key=key, kind=Kind.MANIFEST, max_raw_size=1 << 30)
        formats.append(msgpack.unpackb(raw)["format"])
    assert formats == [1, 2]


def test_every_dtype_round_trips_with_deltas(tmp_path):
    store = ckptstore.open(str(tmp_path / "s"), chunk_size_bytes=4096, inline_threshold_bytes=64, delta="on")
    for seed in range(3):
        state = every_dtype(seed=seed)
        commit = store.commit(state)
        assert_same(state, store.checkout(commit.id))


def test_ckpt_init_records_the_delta_settings(tmp_path):
    from click.testing import CliRunner

    from ckptstore.cli import cli

    url = str(tmp_path / "s")
    result = CliRunner().invoke(cli, ["--store", url, "init", "--delta", "on", "--delta-keyframe-interval", "2"])
    assert result.exit_code == 0, result.output
    store = ckptstore.open(url, chunk_size_bytes=8192, inline_threshold_bytes=1024)
    assert (store.config.delta, store.config.delta_keyframe_interval) == ("on", 2)
    commits = [store.commit(s) for s in fine_tuning(3)]
    assert [max(_chain_lengths(store, c)) for c in commits] == [0, 1, 0]
    bad = CliRunner().invoke(cli, ["--store", str(tmp_path / "t"), "init", "--delta", "maybe"])
    assert bad.exit_code != 0 and "maybe" in bad.output


def test_tensors_sharing_a_base_chunk_are_encoded_against_intact_bytes(tmp_path):
    """Many chunks whose parent chunk is the same (zero-initialised tensors) are encoded in
    parallel against one cached base, which must stay intact while any of them reads it."""
    store = ckptstore.open(str(tmp_path / "s"), chunk_size_bytes=8192, inline_threshold_bytes=1024, delta="on", threads=8)
    g = torch.Generator().manual_seed(0)
    state = {f"b{i}": torch.zeros(20_000, dtype=torch.bfloat16) for i in range(16)}
    commits, states = [store.commit(state)], [state]
    for _ in range(4):
        state = {k: (v.float() + 1e-2 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in state.items()}
        commits.append(store.commit(state))
        states.append(state)
    assert sum(c.stats.delta_chunks for c in commits) > 16
    for state, commit in zip(states, commits):
        assert_same(state, store.checkout(commit.id))
