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
``training_args.bin`` is kept as bytes and never unpickled. ``store.export(commit, dir)``
writes the model with its ``files`` (``training_args.bin`` left out), a directory that
``AutoModel.from_pretrained(dir)`` loads.

Not handled: DeepSpeed, FSDP and per-rank optimizer shards (``rank*-of-N-optimizer.pt``);
sub-folders of a checkpoint (multi-adapter PEFT) are kept as files, not as tensors. In a multi-process run only the
world's process zero commits; it reads the ``rng_state_<rank>.pth`` files present when
its own save returns.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from functools import partial
from typing import Any, cast

import torch
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from ..commit import Commit
from ..errors import CheckpointNotFound, CkptStoreError, UnknownRef
from ..formats.directory import replace_directory
from ..formats.files import FILES_KEY, write_atomically, write_files
from ..formats.hf import (
    RANK_RNG_FILE,
    TRAINER_FILES,
    TRAINER_ONLY_FILES,
    TRAINER_STATE_KEY,
    TRAINER_STATE_NAME,
    read_checkpoint,
    trainer_best_step,
    trainer_step_metrics,
)
from ..store import Store
from .training import BRANCH_ENV, resume_ref

log = logging.getLogger("ckptstore.huggingface")

PREFIX_CHECKPOINT_DIR = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def checkpoint_folder(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def read_trainer_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, metadata)`` of a Trainer ``checkpoint-N`` folder, as
    :func:`ckptstore.formats.hf.read_checkpoint` reads it: ``model``, ``optimizer``,
    ``scheduler``, ``scaler``, ``rng_state``, each ``rng_state_<rank>.pth`` as
    ``rng_state_<rank>``, ``trainer_state``, and every other plain file, not a symlink
    (``config.json``, ``generation_config.json``, tokenizer files, ``training_args.bin``)
    under ``files`` as its bytes (a uint8 tensor, so an unchanged file is stored once across
    commits; the same routine as :meth:`Store.import_checkpoint`)."""
    return read_checkpoint(path)


def step_metrics(state: TrainerState, step: int | None = None) -> dict[str, float]:
    """Every number the Trainer logged at ``step`` (default: the current step), by name:
    ``loss``, ``learning_rate``, ``grad_norm``, ``eval_loss``, ``eval_*``. Values logged at
    other steps are left out, so ``best`` only ever points at a commit that was evaluated
    (:func:`ckptstore.formats.hf.trainer_step_metrics`, which imports use too)."""
    return trainer_step_metrics(state.log_history, state.global_step if step is None else step)


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
    commits go; ``ref`` (default ``$CKPTSTORE_REF``, else that branch's head, never
    ``latest``: see :func:`ckptstore.integrations.training.resume_ref`) is what :meth:`materialize`
    resumes from. With ``keep_checkpoint_dirs=False``
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
        self.ref = resume_ref(store, ref=ref, branch=self.branch)
        self.keep_checkpoint_dirs = keep_checkpoint_dirs
        self.metadata = dict(metadata or {})
        self.commits: list[Commit] = []
        self._committed_dirs: list[str] = []

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        path = os.path.join(cast(str, args.output_dir), checkpoint_folder(state.global_step))  # TrainingArguments fills in a default
        if not os.path.isdir(path):
            raise CheckpointNotFound(f"CkptStoreCallback: the Trainer saved, but there is no {path} to commit", path=path)
        checkpoint, _ = read_trainer_checkpoint(path)
        metadata = {**self.metadata, "step": state.global_step}
        if state.epoch is not None:
            metadata["epoch"] = float(state.epoch)
        commit = cast(Commit, self.store.commit(  # blocking (the default): the Commit itself
            checkpoint, branch=self.branch, message=checkpoint_folder(state.global_step), metadata=metadata,
            metrics=step_metrics(state), **best_metric_options(args),
        ))  # fmt: skip
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
    """Write commit ``ref`` (default ``$CKPTSTORE_REF``, else the head of
    ``$CKPTSTORE_BRANCH``, else of the store's default branch: the branch a
    :class:`CkptStoreCallback` commits to, see :func:`ckptstore.integrations.training.resume_ref`) as the Trainer
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
    ref = resume_ref(store, ref=ref)
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
    best_step = trainer_best_step(trainer_state)
    if best_step == step:
        trainer_state = {**trainer_state, "best_model_checkpoint": path}
    elif best and best_step is not None:
        best_path, wrote = _materialize_best(store, commit, best_step, directory)
        if best_path is not None:
            trainer_state = {**trainer_state, "best_model_checkpoint": best_path}
            if wrote:
                written.append(best_path)
    with _building(path) as tmp:
        store.export(commit.id, tmp, component="model")  # the weights and the model directory's files
        write_files(tmp, {name: data for name, data in (state.get(FILES_KEY) or {}).items() if name in TRAINER_ONLY_FILES})
        for file, component in TRAINER_FILES.items():
            if component in state:
                write_atomically(os.path.join(tmp, file), partial(torch.save, state[component]))
        for component, value in state.items():
            if RANK_RNG_FILE.fullmatch(f"{component}.pth"):
                write_atomically(os.path.join(tmp, f"{component}.pth"), partial(torch.save, value))
        if state.get(TRAINER_STATE_KEY) is not None:
            encoded = (json.dumps(trainer_state, indent=2, sort_keys=True) + "\n").encode()
            write_atomically(os.path.join(tmp, TRAINER_STATE_NAME), lambda f: f.write(encoded))
    log.info("materialized %s (%s) at %s", ref, commit.short_id, path)
    return written


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
        with _building(path) as tmp:
            store.export(ancestor.id, tmp, component="model")  # the weights and the model directory's files
    except CkptStoreError as exc:  # e.g. GC dropped its model
        log.warning("cannot write the best checkpoint (step %d) from %s: %s", best_step, ancestor.short_id, exc)
        return None, False
    return path, True


class _building:
    """A temporary folder beside ``path`` that replaces ``path`` when the block succeeds, in
    one durable rename (:func:`~ckptstore.formats.directory.replace_directory`)."""

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
        replace_directory(self.tmp, self.path)
