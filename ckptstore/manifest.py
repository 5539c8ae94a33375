"""Manifests: what a checkpoint holds, as a versioned msgpack document.

A state (nested dicts, lists, tuples, scalars, tensors, numpy arrays) is encoded as:

``tree``
    The state with every tensor replaced by a reference into ``tensors``; encoded with
    msgpack, every non-native type as a msgpack extension (see :mod:`ckptstore.tree`, which
    also writes and selects key paths). No pickle.
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

import functools
import gc
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, NamedTuple

import msgpack

from .codec import DTYPE_INFO, MAX_DELTA_CHAIN, tensor_bytes, torch_dtype_names, torch_dtypes
from .errors import CkptStoreError, IntegrityError, UnsupportedFormat
from .ids import is_full_id
from .tree import NUMPY_KINDS, encode_tree, join_key, unpack_value
from .tree import TensorRef as TensorRef  # public here too: merge_manifests takes TensorRefs; docs/design.md names manifest.key_segment
from .tree import key_segment as key_segment

if TYPE_CHECKING:  # imported where tensors are handled: reading a manifest needs neither
    import torch

MANIFEST_FORMAT_VERSION = 2
READABLE_MANIFEST_FORMATS = (1, 2)


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

    def _doc(self) -> list[str | int | list[str]]:
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
                    walk(v, join_key(path, k))
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    walk(v, join_key(path, i))

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
        packed: bytes = msgpack.packb(doc, use_bin_type=True)
        return packed

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


def _storage_span(t: torch.Tensor) -> tuple[int, int]:
    """The [start, end) byte range of ``t``'s storage that ``t`` touches."""
    start = int(t.storage_offset()) * t.element_size()
    extent = (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()
    return start, start + extent


def _plan_tensors(tensors: list[tuple[str, Any]], *, inline_threshold_bytes: int) -> tuple[list[TensorEntry], list[Blob], dict[int, BlobSource]]:
    """Group tensors by shared storage; return entries, blobs (inline ones filled) and the
    sources of the blobs still to be chunked, by blob index."""
    import numpy as np
    import torch

    groups: dict[tuple[str, int], list[int]] = {}
    for i, (_, t) in enumerate(tensors):
        shareable = isinstance(t, torch.Tensor) and t.numel() > 0 and not t.is_conj() and not t.is_neg()
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
            data = arr.reshape(-1).view(np.uint8).data.cast("B") if arr.size else memoryview(b"")
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
    tree, tensors = encode_tree(state)
    entries, blobs, sources = _plan_tensors(tensors, inline_threshold_bytes=inline_threshold_bytes)
    return Manifest(tree=tree, tensors=entries, blobs=blobs), sources


def merge_manifests(parts: Mapping[str, Manifest] | Mapping[int, Manifest], *, extra: Mapping[str, Any] | None = None) -> Manifest:
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
            tensors.append(
                TensorEntry(
                    f"{join_key('', name)}/{e.path}" if e.path else join_key("", name),
                    e.dtype,
                    e.shape,
                    e.stride,
                    e.blob + first_blob,
                    e.offset,
                    e.kind,
                    e.requires_grad,
                )
            )
        blobs.extend(part.blobs)
    tree.update(extra or {})
    return Manifest(tree=encode_tree(tree)[0], tensors=tensors, blobs=blobs)


# --------------------------------------------------------------------------------------------
# Decoding


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
                f"manifest {self.key} has format version {version!r}; this version of ckptstore reads versions {', '.join(map(str, READABLE_MANIFEST_FORMATS))}"
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
            if np_dtype.kind not in NUMPY_KINDS:
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


def _are_counts(values: tuple[object, ...]) -> bool:
    """Every item an int (not a bool) in [0, 2**62)."""
    for v in values:
        if type(v) is not int or not 0 <= v < _COUNT_LIMIT:
            return False
    return True


# --------------------------------------------------------------------------------------------
# Tensors from blobs


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
