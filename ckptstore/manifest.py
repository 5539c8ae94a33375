"""Manifests: what a checkpoint holds, as a versioned msgpack document.

A state (nested dicts, lists, tuples, scalars, tensors, numpy arrays) is encoded as:

``tree``
    The state with every tensor replaced by a reference into ``tensors``; encoded with
    msgpack, every non-native type as a msgpack extension (see :class:`Ext`). No pickle.
``tensors``
    One entry per tensor: key path, dtype, shape, stride (``None`` = contiguous), the blob
    holding its bytes and its byte offset there, and its kind (tensor, parameter, ndarray).
``blobs``
    Byte buffers: a tensor's bytes, or one storage shared by several tensors (tied weights,
    views), stored once. A blob is either inlined (small) or a list of chunks
    ``[chunk id, raw size]`` of at most ``chunk_size_bytes`` each; a chunk stored as a delta
    is ``[chunk id, raw size, [base ids, nearest first]]``, so that what a manifest needs is
    known without reading its chunks (format version 2; a manifest without deltas is
    written as version 1).

Decoding distrusts its input: every field is type- and range-checked against the others
before any tensor is built.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import gc
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, NamedTuple

import msgpack

from .codec import DTYPE_INFO, MAX_DELTA_CHAIN, tensor_bytes, torch_dtype_names, torch_dtypes
from .errors import CkptStoreError, IntegrityError, UnsupportedFormat, UnsupportedValue
from .ids import is_full_id

if TYPE_CHECKING:  # imported where tensors are handled: reading a manifest needs neither
    import numpy as np
    import torch

MANIFEST_FORMAT_VERSION = 2
READABLE_MANIFEST_FORMATS = (1, 2)
MAX_DEPTH = 200
#: Tuples, OrderedDicts and dicts with int keys nest as msgpack extensions, which the C
#: decoder recurses into with a large stack frame each; their nesting is capped lower.
MAX_EXT_DEPTH = 32
_NUMPY_KINDS = "biufc"
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1


class Ext(IntEnum):
    """msgpack extension codes used in trees."""

    TENSOR = 1  # index into the manifest's tensors
    TUPLE = 2  # list of items
    DICT = 3  # list of [key, value]; for dicts whose keys are not all str
    ODICT = 4  # [list of [key, value], _metadata or None]
    BIGINT = 5  # signed little-endian bytes
    NPSCALAR = 6  # [dtype.str, bytes]
    DTYPE = 7  # torch dtype name
    DEVICE = 8  # torch device string
    SIZE = 9  # torch.Size as a list


class TensorKind(IntEnum):
    TENSOR = 0
    PARAMETER = 1
    NDARRAY = 2


@dataclass(frozen=True)
class ChunkRef:
    """A chunk of a blob: its id and raw size, and if it is stored as a delta, the chunks it
    is read through (its base first)."""

    id: str
    size: int
    bases: tuple[str, ...] = ()

    def _doc(self) -> list:
        return [self.id, self.size, list(self.bases)] if self.bases else [self.id, self.size]


@dataclass
class Blob:
    size: int
    chunks: list[ChunkRef] = field(default_factory=list)
    inline: bytes | None = None


class TensorEntry(NamedTuple):
    """One tensor of a manifest (a named tuple: manifests of many small tensors load fast)."""

    path: str
    dtype: str  # a torch dtype name, or a numpy dtype string for ndarrays
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None
    blob: int
    offset: int
    kind: TensorKind
    requires_grad: bool = False

    @property
    def itemsize(self) -> int:
        if self.kind is TensorKind.NDARRAY:
            import numpy as np

            return np.dtype(self.dtype).itemsize
        return DTYPE_INFO[self.dtype].itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def extent_bytes(self) -> int:
        """Bytes of the blob this tensor spans from its offset."""
        return _extent_bytes(self.shape, self.stride, self.itemsize)


def _extent_bytes(shape: Sequence[int], stride: Sequence[int] | None, itemsize: int) -> int:
    if not all(shape):
        return 0
    if stride is None:
        return math.prod(shape) * itemsize
    return (sum((n - 1) * s for n, s in zip(shape, stride)) + 1) * itemsize


@dataclass
class Manifest:
    tree: bytes
    tensors: list[TensorEntry]
    blobs: list[Blob]

    @property
    def logical_bytes(self) -> int:
        """Bytes of tensor data (each shared storage once) plus the encoded tree."""
        return sum(b.size for b in self.blobs) + len(self.tree)

    def chunk_ids(self) -> set[str]:
        """Every chunk this manifest needs, delta bases included."""
        return set(self.chunk_sizes())

    def chunk_sizes(self, blobs: Iterable[int] | None = None) -> dict[str, int]:
        """Chunk id → raw size for every chunk the given blobs (default: all) need, delta
        bases included (a base has the size of the chunk it is a base of)."""
        out: dict[str, int] = {}
        for index in range(len(self.blobs)) if blobs is None else blobs:
            for c in self.blobs[index].chunks:
                out[c.id] = c.size
                for base in c.bases:
                    out.setdefault(base, c.size)
        return out

    @functools.cached_property
    def key_paths(self) -> list[tuple[str, ...]]:
        """For each tensor entry, every key path at which the tree holds it, in tree order (a
        tensor reached by two paths, as ``{"ema": sd, "model": sd}`` or tied weights, is one
        entry held at both). Derived from the tree, so it needs no field of its own."""
        paths: list[list[str]] = [[] for _ in self.tensors]

        def walk(value: Any, path: str) -> None:
            if isinstance(value, TensorRef):
                paths[value.index].append(path)
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(v, _join(path, k))
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    walk(v, _join(path, i))

        walk(unpack_value(self.tree, key="(manifest tree)", tensors=[TensorRef(i) for i in range(len(self.tensors))]), "")
        return [tuple(p) if p else (e.path,) for p, e in zip(paths, self.tensors)]

    def chunk_chains(self) -> dict[str, tuple[str, ...]]:
        """Chunk id → the chain it is read through (its bases, nearest first; ``()`` for a
        self-contained chunk), for every chunk this manifest needs, bases included (a base's
        chain is the rest of its dependent's)."""
        out: dict[str, tuple[str, ...]] = {}
        for blob in self.blobs:
            for c in blob.chunks:
                out[c.id] = c.bases
                for i, base in enumerate(c.bases):
                    out.setdefault(base, c.bases[i + 1 :])
        return out

    def to_bytes(self) -> bytes:
        deltas = any(c.bases for b in self.blobs for c in b.chunks)
        doc = {
            "format": MANIFEST_FORMAT_VERSION if deltas else 1,
            "tree": self.tree,
            "tensors": [
                [t.path, t.dtype, list(t.shape), None if t.stride is None else list(t.stride),
                 t.blob, t.offset, int(t.kind), t.requires_grad]
                for t in self.tensors
            ],
            "blobs": [
                [b.size, [c._doc() for c in b.chunks], b.inline] for b in self.blobs
            ],
        }  # fmt: skip
        return msgpack.packb(doc, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, *, key: str) -> Manifest:
        return _ManifestReader(key).read(data)


# --------------------------------------------------------------------------------------------
# Encoding


@dataclass
class BlobSource:
    """Bytes to store for one blob; ``owner`` keeps the tensor that backs ``data`` alive.
    ``private``: ``data`` is a copy made while encoding (from a GPU, or of a non-contiguous
    tensor), not the caller's memory, so later changes to the state cannot reach it."""

    data: memoryview
    path: str
    owner: Any = None
    private: bool = False

    def staged(self, spare: dict[int, list[torch.Tensor]] | None = None) -> BlobSource:
        """This source with ``data`` copied into memory of its own (unless it already is),
        so the caller may change the state right away. ``spare``: buffers by size to reuse
        (a fresh buffer costs a page fault per 4 KiB, several times the copy itself)."""
        import torch
        if self.private or not len(self.data):
            return self
        free = (spare or {}).get(len(self.data))
        copy = free.pop() if free else torch.empty(len(self.data), dtype=torch.uint8)
        copy.copy_(torch.frombuffer(self.data, dtype=torch.uint8))
        return BlobSource(tensor_bytes(copy), self.path, copy, True)


#: A str key whose text would read as an int key or list index (or as nothing) is quoted.
_NUMBER_LIKE = re.compile(r"-?[0-9]*")
_INT_TEXT = re.compile(r"-?[0-9]+")


def key_segment(key: str | int) -> str:
    """One key of a key path, written so that no two keys read alike: an int key or list
    index as its digits; a str key as its text with ``~`` written ``~0`` and ``/`` written
    ``~1`` (as in JSON Pointer), and quoted as ``~"1"`` where it would read as a number (or
    is empty). So ``{"a/b": t}`` is ``a~1b`` and ``{"a": {"b": t}}`` is ``a/b``; ``{1: t}`` is
    ``1`` and ``{"1": t}`` is ``~"1"``."""
    if type(key) is not str:
        return str(key)
    text = key.replace("~", "~0").replace("/", "~1")
    return f'~"{text}"' if _NUMBER_LIKE.fullmatch(text) else text


def dotted_name(path: str) -> str:
    """The name an export gives the tensor at key path ``path`` (relative to the exported
    component): its keys joined by ``.``, a ``/`` inside a key included, as Hugging Face
    names weights (``encoder/layer/0/weight`` → ``encoder.layer.0.weight``)."""
    return ".".join(map(str, split_key_path(path.lstrip("/")))).replace("/", ".")


def split_key_path(path: str) -> list[str | int]:
    """The keys of a key path (the inverse of how :func:`key_segment` writes them): ints for
    digit segments, str for the rest, unescaped."""
    keys: list[str | int] = []
    for segment in path.split("/") if path else []:
        if segment.startswith('~"') and segment.endswith('"') and len(segment) >= 3:
            keys.append(segment[2:-1].replace("~1", "/").replace("~0", "~"))
        elif _INT_TEXT.fullmatch(segment):
            keys.append(int(segment))
        else:
            keys.append(segment.replace("~1", "/").replace("~0", "~"))
    return keys


def _join(path: str, key: str | int) -> str:
    """The key path of ``key`` inside the value at ``path``."""
    segment = key_segment(key)
    return f"{path}/{segment}" if path else segment


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@dataclass(frozen=True)
class TensorRef:
    """Stands in a tree for tensor ``index`` of a manifest that is being assembled from
    parts already stored (see :func:`merge_manifests`)."""

    index: int


class _TreeEncoder:
    """Walks a state, turning it into msgpack-native values and collecting its tensors."""

    def __init__(self, *, allow_tensors: bool) -> None:
        self.allow_tensors = allow_tensors
        self.tensors: list[tuple[str, Any]] = []
        self._index_of: dict[int, int] = {}  # id(tensor) -> index: one object stays one object
        self._ext_depth = 0

    def encode(self, value: Any, path: str = "", depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise UnsupportedValue(path, f"nested deeper than {MAX_DEPTH} levels")
        t = type(value)
        if value is None or t in (bool, float, bytes):
            return value
        if t is str:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise UnsupportedValue(path, "string is not valid UTF-8 (lone surrogates)") from None
            return value
        if t is int:
            if _INT64_MIN <= value <= _UINT64_MAX:
                return value
            length = (value.bit_length() + 8) // 8
            return msgpack.ExtType(Ext.BIGINT, value.to_bytes(length, "little", signed=True))
        if t is list:
            return [self.encode(v, _join(path, i), depth + 1) for i, v in enumerate(value)]
        if t is tuple:
            with self._extension(path):
                items = [self.encode(v, _join(path, i), depth + 1) for i, v in enumerate(value)]
            return msgpack.ExtType(Ext.TUPLE, _pack(items))
        if t is OrderedDict or (t is dict and not all(type(k) is str for k in value)):
            with self._extension(path):
                return self._encode_dict(value, path, depth)
        if t is dict:
            return self._encode_dict(value, path, depth)
        import numpy as np  # only values of other types come this far
        import torch

        if t is torch.Tensor or t is torch.nn.Parameter or t is np.ndarray:
            return self._encode_array(value, path)
        if t is TensorRef:
            return msgpack.ExtType(Ext.TENSOR, _pack(value.index))
        if isinstance(value, np.generic):
            if value.dtype.kind not in _NUMPY_KINDS:
                raise UnsupportedValue(path, f"numpy scalar of dtype {value.dtype} is not supported")
            return msgpack.ExtType(Ext.NPSCALAR, _pack([value.dtype.str, value.tobytes()]))
        if t is torch.dtype:
            return msgpack.ExtType(Ext.DTYPE, str(value).removeprefix("torch.").encode())
        if t is torch.device:
            return msgpack.ExtType(Ext.DEVICE, str(value).encode())
        if t is torch.Size:
            return msgpack.ExtType(Ext.SIZE, _pack(list(value)))
        state_dict = getattr(value, "state_dict", None)
        if callable(state_dict) and not isinstance(value, type):
            return self.encode(state_dict(), path, depth + 1)
        name = f"{t.__module__}.{t.__qualname__}"
        raise UnsupportedValue(
            path,
            f"cannot store a value of type {name} without pickle; supported are None, bool, "
            "int, float, str, bytes, list, tuple, dict, OrderedDict, tensors, numpy arrays "
            "and scalars, torch dtype/device/Size, and objects with state_dict()",
        )

    @contextlib.contextmanager
    def _extension(self, path: str) -> Iterator[None]:
        self._ext_depth += 1
        try:
            if self._ext_depth > MAX_EXT_DEPTH:
                raise UnsupportedValue(path, f"tuples, OrderedDicts and int-keyed dicts nested deeper than {MAX_EXT_DEPTH} levels")
            yield
        finally:
            self._ext_depth -= 1

    def _encode_dict(self, value: dict, path: str, depth: int) -> Any:
        pairs = []
        all_str = True
        for k, v in value.items():
            if type(k) is str:
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    raise UnsupportedValue(path, f"dict key {k!r} is not valid UTF-8 (lone surrogates)") from None
            elif type(k) is int and _INT64_MIN <= k <= _UINT64_MAX:
                all_str = False
            else:
                raise UnsupportedValue(path, f"dict key {k!r} of type {type(k).__name__}: keys must be str or int")
            pairs.append((k, self.encode(v, _join(path, k), depth + 1)))
        if type(value) is OrderedDict:
            meta = getattr(value, "_metadata", None)
            meta_enc = None if meta is None else self.encode(meta, _join(path, "_metadata"), depth + 1)
            return msgpack.ExtType(Ext.ODICT, _pack([[list(p) for p in pairs], meta_enc]))
        if all_str:
            return dict(pairs)
        return msgpack.ExtType(Ext.DICT, _pack([list(p) for p in pairs]))

    def _encode_array(self, value: Any, path: str) -> Any:
        import numpy as np
        import torch
        if not self.allow_tensors:
            raise UnsupportedValue(path, "tensors and arrays are not allowed here (commit metadata)")
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in _NUMPY_KINDS or value.dtype.hasobject:
                raise UnsupportedValue(path, f"numpy array of dtype {value.dtype} is not supported")
        else:
            if value.layout != torch.strided:
                raise UnsupportedValue(path, f"tensor with layout {value.layout} is not supported (dense tensors only)")
            if value.is_quantized or value.dtype not in torch_dtype_names():
                raise UnsupportedValue(path, f"tensor dtype {value.dtype} is not supported")
            if value.device.type == "meta":
                raise UnsupportedValue(path, "tensor is on the meta device and has no data")
        index = self._index_of.get(id(value))
        if index is None:
            index = self._index_of[id(value)] = len(self.tensors)
            self.tensors.append((path, value))
        return msgpack.ExtType(Ext.TENSOR, _pack(index))


def _storage_span(t: torch.Tensor) -> tuple[int, int]:
    """The [start, end) byte range of ``t``'s storage that ``t`` touches."""
    start = t.storage_offset() * t.element_size()
    extent = (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()
    return start, start + extent


def _plan_tensors(tensors: list[tuple[str, Any]], *, inline_threshold_bytes: int) -> tuple[list[TensorEntry], list[Blob], dict[int, BlobSource]]:
    """Group tensors by shared storage; return entries, blobs (inline ones filled) and the
    sources of the blobs still to be chunked, by blob index."""
    import numpy as np
    import torch
    groups: dict[tuple, list[int]] = {}
    for i, (_, t) in enumerate(tensors):
        shareable = (
            isinstance(t, torch.Tensor) and t.numel() > 0 and not t.is_conj() and not t.is_neg()
        )
        key = (str(t.device), t.untyped_storage().data_ptr()) if shareable else ("alone", i)
        groups.setdefault(key, []).append(i)

    entries: list[TensorEntry | None] = [None] * len(tensors)
    blobs: list[Blob] = []
    sources: dict[int, BlobSource] = {}
    copies: list[torch.Tensor] = []  # device → host copies still in flight

    def add_blob(data: memoryview, path: str, owner: Any, *, private: bool) -> int:
        index = len(blobs)
        if len(data) <= inline_threshold_bytes:
            if copies:  # the bytes are read now: let pending device copies land first
                torch.cuda.synchronize()
                copies.clear()
            blobs.append(Blob(size=len(data), inline=data.tobytes()))
        else:
            blobs.append(Blob(size=len(data)))
            sources[index] = BlobSource(data, path, owner, private)
        return index

    for members in groups.values():
        first_path, first = tensors[members[0]]
        if isinstance(first, np.ndarray):
            arr = np.ascontiguousarray(first)
            data = memoryview(arr.reshape(-1).view(np.uint8)).cast("B") if arr.size else memoryview(b"")
            blob = add_blob(data, first_path, arr, private=not np.shares_memory(arr, first))
            entries[members[0]] = TensorEntry(first_path, arr.dtype.str, tuple(arr.shape), None, blob, 0, TensorKind.NDARRAY)
            continue
        if len(members) == 1:
            c = _to_host(first.detach().resolve_conj().resolve_neg().contiguous(), copies)
            private = c.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or first.device.type != "cpu"
            blob = add_blob(tensor_bytes(c), first_path, c, private=private)
            entries[members[0]] = _torch_entry(first_path, first, None, blob, 0)
            continue
        spans = [_storage_span(tensors[i][1]) for i in members]
        lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
        region = torch.empty(0, dtype=torch.uint8, device=first.device)
        region.set_(first.untyped_storage(), lo, (hi - lo,), (1,))
        region = _to_host(region, copies)
        blob = add_blob(tensor_bytes(region), first_path, region, private=first.device.type != "cpu")
        for i, (start, _) in zip(members, spans):
            path, t = tensors[i]
            entries[i] = _torch_entry(path, t, tuple(t.stride()), blob, start - lo)
    if copies:
        torch.cuda.synchronize()  # every device-to-host copy has landed
    return [e for e in entries if e is not None], blobs, sources


def _to_host(t: torch.Tensor, copies: list[torch.Tensor]) -> torch.Tensor:
    """``t`` on the CPU. A CUDA tensor is copied into pinned memory without blocking (the
    caller synchronises once for all of them); other devices copy as ``.cpu()`` does."""
    import torch
    if t.device.type == "cpu":
        return t
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        copies.append(host)
        return host
    return t.cpu()


def _torch_entry(path: str, t: torch.Tensor, stride: tuple[int, ...] | None, blob: int, offset: int) -> TensorEntry:
    import torch
    kind = TensorKind.PARAMETER if type(t) is torch.nn.Parameter else TensorKind.TENSOR
    return TensorEntry(path, torch_dtype_names()[t.dtype], tuple(t.shape), stride, blob, offset, kind, bool(t.requires_grad))


def encode_state(state: Any, *, inline_threshold_bytes: int) -> tuple[Manifest, dict[int, BlobSource]]:
    """Encode ``state`` into a manifest whose non-inline blobs have no chunks yet, and the
    bytes of those blobs. Raises :class:`UnsupportedValue` naming the key path of the first
    value that cannot be stored; nothing is written."""
    encoder = _TreeEncoder(allow_tensors=True)
    tree = _pack(encoder.encode(state))
    entries, blobs, sources = _plan_tensors(encoder.tensors, inline_threshold_bytes=inline_threshold_bytes)
    return Manifest(tree=tree, tensors=entries, blobs=blobs), sources


def merge_manifests(parts: Mapping[str | int, Manifest], *, extra: Mapping[str, Any] | None = None) -> Manifest:
    """One manifest whose tree maps each key of ``parts`` to that part's tree (tensors and
    blobs renumbered, key paths prefixed), plus the values of ``extra`` (which may hold
    :class:`TensorRef` s to the merged tensors). Chunks are shared, not copied: this is how
    the manifests that several processes wrote become one commit."""
    tensors: list[TensorEntry] = []
    blobs: list[Blob] = []
    tree: dict[Any, Any] = {}
    for name, part in parts.items():
        first_tensor, first_blob = len(tensors), len(blobs)
        refs = [TensorRef(first_tensor + i) for i in range(len(part.tensors))]
        tree[name] = unpack_value(part.tree, key=f"(part {name})", tensors=refs)
        for e in part.tensors:
            tensors.append(TensorEntry(f"{_join('', name)}/{e.path}" if e.path else _join("", name), e.dtype, e.shape, e.stride, e.blob + first_blob, e.offset, e.kind, e.requires_grad))
        blobs.extend(part.blobs)
    tree.update(extra or {})
    return Manifest(tree=_pack(_TreeEncoder(allow_tensors=True).encode(tree)), tensors=tensors, blobs=blobs)


def tree_key_paths(tree: Any, path: str = "") -> Iterator[str]:
    """Every key path in a decoded tree (containers and leaves), written as key paths are."""
    if isinstance(tree, dict):
        items: Iterable[tuple[Any, Any]] = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return
    for k, v in items:
        child = _join(path, k)
        yield child
        yield from tree_key_paths(v, child)


def pack_value(value: Any, *, path: str) -> bytes:
    """Encode a tensor-free value (commit metadata) with the tree's type rules."""
    return _pack(_TreeEncoder(allow_tensors=False).encode(value, path))


# --------------------------------------------------------------------------------------------
# Decoding


def unpack_value(data: bytes | memoryview, *, key: str, tensors: Sequence[Any] = ()) -> Any:
    """Decode a tree, putting ``tensors[i]`` where the tree references tensor ``i``."""

    depth = 0

    def inner_of(payload: bytes) -> Any:
        nonlocal depth
        depth += 1
        try:
            if depth > MAX_EXT_DEPTH:
                raise IntegrityError(f"tree extensions nested deeper than {MAX_EXT_DEPTH} levels", key=key)
            return msgpack.unpackb(payload, ext_hook=hook, raw=False)
        finally:
            depth -= 1

    def hook(code: int, payload: bytes) -> Any:
        inner = lambda: inner_of(payload)
        if code == Ext.TENSOR:
            index = inner()
            if type(index) is not int or not 0 <= index < len(tensors):
                raise IntegrityError(f"tree references tensor {index!r} of {len(tensors)}", key=key)
            return tensors[index]
        if code == Ext.TUPLE:
            return tuple(inner())
        if code == Ext.DICT:
            return {_check_key(k, key): v for k, v in inner()}
        if code == Ext.ODICT:
            pairs, meta = inner()
            od = OrderedDict((_check_key(k, key), v) for k, v in pairs)
            if meta is not None:
                od._metadata = meta  # type: ignore[attr-defined]
            return od
        if code == Ext.BIGINT:
            return int.from_bytes(payload, "little", signed=True)
        if code == Ext.NPSCALAR:
            dtype_str, raw = inner()
            import numpy as np

            dtype = np.dtype(dtype_str)
            if dtype.kind not in _NUMPY_KINDS or dtype.itemsize != len(raw):
                raise IntegrityError(f"bad numpy scalar of dtype {dtype_str!r}", key=key)
            return np.frombuffer(raw, dtype=dtype)[0]
        if code == Ext.DTYPE:
            import torch

            dtype = getattr(torch, payload.decode(), None)
            if not isinstance(dtype, torch.dtype):
                raise IntegrityError(f"unknown torch dtype {payload!r}", key=key)
            return dtype
        if code == Ext.DEVICE:
            import torch

            return torch.device(payload.decode())
        if code == Ext.SIZE:
            import torch

            return torch.Size(inner())
        raise IntegrityError(f"unknown tree extension type {code}", key=key)

    try:
        return msgpack.unpackb(data, ext_hook=hook, raw=False)
    except CkptStoreError:
        raise
    except (ValueError, TypeError, KeyError, RecursionError, UnicodeDecodeError, RuntimeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"malformed tree: {type(exc).__name__}: {exc}", key=key) from exc


def _check_key(k: Any, key: str) -> str | int:
    if type(k) not in (str, int):
        raise IntegrityError(f"dict key of type {type(k).__name__} in tree", key=key)
    return k


class _ManifestReader:
    """Validates a manifest document field by field, as it streams out of the msgpack
    decoder: entries are checked one at a time, so a malformed document fails without the
    whole of it ever being held as Python objects."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.version: int | None = None
        self.has_deltas = False
        self.numpy_itemsizes: dict[str, int] = {}

    def fail(self, what: str) -> IntegrityError:
        return IntegrityError(f"malformed manifest: {what}", key=self.key)

    def read(self, data: bytes | memoryview) -> Manifest:
        # A manifest may hold 10**5 entries, a few small objects each, none of which can form
        # a cycle; with the cyclic collector running, reading spends more time in its scans
        # of them than in the reading itself. It is paused for the read (it is process-wide:
        # re-enabled only if it was enabled here, so a caller's gc.disable() stands).
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._read(data)
        except CkptStoreError:
            raise
        except Exception as exc:  # the decoder's own errors: truncation, bad types, limits
            raise self.fail(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if collecting:
                gc.enable()

    def _read(self, data: bytes | memoryview) -> Manifest:
        # Arrays as tuples: a shape is used as it comes, with no copy per entry.
        unpacker = msgpack.Unpacker(raw=False, use_list=False, max_buffer_size=max(len(data), 1))
        unpacker.feed(data)
        try:
            count = unpacker.read_map_header()
        except ValueError:
            raise self.fail("not a map") from None
        fields: dict[str, Any] = {}
        for _ in range(count):
            name = unpacker.unpack()
            if type(name) is not str or name in fields:
                raise self.fail(f"field name {name!r} (not a str, or repeated)")
            if name == "tensors":
                fields[name] = [self.tensor(raw) for raw in self._array(unpacker, name)]
            elif name == "blobs":
                fields[name] = [self.blob(raw) for raw in self._array(unpacker, name)]
            else:
                fields[name] = unpacker.unpack()
                if name == "format":  # written first: an unknown version is named before anything else fails
                    self._check_version(fields[name])
        if unpacker.tell() != len(data):
            raise self.fail("extra bytes after the document")
        self._check_version(fields.get("format"))
        tree, tensors, blobs = fields.get("tree"), fields.get("tensors"), fields.get("blobs")
        if not isinstance(tree, bytes) or tensors is None or blobs is None:
            raise self.fail("missing tree, tensors or blobs")
        if self.has_deltas and self.version < 2:  # type: ignore[operator]
            raise self.fail("delta bases of a chunk in a format 1 manifest")
        for entry in tensors:
            self.check_fits(entry, blobs)
        return Manifest(tree=tree, tensors=tensors, blobs=blobs)

    def _check_version(self, version: Any) -> None:
        if type(version) is not int or version not in READABLE_MANIFEST_FORMATS:
            raise UnsupportedFormat(
                f"manifest {self.key} has format version {version!r}; this version of "
                f"ckptstore reads versions {', '.join(map(str, READABLE_MANIFEST_FORMATS))}"
            )
        self.version = version

    def _array(self, unpacker: msgpack.Unpacker, name: str) -> Iterator[Any]:
        """The items of the array that comes next, one at a time."""
        try:
            count = unpacker.read_array_header()
        except ValueError:
            raise self.fail(f"{name} is not a list") from None
        for _ in range(count):
            yield unpacker.unpack()

    def blob(self, raw: Any) -> Blob:
        if not (type(raw) is tuple and len(raw) == 3):
            raise self.fail("blob is not [size, chunks, inline]")
        size, chunks, inline = raw
        if not _is_count(size) or type(chunks) is not tuple:
            raise self.fail("blob size or chunk list")
        refs = []
        for c in chunks:
            if not (type(c) is tuple and len(c) in (2, 3) and type(c[0]) is str and is_full_id(c[0]) and _is_count(c[1])):
                raise self.fail("chunk reference")
            bases: tuple[str, ...] = ()
            if len(c) == 3:
                bases = c[2]
                if type(bases) is not tuple or not 1 <= len(bases) <= MAX_DELTA_CHAIN:
                    raise self.fail("delta bases of a chunk")
                if not all(type(b) is str and is_full_id(b) for b in bases) or len({c[0], *bases}) != len(bases) + 1:
                    raise self.fail("delta bases of a chunk")
                self.has_deltas = True
            refs.append(ChunkRef(c[0], c[1], bases))
        if inline is not None:
            if type(inline) is not bytes or len(inline) != size or refs:
                raise self.fail("inline blob size")
        elif sum(r.size for r in refs) != size:
            raise self.fail("chunk sizes do not add up to the blob size")
        return Blob(size=size, chunks=refs, inline=inline)

    def tensor(self, raw: Any) -> TensorEntry:
        """An entry, checked on its own (whether it fits its blob: :meth:`check_fits`). The
        checks are written out, not factored into calls: a manifest may hold 10**5 entries."""
        if not (type(raw) is tuple and len(raw) == 8):
            raise self.fail("tensor entry is not a list of 8 fields")
        path, dtype, shape, stride, blob, offset, kind, requires_grad = raw
        if type(path) is not str or type(dtype) is not str or type(requires_grad) is not bool:
            raise self.fail("tensor path, dtype or requires_grad")
        if type(shape) is not tuple or not _are_counts(shape):
            raise self.fail(f"shape of {path}")
        if stride is not None and not (type(stride) is tuple and len(stride) == len(shape) and _are_counts(stride)):
            raise self.fail(f"stride of {path}")
        if not (type(kind) is int and 0 <= kind <= 2 and type(blob) is int and 0 <= blob < _COUNT_LIMIT and type(offset) is int and 0 <= offset < _COUNT_LIMIT):
            raise self.fail(f"kind, blob or offset of {path}")
        if kind == TensorKind.NDARRAY:
            if requires_grad:
                raise self.fail(f"requires_grad on {path}, a numpy array")
            self.numpy_itemsize(dtype, path)
        else:
            grads = _TORCH_DTYPE_GRADS.get(dtype)
            if grads is None:
                raise IntegrityError(f"unknown tensor dtype {dtype!r}", key=self.key, path=path)
            if requires_grad and not grads:
                raise self.fail(f"requires_grad on {path}, whose dtype {dtype} has no gradients")
            dtype = _TORCH_DTYPE_NAMES[dtype]  # one string object per dtype, not one per entry
        return TensorEntry(path, dtype, shape, stride, blob, offset, _TENSOR_KINDS[kind], requires_grad)

    def numpy_itemsize(self, dtype: str, path: str) -> int:
        import numpy as np
        size = self.numpy_itemsizes.get(dtype)
        if size is None:
            try:
                np_dtype = np.dtype(dtype)
            except TypeError:
                raise self.fail(f"numpy dtype {dtype!r} of {path}") from None
            if np_dtype.kind not in _NUMPY_KINDS:
                raise self.fail(f"numpy dtype {dtype!r} of {path}")
            size = self.numpy_itemsizes[dtype] = np_dtype.itemsize
        return size

    def check_fits(self, entry: TensorEntry, blobs: list[Blob]) -> None:
        if entry.blob >= len(blobs):
            raise self.fail(f"kind, blob or offset of {entry.path}")
        if entry.kind is TensorKind.NDARRAY:
            itemsize = self.numpy_itemsize(entry.dtype, entry.path)
        else:
            itemsize = _TORCH_ITEMSIZES[entry.dtype]
        if entry.offset % itemsize or entry.offset + _extent_bytes(entry.shape, entry.stride, itemsize) > blobs[entry.blob].size:
            raise IntegrityError("tensor does not fit its blob", key=self.key, path=entry.path)


_COUNT_LIMIT = 2**62
_TENSOR_KINDS = tuple(TensorKind)
_TORCH_DTYPE_NAMES = {name: name for name in DTYPE_INFO}
_TORCH_DTYPE_GRADS = {name: dtype.is_floating_point or dtype.is_complex for name, dtype in DTYPE_INFO.items()}
_TORCH_ITEMSIZES = {name: dtype.itemsize for name, dtype in DTYPE_INFO.items()}


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < _COUNT_LIMIT


def _are_counts(values: tuple) -> bool:
    """Every item an int (not a bool) in [0, 2**62)."""
    for v in values:
        if type(v) is not int or not 0 <= v < _COUNT_LIMIT:
            return False
    return True


def build_tensor(entry: TensorEntry, blob_buffer: torch.Tensor) -> Any:
    """Make the tensor or array of ``entry`` as a view of its blob's uint8 buffer (so tensors
    sharing a blob stay tied)."""
    import numpy as np
    import torch
    if entry.kind is TensorKind.NDARRAY:
        flat = blob_buffer.numpy()[entry.offset : entry.offset + entry.nbytes]
        return flat.view(np.dtype(entry.dtype)).reshape(entry.shape)
    dtype = torch_dtypes()[entry.dtype]
    stride = entry.stride if entry.stride is not None else _contiguous_stride(entry.shape)
    t = torch.empty(0, dtype=dtype, device=blob_buffer.device)
    t.set_(blob_buffer.untyped_storage(), entry.offset // entry.itemsize, entry.shape, stride)
    if entry.kind is TensorKind.PARAMETER:
        return torch.nn.Parameter(t, requires_grad=entry.requires_grad)
    if entry.requires_grad:
        t.requires_grad_(True)
    return t


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))



# --------------------------------------------------------------------------------------------
# Selecting key paths


def path_under(path: str, prefix: str) -> bool:
    """Whether key path ``path`` is ``prefix`` or lies below it (``optimizer/state/0`` is
    under ``optimizer``)."""
    prefix = prefix.strip("/")
    return not prefix or path == prefix or path.startswith(prefix + "/")


def _matches(path: str, pattern: str) -> bool:
    """A key pattern matches a path equal to it, below it, or that it matches as a glob
    (``*`` crosses ``/``)."""
    return path_under(path, pattern) or fnmatch.fnmatchcase(path, pattern)


@dataclass(frozen=True)
class KeySelection:
    """The key paths ``include`` names (all, if ``None``) minus those ``exclude`` names.
    A pattern selects a path equal to it or below it, or any path it matches as a glob."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    @classmethod
    def of(cls, include: str | Sequence[str] | None, exclude: str | Sequence[str] | None) -> KeySelection:
        as_tuple = lambda v: (v,) if isinstance(v, str) else tuple(v)
        return cls(None if include is None else as_tuple(include), () if exclude is None else as_tuple(exclude))

    @property
    def everything(self) -> bool:
        return self.include is None and not self.exclude

    def excluded(self, path: str) -> bool:
        return any(_matches(path, p) for p in self.exclude)

    def selected(self, path: str) -> bool:
        """Whether ``path`` (a value or tensor) is selected."""
        if self.excluded(path):
            return False
        return self.include is None or any(_matches(path, p) for p in self.include)

    def unmatched(self, paths: Iterable[str]) -> list[str]:
        """The include patterns that match none of ``paths``."""
        paths = list(paths)
        return [p for p in self.include or () if not any(_matches(path, p) for path in paths)]

    def prune(self, tree: Any, path: str = "") -> Any:
        """``tree`` with the unselected values removed from dicts, lists and tuples; a
        container is kept if it is selected or holds something selected."""
        if isinstance(tree, dict):
            out = type(tree)()
            for k, v in tree.items():
                child = _join(path, k)
                if self.excluded(child):
                    continue
                if self.include is not None and self.selected(child):
                    out[k] = KeySelection(None, self.exclude).prune(v, child)
                    continue
                kept = self.prune(v, child)
                if kept is not _NOTHING:
                    out[k] = kept
            if hasattr(tree, "_metadata"):
                out._metadata = tree._metadata  # type: ignore[attr-defined]
            return out if out or not path or self.selected(path) else _NOTHING
        if isinstance(tree, (list, tuple)):
            items = []
            for i, v in enumerate(tree):
                child = _join(path, i)
                if self.excluded(child):
                    continue
                kept = KeySelection(None, self.exclude).prune(v, child) if self.include is not None and self.selected(child) else self.prune(v, child)
                if kept is not _NOTHING:
                    items.append(kept)
            out_seq = type(tree)(items) if isinstance(tree, list) else tuple(items)
            return out_seq if items or not path or self.selected(path) else _NOTHING
        return tree if self.selected(path) else _NOTHING


_NOTHING = object()
