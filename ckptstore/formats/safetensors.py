"""The safetensors format: one file or a Hugging Face style directory of shards read through
the ``safetensors`` package (memory-mapped, the header checked first), and tensors written as
one file or as numbered shards with ``model.safetensors.index.json`` (by our own writer, in the
order given: :func:`write_safetensors` says why).

A malformed file (a header with a duplicate name, overlapping tensors or a hole between them,
an index that disagrees with its shards) raises :class:`InvalidCheckpoint` naming the file.
Each file is memory-mapped once, copy-on-write, and its tensors are views of that one mapping
(each tensor still its own storage, so its own blob; the mapping holds no file descriptor, so
a directory of thousands of shards imports under a low ``ulimit -n``), so committing a
directory larger than RAM streams it: pages are read as the pipeline hashes them.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import CheckpointNotFound, InvalidCheckpoint, UnsupportedValue
from .files import (
    check_export_target,
    export_errors,
    export_lock,
    open_checkpoint_file,
    parse_json,
    read_json_file,
    write_atomically,
)

if TYPE_CHECKING:  # imported where files are read or written: the CLI starts without them
    import torch


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: Largest safetensors header we read (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000
DEFAULT_MAX_SHARD_SIZE_BYTES = 5 * 10**9


@functools.cache
def safetensors_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name → torch dtype (those this torch has)."""
    import torch

    dtypes = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
    }  # fmt: skip
    for name, dtype in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
        if hasattr(torch, dtype):
            dtypes[name] = getattr(torch, dtype)
    return dtypes


@functools.cache
def safetensors_names() -> dict[torch.dtype, str]:
    """Torch dtype → safetensors dtype name: the inverse of :func:`safetensors_dtypes`."""
    return {dtype: name for name, dtype in safetensors_dtypes().items()}


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of one ``.safetensors`` file by name, in its header's order, each a
    copy-on-write view of one memory map of the file (nothing is read until used, and no
    descriptor stays open), and its ``__metadata__``. The file is checked as the safetensors
    format requires: a JSON object header, no name twice, a ``__metadata__`` of strings, and
    tensors that tile the data exactly (no overlap, no hole, nothing after the last). A
    malformed file raises :class:`InvalidCheckpoint` naming it."""
    from safetensors import SafetensorError, safe_open

    with open_checkpoint_file(path) as f:
        # The header is parsed here too, because (measured with safetensors 0.8.0) the library
        # accepts a header that names one tensor twice (it keeps the last entry), and refuses
        # an overlap, a hole and a duplicate name alike as "invalid offset for tensor `b`",
        # without saying which bytes. Cost on a 5,000-tensor file (2 busy cores): 120-150 ms
        # to check the header, 440-700 ms for safe_open to map the tensors.
        metadata, names = _check_header(path, f)
        try:
            # safe_open maps the file copy-on-write (each tensor its own storage) and closes
            # its descriptor (measured: 300 files open, no descriptor more). /dev/fd/N: the
            # file already opened and checked, not whatever ``path`` names now.
            with safe_open(f"/dev/fd/{f.fileno()}", framework="pt") as opened:
                tensors = {name: opened.get_tensor(name) for name in names}
        except (SafetensorError, RuntimeError) as exc:  # a dtype torch lacks; shrunk since its size was read
            raise InvalidCheckpoint(path, f"is not a safetensors file the safetensors package reads: {exc}") from None
    return tensors, metadata


def _check_header(path: str, f: BinaryIO) -> tuple[dict[str, str], list[str]]:
    """The ``__metadata__`` of the safetensors file ``f`` (``path``) and its tensors' names in
    the header's order, after checking the header (see :func:`read_safetensors`)."""
    file_size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) != 8:
        raise InvalidCheckpoint(path, "is truncated: no header length")
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > min(MAX_HEADER_BYTES, file_size - 8):
        raise InvalidCheckpoint(path, f"declares a {header_size}-byte header")
    header = parse_json(path, f.read(header_size))
    if not isinstance(header, dict):
        raise InvalidCheckpoint(path, "has a header that is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidCheckpoint(path, "has a __metadata__ that is not an object of strings")
    _check_layout(path, header, file_size - 8 - header_size)
    return metadata, list(header)


def _check_layout(path: str, header: dict[str, Any], data_size: int) -> None:
    """Check each tensor's entry: a known dtype, a shape and byte range that fit, and ranges
    that tile ``[0, data_size)`` exactly (the safetensors format forbids overlaps, holes and
    trailing bytes, which would let one file be read two ways)."""
    layout = {}
    for name, info in header.items():
        try:
            if not isinstance(info, dict):
                raise TypeError
            dtype = safetensors_dtypes()[info["dtype"]]
            shape, offsets = info["shape"], info["data_offsets"]
            if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
                raise TypeError
            if not all(type(n) is int and n >= 0 for n in (*shape, *offsets)):
                raise TypeError
        except (KeyError, TypeError):
            raise InvalidCheckpoint(path, f"has a malformed entry for tensor {name!r}") from None
        begin, end = offsets
        numel = 1
        for n in shape:
            numel *= n
        if end - begin != numel * dtype.itemsize:
            raise InvalidCheckpoint(path, f"tensor {name!r} does not fit its bytes: {end - begin} bytes for {numel} {info['dtype']} values")
        if end > data_size:
            raise InvalidCheckpoint(path, f"tensor {name!r} ends at byte {end} of a {data_size}-byte data section (truncated?)")
        layout[name] = (dtype, shape, begin, end)
    covered, last = 0, None
    for name, (_, _, begin, end) in sorted(layout.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin < covered:
            raise InvalidCheckpoint(path, f"tensors {last!r} and {name!r} overlap (at byte {begin} of its data)")
        if begin > covered:
            raise InvalidCheckpoint(path, f"bytes {covered}..{begin} of its data belong to no tensor (a hole before {name!r})")
        covered, last = end, name
    if covered != data_size:
        raise InvalidCheckpoint(path, f"bytes {covered}..{data_size} of its data belong to no tensor")


def read_index(path: str) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json``: tensor name → shard file
    name, each a plain name inside the index's directory."""
    index = read_json_file(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise InvalidCheckpoint(path, "has no weight_map object")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InvalidCheckpoint(path, f"maps tensor {tensor!r} to {shard!r}, which is not a file name")
        if shard in ("", ".", "..") or os.path.basename(shard) != shard:
            raise InvalidCheckpoint(path, f"names shard {shard!r} outside its directory")
    return weight_map


def read_directory(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face style directory: the shards that
    ``model.safetensors.index.json`` names, or ``model.safetensors``, or every
    ``*.safetensors`` file in it. With an index, the index and the shards must agree
    exactly: a tensor the index lists that its shard lacks, or one a shard holds that the
    index places elsewhere or does not list (a mix of two exports, say), is
    :class:`InvalidCheckpoint`, as is a tensor in two files."""
    index_path = os.path.join(path, INDEX_NAME)
    weight_map = read_index(index_path) if os.path.lexists(index_path) else None
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointNotFound(f"no {INDEX_NAME} or *.safetensors file in {path}", path=path)
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for name in files:
        file = os.path.join(path, name)
        tensors, _ = read_safetensors(file)
        for key, tensor in tensors.items():
            if weight_map is not None and weight_map.get(key) != name:
                where = f"places it in {weight_map[key]}" if key in weight_map else "does not list it"
                raise InvalidCheckpoint(file, f"holds tensor {key!r}, but {INDEX_NAME} {where}")
            if key in out:
                raise InvalidCheckpoint(file, f"holds tensor {key!r}, which {source[key]} holds too")
            out[key], source[key] = tensor, name
    missing = [key for key in weight_map or () if key not in out]
    if missing and weight_map is not None:  # (only an index lists tensors)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InvalidCheckpoint(index_path, f"lists tensor {missing[0]!r} in {weight_map[missing[0]]}, which does not hold it{more}")
    return out


@dataclass(frozen=True)
class ExportedTensor:
    """One tensor to export: its name in the files, and how to get its bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    key_path: str


def plan_shards(tensors: Iterable[ExportedTensor], *, max_shard_size_bytes: int) -> list[list[ExportedTensor]]:
    """Group tensors into shards of at most ``max_shard_size_bytes`` in order (a larger
    tensor gets a shard of its own)."""
    shards: list[list[ExportedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s] or [[]]


def check_exportable(tensors: Iterable[ExportedTensor]) -> None:
    """Refuse, before anything is written, a tensor whose dtype safetensors has no name for,
    or two tensors exported under one name (:class:`UnsupportedValue` naming its key path)."""
    seen: dict[str, str] = {}
    for t in tensors:
        if t.dtype not in safetensors_names():
            raise UnsupportedValue(t.key_path, f"dtype {t.dtype} has no safetensors equivalent")
        if t.name in seen:
            raise UnsupportedValue(t.key_path, f"exports under the same name {t.name!r} as {seen[t.name]}")
        seen[t.name] = t.key_path


def write_safetensors(
    path: str, shard: list[ExportedTensor], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, *, replace: bool = True
) -> None:
    """Write ``shard`` as the safetensors file ``path`` (through :func:`write_atomically`),
    its tensors laid out in the order given, one at a time from ``tensors``."""
    # Written here, not with the safetensors package: its serialize_file (and so save_file)
    # lays tensors out by dtype, then name, whatever order they are given in (measured with
    # 0.8.0: {"0.weight", "0.bias"} is written, and load_file returns it, as 0.bias, 0.weight),
    # so an export would no longer load in the model's order, nor import back to the
    # manifest it came from. It also writes a temp file of its own (mode 0600, never
    # fsync'd: seen with strace), renamed over the path it is given.
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": safetensors_names()[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    write_atomically(path, lambda f: f.writelines(_safetensors_parts(encoded, shard, tensors)), replace=replace)


def _safetensors_parts(header: bytes, shard: list[ExportedTensor], tensors: Mapping[str, torch.Tensor]) -> Iterable[bytes | memoryview]:
    import torch

    yield struct.pack("<Q", len(header))
    yield header
    for t in shard:
        tensor = tensors[t.name].contiguous()
        if tensor.numel():
            yield tensor.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def write_shards(
    directory: str,
    shards: list[list[ExportedTensor]],
    read_shard: Callable[[list[ExportedTensor]], Mapping[str, torch.Tensor]],
    metadata: Mapping[str, str] | None,
    progress: Callable[[str, int, int], None] | None,
) -> list[str]:
    """Write ``shards`` into the folder ``directory``: ``model.safetensors``, or numbered
    shards and ``model.safetensors.index.json``; returns the names written."""
    count = len(shards)
    names = [SINGLE_NAME] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    weight_map: dict[str, str] = {}
    total = sum(t.nbytes for shard in shards for t in shard)
    done = 0
    for name, shard in zip(names, shards):
        write_safetensors(os.path.join(directory, name), shard, read_shard(shard), metadata)
        weight_map.update((t.name, name) for t in shard)
        done += sum(t.nbytes for t in shard)
        if progress is not None:
            progress("export", done, total)
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        encoded = json.dumps(index, indent=2).encode()
        write_atomically(os.path.join(directory, INDEX_NAME), lambda f: f.write(encoded))
        names.append(INDEX_NAME)
    return names


def write_file(
    path: str,
    tensors: list[ExportedTensor],
    read_tensors: Callable[[list[ExportedTensor]], Mapping[str, torch.Tensor]],
    *,
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    force: bool = False,
) -> list[str]:
    """Write ``tensors`` as one safetensors file at ``path``, whole or not at all, under the
    export lock of ``path`` (:class:`ExportBusy` if another export is writing it). A file
    already there is :class:`TargetExists` unless ``force`` (:func:`check_export_target`)."""
    check_export_target(path, directory=False, force=force)
    with export_errors(path):
        with export_lock(os.path.abspath(path)):
            write_safetensors(path, tensors, read_tensors(tensors), metadata, replace=force)
    if progress is not None:
        total = sum(t.nbytes for t in tensors)
        progress("export", total, total)
    return [path]
