"""Checkpoint formats from outside: safetensors files, Hugging Face style directories and
``checkpoint-N`` folders, ``.pt`` files; reading them for a commit, and exporting a commit as
a sharded safetensors directory.

Reading checks everything before a byte is stored: a malformed file (a safetensors header
with a duplicate name, overlapping tensors or a hole between them, an index that disagrees
with its shards, JSON that is not an object, not UTF-8 or nested too deeply, a FIFO or other
non-regular file) raises :class:`InvalidCheckpoint` naming the file. Each safetensors file is
memory-mapped once, copy-on-write, and its tensors are views of that one mapping (each tensor
still its own storage, so its own blob; the mapping holds no file descriptor, so a directory of
thousands of shards imports under a low ``ulimit -n``), so committing a directory larger than
RAM streams it: pages are read as the pipeline hashes them.

Symlinks: the checkpoint files read here (safetensors shards and their index, weights,
``optimizer.pt`` and the other Trainer pickles, ``trainer_state.json``) may be symlinks, and
are followed wherever they point, since a Hugging Face cache snapshot is a folder of symlinks
into ``blobs/``. A directory's other files (``config.json``, tokenizer files, subfolders such
as ``1_Pooling/``) are kept under ``files`` as their bytes (:func:`read_extra_files`): regular
files only, never through a symlink (except a cache snapshot's links into its own ``blobs/``),
each at most :data:`MAX_EXTRA_FILE_BYTES`.

Writing never replaces what is at the target unless forced (:func:`check_export_target`:
an existing file, or a directory with entries, is :class:`TargetExists`; a missing parent,
a file where a directory goes or the reverse, and every other failure of the filesystem is
:class:`StorageError` naming the path, never a bare ``OSError``). It takes a lock beside the
target (:class:`ExportBusy` for a second export to it at the same time; a killed exporter's
lock is taken over), writes every file to a temp file created exclusively with a random name
in its directory, fsyncs it and links (or, forced, renames) it into place. A directory is
built whole beside the target and then swapped in (:func:`write_directory`).
File names are ours (``model.safetensors``, ``model-00001-of-00003.safetensors``) or those of
a commit's ``files``, each checked to be a relative POSIX path without ``..`` before anything
is written (:func:`check_file_name`); tensor names only ever go inside the files, so no name
can make an export write outside its directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import math
import os
import re
import shutil
import stat
import struct
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from .errors import CheckpointNotFound, CkptStoreError, ExportBusy, InvalidCheckpoint, InvalidFileName, StorageError, TargetExists, UnsupportedValue
from .manifest import key_segment
from .objectstore import fsync_directory

if TYPE_CHECKING:  # imported where files are read or written: the CLI starts without them
    import torch

log = logging.getLogger("ckptstore.shards")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
#: Largest safetensors header we read (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000
DEFAULT_MAX_SHARD_SIZE_BYTES = 5 * 10**9
#: What an export writes: a Hugging Face style directory, one safetensors file, one ``torch.save`` file.
EXPORT_FORMATS = ("hf", "safetensors", "pt")

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


def open_checkpoint_file(path: str) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file or a symlink to one. Anything
    else (a FIFO, a device, a directory) is :class:`InvalidCheckpoint`: it is opened
    non-blocking and checked before a byte is read, so a FIFO cannot stall an import."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidCheckpoint(path, "is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key it has twice (``json`` keeps the last one)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _invalid_text(value: Any) -> str | None:
    """The first string in ``value`` (dict keys included) that is not valid Unicode (a lone
    surrogate, which JSON's ``\\udcff`` escapes allow), or ``None``."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _parse_json(path: str, data: bytes) -> Any:
    """``data``, the contents of the file ``path``, as JSON: UTF-8, no key twice in one
    object, every string valid Unicode. Anything else is :class:`InvalidCheckpoint` naming
    ``path`` (never a raw decode or recursion error)."""
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise InvalidCheckpoint(path, "is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidCheckpoint(path, f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidCheckpoint(path, "holds JSON nested too deeply") from None
    except _DuplicateKey as exc:
        raise InvalidCheckpoint(path, f"has the key {exc.args[0]!r} twice in one object") from None
    bad = _invalid_text(value)
    if bad is not None:
        raise InvalidCheckpoint(path, f"holds a string that is not valid Unicode: {bad!r}")
    return value


def _read_json_file(path: str) -> Any:
    """The JSON document in the regular file ``path`` (see :func:`_parse_json`)."""
    with open_checkpoint_file(path) as f:
        return _parse_json(path, f.read())


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of one ``.safetensors`` file by name, in name order (not the file's: the
    library lays a file out by dtype, so an export imports to the same manifest), each a
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
        metadata = _check_header(path, f)
        try:
            # safe_open maps the file copy-on-write (each tensor its own storage) and closes
            # its descriptor (measured: 300 files open, no descriptor more). /dev/fd/N: the
            # file already opened and checked, not whatever ``path`` names now.
            with safe_open(f"/dev/fd/{f.fileno()}", framework="pt") as opened:
                tensors = {name: opened.get_tensor(name) for name in sorted(opened.keys())}
        except (SafetensorError, RuntimeError) as exc:  # a dtype torch lacks; shrunk since its size was read
            raise InvalidCheckpoint(path, f"is not a safetensors file the safetensors package reads: {exc}") from None
    return tensors, metadata


def _check_header(path: str, f: BinaryIO) -> dict[str, str]:
    """The ``__metadata__`` of the safetensors file ``f`` (``path``) after checking its header
    (see :func:`read_safetensors`)."""
    file_size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) != 8:
        raise InvalidCheckpoint(path, "is truncated: no header length")
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > min(MAX_HEADER_BYTES, file_size - 8):
        raise InvalidCheckpoint(path, f"declares a {header_size}-byte header")
    header = _parse_json(path, f.read(header_size))
    if not isinstance(header, dict):
        raise InvalidCheckpoint(path, "has a header that is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidCheckpoint(path, "has a __metadata__ that is not an object of strings")
    _check_layout(path, header, file_size - 8 - header_size)
    return metadata


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
    index = _read_json_file(path)
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
    :class:`InvalidCheckpoint`, as is a tensor in two files. Tensors come in name order."""
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
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InvalidCheckpoint(index_path, f"lists tensor {missing[0]!r} in {weight_map[missing[0]]}, which does not hold it{more}")  # type: ignore[index]
    return dict(sorted(out.items()))


#: The files of a Hugging Face Trainer ``checkpoint-N`` folder besides the weights, and the
#: component each becomes. They are pickles: read with ``torch.load(weights_only=True)``,
#: which refuses anything but tensors and plain containers.
TRAINER_FILES = {"optimizer.pt": "optimizer", "scheduler.pt": "scheduler", "scaler.pt": "scaler", "rng_state.pth": "rng_state"}
#: Each process's RNG states in a multi-process Trainer run: component ``rng_state_<rank>``.
RANK_RNG_FILE = re.compile(r"rng_state_(\d+)\.pth")
WEIGHT_FILES = ("pytorch_model.bin",)
TRAINER_STATE_KEY = "trainer_state"
#: The component that holds a checkpoint directory's other files (``config.json``, tokenizer
#: files, ``1_Pooling/config.json``): relative POSIX path → the file's bytes as a uint8 tensor.
FILES_KEY = "files"
#: A file of a checkpoint directory larger than this is left out of the commit (logged).
MAX_EXTRA_FILE_BYTES = 256 << 20
#: Files a Trainer writes into ``checkpoint-N`` that are no part of a model directory: kept
#: in a commit (and written back by the Trainer integration), never exported.
TRAINER_ONLY_FILES = frozenset({"training_args.bin"})
#: Other copies of a directory's weights (PyTorch pickles, TensorFlow, Flax), not kept as files.
_WEIGHT_COPY = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?|tf_model\.h5|flax_model\.msgpack")
#: A Trainer's checkpoint folder in its ``output_dir``.
CHECKPOINT_FOLDER = re.compile(r"checkpoint-(\d+)")


@functools.cache
def numpy_safe_globals() -> list[Any]:
    """NumPy arrays (a Trainer's ``rng_state.pth`` holds ``np.random.get_state()``), allowed in
    ``weights_only`` loads as transformers allows them: they rebuild arrays, never run code."""
    import numpy as np

    return [
        (np._core if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else np.core).multiarray._reconstruct, np.ndarray, np.dtype,
        *(type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.float16, np.float32, np.float64)),
    ]  # fmt: skip


_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # pickle protocol 2, then torch's 10-byte magic number


def load_weights_only(path: str) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, plain containers and NumPy arrays
    only, no code. ``path`` must be a regular file (or a symlink to one); a file torch
    cannot load so is :class:`InvalidCheckpoint` naming it and saying why (what
    ``weights_only`` refused, say a class of the file's own; or that it is no ``torch.save``
    file at all). A zip file (``torch.save``'s format since torch 1.6) is memory-mapped; a
    legacy one (``_use_new_zipfile_serialization=False``, an old hub ``pytorch_model.bin``),
    which torch cannot map, is read whole."""
    import torch
    allow_numpy = torch.serialization.safe_globals(numpy_safe_globals()) if hasattr(torch.serialization, "safe_globals") else contextlib.nullcontext()
    with open_checkpoint_file(path) as f:  # checked first: torch would block on a FIFO
        magic = f.read(4)
        f.seek(0)
        is_zip = magic == _ZIP_MAGIC
        try:
            with allow_numpy:
                return torch.load(path if is_zip else f, map_location="cpu", weights_only=True, mmap=is_zip)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, RecursionError, ...
            text = str(exc)
            refused = re.search(r"WeightsUnpickler error: (.*?)(?:\.\s|\n|$)", text)  # torch's own reason, not its advice
            why = f"{type(exc).__name__}: {refused[1] if refused else (text.splitlines()[0] if text else '')}"
            if not (is_zip or magic == _LEGACY_MAGIC):
                raise InvalidCheckpoint(path, f"is not a file torch.save writes (neither zip nor legacy format); torch.load(weights_only=True) failed: {why}") from exc
            raise InvalidCheckpoint(path, f"cannot be loaded with weights_only=True: {why}") from exc


def read_trainer_state(path: str) -> tuple[dict[str, Any], int | None]:
    """A Trainer's ``trainer_state.json`` and its ``global_step`` (``None`` if it has none).
    Not a JSON object, or a ``global_step`` that is not a whole number (``true`` is not
    one), is :class:`InvalidCheckpoint`."""
    trainer_state = _read_json_file(path)
    if not isinstance(trainer_state, dict):
        raise InvalidCheckpoint(path, "is not a JSON object")
    step = trainer_state.get("global_step")
    if step is not None and (type(step) is not int or step < 0):
        raise InvalidCheckpoint(path, f"has global_step {step!r}, which is not a whole number")
    return trainer_state, step


def read_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, metadata)`` of a checkpoint on disk: a ``.safetensors`` file or a directory
    of them (``{"model": tensors}``), a Trainer ``checkpoint-N`` folder (``model``,
    ``optimizer``, ``scheduler``, ``scaler``, ``rng_state``, ``rng_state_<rank>``,
    ``trainer_state``; metadata ``step`` and ``epoch``), or a ``.pt``/``.pth``/``.bin`` file
    (its dict as the state). A directory's other files (``config.json``, tokenizer files,
    ``1_Pooling/config.json``) go under ``files`` (see :func:`read_extra_files`). Reads only
    the checkpoint files it names (symlinks to them are followed; see the module's notes); a
    malformed one is :class:`InvalidCheckpoint` naming it, raised before anything is returned."""
    if os.path.isdir(path):
        state: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        names = sorted(os.listdir(path))
        has_safetensors = INDEX_NAME in names or any(f.endswith(".safetensors") for f in names)
        if has_safetensors:
            state["model"] = read_directory(path)
        else:
            for name in WEIGHT_FILES:
                if name in names:
                    state["model"] = load_weights_only(os.path.join(path, name))
        for name, component in TRAINER_FILES.items():
            if name in names:
                state[component] = load_weights_only(os.path.join(path, name))
        for name in names:
            rank = RANK_RNG_FILE.fullmatch(name)
            if rank:
                state[f"rng_state_{rank[1]}"] = load_weights_only(os.path.join(path, name))
        if TRAINER_STATE_NAME in names:
            state[TRAINER_STATE_KEY], step = read_trainer_state(os.path.join(path, TRAINER_STATE_NAME))
            if step is not None:
                metadata["step"] = step
            epoch = _number(state[TRAINER_STATE_KEY].get("epoch"))
            if epoch is not None:
                metadata["epoch"] = epoch
        if not state:
            raise CheckpointNotFound(f"{path} holds no safetensors, pytorch_model.bin or Trainer checkpoint files", path=path)
        read = {*TRAINER_FILES, TRAINER_STATE_NAME, *WEIGHT_FILES}

        def is_read(name: str) -> bool:
            return name in read or RANK_RNG_FILE.fullmatch(name) is not None or (has_safetensors and (name == INDEX_NAME or name.endswith(".safetensors")))

        files = read_extra_files(path, skip=is_read)
        if files:
            state[FILES_KEY] = files
        return state, metadata
    if path.endswith(".safetensors"):
        return {"model": read_safetensors(path)[0]}, {}
    if os.path.lexists(path):
        loaded = load_weights_only(path)
        return (loaded if isinstance(loaded, dict) and all(isinstance(k, str) for k in loaded) else {"model": loaded}), {}
    raise CheckpointNotFound(f"no checkpoint at {path}", path=path)


def read_extra_files(path: str, *, skip: Callable[[str], bool] = lambda name: False) -> dict[str, torch.Tensor]:
    """The other files of the checkpoint directory ``path``, by relative POSIX path
    (``config.json``, ``tokenizer.json``, ``1_Pooling/config.json``), each as its bytes in a
    uint8 tensor, so an unchanged file is stored once across commits. ``skip(name)`` names
    the top-level entries read as checkpoint files. Also left out: hidden entries (``.git``,
    ``.gitattributes``), other copies of the weights at the top (``pytorch_model*.bin`` and
    its index, ``tf_model.h5``, ``flax_model.msgpack``), ``checkpoint-N`` subfolders
    (checkpoints of their own), and, with a warning, symlinks (only checkpoint files are
    followed, and, in a Hugging Face cache snapshot, links into that repository's ``blobs/``:
    see :func:`hub_cache_blobs`), other non-regular files and files over
    :data:`MAX_EXTRA_FILE_BYTES`."""
    import torch
    files: dict[str, torch.Tensor] = {}
    blobs = hub_cache_blobs(path)

    def walk(folder: str, prefix: str) -> None:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith(".") or (not prefix and (skip(entry.name) or _WEIGHT_COPY.fullmatch(entry.name))):
                continue
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if blobs is not None and os.path.dirname(target) == blobs:
                    data = _read_small_file(target)
                    if data is not None:
                        files[prefix + entry.name] = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
                else:
                    log.warning("not committing %s: a symlink, and not a checkpoint file", entry.path)
            elif entry.is_dir(follow_symlinks=False):
                if CHECKPOINT_FOLDER.fullmatch(entry.name):
                    log.info("not committing %s: a checkpoint of its own", entry.path)
                else:
                    walk(entry.path, f"{prefix}{entry.name}/")
            else:
                data = _read_small_file(entry.path)
                if data is not None:
                    files[prefix + entry.name] = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)

    walk(path, "")
    return files


def hub_cache_blobs(path: str) -> str | None:
    """The ``blobs/`` folder of the Hugging Face cache repository whose snapshot ``path`` is
    (``models--ORG--NAME/snapshots/REVISION``), or ``None`` if ``path`` is not a snapshot.
    A snapshot's files are symlinks into that folder; those, and only those, are read as its
    other files."""
    real = os.path.realpath(path)
    snapshots = os.path.dirname(real)
    if os.path.basename(snapshots) != "snapshots":
        return None
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    return blobs if os.path.isdir(blobs) and not os.path.islink(blobs) else None


def _read_small_file(path: str) -> bytearray | None:
    """The bytes of the regular file ``path`` (not through a symlink), or ``None`` (with a
    warning) if it is something else or larger than :data:`MAX_EXTRA_FILE_BYTES`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        log.warning("not committing %s: a symlink, and not a checkpoint file", path)
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            log.warning("not committing %s: not a regular file", path)
            return None
        data = bytearray(f.read(MAX_EXTRA_FILE_BYTES + 1))
    if len(data) > MAX_EXTRA_FILE_BYTES:
        log.warning("not committing %s (%d bytes): larger than %d bytes", path, max(info.st_size, len(data)), MAX_EXTRA_FILE_BYTES)
        return None
    return data


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a JSON number a float can hold, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def trainer_step_metrics(log_history: Any, step: int) -> dict[str, float]:
    """Every number a Trainer logged at ``step`` in ``log_history`` (``trainer_state.json``'s
    list of log entries), by name: ``loss``, ``learning_rate``, ``grad_norm``, ``eval_loss``,
    ``eval_*``. Values logged at other steps are left out, so ``best`` only ever points at a
    commit that was evaluated; entries that are not objects, and values that are not
    numbers, are skipped."""
    out: dict[str, float] = {}
    for entry in log_history if isinstance(log_history, list) else ():
        if not isinstance(entry, dict) or entry.get("step") != step:
            continue
        for name, value in entry.items():
            number = _number(value)
            if name not in ("step", "epoch") and number is not None:
                out[name] = number
    return out


def trainer_best_step(trainer_state: Mapping[str, Any]) -> int | None:
    """The step of a Trainer run's best checkpoint: ``best_global_step``, or (older
    transformers) the number in ``best_model_checkpoint``; ``None`` if it names none."""
    step = trainer_state.get("best_global_step")
    if type(step) is int and step > 0:
        return step
    folder = trainer_state.get("best_model_checkpoint")
    match = CHECKPOINT_FOLDER.fullmatch(os.path.basename(os.path.normpath(folder))) if isinstance(folder, str) and folder else None
    return int(match[1]) if match else None


def trainer_best_metric(trainer_state: Mapping[str, Any], steps: Iterable[int], *, greater_is_better: bool | None = None) -> tuple[str, bool] | None:
    """The metric a Trainer run chose its best checkpoint by, and its direction, as far as
    ``trainer_state.json`` tells (it does not record ``metric_for_best_model``): the one
    ``eval_*`` value logged at :func:`trainer_best_step` that equals ``best_metric``, and
    ``greater_is_better`` if given, else the direction in which that value is the best of
    those logged at ``steps`` (the name's own first: lower for a ``loss``). ``None`` if that
    is not one metric and one direction."""
    best_step, value = trainer_best_step(trainer_state), _number(trainer_state.get("best_metric"))
    history = trainer_state.get("log_history")
    if best_step is None or value is None or math.isnan(value):
        return None
    names = [name for name, logged in trainer_step_metrics(history, best_step).items() if name.startswith("eval_") and logged == value]
    if len(names) != 1:
        return None
    name = names[0]
    logged = [v for step in steps for v in [trainer_step_metrics(history, step).get(name)] if v is not None and not math.isnan(v)]
    default = not name.endswith("loss")
    for greater in (greater_is_better,) if greater_is_better is not None else (default, not default):
        if value == (max(logged, default=value) if greater else min(logged, default=value)):
            return name, greater
    return None


def run_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """The ``checkpoint-N`` folders of the Trainer ``output_dir`` as ``(N, path)``, in step
    order; empty if it has none (or is no directory). Two folders of one step
    (``checkpoint-5``, ``checkpoint-05``) are :class:`InvalidCheckpoint`."""
    if not os.path.isdir(output_dir):
        return []
    found: dict[int, str] = {}
    for name in sorted(os.listdir(output_dir)):
        match = CHECKPOINT_FOLDER.fullmatch(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            step = int(match[1])
            if step in found:
                raise InvalidCheckpoint(path, f"is step {step}, as {found[step]} is")
            found[step] = path
    return sorted(found.items())


def check_file_name(name: Any) -> str:
    """``name`` if it is a relative POSIX path that stays inside its folder: ``/``-separated
    segments, none empty, ``.`` or ``..``, and no NUL; else :class:`InvalidFileName`."""
    if not isinstance(name, str) or not name:
        raise InvalidFileName(name, "is not a relative path")
    if name.startswith("/"):
        raise InvalidFileName(name, "is an absolute path; a file name must be relative to the folder it is written into")
    if "\0" in name:
        raise InvalidFileName(name, "holds a NUL character")
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidFileName(name, f"has a segment {segment!r}; only plain names separated by '/' stay inside the folder")
    return name


def check_files(files: Mapping[Any, Any]) -> dict[str, bytes | bytearray | memoryview]:
    """``files`` (relative POSIX path → bytes, or a 1-D uint8 tensor of them) with every name
    checked (:func:`check_file_name`; a name inside another file's name is
    :class:`InvalidFileName` too) and every value as bytes (else :class:`UnsupportedValue`)."""
    import torch
    out: dict[str, bytes | bytearray | memoryview] = {}
    for name, data in files.items():
        check_file_name(name)
        if isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and data.dim() == 1:
            out[name] = memoryview(data.cpu().contiguous().numpy())
        elif isinstance(data, (bytes, bytearray)):
            out[name] = data
        else:
            raise UnsupportedValue(f"{FILES_KEY}/{name}", "is not a file's bytes (a 1-D uint8 tensor)")
    for name in out:
        segments = name.split("/")
        for i in range(1, len(segments)):
            if "/".join(segments[:i]) in out:
                raise InvalidFileName(name, f"is inside {'/'.join(segments[:i])!r}, which is a file")
    return out


def write_files(directory: str, files: Mapping[Any, Any]) -> list[str]:
    """Write ``files`` (see :func:`check_files`) into the existing folder ``directory``,
    making subfolders as needed; returns their names. Every name is checked before anything
    is written, so no name (a commit is data from outside) can write outside ``directory``;
    nor is a symlink inside it followed. Each file is written whole or not at all."""
    checked = check_files(files)
    _write_checked_files(directory, checked)
    return list(checked)


def _write_checked_files(directory: str, files: Mapping[str, bytes | bytearray | memoryview]) -> None:
    for name, data in files.items():
        *folders, _ = name.split("/")
        parent = directory
        for folder in folders:
            parent = os.path.join(parent, folder)
            try:
                os.mkdir(parent)
            except FileExistsError:
                if os.path.islink(parent) or not os.path.isdir(parent):
                    raise NotADirectoryError(f"cannot write {name} into {directory}: {parent} is not a folder") from None
        write_atomically(os.path.join(directory, name), lambda f, data=data: f.write(data))


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
        if t.dtype not in safetensors_names():
            raise UnsupportedValue(t.key_path, f"dtype {t.dtype} has no safetensors equivalent")
        if t.name in seen:
            raise UnsupportedValue(t.key_path, f"exports under the same name {t.name!r} as {seen[t.name]}")
        seen[t.name] = t.key_path


def check_export_target(path: str, *, directory: bool, force: bool = False) -> None:
    """Refuse an export to ``path`` (a ``directory``, or else one file) before anything is
    read or written. :class:`TargetExists` if a file (or symlink) is there, or a directory
    with entries, unless ``force``; an empty directory is exported into. :class:`StorageError`
    naming the path, forced or not, if its parent is missing or not a directory, the target
    is of the other kind (a file where a directory goes, or the reverse), which no export
    replaces, or the filesystem refuses to tell."""
    target = os.path.realpath(path) if directory else os.path.abspath(path)
    parent = os.path.dirname(target)
    with _export_errors(path):
        try:
            if not stat.S_ISDIR(os.stat(parent).st_mode):
                raise NotADirectoryError
        except FileNotFoundError:
            raise StorageError(f"cannot export to {path}: its parent directory {parent} does not exist") from None
        except NotADirectoryError:
            raise StorageError(f"cannot export to {path}: {parent} is not a directory") from None
        try:
            mode = os.lstat(target).st_mode
        except FileNotFoundError:
            return
        kind = "directory" if directory else "file"
        if stat.S_ISDIR(mode) != directory:
            there = "a file" if directory else "a directory"
            raise StorageError(f"cannot export a {kind} to {path}: {there} is there, which an export never replaces with a {kind}")
        if force:
            return
        if not directory:
            raise TargetExists(path, "already exists")
        with os.scandir(target) as entries:
            if next(entries, None) is not None:
                raise TargetExists(path, "is a directory with files in it")


@contextlib.contextmanager
def _export_errors(path: str) -> Iterator[None]:
    """Turn a failure of the filesystem in the block (permission denied, read-only, full) into
    :class:`StorageError` naming ``path`` and the file at fault; ours pass as they are."""
    try:
        yield
    except CkptStoreError:
        raise
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and exc.filename != path else ""
        raise StorageError(f"cannot export to {path}: {exc.strerror or exc}{where}") from exc


def write_directory(
    directory: str,
    shards: list[list[ExportedTensor]],
    read_shard: Callable[[list[ExportedTensor]], Mapping[str, torch.Tensor]],
    *,
    files: Mapping[Any, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    force: bool = False,
) -> list[str]:
    """Write ``shards`` as the Hugging Face style directory ``directory``:
    ``model.safetensors`` (one shard) or numbered shards plus
    ``model.safetensors.index.json``; ``read_shard`` returns one shard's tensors by name.
    ``files`` (relative POSIX path → bytes: ``config.json``, tokenizer files,
    ``1_Pooling/config.json``) are written beside them, in the same swap; their names are
    checked before anything is written (:class:`InvalidFileName`), and one that is an
    export's own file name is left out, with a warning. Returns the names written.

    Atomic: the files are written into a new folder beside ``directory``, which then takes
    its place, so ``directory`` holds one export whole, never a mix of two; an export that
    fails or is killed leaves it as it was (a kill in the instant between the two renames of
    the swap leaves it missing, and the next export puts it back). An export owns only its
    own file names (``model.safetensors``, the index, ``model-NNNNN-of-NNNNN.safetensors``)
    and those of ``files``: every other entry of ``directory`` (a README, subfolders) is
    kept, hard-linked into the new folder before the swap; one added during the export is left in
    a ``.NAME.export-old-*`` folder beside it, with a warning. A ``directory`` that is a
    symlink exports into the folder it points to. A second export to ``directory`` while one
    runs raises :class:`ExportBusy`. A ``directory`` with entries is :class:`TargetExists`
    unless ``force`` (then the swap replaces the export's files and keeps the others), and
    its parent must exist (:func:`check_export_target`)."""
    check_export_target(directory, directory=True, force=force)
    target = os.path.realpath(directory)
    parent, name = os.path.split(target)
    extra = check_files(files or {})
    for file in [f for f in extra if is_export_file(f.split("/", 1)[0])]:
        log.warning("not writing file %r into %s: the export writes a file of that name", file, directory)
        del extra[file]
    with _export_errors(directory), export_lock(target):
        _recover_interrupted(target)
        check_export_target(directory, directory=True, force=force)  # again, with what an interrupted export had moved aside put back
        staging = os.path.join(parent, f".{name}.export-new-{uuid.uuid4().hex}")
        os.mkdir(staging, 0o777)
        try:
            names = _write_shards(staging, shards, read_shard, metadata, progress)
            _write_checked_files(staging, extra)
            names += list(extra)
            if os.path.isdir(target):
                shutil.copymode(target, staging)
                _link_entries(target, staging, top=True)
            fsync_directory(staging)
            _swap_in(staging, target, remove_old=lambda old: _remove_replaced(old, target, owned=frozenset(extra)))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # our files, and links to files still in target
            raise
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
    with _export_errors(path):
        with export_lock(os.path.abspath(path)):
            _write_safetensors(path, tensors, read_tensors(tensors), metadata, replace=force)
    if progress is not None:
        total = sum(t.nbytes for t in tensors)
        progress("export", total, total)
    return [path]


def write_torch_file(path: str, read_state: Callable[[], Any], *, force: bool = False) -> list[str]:
    """Write the state ``read_state()`` returns with ``torch.save`` as the file ``path``, whole
    or not at all, under the export lock of ``path`` (:class:`ExportBusy` if another export
    is writing it). The file loads with ``torch.load(path, weights_only=True)`` as the state
    it was, tensors that shared storage (tied weights) still sharing it: a value that would
    not (:func:`check_weights_only`) is :class:`UnsupportedValue` naming its key path, and
    nothing is written. A file already there is :class:`TargetExists` unless ``force``
    (checked before the state is read: :func:`check_export_target`)."""
    import torch
    check_export_target(path, directory=False, force=force)
    with _export_errors(path):
        with export_lock(os.path.abspath(path)):
            state = read_state()
            check_weights_only(state)
            write_atomically(path, lambda f: torch.save(state, f), replace=force)
    return [path]


#: What ``torch.load(weights_only=True)`` reads back as itself, besides containers, tensors,
#: and torch dtype, device and Size.
_WEIGHTS_ONLY_LEAVES = (type(None), bool, int, float, str, bytes)


def check_weights_only(value: Any, path: str = "") -> None:
    """Raise :class:`UnsupportedValue` naming the key path of the first value in ``value`` that
    ``torch.load(weights_only=True)`` would not read back as it is: anything but ``None``,
    bool, int, float, str, bytes, dict (OrderedDict with its ``_metadata``), list, tuple,
    tensors and parameters, torch dtype, device and Size (a numpy array, say)."""
    import torch

    if type(value) in _WEIGHTS_ONLY_LEAVES or type(value) in (torch.Tensor, torch.nn.Parameter, torch.dtype, torch.device, torch.Size):
        return
    if type(value) in (dict, OrderedDict):
        items: Iterable[tuple[Any, Any]] = value.items()
        meta = getattr(value, "_metadata", None)
        if meta is not None:
            check_weights_only(meta, f"{path}/_metadata" if path else "_metadata")
    elif type(value) in (list, tuple):
        items = enumerate(value)
    else:
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        raise UnsupportedValue(path, f"is a {kind}, which a weights-only torch.load cannot read back; leave it out of the export, or export another format")
    for key, item in items:
        check_weights_only(item, f"{path}/{key_segment(key)}" if path else key_segment(key))


_EXPORT_FILE = re.compile(r"model\.safetensors|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors|\.export-[0-9a-f]{32}\.tmp")


def is_export_file(name: str) -> bool:
    """Whether ``name`` is a file name an export writes into a directory (and so replaces),
    or the temp file of one that was killed."""
    return _EXPORT_FILE.fullmatch(name) is not None


@contextlib.contextmanager
def export_lock(target: str) -> Iterator[None]:
    """Hold the export lock of ``target`` (an absolute path) for the block: the file
    ``.NAME.export-lock`` beside it, ``flock``-ed while held. Another export of ``target``
    meanwhile raises :class:`ExportBusy` at once. The kernel drops the flock of a holder
    that dies, so a lock file a killed exporter left is taken over at once (no pid or clock
    is consulted)."""
    parent, name = os.path.split(target)
    lock = os.path.join(parent, f".{name}.export-lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ExportBusy(target) from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed this lock file as we opened it: take a fresh one
    try:
        yield
    finally:
        try:
            os.unlink(lock)  # while still flock-ed: an exporter that opened it sees it gone
        finally:
            os.close(fd)


def _write_shards(
    directory: str,
    shards: list[list[ExportedTensor]],
    read_shard: Callable[[list[ExportedTensor]], Mapping[str, torch.Tensor]],
    metadata: Mapping[str, str] | None,
    progress: Callable[[str, int, int], None] | None,
) -> list[str]:
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
        encoded = json.dumps(index, indent=2).encode()
        write_atomically(os.path.join(directory, INDEX_NAME), lambda f: f.write(encoded))
        names.append(INDEX_NAME)
    return names


def _link_entries(source: str, destination: str, *, top: bool) -> None:
    """Hard-link every entry of ``source`` into ``destination`` (symlinks as themselves,
    subfolders as folders of the same mode, filled alike), except, at the top, an export's
    own files, and anything the export wrote in its place."""
    with os.scandir(source) as entries:
        for entry in entries:
            into = os.path.join(destination, entry.name)
            exists = os.path.lexists(into)
            if entry.is_dir(follow_symlinks=False):
                if not exists:
                    os.mkdir(into)
                    shutil.copymode(entry.path, into)
                elif os.path.islink(into) or not os.path.isdir(into):
                    continue  # a file the export wrote
                _link_entries(entry.path, into, top=False)
                fsync_directory(into)
            elif not (exists or (top and is_export_file(entry.name))):
                os.link(entry.path, into, follow_symlinks=False)


def replace_directory(staging: str, target: str) -> None:
    """Put the complete folder ``staging`` (written with :func:`write_atomically`) at
    ``target`` in one rename, durably: ``staging`` is fsync'd, swapped in
    (:func:`_swap_in`), and the folder it replaced, if any, removed whole. A kill leaves
    ``target`` as it was, or, in the instant between the swap's two renames, beside it as
    ``.NAME.export-old-*``."""
    with _export_errors(target):
        fsync_directory(staging)
        _swap_in(staging, target, remove_old=lambda old: shutil.rmtree(old, ignore_errors=True))


def _swap_in(staging: str, target: str, *, remove_old: Callable[[str], None]) -> None:
    """Put the folder ``staging`` at ``target``: renamed there, or, if ``target`` exists,
    renamed there after ``target`` is renamed aside, which ``remove_old`` then clears away
    (given its path), the parent fsync'd in between."""
    parent, name = os.path.split(target)
    if not os.path.isdir(target):
        os.rename(staging, target)
        fsync_directory(parent)
        return
    old = os.path.join(parent, f".{name}.export-old-{uuid.uuid4().hex}")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    fsync_directory(parent)
    remove_old(old)


def _recover_interrupted(target: str) -> None:
    """Clean up after an export of ``target`` that was killed (called under its lock): put
    the old folder back if it was killed between the two renames of a swap, remove its
    half-written folders, and finish emptying an old folder a swap left."""
    parent, name = os.path.split(target)
    ours = re.compile(rf"\.{re.escape(name)}\.export-(new|old)-[0-9a-f]{{32}}")
    found: dict[str, list[str]] = {"new": [], "old": []}
    for entry in sorted(os.listdir(parent)):
        match = ours.fullmatch(entry)
        if match:
            found[match[1]].append(os.path.join(parent, entry))
    if found["new"] and found["old"] and not os.path.lexists(target):
        os.rename(found["old"].pop(), target)
        log.warning("%s: put back the folder an interrupted export had moved aside", target)
    for staging in found["new"]:
        shutil.rmtree(staging, ignore_errors=True)  # our files, and links to files kept elsewhere
    if os.path.isdir(target):
        for old in found["old"]:
            _remove_replaced(old, target)


def _remove_replaced(old: str, new: str, *, owned: frozenset[str] = frozenset()) -> None:
    """Empty and remove the folder ``old`` that ``new`` replaced: unlink the export's own
    files, those it wrote in their place (``owned``), and every entry that is the very file
    ``new`` holds at the same place; keep (with a warning) anything else, something added to
    ``old`` while the export ran."""
    try:
        if _remove_entries(old, new, owned, prefix=""):
            return
        log.warning("%s: entries added while it was exported were kept in %s", new, old)
    except OSError as exc:
        log.warning("%s: could not remove the folder it replaced, %s: %s", new, old, exc)


def _remove_entries(old: str, new: str, owned: frozenset[str], *, prefix: str) -> bool:
    kept = False
    with os.scandir(old) as entries:
        for entry in entries:
            twin = os.path.join(new, entry.name)
            is_dir = entry.is_dir(follow_symlinks=False)
            if is_dir and os.path.isdir(twin) and not os.path.islink(twin):
                kept |= not _remove_entries(entry.path, twin, owned, prefix=f"{prefix}{entry.name}/")
            elif not is_dir and ((not prefix and is_export_file(entry.name)) or prefix + entry.name in owned or _same_file(entry, twin)):
                os.unlink(entry.path)
            else:
                kept = True
    if not kept:
        os.rmdir(old)
    return not kept


def _same_file(entry: os.DirEntry, path: str) -> bool:
    try:
        return os.path.samestat(entry.stat(follow_symlinks=False), os.lstat(path))
    except FileNotFoundError:
        return False


def _write_safetensors(path: str, shard: list[ExportedTensor], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, *, replace: bool = True) -> None:
    """Write ``shard`` as the safetensors file ``path`` with the ``safetensors`` package's
    ``serialize_file`` (through :func:`write_atomically`). ``serialize_file`` rather than
    ``save_file``: an export's tensors may share storage (tied weights, each written whole),
    which ``save_file`` refuses."""
    from safetensors import TensorSpec, serialize_file

    contiguous = {t.name: tensors[t.name].contiguous() for t in shard}  # alive while serialize_file reads them
    specs = {
        t.name: TensorSpec(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), data_ptr=contiguous[t.name].data_ptr(), data_len=t.nbytes)
        for t in shard
    }  # fmt: skip
    write_atomically(path, lambda f: serialize_file(specs, f.name, metadata={"format": "pt", **(metadata or {})}), replace=replace)


def write_atomically(path: str, write: Callable[[BinaryIO], Any], *, replace: bool = True) -> None:
    """Write the file ``path`` whole or not at all: the one way every file this package
    writes is written (exports, and the Trainer folder
    :func:`~ckptstore.integrations.huggingface.materialize` builds). ``write`` fills a temp
    file created exclusively (``O_EXCL``, so never through a planted symlink) under a random
    name in the same directory, or replaces it by its name ``f.name``, as safetensors'
    ``serialize_file`` does (its own temp file, mode 0600, renamed there, and never fsync'd:
    seen with strace, safetensors 0.8.0), in which case it gets the mode our temp file had.
    The file at that name is fsync'd and renamed over ``path`` (or, unless ``replace``,
    hard-linked there, which fails with :class:`TargetExists` if anything is there by then,
    leaving it as it was), and the directory fsync'd."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".export-{uuid.uuid4().hex}.tmp")
    f = open(tmp, "xb")  # noqa: SIM115 (closed below, before the file is fsync'd)
    try:
        with f:
            created = os.fstat(f.fileno())
            write(f)
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            written = os.fstat(fd)
            if not os.path.samestat(written, created):
                os.fchmod(fd, stat.S_IMODE(created.st_mode))
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise TargetExists(path, "already exists") from None
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)
