"""State trees: the structure of a state, apart from its tensors' bytes, and its key paths.

A tree is a state (nested dicts, lists, tuples, scalars, tensors, numpy arrays) with every
tensor replaced by a reference to it, encoded with msgpack: every non-native type as a
msgpack extension (see :class:`Ext`), never pickle. Commit metadata is encoded with the same
rules, tensors refused.

A *key path* names a value in a tree: its keys from the root, each written by
:func:`key_segment`, joined by ``/``. :class:`KeySelection` selects key paths by pattern.

Decoding (:func:`unpack_value`) distrusts its input: extension payloads are type-checked and
their nesting is capped.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from .codec import torch_dtype_names
from .errors import CkptStoreError, IntegrityError, UnsupportedValue

MAX_DEPTH = 200
#: Tuples, OrderedDicts and dicts with int keys nest as msgpack extensions, which the C
#: decoder recurses into with a large stack frame each; their nesting is capped lower.
MAX_EXT_DEPTH = 32
#: The kinds of numpy dtype (``dtype.kind``) a tree or a manifest holds: bool, int, uint, float, complex.
NUMPY_KINDS = "biufc"
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


def join_key(path: str, key: str | int) -> str:
    """The key path of ``key`` inside the value at ``path``."""
    segment = key_segment(key)
    return f"{path}/{segment}" if path else segment


def _pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


@dataclass(frozen=True)
class TensorRef:
    """Stands in a tree for tensor ``index`` of a manifest that is being assembled from
    parts already stored (see :func:`~ckptstore.manifest.merge_manifests`)."""

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
            return [self.encode(v, join_key(path, i), depth + 1) for i, v in enumerate(value)]
        if t is tuple:
            with self._extension(path):
                items = [self.encode(v, join_key(path, i), depth + 1) for i, v in enumerate(value)]
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
            if value.dtype.kind not in NUMPY_KINDS:
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

    def _encode_dict(self, value: dict[Any, Any], path: str, depth: int) -> Any:
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
            pairs.append((k, self.encode(v, join_key(path, k), depth + 1)))
        if type(value) is OrderedDict:
            meta = getattr(value, "_metadata", None)
            meta_enc = None if meta is None else self.encode(meta, join_key(path, "_metadata"), depth + 1)
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
            if value.dtype.kind not in NUMPY_KINDS or value.dtype.hasobject:
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


def tree_key_paths(tree: Any, path: str = "") -> Iterator[str]:
    """Every key path in a decoded tree (containers and leaves), written as key paths are."""
    if isinstance(tree, dict):
        items: Iterable[tuple[Any, Any]] = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return
    for k, v in items:
        child = join_key(path, k)
        yield child
        yield from tree_key_paths(v, child)


def encode_tree(state: Any) -> tuple[bytes, list[tuple[str, Any]]]:
    """The encoded tree of ``state``, and the tensors and arrays it references by index, each
    with the key path where it is first met (an object held at several paths is one)."""
    encoder = _TreeEncoder(allow_tensors=True)
    return _pack(encoder.encode(state)), encoder.tensors


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
        def inner() -> Any:
            return inner_of(payload)

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
            if dtype.kind not in NUMPY_KINDS or dtype.itemsize != len(raw):
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
    if type(k) is str or type(k) is int:
        return k
    raise IntegrityError(f"dict key of type {type(k).__name__} in tree", key=key)


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
        def as_tuple(v: str | Sequence[str]) -> tuple[str, ...]:
            return (v,) if isinstance(v, str) else tuple(v)

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
                child = join_key(path, k)
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
                child = join_key(path, i)
                if self.excluded(child):
                    continue
                kept = KeySelection(None, self.exclude).prune(v, child) if self.include is not None and self.selected(child) else self.prune(v, child)
                if kept is not _NOTHING:
                    items.append(kept)
            out_seq = type(tree)(items) if isinstance(tree, list) else tuple(items)
            return out_seq if items or not path or self.selected(path) else _NOTHING
        return tree if self.selected(path) else _NOTHING


_NOTHING = object()
