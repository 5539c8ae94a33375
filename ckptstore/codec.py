"""Object frames (a versioned header + a body) and tensor ↔ bytes.

Every stored object is a frame::

    offset  size  field
    0       4     magic  b"CKPT"
    4       1     format version (1)
    5       1     kind: 1 chunk, 2 manifest, 3 commit, 4 ref, 5 config, 6 record
    6       1     codec: 0 raw, 1 zstd, 2 grouped, 3 delta
    7       1     reserved (0)
    8       8     raw size in bytes (little endian)
    16      8     body size in bytes (little endian)
    24      ...   body

The body by codec:

``raw``
    The raw bytes.
``zstd``
    One zstd frame that declares its content size.
``grouped``
    The bytes of fixed-size values regrouped by position ("byte planes"): plane ``j`` holds
    byte ``j`` of every value, so the sign and exponent bytes of floats, which vary little,
    sit together and compress well, while mantissa bytes, which do not, are stored as they
    are::

        1 byte   group size k (2, 4 or 8: the bytes of one value)
        k × 9    per plane: codec (0 raw, 1 zstd) and body size (u64, little endian)
        ...      the plane bodies, then the last raw_size % k bytes as they are
``delta``
    The XOR of the raw bytes with those of a *base* chunk (the same tensor's chunk in the
    parent commit), encoded as raw, zstd or grouped. For weights that a small learning rate
    moves a little, the sign, exponent and high mantissa bits mostly cancel::

        1 byte   chain length n (1 to MAX_DELTA_CHAIN)
        n × 16   the base's id, then the base's own bases (nearest first), as digests
        1 byte   codec of the residual (0 raw, 1 zstd, 2 grouped)
        ...      the residual's body

Chunk ids are the hash of the raw bytes whatever the codec, so the choice of codec never
changes an id. Decoding distrusts its input: the header is checked (magic, version, kind,
sizes) and the raw size against what the caller expects *before* anything is decompressed;
no zstd frame may produce more than the size its place in the body allows.
"""

from __future__ import annotations

import functools
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Literal, NamedTuple, overload

import zstandard

from .errors import IntegrityError, UnsupportedFormat

if TYPE_CHECKING:  # imported where bytes or tensors are handled, so that reading refs and commits never loads them
    import numpy as np
    import torch

MAGIC = b"CKPT"
OBJECT_FORMAT_VERSION = 1
HEADER = struct.Struct("<4sBBBBQQ")
HEADER_SIZE = HEADER.size
#: Longest chain of bases a delta may declare (a store's keyframe interval is far shorter).
MAX_DELTA_CHAIN = 64
GROUP_SIZES = (2, 4, 8)
#: Bytes to read from the start of an object to learn its codec and, for a delta, its chain.
CHAIN_PREFIX_BYTES = HEADER_SIZE + 1 + 16 * MAX_DELTA_CHAIN

_PLANE = struct.Struct("<BQ")
_LITTLE_ENDIAN = sys.byteorder == "little"
_ID_BYTES = 16
#: Chunks smaller than this are never worth compressing.
_MIN_COMPRESS_BYTES = 256
#: Bytes of a chunk (taken from four places) compressed first to choose its encoding.
_SAMPLE_BYTES = 64 * 1024
#: A compressed encoding (plain zstd, or byte planes) is kept only if it saves at least this
#: fraction of the raw size: the saving must pay for decoding it on every checkout, and for
#: its CPU on commit. fp32 weights and Adam moments save about 8% as plain zstd and 17% as
#: byte planes; the planes cost a pass over the chunk and zstd over its exponent plane, which
#: on two cores and a fast disk made commits 0.57x as fast as writing the chunks raw
#: (bench/README.md, "Encodings"). bf16 saves about 33% as byte planes. Whether an encoding
#: that qualifies is worth its CPU in a given commit is the caller's ``worth`` (the pipeline
#: weighs it against the sink's speed: see ``ckptstore.balance.EncodingBalance``).
MIN_SAVING = 0.20
#: A byte plane is compressed only if that saves this fraction of it.
_MIN_PLANE_SAVING = 0.10
#: With ``delta="auto"``, a delta is kept only where it is at most this fraction of the chunk
#: encoded whole (and saves ``min_saving`` of the raw size). A delta costs a pass of XOR,
#: byte planes and zstd on commit, and a read of its chain on every checkout. bf16 weights of
#: a fine-tuning run come to 0.03-0.30 of their byte-planed size; fp32 weights to 0.5-0.6,
#: because their low mantissa bytes change at any learning rate, and encoding them costs more
#: CPU than writing the bytes saved takes on a local disk (bench/README.md, "Encodings");
#: fp32 chunks whose values mostly did not change still qualify. ``delta="on"`` keeps every
#: delta, for slow storage.
DELTA_AUTO_MAX_RATIO = 0.4


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
    GROUPED = 2
    DELTA = 3


_local = threading.local()


def _compressor(level: int, *, planes: bool = False) -> zstandard.ZstdCompressor:
    """A per-thread zstd compressor. For byte planes at the usual levels (up to 3), zstd is
    tuned to rely on entropy coding with a small match table: exponent planes have few long
    repeats, and this is about 2.5× faster than level 1 and a little smaller."""
    cache: dict[tuple[int, bool], zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if (level, planes) not in cache:
        if planes and level <= 3:
            params = zstandard.ZstdCompressionParameters(
                window_log=17, hash_log=6, chain_log=6, search_log=1, min_match=7,
                strategy=zstandard.STRATEGY_FAST, write_content_size=True,
            )  # fmt: skip
            cache[level, planes] = zstandard.ZstdCompressor(compression_params=params)
        else:
            cache[level, planes] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level, planes]


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


# --------------------------------------------------------------------------------------------
# Encoding


@dataclass(frozen=True)
class DeltaBase:
    """A chunk that another may be stored as a delta against: its chain (its own id first,
    then its bases, nearest first), its size, :func:`sample_of` its bytes (all that the
    choice of encoding looks at), and ``load``, which returns its bytes: called only once a
    delta is chosen, so a base that is not in memory is read only where a delta is stored
    (``None``: it cannot be had, and the chunk is stored whole)."""

    chain: tuple[str, ...]
    size: int
    sample: np.ndarray
    load: Callable[[], bytes | memoryview | np.ndarray | None]

    @classmethod
    def of(cls, data: bytes | memoryview | np.ndarray, chain: tuple[str, ...], *, group_bytes: int) -> DeltaBase:
        """A base whose bytes are in hand."""
        import numpy as np

        values = np.frombuffer(data, dtype=np.uint8)
        return cls(chain, len(values), sample_of(values, group_bytes=group_bytes), lambda: values)


@dataclass
class Encoded:
    """A framed object: the ``parts`` to write in order, the codec chosen, for a delta the
    chunks it needs (its base first), and the :func:`sample_of` the raw bytes that the
    choice was made on (``None`` if none was taken; it may view the raw bytes)."""

    parts: list[bytes | memoryview]
    codec: Codec
    bases: tuple[str, ...] = ()
    sample: np.ndarray | None = None

    @property
    def stored_bytes(self) -> int:
        return sum(len(p) for p in self.parts)


@dataclass(frozen=True)
class _Plan:
    """An encoding chosen on a sample: its codec, for ``grouped`` which planes to compress,
    and the sample's estimated stored size."""

    codec: Codec
    compress_planes: tuple[bool, ...] = ()
    estimate_bytes: int = 0


def _planes(values: np.ndarray, group: int, scratch: np.ndarray | None = None) -> np.ndarray:
    """``values`` (uint8) as ``group`` rows of byte planes, in ``scratch`` if it is given and
    large enough (a fresh buffer costs a page fault per 4 KiB, more than the copy itself);
    trailing bytes are left out."""
    import numpy as np

    count = len(values) // group
    if scratch is None or len(scratch) < count * group:
        scratch = np.empty(count * group, dtype=np.uint8)
    out = scratch[: count * group].reshape(group, count)
    if group == 2 and _LITTLE_ENDIAN:  # split as 16-bit values: faster than strided copies
        pairs = values[: count * group].view(np.uint16)
        np.copyto(out[0], pairs, casting="unsafe")  # the low byte
        np.right_shift(pairs, 8, out=out[1], casting="unsafe")
        return out
    grid = values[: count * group].reshape(count, group)
    for j in range(group):
        out[j] = grid[:, j]
    return out


def sample_of(values: np.ndarray, *, group_bytes: int) -> np.ndarray:
    """What :func:`encode_object` chooses an encoding on: about ``_SAMPLE_BYTES`` of
    ``values`` (uint8) from four places, each a whole number of values (a view if that is
    all of them)."""
    import numpy as np

    group = group_bytes if group_bytes in GROUP_SIZES else 1
    if len(values) <= 2 * _SAMPLE_BYTES:
        return values
    piece = (_SAMPLE_BYTES // 4) // group * group
    starts = [(len(values) - piece) * i // 3 // group * group for i in range(4)]
    return np.concatenate([values[s : s + piece] for s in starts])


@overload
def _plan(sample: np.ndarray, *, group: int, level: int, min_saving: float, residual: bool = ..., give_up_above: None = ...) -> _Plan: ...
@overload
def _plan(sample: np.ndarray, *, group: int, level: int, min_saving: float, residual: bool = ..., give_up_above: float | None) -> _Plan | None: ...
def _plan(sample: np.ndarray, *, group: int, level: int, min_saving: float, residual: bool = False, give_up_above: float | None = None) -> _Plan | None:
    """The encoding that stores ``sample`` smallest, among raw, zstd and (for ``group`` > 1)
    grouped, each kept only where it saves ``min_saving`` of the raw size. The ``residual``
    of a delta of floats is planned as byte planes only: its zero bytes sit in the high
    planes, where plain zstd does no better. With ``give_up_above``: ``None`` as soon as no
    encoding can come to that many bytes (the planes' sizes only add up; the mantissa planes,
    which rarely compress, come first)."""
    floats = group > 1 and len(sample) >= group
    best = _Plan(Codec.RAW, estimate_bytes=len(sample))
    if not (residual and floats):
        plain = len(_compressor(level).compress(sample.data))
        if plain < (1 - min_saving) * len(sample):
            best = _Plan(Codec.ZSTD, estimate_bytes=plain)
    if floats:
        planes = _planes(sample, group)
        chosen, total = [], len(sample) - planes.size
        plane_compressor = _compressor(level, planes=True)
        for plane in planes:
            size = len(plane_compressor.compress(plane.data))
            chosen.append(size < (1 - _MIN_PLANE_SAVING) * len(plane))
            total += size if chosen[-1] else len(plane)
            if give_up_above is not None and min(total, best.estimate_bytes) > give_up_above:
                return None
        if any(chosen) and total < best.estimate_bytes and total < (1 - min_saving) * len(sample):
            best = _Plan(Codec.GROUPED, tuple(chosen), total)
    return None if give_up_above is not None and best.estimate_bytes > give_up_above else best


def _encode_body(values: np.ndarray, plan: _Plan, *, group: int, level: int, scratch: np.ndarray | None) -> tuple[Codec, list[bytes | memoryview]]:
    """Encode ``values`` as ``plan`` says; falls back to raw where that is not smaller."""
    raw: list[bytes | memoryview] = [values.data]
    if plan.codec is Codec.ZSTD:
        whole = _compressor(level).compress(values.data)
        return (Codec.ZSTD, [whole]) if len(whole) < len(values) else (Codec.RAW, raw)
    if plan.codec is Codec.GROUPED:
        planes = _planes(values, group, scratch)
        table, bodies = [bytes([group])], []
        for plane, compress in zip(planes, plan.compress_planes):
            body: bytes | memoryview = plane.data
            codec = Codec.RAW
            if compress:
                packed = _compressor(level, planes=True).compress(plane.data)
                if len(packed) < len(plane):
                    body, codec = packed, Codec.ZSTD
            table.append(_PLANE.pack(codec, len(body)))
            bodies.append(body)
        parts: list[bytes | memoryview] = [b"".join(table), *bodies, values[planes.size :].data]
        if sum(len(p) for p in parts) < len(values):
            return Codec.GROUPED, parts
    return Codec.RAW, raw


def encode_object(
    kind: Kind,
    raw: bytes | memoryview,
    *,
    compression_level: int | None,
    group_bytes: int = 1,
    base: DeltaBase | None = None,
    delta: Literal["on", "auto"] = "auto",
    scratch: np.ndarray | None = None,
    min_saving: float = MIN_SAVING,
    worth: Callable[[Codec, float], bool] | None = None,
) -> Encoded:
    """Frame ``raw`` as an object of ``kind``.

    With a ``compression_level``, the encoding is chosen on a sample: raw, zstd, or (for
    values of ``group_bytes`` 2, 4 or 8 bytes, i.e. floats) byte planes with zstd where they
    compress; a compressed encoding only where it saves ``min_saving`` of the raw size. With
    a ``base`` of the same size, the XOR against it is stored instead when ``delta="on"``,
    or with ``delta="auto"`` when that is at most ``DELTA_AUTO_MAX_RATIO`` of the chunk
    encoded whole and saves ``min_saving`` of the raw size. ``worth(codec, fraction)``, if
    given, is asked once an encoding that pays is planned (its codec, ``delta`` for a delta
    unless ``delta="on"``, and the sample's estimated stored size over its raw size) whether
    to spend the CPU on it; ``False`` stores the object raw and whole. A raw body is
    returned as a view of ``raw``, not copied. Deterministic: the same arguments give the
    same bytes. ``scratch``: a uint8 buffer (of ``2 * len(raw)`` bytes for deltas) that the
    returned parts may view, so it must not be reused until they are written.
    """
    view = memoryview(raw).cast("B")
    group = group_bytes if group_bytes in GROUP_SIZES else 1
    if compression_level is None or len(view) < _MIN_COMPRESS_BYTES:
        return Encoded(_frame(kind, Codec.RAW, len(view), [view]), Codec.RAW)
    import numpy as np

    values = np.frombuffer(view, dtype=np.uint8)
    sample = sample_of(values, group_bytes=group)
    plan = _plan(sample, group=group, level=compression_level, min_saving=min_saving)
    residual_plan = None
    if base is not None and base.size == len(values) and len(base.sample) == len(sample) and 1 <= len(base.chain) <= MAX_DELTA_CHAIN:
        # With "auto", a delta must be much smaller than the chunk stored whole: it costs CPU
        # here, and a read of its chain on every checkout.
        limit = min(plan.estimate_bytes - min_saving * len(sample), DELTA_AUTO_MAX_RATIO * plan.estimate_bytes)
        residual_plan = _plan(
            sample ^ base.sample, group=group, level=compression_level, min_saving=min_saving,
            residual=True, give_up_above=None if delta == "on" else limit,
        )  # fmt: skip
    if worth is not None and not (residual_plan is not None and delta == "on"):
        chosen, codec = (residual_plan, Codec.DELTA) if residual_plan is not None else (plan, plan.codec)
        if codec is not Codec.RAW and not worth(codec, chosen.estimate_bytes / len(sample)):
            return Encoded(_frame(kind, Codec.RAW, len(values), [view]), Codec.RAW, sample=sample)
    if residual_plan is not None and base is not None:
        base_data = base.load()
        base_values = np.frombuffer(base_data, dtype=np.uint8) if base_data is not None else None
        if base_values is not None and len(base_values) == len(values):
            n = len(values)
            into = scratch[n : 2 * n] if scratch is not None and len(scratch) >= 2 * n else None
            residual = np.bitwise_xor(values, base_values, out=into)
            codec, body = _encode_body(residual, residual_plan, group=group, level=compression_level, scratch=scratch)
            prefix = bytes([len(base.chain)]) + b"".join(bytes.fromhex(c) for c in base.chain) + bytes([codec])
            return Encoded(_frame(kind, Codec.DELTA, len(values), [prefix, *body]), Codec.DELTA, base.chain, sample)
    codec, body = _encode_body(values, plan, group=group, level=compression_level, scratch=scratch)
    return Encoded(_frame(kind, codec, len(values), body), codec, sample=sample)


def _frame(kind: Kind, codec: Codec, raw_size: int, body: list[bytes | memoryview]) -> list[bytes | memoryview]:
    body_size = sum(len(p) for p in body)
    return [HEADER.pack(MAGIC, OBJECT_FORMAT_VERSION, kind, codec, 0, raw_size, body_size), *body]


def encode_object_bytes(kind: Kind, raw: bytes, *, compression_level: int | None) -> bytes:
    """:func:`encode_object` joined into one ``bytes`` (for small objects)."""
    return b"".join(encode_object(kind, raw, compression_level=compression_level).parts)


# --------------------------------------------------------------------------------------------
# Decoding


def read_header(data: bytes | memoryview, *, key: str, kind: Kind) -> tuple[Codec, int, int]:
    """Check a frame's header; return ``(codec, raw_size, body_size)``."""
    if len(data) < HEADER_SIZE:
        raise IntegrityError(f"object is truncated ({len(data)} bytes, header needs {HEADER_SIZE})", key=key)
    magic, version, found_kind, codec, _reserved, raw_size, body_size = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IntegrityError("not a ckptstore object (bad magic)", key=key)
    if version != OBJECT_FORMAT_VERSION:
        raise UnsupportedFormat(f"object {key} has format version {version}; this version of ckptstore reads version {OBJECT_FORMAT_VERSION}")
    if found_kind != kind:
        raise IntegrityError(f"object is of kind {found_kind}, expected {kind.name.lower()}", key=key)
    if _reserved != 0:
        raise IntegrityError("object header has a nonzero reserved byte", key=key)
    if codec not in Codec.__members__.values():
        raise UnsupportedFormat(f"object {key} uses unknown codec {codec}")
    if codec == Codec.DELTA and kind != Kind.CHUNK:
        raise IntegrityError("only chunks may be stored as deltas", key=key)
    return Codec(codec), raw_size, body_size


@dataclass(frozen=True)
class Frame:
    """A checked frame: the raw size, the body's codec and body, and for a delta its bases
    (``codec`` is then the residual's codec and ``body`` the residual's body)."""

    codec: Codec
    raw_size: int
    body: memoryview
    bases: tuple[str, ...] = ()


def delta_chain(body_prefix: bytes | memoryview, *, key: str, path: str | None = None) -> tuple[tuple[str, ...], Codec, int]:
    """Parse the start of a delta's body: ``(bases, residual codec, prefix length)``."""
    if not len(body_prefix):
        raise IntegrityError("delta body is empty", key=key, path=path)
    n = body_prefix[0]
    end = 1 + n * _ID_BYTES
    if not 1 <= n <= MAX_DELTA_CHAIN:
        raise IntegrityError(f"delta declares a chain of {n} bases (1 to {MAX_DELTA_CHAIN} allowed)", key=key, path=path)
    if len(body_prefix) < end + 1:
        raise IntegrityError("delta body is truncated in its chain", key=key, path=path)
    bases = tuple(bytes(body_prefix[1 + i * _ID_BYTES : 1 + (i + 1) * _ID_BYTES]).hex() for i in range(n))
    inner = body_prefix[end]
    if inner not in (Codec.RAW, Codec.ZSTD, Codec.GROUPED):
        raise IntegrityError(f"delta residual has codec {inner}", key=key, path=path)
    if len(set(bases)) != n:
        raise IntegrityError("delta chain repeats a base", key=key, path=path)
    return bases, Codec(inner), end + 1


def parse_frame(data: bytes | memoryview, *, key: str, kind: Kind, max_raw_size: int, path: str | None = None) -> Frame:
    """Check a whole object's header and sizes (nothing is decompressed).

    ``max_raw_size`` bounds what the header may declare (the expected size of a chunk, or a
    cap for manifests and commits); a larger declaration is refused.
    """
    codec, raw_size, body_size = read_header(data, key=key, kind=kind)
    if raw_size > max_raw_size:
        raise IntegrityError(f"object declares {raw_size} bytes, at most {max_raw_size} expected", key=key, path=path)
    body = memoryview(data).cast("B")[HEADER_SIZE:]
    if len(body) != body_size:
        raise IntegrityError(f"object body is {len(body)} bytes, header says {body_size}", key=key, path=path)
    if codec is Codec.DELTA:
        bases, inner, prefix = delta_chain(body, key=key, path=path)
        return Frame(inner, raw_size, body[prefix:], bases)
    return Frame(codec, raw_size, body)


@overload
def _decompress(body: memoryview, size: int, *, key: str, path: str | None, out: None = ...) -> bytes: ...
@overload
def _decompress(body: memoryview, size: int, *, key: str, path: str | None, out: np.ndarray) -> np.ndarray: ...
def _decompress(body: memoryview, size: int, *, key: str, path: str | None, out: np.ndarray | None = None) -> bytes | np.ndarray:
    """One zstd frame that must declare and produce exactly ``size`` bytes; into ``out``
    (uint8, ``size`` long) if given, without an intermediate buffer."""
    try:
        declared = zstandard.frame_content_size(body)
        if declared != size:
            raise IntegrityError(f"zstd frame declares {declared} bytes, {size} expected", key=key, path=path)
        if out is None:
            data: bytes | np.ndarray = _decompressor().decompress(body, max_output_size=size)
            produced = len(data)
        else:
            data, produced = out, 0
            with _decompressor().stream_reader(body) as reader:
                view = out.data
                while produced < size and (n := reader.readinto(view[produced:])):
                    produced += n
                if produced == size and reader.read(1):
                    produced += 1
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"zstd frame is corrupt: {exc}", key=key, path=path) from exc
    if produced != size:
        raise IntegrityError(f"zstd frame does not produce the {size} bytes it declares", key=key, path=path)
    return data


def _plane_buffer(size: int, index: int = 0) -> np.ndarray:
    """Per-thread buffer ``index`` for a decompressed byte plane (reused: a fresh buffer
    costs a page fault per 4 KiB)."""
    import numpy as np

    buffers = getattr(_local, "planes", None)
    if buffers is None:
        buffers = _local.planes = {}
    buffer = buffers.get(index)
    if buffer is None or len(buffer) < size:
        buffer = buffers[index] = np.empty(size, dtype=np.uint8)
    return buffer[:size]


def _put(target: np.ndarray, data: bytes | memoryview | np.ndarray, *, xor: bool) -> None:
    import numpy as np

    source = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if xor:
        np.bitwise_xor(target, source, out=target)
    else:
        target[:] = source


def decode_into(frame: Frame, target: np.ndarray, *, xor: bool = False, key: str, path: str | None = None) -> None:
    """Write the frame's decoded body into ``target`` (uint8, ``frame.raw_size`` long), or
    XOR it into ``target`` (which holds the base, for a delta's residual)."""
    size, body = frame.raw_size, frame.body
    if len(target) != size:
        raise ValueError(f"target is {len(target)} bytes, the object {size}")
    if frame.codec is Codec.RAW:
        if len(body) != size:
            raise IntegrityError(f"raw body is {len(body)} bytes, {size} expected", key=key, path=path)
        _put(target, body, xor=xor)
    elif frame.codec is Codec.ZSTD:
        if xor:
            _put(target, _decompress(body, size, key=key, path=path, out=_plane_buffer(size)), xor=True)
        else:
            _decompress(body, size, key=key, path=path, out=target)
    elif frame.codec is Codec.GROUPED:
        _decode_grouped(body, target, xor=xor, key=key, path=path)
    else:
        raise IntegrityError(f"codec {frame.codec.name.lower()} cannot hold a body", key=key, path=path)


def _decode_grouped(body: memoryview, target: np.ndarray, *, xor: bool, key: str, path: str | None) -> None:
    import numpy as np

    if not len(body) or body[0] not in GROUP_SIZES:
        raise IntegrityError(f"grouped body has group size {body[0] if len(body) else None}", key=key, path=path)
    group = body[0]
    table_end = 1 + group * _PLANE.size
    if len(body) < table_end:
        raise IntegrityError("grouped body is truncated in its plane table", key=key, path=path)
    planes = [_PLANE.unpack_from(body, 1 + j * _PLANE.size) for j in range(group)]
    count, tail = divmod(len(target), group)
    if table_end + sum(n for _, n in planes) + tail != len(body):
        raise IntegrityError("grouped body sizes do not add up", key=key, path=path)
    offset = table_end
    decoded: list[np.ndarray] = []
    for j, (codec, n) in enumerate(planes):
        data = body[offset : offset + n]
        offset += n
        if codec == Codec.ZSTD:
            decoded.append(_decompress(data, count, key=key, path=path, out=_plane_buffer(count, j)))
        elif codec == Codec.RAW and n == count:
            decoded.append(np.frombuffer(data, dtype=np.uint8))
        else:
            raise IntegrityError(f"byte plane {j} has codec {codec} and {n} bytes", key=key, path=path)
    main = target[: count * group]
    if group == 2 and _LITTLE_ENDIAN and main.ctypes.data % 2 == 0:
        # plane 1 is the high byte: two passes over 16-bit values, several times faster than
        # strided copies; a delta's residual is put together in a scratch buffer, then XORed in
        values = (_plane_buffer(len(main), group) if xor else main).view(np.uint16)
        np.left_shift(decoded[1], 8, out=values, dtype=np.uint16)
        np.bitwise_or(values, decoded[0], out=values)
        if xor:
            np.bitwise_xor(main.view(np.uint16), values, out=main.view(np.uint16))
    else:
        grid = main.reshape(count, group)
        for j, plane in enumerate(decoded):
            _put(grid[:, j], plane, xor=xor)
    if tail:
        _put(target[count * group :], body[offset:], xor=xor)


def decode_object(data: bytes | memoryview, *, key: str, kind: Kind, max_raw_size: int, path: str | None = None) -> bytes | memoryview:
    """Check and unframe a self-contained object; return its raw bytes (a delta chunk needs
    its bases: read it with :class:`ckptstore.pipeline.ChunkReader`)."""
    frame = parse_frame(data, key=key, kind=kind, max_raw_size=max_raw_size, path=path)
    if frame.bases:
        raise IntegrityError("object is a delta; it is read through its bases", key=key, path=path)
    if frame.codec is Codec.RAW:
        if len(frame.body) != frame.raw_size:
            raise IntegrityError("raw object size does not match its header", key=key, path=path)
        return frame.body
    if frame.codec is Codec.ZSTD:
        return _decompress(frame.body, frame.raw_size, key=key, path=path)
    import numpy as np  # byte planes: tensor chunks only

    out = np.empty(frame.raw_size, dtype=np.uint8)
    decode_into(frame, out, key=key, path=path)
    return out.data


# --------------------------------------------------------------------------------------------
# Tensors ↔ bytes


class DtypeInfo(NamedTuple):
    """What a store needs to know of a torch dtype, known without importing torch (the
    attributes are ``torch.dtype``'s own)."""

    itemsize: int
    is_floating_point: bool
    is_complex: bool


#: The torch dtypes a store holds, by name.
DTYPE_INFO: dict[str, DtypeInfo] = {
    "float64": DtypeInfo(8, True, False), "float32": DtypeInfo(4, True, False),
    "float16": DtypeInfo(2, True, False), "bfloat16": DtypeInfo(2, True, False),
    "float8_e4m3fn": DtypeInfo(1, True, False), "float8_e4m3fnuz": DtypeInfo(1, True, False),
    "float8_e5m2": DtypeInfo(1, True, False), "float8_e5m2fnuz": DtypeInfo(1, True, False),
    "float8_e8m0fnu": DtypeInfo(1, True, False),
    "complex32": DtypeInfo(4, False, True), "complex64": DtypeInfo(8, False, True), "complex128": DtypeInfo(16, False, True),
    "int8": DtypeInfo(1, False, False), "int16": DtypeInfo(2, False, False),
    "int32": DtypeInfo(4, False, False), "int64": DtypeInfo(8, False, False),
    "uint8": DtypeInfo(1, False, False), "uint16": DtypeInfo(2, False, False),
    "uint32": DtypeInfo(4, False, False), "uint64": DtypeInfo(8, False, False),
    "bool": DtypeInfo(1, False, False),
}  # fmt: skip


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """Name → torch dtype, for the dtypes of :data:`DTYPE_INFO` that this torch has."""
    import torch

    return {n: getattr(torch, n) for n in DTYPE_INFO if hasattr(torch, n)}


@functools.cache
def torch_dtype_names() -> dict[torch.dtype, str]:
    """Torch dtype → name: the inverse of :func:`torch_dtypes`."""
    return {dt: n for n, dt in torch_dtypes().items()}


def dtype_from_name(name: str, *, key: str | None = None, path: str | None = None) -> torch.dtype:
    try:
        return torch_dtypes()[name]
    except (KeyError, TypeError):
        raise IntegrityError(f"unknown tensor dtype {name!r}", key=key, path=path) from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, as a zero-copy view."""
    import torch

    flat = tensor.reshape(-1).view(torch.uint8)
    return flat.numpy().data.cast("B")
