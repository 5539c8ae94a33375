"""Object frames, manifests and trees: round trips and distrust of hostile input."""

from __future__ import annotations

import os
import struct

import msgpack
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from states import assert_same, every_dtype

import ckptstore
from ckptstore.codec import HEADER, MAGIC, Kind, decode_object, encode_object_bytes
from ckptstore.manifest import Manifest, encode_state
from ckptstore.tree import unpack_value


@pytest.mark.parametrize("level", [None, 1, 3, 19])
@pytest.mark.parametrize("data", [b"", b"x", bytes(10_000), bytes(range(256)) * 1000, torch.randn(50_000).numpy().tobytes()])
def test_frames_round_trip(level, data):
    framed = encode_object_bytes(Kind.CHUNK, data, compression_level=level)
    assert bytes(decode_object(framed, key="k", kind=Kind.CHUNK, max_raw_size=len(data))) == data


def test_compression_is_kept_only_where_it_pays():
    zeros = encode_object_bytes(Kind.CHUNK, bytes(1 << 20), compression_level=3)
    noise = os.urandom(1 << 20)
    random_frame = encode_object_bytes(Kind.CHUNK, noise, compression_level=3)
    assert len(zeros) < 1000
    assert len(random_frame) == HEADER.size + len(noise)  # stored raw


def _frame(raw_size, body, *, version=1, kind=Kind.CHUNK, codec=1, reserved=0):
    return HEADER.pack(MAGIC, version, kind, codec, reserved, raw_size, len(body)) + body


def test_forged_zstd_frame_declaring_64_gib_is_refused_before_decompressing():
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 20))
    with pytest.raises(ckptstore.IntegrityError, match="declares"):
        decode_object(_frame(64 << 30, bomb), key="k", kind=Kind.CHUNK, max_raw_size=1 << 20)
    # The header agrees with the manifest, but the zstd frame inside declares more.
    with pytest.raises(ckptstore.IntegrityError, match="zstd frame declares"):
        decode_object(_frame(1000, bomb), key="k", kind=Kind.CHUNK, max_raw_size=1000)
    # No content size in the zstd frame: output is capped at the declared size.
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    with pytest.raises(ckptstore.IntegrityError):
        decode_object(_frame(1000, cctx.compress(bytes(1 << 20))), key="k", kind=Kind.CHUNK, max_raw_size=1000)


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (b"", ckptstore.IntegrityError),
        (b"CKP", ckptstore.IntegrityError),
        (b"XXXX" + bytes(30), ckptstore.IntegrityError),
        (_frame(3, b"abc", version=2, codec=0), ckptstore.UnsupportedFormat),
        (_frame(3, b"abc", codec=7), ckptstore.UnsupportedFormat),
        (_frame(3, b"abc", codec=0, reserved=1), ckptstore.IntegrityError),
        (_frame(3, b"abc", codec=0, kind=Kind.MANIFEST), ckptstore.IntegrityError),
        (_frame(4, b"abc", codec=0), ckptstore.IntegrityError),
        (_frame(3, b"abc", codec=0)[:-1], ckptstore.IntegrityError),
        (_frame(3, b"garbage!", codec=1), ckptstore.IntegrityError),
    ],
)
def test_bad_frames_raise_typed_errors(frame, error):
    with pytest.raises(error):
        decode_object(frame, key="chunks/ab/x", kind=Kind.CHUNK, max_raw_size=100)


def test_every_dtype_through_manifest():
    state = every_dtype(seed=3)
    manifest, sources = encode_state(state, inline_threshold_bytes=1 << 20)
    assert not sources  # all inline
    decoded = Manifest.from_bytes(manifest.to_bytes(), key="m")
    assert decoded == manifest


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format=99),
        lambda d: d.update(tensors=[["x", "float32", [10**9], None, 0, 0, 0, False]]),
        lambda d: d.update(tensors=[["x", "float33", [1], None, 0, 0, 0, False]]),
        lambda d: d.update(tensors=[["x", "float32", [2], None, 5, 0, 0, False]]),
        lambda d: d.update(tensors=[["x", "float32", [2], None, 0, 2, 0, False]]),
        lambda d: d.update(blobs=[[8, [["zz" * 16, 8]], None]]),
        lambda d: d.update(blobs=[[8, [["ab" * 16, 9]], None]]),
        lambda d: d.update(blobs=[[8, [], b"short"]]),
        lambda d: d.update(tree=msgpack.packb(msgpack.ExtType(1, msgpack.packb(7)))),
        lambda d: d.update(tree=msgpack.packb(msgpack.ExtType(42, b""))),
        lambda d: d.pop("tree"),
    ],
)
def test_malformed_manifests_are_refused(mutate):
    manifest, _ = encode_state({"x": torch.ones(2)}, inline_threshold_bytes=1 << 20)
    doc = msgpack.unpackb(manifest.to_bytes(), raw=False)
    mutate(doc)
    with pytest.raises((ckptstore.IntegrityError, ckptstore.UnsupportedFormat)):
        decoded = Manifest.from_bytes(msgpack.packb(doc, use_bin_type=True), key="m")
        unpack_value(decoded.tree, key="m", tensors=[object()] * len(decoded.tensors))


def test_deeply_nested_and_oversized_trees_are_refused():
    deep = 1
    for _ in range(1000):
        deep = [deep]
    with pytest.raises(ckptstore.UnsupportedValue, match="nested deeper"):
        encode_state({"deep": deep}, inline_threshold_bytes=0)
    tuples = ()
    for _ in range(40):
        tuples = (tuples,)
    with pytest.raises(ckptstore.UnsupportedValue, match="nested deeper"):
        encode_state({"tuples": tuples}, inline_threshold_bytes=0)
    nested_ext = msgpack.packb(7)
    for _ in range(5000):
        nested_ext = msgpack.packb(msgpack.ExtType(2, nested_ext))
    with pytest.raises(ckptstore.IntegrityError):
        unpack_value(nested_ext, key="m")


values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=4)
    | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=5) | st.integers(-5, 5), children, max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(values)
def test_any_plain_value_round_trips(value):
    manifest, _ = encode_state({"v": value}, inline_threshold_bytes=0)
    assert_same({"v": value}, unpack_value(manifest.tree, key="m"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_trees_and_manifests_raise_only_typed_errors(data):
    for decode in (lambda: unpack_value(data, key="m"), lambda: Manifest.from_bytes(data, key="m")):
        try:
            decode()
        except (ckptstore.IntegrityError, ckptstore.UnsupportedFormat):
            pass


def test_header_layout_is_24_bytes_little_endian():
    framed = encode_object_bytes(Kind.COMMIT, b"abc", compression_level=None)
    assert framed[:4] == b"CKPT" and framed[4] == 1 and framed[5] == Kind.COMMIT
    assert struct.unpack_from("<QQ", framed, 8) == (3, 3) and framed[24:] == b"abc"


def test_the_tree_names_users_import_from_manifest_are_the_tree_modules():
    """The state tree lives in ckptstore.tree; the names docs and the integrations take from
    ckptstore.manifest stay there, as the same objects."""
    import ckptstore.manifest
    import ckptstore.tree

    assert ckptstore.manifest.key_segment is ckptstore.tree.key_segment
    assert ckptstore.manifest.TensorRef is ckptstore.tree.TensorRef
