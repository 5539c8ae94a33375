"""Checkpoint formats from outside: safetensors files, Hugging Face style directories and
``checkpoint-N`` folders, ``.pt`` files; reading them for a commit, and exporting a commit as
a sharded safetensors directory.

Reading memory-maps each file and builds tensors as views of the mapping, so committing a
directory larger than RAM streams it: pages are read as the pipeline hashes them. Writing
goes one shard at a time (only that shard's chunks are read), to a temp file in the target
directory that is renamed into place. File names are ours (``model.safetensors``,
``model-00001-of-00003.safetensors``); tensor names only ever go inside the files, so no
name can make an export write outside its directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import IntegrityError, UnsupportedValue

log = logging.getLogger("ckptstore.shards")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: Largest safetensors header we read (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000
DEFAULT_MAX_SHARD_SIZE_BYTES = 5 * 10**9

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
}  # fmt: skip
for _name, _dtype in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _dtype):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _dtype)
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of one ``.safetensors`` file, each a copy-on-write memory map (nothing is
    read until used), and its ``__metadata__``. A malformed file raises
    :class:`IntegrityError` naming it."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise IntegrityError(f"safetensors file {path} is truncated")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(MAX_HEADER_BYTES, file_size - 8):
            raise IntegrityError(f"safetensors file {path} declares a {header_size}-byte header")
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"safetensors file {path} has a malformed header: {exc}") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"safetensors file {path} has a malformed header")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_size
    tensors = {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(n) for n in info["shape"]]
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"safetensors file {path}: bad entry for tensor {name!r}") from None
        itemsize = torch.empty(0, dtype=dtype).element_size()
        numel = 1
        for n in shape:
            numel *= n
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= file_size - data_start or end - begin != numel * itemsize:
            raise IntegrityError(f"safetensors file {path}: tensor {name!r} does not fit its bytes")
        if begin == end:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        # One copy-on-write map per tensor: each is its own storage (and its own blob).
        raw = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", offset=data_start + begin, shape=(end - begin,)))
        if (data_start + begin) % itemsize:
            raw = raw.clone()  # unaligned: view() needs aligned bytes
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def read_directory(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face style directory: the shards that
    ``model.safetensors.index.json`` names, or ``model.safetensors``, or every
    ``*.safetensors`` file in it."""
    index_path = os.path.join(path, INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise IntegrityError(f"{index_path} is malformed: {exc}") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not isinstance(name, str) or os.path.basename(name) != name:
                raise IntegrityError(f"{index_path} names shard {name!r} outside its directory")
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no {INDEX_NAME} or *.safetensors file in {path}")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        tensors, _ = read_safetensors(os.path.join(path, name))
        for key, tensor in tensors.items():
            if key in out:
                raise IntegrityError(f"tensor {key!r} appears in more than one shard of {path}")
            out[key] = tensor
    return out


#: The files of a Hugging Face Trainer ``checkpoint-N`` folder besides the weights, and the
#: component each becomes. They are pickles: read with ``torch.load(weights_only=True)``,
#: which refuses anything but tensors and plain containers.
TRAINER_FILES = {"optimizer.pt": "optimizer", "scheduler.pt": "scheduler", "scaler.pt": "scaler", "rng_state.pth": "rng_state"}
WEIGHT_FILES = ("pytorch_model.bin",)


#: NumPy arrays (a Trainer's ``rng_state.pth`` holds ``np.random.get_state()``), allowed in
#: ``weights_only`` loads as transformers allows them: they rebuild arrays, never run code.
NUMPY_SAFE_GLOBALS = [
    (np._core if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else np.core).multiarray._reconstruct, np.ndarray, np.dtype,
    *(type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.float16, np.float32, np.float64)),
]  # fmt: skip


def load_weights_only(path: str) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, plain containers and NumPy arrays
    only, no code."""
    allow_numpy = torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS) if hasattr(torch.serialization, "safe_globals") else contextlib.nullcontext()
    try:
        with allow_numpy:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ...
        raise IntegrityError(f"{path} cannot be loaded with weights_only=True: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def read_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, metadata)`` of a checkpoint on disk: a ``.safetensors`` file or a directory
    of them (``{"model": tensors}``), a Trainer ``checkpoint-N`` folder (``model``,
    ``optimizer``, ``scheduler``, ``rng_state``, ``trainer_state``; metadata ``step``), or a
    ``.pt``/``.pth``/``.bin`` file (its dict as the state)."""
    if os.path.isdir(path):
        state: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        has_safetensors = os.path.exists(os.path.join(path, INDEX_NAME)) or any(f.endswith(".safetensors") for f in os.listdir(path))
        if has_safetensors:
            state["model"] = read_directory(path)
        else:
            for name in WEIGHT_FILES:
                if os.path.exists(os.path.join(path, name)):
                    state["model"] = load_weights_only(os.path.join(path, name))
        for name, component in TRAINER_FILES.items():
            if os.path.exists(os.path.join(path, name)):
                state[component] = load_weights_only(os.path.join(path, name))
        trainer_state = os.path.join(path, "trainer_state.json")
        if os.path.exists(trainer_state):
            with open(trainer_state, encoding="utf-8") as f:
                state["trainer_state"] = json.load(f)
            step = state["trainer_state"].get("global_step")
            if isinstance(step, int):
                metadata["step"] = step
        if not state:
            raise FileNotFoundError(f"{path} holds no safetensors, pytorch_model.bin or Trainer checkpoint files")
        return state, metadata
    if path.endswith(".safetensors"):
        return {"model": read_safetensors(path)[0]}, {}
    if os.path.isfile(path):
        loaded = load_weights_only(path)
        return (loaded if isinstance(loaded, dict) and all(isinstance(k, str) for k in loaded) else {"model": loaded}), {}
    raise FileNotFoundError(f"no checkpoint at {path}")


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
    seen: dict[str, str] = {}
    for t in tensors:
        if t.dtype not in SAFETENSORS_NAMES:
            raise UnsupportedValue(t.key_path, f"dtype {t.dtype} has no safetensors equivalent")
        if t.name in seen:
            raise UnsupportedValue(t.key_path, f"exports under the same name {t.name!r} as {seen[t.name]}")
        seen[t.name] = t.key_path


def write_directory(
    directory: str,
    shards: list[list[ExportedTensor]],
    read_shard: Callable[[list[ExportedTensor]], Mapping[str, torch.Tensor]],
    *,
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[str]:
    """Write ``shards`` into ``directory`` as ``model.safetensors`` (one shard) or numbered
    shards plus ``model.safetensors.index.json``; ``read_shard`` returns one shard's tensors
    by name. Each file appears whole or not at all. Returns the file names written."""
    os.makedirs(directory, exist_ok=True)
    count = len(shards)
    names = [SINGLE_NAME] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    weight_map: dict[str, str] = {}
    total = sum(t.nbytes for shard in shards for t in shard)
    done = 0
    for name, shard in zip(names, shards):
        _write_safetensors(os.path.join(directory, name), shard, read_shard(shard), metadata)
        weight_map.update((t.name, name) for t in shard)
        done += sum(t.nbytes for t in shard)
        if progress is not None:
            progress("export", done, total)
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_atomically(os.path.join(directory, INDEX_NAME), [json.dumps(index, indent=2).encode()])
        names.append(INDEX_NAME)
    for stale in os.listdir(directory):  # shards and index of an earlier export
        if stale not in names and (stale in (SINGLE_NAME, INDEX_NAME) or _SHARD_NAME.fullmatch(stale)):
            os.unlink(os.path.join(directory, stale))
    return names


def write_file(
    path: str,
    tensors: list[ExportedTensor],
    read_tensors: Callable[[list[ExportedTensor]], Mapping[str, torch.Tensor]],
    *,
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[str]:
    """Write ``tensors`` as one safetensors file at ``path`` (appears whole or not at all)."""
    _write_safetensors(path, tensors, read_tensors(tensors), metadata)
    if progress is not None:
        total = sum(t.nbytes for t in tensors)
        progress("export", total, total)
    return [path]


_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _write_safetensors(path: str, shard: list[ExportedTensor], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    _write_atomically(path, _safetensors_parts(encoded, shard, tensors))


def _safetensors_parts(header: bytes, shard: list[ExportedTensor], tensors: Mapping[str, torch.Tensor]) -> Iterable[bytes | memoryview]:
    yield struct.pack("<Q", len(header))
    yield header
    for t in shard:
        tensor = tensors[t.name].contiguous()
        if tensor.numel():
            yield memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _write_atomically(path: str, parts: Iterable[bytes | memoryview]) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "xb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
