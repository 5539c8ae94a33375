"""Checkpoints on disk as Hugging Face and its Trainer leave them: a directory of safetensors
shards or a ``pytorch_model.bin``, a Trainer ``checkpoint-N`` folder (weights, optimizer,
scheduler, scaler and RNG pickles, ``trainer_state.json``), a run's ``output_dir`` of such
folders; and single ``.safetensors`` and ``.pt`` files (:func:`read_checkpoint`).

Everything is checked before anything is returned: a malformed file raises
:class:`InvalidCheckpoint` naming it. Symlinks: the checkpoint files read here (safetensors
shards and their index, weights, ``optimizer.pt`` and the other Trainer pickles,
``trainer_state.json``) may be symlinks, and are followed wherever they point, since a Hugging
Face cache snapshot is a folder of symlinks into ``blobs/``. A directory's other files
(``config.json``, tokenizer files, subfolders such as ``1_Pooling/``) are kept under ``files``
as their bytes (:func:`read_extra_files`): regular files only, never through a symlink (except
a cache snapshot's links into its own ``blobs/``), each at most :data:`MAX_EXTRA_FILE_BYTES`.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointNotFound, InvalidCheckpoint
from .files import FILES_KEY, read_json_file
from .pt import load_weights_only
from .safetensors import INDEX_NAME, read_directory, read_safetensors

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ckptstore.shards")

TRAINER_STATE_NAME = "trainer_state.json"


#: The files of a Hugging Face Trainer ``checkpoint-N`` folder besides the weights, and the
#: component each becomes. They are pickles: read with ``torch.load(weights_only=True)``,
#: which refuses anything but tensors and plain containers.
TRAINER_FILES = {"optimizer.pt": "optimizer", "scheduler.pt": "scheduler", "scaler.pt": "scaler", "rng_state.pth": "rng_state"}
#: Each process's RNG states in a multi-process Trainer run: component ``rng_state_<rank>``.
RANK_RNG_FILE = re.compile(r"rng_state_(\d+)\.pth")
WEIGHT_FILES = ("pytorch_model.bin",)
TRAINER_STATE_KEY = "trainer_state"
#: A file of a checkpoint directory larger than this is left out of the commit (logged).
MAX_EXTRA_FILE_BYTES = 256 << 20
#: Files a Trainer writes into ``checkpoint-N`` that are no part of a model directory: kept
#: in a commit (and written back by the Trainer integration), never exported.
TRAINER_ONLY_FILES = frozenset({"training_args.bin"})
#: Other copies of a directory's weights (PyTorch pickles, TensorFlow, Flax), not kept as files.
_WEIGHT_COPY = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?|tf_model\.h5|flax_model\.msgpack")
#: A Trainer's checkpoint folder in its ``output_dir``.
CHECKPOINT_FOLDER = re.compile(r"checkpoint-(\d+)")


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


def read_trainer_state(path: str) -> tuple[dict[str, Any], int | None]:
    """A Trainer's ``trainer_state.json`` and its ``global_step`` (``None`` if it has none).
    Not a JSON object, or a ``global_step`` that is not a whole number (``true`` is not
    one), is :class:`InvalidCheckpoint`."""
    trainer_state = read_json_file(path)
    if not isinstance(trainer_state, dict):
        raise InvalidCheckpoint(path, "is not a JSON object")
    step = trainer_state.get("global_step")
    if step is not None and (type(step) is not int or step < 0):
        raise InvalidCheckpoint(path, f"has global_step {step!r}, which is not a whole number")
    return trainer_state, step


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
