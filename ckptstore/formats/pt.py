"""``torch.save`` files: read with ``torch.load(weights_only=True)`` (tensors, plain
containers and NumPy arrays, never code), written only with what such a load reads back."""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import InvalidCheckpoint, UnsupportedValue
from ..tree import key_segment
from .files import (
    check_export_target,
    export_errors,
    export_lock,
    open_checkpoint_file,
    write_atomically,
)


@functools.cache
def numpy_safe_globals() -> list[Any]:
    """NumPy arrays (a Trainer's ``rng_state.pth`` holds ``np.random.get_state()``), allowed in
    ``weights_only`` loads as transformers allows them: they rebuild arrays, never run code."""
    import numpy as np

    return [
        (np._core if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else np.core).multiarray._reconstruct, np.ndarray, np.dtype,  # type: ignore[attr-defined]  # numpy's stubs do not declare np._core
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
                raise InvalidCheckpoint(
                    path, f"is not a file torch.save writes (neither zip nor legacy format); torch.load(weights_only=True) failed: {why}"
                ) from exc
            raise InvalidCheckpoint(path, f"cannot be loaded with weights_only=True: {why}") from exc


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
    with export_errors(path):
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
