"""Hugging Face ``transformers`` Trainer integration: commit every Trainer save to a store,
and resume a run from any commit.

    from ckptstore.integrations.huggingface import CkptStoreCallback

    store = ckptstore.open("ckpts")
    callback = CkptStoreCallback(store)                     # commits on every Trainer save
    trainer = Trainer(model, args, train_dataset=..., eval_dataset=..., callbacks=[callback])
    trainer.train(resume_from_checkpoint=callback.materialize(args.output_dir))

Each save of the Trainer (``checkpoint-N``: weights, ``optimizer.pt``, ``scheduler.pt``,
``scaler.pt``, ``rng_state*.pth``, ``trainer_state.json`` and the small files beside them,
``config.json`` and the like) becomes one commit: components ``model``, ``optimizer``,
``scheduler``, ``scaler``, ``rng_state``, ``trainer_state`` and ``files``; metadata
``step`` and ``epoch``; as metrics, everything the Trainer logged at that step (``loss``,
``learning_rate``, ``grad_norm``, ``eval_*``). ``best`` follows the Trainer's
``metric_for_best_model`` in the direction of ``greater_is_better``.

:func:`materialize` writes a commit back as a ``checkpoint-N`` folder, which
``trainer.train(resume_from_checkpoint=...)`` resumes exactly as from the folder the
Trainer wrote (same weights, optimizer and scheduler state, RNG states and data position).
Pickled files (``optimizer.pt``, ``rng_state.pth``) are read with ``weights_only=True``;
``training_args.bin`` is kept as bytes and never unpickled.

Not handled: DeepSpeed, FSDP and per-rank optimizer shards (``rank*-of-N-optimizer.pt``)
and sub-folders of a checkpoint (multi-adapter PEFT). In a multi-process run only the
world's process zero commits; it reads the ``rng_state_<rank>.pth`` files present when
its own save returns.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import torch
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from ..commit import Commit
from ..errors import CkptStoreError, ComponentsUnavailable, UnknownRef
from ..formats import (
    INDEX_NAME,
    TRAINER_FILES,
    WEIGHT_FILES,
    load_weights_only,
    read_checkpoint,
)
from ..store import LATEST, Store
from ..training import BRANCH_ENV, REF_ENV

log = logging.getLogger("ckptstore.huggingface")

PREFIX_CHECKPOINT_DIR = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
TRAINER_STATE_NAME = "trainer_state.json"
#: Components besides the model, each written back as the file it came from.
FILES_KEY = "files"
TRAINER_STATE_KEY = "trainer_state"
_RANK_RNG_FILE = re.compile(r"rng_state_(\d+)\.pth")
#: Other files of a checkpoint folder larger than this are left out of the commit (logged).
MAX_EXTRA_FILE_BYTES = 256 << 20


def checkpoint_folder(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def read_trainer_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, metadata)`` of a Trainer ``checkpoint-N`` folder: what
    :func:`ckptstore.formats.read_checkpoint` reads (``model``, ``optimizer``, ``scheduler``,
    ``scaler``, ``rng_state``, ``trainer_state``), each ``rng_state_<rank>.pth`` as
    ``rng_state_<rank>``, and every other plain file, not a symlink (``config.json``,
    ``generation_config.json``, tokenizer files, ``training_args.bin``) under ``files`` as its
    bytes (a uint8 tensor, so an unchanged file is stored once across commits)."""
    state, metadata = read_checkpoint(path)
    names = sorted(os.listdir(path))
    has_safetensors = INDEX_NAME in names or any(n.endswith(".safetensors") for n in names)
    read = {*TRAINER_FILES, TRAINER_STATE_NAME} | ({INDEX_NAME} if has_safetensors else set(WEIGHT_FILES))
    files: dict[str, torch.Tensor] = {}
    for name in names:
        full = os.path.join(path, name)
        rank = _RANK_RNG_FILE.fullmatch(name)
        if rank:
            state[f"rng_state_{rank[1]}"] = load_weights_only(full)
        elif name in read or (has_safetensors and name.endswith(".safetensors")) or name.startswith(".") or not os.path.isfile(full):
            continue
        elif os.path.islink(full):  # only checkpoint files are followed (see ckptstore.formats)
            log.warning("not committing %s: a symlink, and not a checkpoint file", full)
        elif os.path.getsize(full) > MAX_EXTRA_FILE_BYTES:
            log.warning("not committing %s (%d bytes): larger than %d bytes", full, os.path.getsize(full), MAX_EXTRA_FILE_BYTES)
        else:
            with open(full, "rb") as f:
                data = bytearray(f.read())
            files[name] = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    if files:
        state[FILES_KEY] = files
    return state, metadata


def step_metrics(state: TrainerState, step: int | None = None) -> dict[str, float]:
    """Every number the Trainer logged at ``step`` (default: the current step), by name:
    ``loss``, ``learning_rate``, ``grad_norm``, ``eval_loss``, ``eval_*``. Values logged at
    other steps are left out, so ``best`` only ever points at a commit that was evaluated."""
    step = state.global_step if step is None else step
    out: dict[str, float] = {}
    for entry in state.log_history:
        if entry.get("step") != step:
            continue
        for name, value in entry.items():
            if name not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = float(value)
    return out


def best_metric_options(args: TrainingArguments) -> dict[str, Any]:
    """``best_metric`` and ``greater_is_better`` for :meth:`Store.commit` from the Trainer's
    ``metric_for_best_model`` (prefixed ``eval_`` as the Trainer does) and
    ``greater_is_better``; empty (the store's own setting) when none is set."""
    metric = getattr(args, "metric_for_best_model", None)
    if not metric:
        return {}
    name = metric if metric.startswith("eval_") else f"eval_{metric}"
    greater = getattr(args, "greater_is_better", None)
    return {"best_metric": name, "greater_is_better": greater if greater is not None else not name.endswith("loss")}


class CkptStoreCallback(TrainerCallback):
    """A ``TrainerCallback`` that commits each checkpoint the Trainer saves.

    ``branch`` (default ``$CKPTSTORE_BRANCH``, else the store's default branch) is where
    commits go; ``ref`` (default ``$CKPTSTORE_REF``, else ``branch`` if given, else
    ``latest``) is what :meth:`materialize` resumes from. With ``keep_checkpoint_dirs=False``
    each ``checkpoint-N`` folder is deleted once committed, except the best one while
    ``load_best_model_at_end`` needs it (deleted when training ends). ``metadata`` is added
    to every commit's. :attr:`commits` lists the commits made, oldest first.
    """

    def __init__(
        self,
        store: Store,
        *,
        branch: str | None = None,
        ref: str | None = None,
        keep_checkpoint_dirs: bool = True,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.store = store
        self.branch = branch or os.environ.get(BRANCH_ENV) or None
        self.ref = ref or os.environ.get(REF_ENV) or self.branch or LATEST
        self.keep_checkpoint_dirs = keep_checkpoint_dirs
        self.metadata = dict(metadata or {})
        self.commits: list[Commit] = []
        self._committed_dirs: list[str] = []

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        path = os.path.join(args.output_dir, checkpoint_folder(state.global_step))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"CkptStoreCallback: the Trainer saved, but there is no {path} to commit")
        checkpoint, _ = read_trainer_checkpoint(path)
        metadata = {**self.metadata, "step": state.global_step}
        if state.epoch is not None:
            metadata["epoch"] = float(state.epoch)
        commit = self.store.commit(
            checkpoint, branch=self.branch, message=checkpoint_folder(state.global_step), metadata=metadata,
            metrics=step_metrics(state), **best_metric_options(args),
        )  # fmt: skip
        del checkpoint  # memory maps of the folder's files
        self.commits.append(commit)
        log.info("committed %s as %s (step %d)", path, commit.short_id, state.global_step)
        if not self.keep_checkpoint_dirs:
            self._committed_dirs.append(path)
            self._remove_committed_dirs(keep=state.best_model_checkpoint if args.load_best_model_at_end else None)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.keep_checkpoint_dirs and state.is_world_process_zero:
            self._remove_committed_dirs(keep=None)  # the best model, if wanted, is loaded by now

    def _remove_committed_dirs(self, *, keep: str | None) -> None:
        kept = []
        for path in self._committed_dirs:
            if keep is not None and os.path.abspath(path) == os.path.abspath(keep):
                kept.append(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
        self._committed_dirs = kept

    def materialize(self, directory: str) -> str | None:
        """:func:`materialize` of :attr:`ref` into ``directory``: the path to pass as
        ``resume_from_checkpoint``, or ``None`` for a fresh start. With
        ``keep_checkpoint_dirs=False`` the folders written are deleted like committed ones
        (at the next save; the best one when training ends)."""
        written = _materialize(self.store, self.ref, directory, best=True)
        if not self.keep_checkpoint_dirs:
            self._committed_dirs.extend(written)
        return written[0] if written else None


def materialize(store: Store, ref: str | None, directory: str, *, best: bool = True) -> str | None:
    """Write commit ``ref`` (default ``$CKPTSTORE_REF``, else ``latest``) as the Trainer
    folder ``directory/checkpoint-N`` and return its path, for
    ``trainer.train(resume_from_checkpoint=...)``; ``None`` if the store has no such ref.

    The folder is built beside its final place and renamed into it, replacing a folder of
    that name. With ``best``, when the checkpoint's ``trainer_state`` names a best step other
    than its own (``load_best_model_at_end``), that step's commit (the nearest ancestor with
    that step) is also written, model only, unless ``directory`` already holds its folder,
    and ``best_model_checkpoint`` points at it (or at the folder itself, if it is the best)."""
    written = _materialize(store, ref, directory, best=best)
    return written[0] if written else None


def _materialize(store: Store, ref: str | None, directory: str, *, best: bool) -> list[str]:
    """:func:`materialize`; returns the folders written, the checkpoint's first."""
    ref = ref or os.environ.get(REF_ENV) or LATEST
    try:
        commit = store.commit_of(ref)
    except UnknownRef:
        log.info("no %r in %s: starting fresh", ref, store.url)
        return []
    state = store.checkout(commit.id, exclude=["model"])
    if not isinstance(state, dict):
        raise CkptStoreError(f"commit {commit.short_id} is not a Trainer checkpoint")
    trainer_state = state.get(TRAINER_STATE_KEY)
    if trainer_state is None:
        log.warning("commit %s has no trainer_state: the Trainer will load its weights and start at step 0", commit.short_id)
        trainer_state = {}
    step = trainer_state.get("global_step", commit.metadata.get("step"))
    if not isinstance(step, int):
        raise CkptStoreError(f"commit {commit.short_id} records no step")
    path = os.path.join(directory, checkpoint_folder(step))
    written = [path]
    best_step = _best_step(trainer_state)
    if best_step == step:
        trainer_state = {**trainer_state, "best_model_checkpoint": path}
    elif best and best_step is not None:
        best_path, wrote = _materialize_best(store, commit, best_step, directory)
        if best_path is not None:
            trainer_state = {**trainer_state, "best_model_checkpoint": best_path}
        if wrote:
            written.append(best_path)
    with _building(path) as tmp:
        store.export(commit.id, tmp, component="model")
        _write_files(tmp, state.get(FILES_KEY) or {})
        for file, component in TRAINER_FILES.items():
            if component in state:
                torch.save(state[component], os.path.join(tmp, file))
        for component, value in state.items():
            if _RANK_RNG_FILE.fullmatch(f"{component}.pth"):
                torch.save(value, os.path.join(tmp, f"{component}.pth"))
        if state.get(TRAINER_STATE_KEY) is not None:
            with open(os.path.join(tmp, TRAINER_STATE_NAME), "w", encoding="utf-8") as f:
                f.write(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n")
    log.info("materialized %s (%s) at %s", ref, commit.short_id, path)
    return written


def _best_step(trainer_state: Mapping[str, Any]) -> int | None:
    """The step of the best checkpoint: ``best_global_step``, or (older transformers)
    the number in ``best_model_checkpoint``."""
    step = trainer_state.get("best_global_step")
    if isinstance(step, int) and step > 0:
        return step
    match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", os.path.basename(os.path.normpath(trainer_state.get("best_model_checkpoint") or "")))
    return int(match[1]) if match else None


def _materialize_best(store: Store, commit: Commit, best_step: int, directory: str) -> tuple[str | None, bool]:
    """The best checkpoint's folder in ``directory`` (``None`` if there is none to be had)
    and whether it was written now."""
    path = os.path.join(directory, checkpoint_folder(best_step))
    if os.path.isdir(path) and any(n.endswith((".safetensors", ".bin")) for n in os.listdir(path)):
        return path, False
    for ancestor in store.log(commit.id)[1:]:
        if ancestor.metadata.get("step") == best_step:
            break
    else:
        log.warning("no commit of step %d behind %s: load_best_model_at_end will not find it", best_step, commit.short_id)
        return None, False
    try:
        try:
            files = store.checkout(ancestor.id, include=[FILES_KEY]).get(FILES_KEY, {})
        except ComponentsUnavailable:
            files = {}
        with _building(path) as tmp:
            store.export(ancestor.id, tmp, component="model")
            _write_files(tmp, files)
    except CkptStoreError as exc:  # e.g. GC dropped its model
        log.warning("cannot write the best checkpoint (step %d) from %s: %s", best_step, ancestor.short_id, exc)
        return None, False
    return path, True


class _building:
    """A temporary folder beside ``path`` that replaces ``path`` when the block succeeds."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")

    def __enter__(self) -> str:
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if os.path.isdir(self.path):
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)


def _write_files(directory: str, files: Mapping[str, Any]) -> None:
    for name, data in files.items():
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise CkptStoreError(f"refusing to write file {name!r} outside {directory}")
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data.numpy().tobytes() if isinstance(data, torch.Tensor) else bytes(data))

