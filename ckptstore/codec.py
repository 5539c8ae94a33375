"""Object frames (a versioned header + a raw or zstd body) and tensor ↔ bytes.

Every stored object is a frame::

    offset  size  field
    0       4     magic  b"CKPT"
    4       1     format version (1)
    5       1     kind: 1 chunk, 2 manifest, 3 commit, 4 ref, 5 config, 6 record
    6       1     codec: 0 raw, 1 zstd
    7       1     reserved (0)
    8       8     raw size in bytes (little endian)
    16      8     body size in bytes (little endian)
    24      ...   body

Decoding distrusts its input: the header is checked (magic, version, kind, sizes) and the raw
size is checked against what the caller expects *before* anything is decompressed, and
decompression never produces more than the raw size.
"""

from __future__ import annotations

import struct
import threading
from enum import IntEnum

import torch
import zstandard

from .errors import IntegrityError, UnsupportedFormat

MAGIC = b"CKPT"
OBJECT_FORMAT_VERSION = 1
HEADER = struct.Struct("<4sBBBBQQ")
HEADER_SIZE = HEADER.size

#: Chunks smaller than this are never worth compressing.
_MIN_COMPRESS_BYTES = 256
#: Bytes of a chunk compressed first to decide whether the whole chunk is worth it.
_SAMPLE_BYTES = 64 * 1024
#: Keep zstd only if it saves at least this fraction. fp32 weights and Adam moments save
#: about 8% at best, not worth the CPU on a commit's critical path; bf16 saves about 20-25%.
_MIN_SAVING = 0.15


class Kind(IntEnum):
    CHUNK = 1
    MANIFEST = 2
    COMMIT = 3
    REF = 4
    CONFIG = 5
    RECORD = 6  # small msgpack records: GC lease, writer markers, demotions, shallow marks


class Codec(IntEnum):
    RAW = 0
    ZSTD = 1


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def encode_object(kind: Kind, raw: bytes | memoryview, *, compression_level: int | None) -> list[bytes | memoryview]:
    """Frame ``raw`` as an object of ``kind``; returns the parts to write in order.

    With a ``compression_level``, zstd is used only where it pays: a sample is compressed
    first, and the whole result is kept only if it is smaller by a useful margin. The raw
    body is returned as a view, not copied.
    """
    view = memoryview(raw).cast("B")
    raw_size = len(view)
    body: bytes | memoryview = view
    codec = Codec.RAW
    if compression_level is not None and raw_size >= _MIN_COMPRESS_BYTES:
        compressor = _compressor(compression_level)
        worth_trying = True
        if raw_size > 2 * _SAMPLE_BYTES:
            sample = view[:_SAMPLE_BYTES]
            worth_trying = len(compressor.compress(sample)) < (1 - _MIN_SAVING) * len(sample)
        if worth_trying:
            compressed = compressor.compress(view)
            if len(compressed) < (1 - _MIN_SAVING) * raw_size:
                body, codec = compressed, Codec.ZSTD
    header = HEADER.pack(MAGIC, OBJECT_FORMAT_VERSION, kind, codec, 0, raw_size, len(body))
    return [header, body]


def encode_object_bytes(kind: Kind, raw: bytes, *, compression_level: int | None) -> bytes:
    """:func:`encode_object` joined into one ``bytes`` (for small objects)."""
    return b"".join(encode_object(kind, raw, compression_level=compression_level))


def read_header(data: bytes | memoryview, *, key: str, kind: Kind) -> tuple[Codec, int, int]:
    """Check a frame's header; return ``(codec, raw_size, body_size)``."""
    if len(data) < HEADER_SIZE:
        raise IntegrityError(f"object is truncated ({len(data)} bytes, header needs {HEADER_SIZE})", key=key)
    magic, version, found_kind, codec, _reserved, raw_size, body_size = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IntegrityError("not a ckptstore object (bad magic)", key=key)
    if version != OBJECT_FORMAT_VERSION:
        raise UnsupportedFormat(
            f"object {key} has format version {version}; this version of ckptstore reads "
            f"version {OBJECT_FORMAT_VERSION}"
        )
    if found_kind != kind:
        raise IntegrityError(f"object is of kind {found_kind}, expected {kind.name.lower()}", key=key)
    if _reserved != 0:
        raise IntegrityError("object header has a nonzero reserved byte", key=key)
    if codec not in (Codec.RAW, Codec.ZSTD):
        raise UnsupportedFormat(f"object {key} uses unknown codec {codec}")
    return Codec(codec), raw_size, body_size


def decode_object(data: bytes | memoryview, *, key: str, kind: Kind, max_raw_size: int, path: str | None = None) -> bytes | memoryview:
    """Check and unframe an object; return its raw bytes.

    ``max_raw_size`` bounds what the header may declare (the expected size of a chunk, or a
    cap for manifests and commits); a larger declaration is refused before decompressing.
    """
    codec, raw_size, body_size = read_header(data, key=key, kind=kind)
    if raw_size > max_raw_size:
        raise IntegrityError(f"object declares {raw_size} bytes, at most {max_raw_size} expected", key=key, path=path)
    body = memoryview(data)[HEADER_SIZE:]
    if len(body) != body_size:
        raise IntegrityError(f"object body is {len(body)} bytes, header says {body_size}", key=key, path=path)
    if codec is Codec.RAW:
        if body_size != raw_size:
            raise IntegrityError("raw object size does not match its header", key=key, path=path)
        return body
    try:
        declared = zstandard.frame_content_size(body)
        if declared != raw_size:
            raise IntegrityError(f"zstd frame declares {declared} bytes, header says {raw_size}", key=key, path=path)
        out = _decompressor().decompress(body, max_output_size=raw_size)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"zstd frame is corrupt: {exc}", key=key, path=path) from exc
    if len(out) != raw_size:
        raise IntegrityError(f"decompressed {len(out)} bytes, header says {raw_size}", key=key, path=path)
    return out


# --------------------------------------------------------------------------------------------
# Tensors ↔ bytes

_DTYPE_NAMES = [
    "float64", "float32", "float16", "bfloat16",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "complex32", "complex64", "complex128",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "bool",
]  # fmt: skip
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)}
DTYPE_NAMES: dict[torch.dtype, str] = {dt: n for n, dt in DTYPES.items()}


def dtype_from_name(name: str, *, key: str | None = None, path: str | None = None) -> torch.dtype:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise IntegrityError(f"unknown tensor dtype {name!r}", key=key, path=path) from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, as a zero-copy view."""
    flat = tensor.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")
