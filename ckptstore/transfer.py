"""Commits in from checkpoints on disk, and out as files: a checkpoint or a Trainer run
imported (read whole and checked by :mod:`ckptstore.formats`, then committed), and a commit
exported as a Hugging Face style directory, one safetensors file or one ``torch.save`` file.

Between the store's parts (manifests, the pipeline, refs) and its facade:
:meth:`Store.import_checkpoint <ckptstore.store.Store.import_checkpoint>`,
:meth:`~ckptstore.store.Store.import_run` and :meth:`~ckptstore.store.Store.export` are
these functions, and their docstrings give the whole contract. What they need of a store is
:class:`Repository`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .backends import ObjectStore
from .codec import torch_dtypes
from .commit import Commit
from .dcp_layout import DcpSave
from .errors import (
    CheckpointNotFound,
    ComponentsUnavailable,
    InvalidCheckpoint,
    InvalidOption,
    RefExists,
    UnsupportedValue,
    option,
)
from .formats.directory import write_directory
from .formats.files import FILES_KEY, check_export_target
from .formats.hf import (
    TRAINER_ONLY_FILES,
    TRAINER_STATE_KEY,
    read_checkpoint,
    run_checkpoints,
    trainer_best_metric,
    trainer_best_step,
    trainer_step_metrics,
)
from .formats.pt import write_torch_file
from .formats.safetensors import (
    DEFAULT_MAX_SHARD_SIZE_BYTES,
    ExportedTensor,
    check_exportable,
    plan_shards,
    write_file,
)
from .layout import manifest_key
from .manifest import (
    Manifest,
    TensorEntry,
    TensorKind,
    build_tensor,
)
from .pipeline import Pipeline, Progress
from .records import dropped_components
from .refs import RefKind, RefStore, check_ref_name
from .tree import KeySelection, dotted_name, path_under

if TYPE_CHECKING:  # imported where tensors are handled
    import torch

log = logging.getLogger("ckptstore")

#: What an export writes: a Hugging Face style directory, one safetensors file, one ``torch.save`` file.
EXPORT_FORMATS = ("hf", "safetensors", "pt")


class Repository(Protocol):
    """What import and export need of a store (a :class:`~ckptstore.store.Store`)."""

    objects: ObjectStore
    refs: RefStore
    pipeline: Pipeline
    config: Any  # StoreConfig: default_branch

    @property
    def commit(self) -> Callable[..., Any]: ...  # Store.commit: a Commit (a CommitFuture given blocking=False)

    def checkout(self, rev: str = ..., *, include: str | Sequence[str] | None = ..., exclude: str | Sequence[str] | None = ...) -> Any: ...

    def commit_of(self, rev: str) -> Commit: ...

    def manifest_of(self, commit: Commit) -> Manifest: ...

    def move_best(self, commit: Commit) -> None: ...


# -- import ----------------------------------------------------------------------------------


def import_checkpoint(repo: Repository, path: str, *, message: str | None = None, **commit_options: Any) -> Commit:
    """Commit the checkpoint at ``path`` (see :meth:`~ckptstore.store.Store.import_checkpoint`):
    read whole and checked before anything is stored."""
    state, found = read_checkpoint(path)
    metadata = {**found, **dict(commit_options.pop("metadata", None) or {})}
    metrics = {**_logged_metrics(state, found.get("step")), **dict(commit_options.pop("metrics", None) or {})}
    commit: Commit = repo.commit(
        state,
        message=message if message is not None else f"import {os.path.basename(os.path.normpath(path))}",
        metadata=metadata,
        metrics=metrics,
        **commit_options,
    )
    return commit


def import_run(
    repo: Repository, output_dir: str, *, branch: str | None = None, message: str | None = None, append: bool = False, **commit_options: Any
) -> list[Commit]:
    """Commit every ``checkpoint-N`` folder of the Trainer ``output_dir`` in step order (see
    :meth:`~ckptstore.store.Store.import_run`): every folder read and checked before the first
    commit."""
    checkpoints = run_checkpoints(output_dir)
    if not checkpoints:
        raise CheckpointNotFound(f"no checkpoint-N folder in {output_dir}", path=output_dir)
    if not commit_options.pop("blocking", True):
        raise InvalidOption("blocking", "import_run commits blocking (each checkpoint's files stay mapped until committed)")
    branch = check_ref_name(branch or repo.config.default_branch, kind=RefKind.BRANCH)
    head = repo.refs.get(RefKind.BRANCH, branch)
    if head is not None and not append:
        raise RefExists.saying(
            f"branch {branch!r} already has commits (head {head[:12]}); import the run onto a new branch, or pass ",
            option("append"),
            " to commit it on top",
        )
    read = _read_run(checkpoints)
    newest: dict[str, Any] = next((state[TRAINER_STATE_KEY] for *_, state, _ in reversed(read) if isinstance(state.get(TRAINER_STATE_KEY), dict)), {})
    steps = [step for step, *_ in read]
    chosen = None if commit_options.get("best_metric") else trainer_best_metric(newest, steps, greater_is_better=commit_options.get("greater_is_better"))
    if chosen is not None:
        commit_options["best_metric"], commit_options["greater_is_better"] = chosen
    metadata, metrics = dict(commit_options.pop("metadata", None) or {}), dict(commit_options.pop("metrics", None) or {})
    tags, progress = commit_options.pop("tags", ()), commit_options.pop("progress", None)
    commits: list[Commit] = []
    for i, (step, path, state, found) in enumerate(read):
        name = os.path.basename(path)
        read[i] = (step, path, None, found)  # its memory maps go with the commit
        commits.append(repo.commit(
            state, branch=branch, message=f"{message} ({name})" if message else name, metadata={**found, **metadata},
            metrics={**_logged_metrics(state, step), **trainer_step_metrics(newest.get("log_history"), step), **metrics},
            tags=tags if i == len(read) - 1 else (),
            progress=(lambda phase, done, total, name=name: progress(f"{name} {phase}", done, total)) if progress else None,
            **commit_options,
        ))  # fmt: skip
        del state
    best_step = trainer_best_step(newest)
    if best_step in steps and commit_options.get("best_metric") is None:
        repo.move_best(commits[steps.index(best_step)])
    return commits


def _read_run(checkpoints: list[tuple[int, str]]) -> list[tuple[int, str, Any, dict[str, Any]]]:
    """``(step, path, state, metadata)`` of each ``checkpoint-N`` folder, read and checked: a
    folder whose ``global_step`` is not its ``N`` is :class:`InvalidCheckpoint`."""
    read = []
    for step, path in checkpoints:
        state, found = read_checkpoint(path)
        if found.get("step", step) != step:
            raise InvalidCheckpoint(os.path.join(path, "trainer_state.json"), f"has global_step {found['step']}, but its folder is checkpoint-{step}")
        read.append((step, path, state, {"step": step, **found}))
    return read


def _logged_metrics(state: Mapping[str, Any], step: int | None) -> dict[str, float]:
    """What a Trainer checkpoint's own ``trainer_state.json`` logged at its ``step``."""
    trainer_state = state.get(TRAINER_STATE_KEY)
    return trainer_step_metrics(trainer_state.get("log_history"), step) if step is not None and isinstance(trainer_state, dict) else {}


# -- export ----------------------------------------------------------------------------------


def export(
    repo: Repository,
    rev: str,
    path: str,
    *,
    component: str | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE_BYTES,
    format: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> list[str]:
    """Write ``rev`` at ``path`` as :meth:`~ckptstore.store.Store.export` says: whole or not
    at all, nothing replaced unless ``force``; returns the files written."""
    whole_state = format == "pt"  # asked for by name: the whole state, not the model's
    if format is None:
        format = "safetensors" if path.endswith(".safetensors") else "pt" if path.endswith(".pt") else "hf"
    elif format not in EXPORT_FORMATS:
        raise InvalidOption("format", f"is {format!r}; it is one of {', '.join(EXPORT_FORMATS)}")
    commit = repo.commit_of(rev)
    check_export_target(path, directory=format == "hf", force=force)  # before any tensor is read
    manifest = repo.manifest_of(commit)
    key = manifest_key(commit.manifest)
    dcp_save = DcpSave.of(manifest, key=key)
    selection = KeySelection.of(include, exclude)
    if dcp_save is not None:  # saved through torch.distributed.checkpoint: each tensor whole, from every rank's chunks
        tensors, read_whole = dcp_save.exported(
            commit.id, component=component, selection=selection, dropped=dropped_components(repo.objects, commit.id),
            read_blobs=lambda blobs: repo.pipeline.read_blobs(manifest, blobs, manifest_key=key),
        )  # fmt: skip
        check_exportable(tensors)
        if format == "pt":
            return write_torch_file(path, lambda: read_whole(tensors), force=force)
        return _write_export(
            repo,
            path,
            commit,
            tensors,
            read_whole,
            format=format,
            with_files=False,
            max_shard_size_bytes=max_shard_size_bytes,
            force=force,
            progress=progress,
        )
    tops = sorted({p.split("/", 1)[0] for paths in manifest.key_paths for p in paths})
    if component is None and "model" in tops and not whole_state:
        component = "model"
    if format == "pt":
        return write_torch_file(path, lambda: _selected_state(repo, commit, component=component, include=include, exclude=exclude), force=force)
    entries = _exported_entries(repo, commit, manifest, component=component, selection=selection, include=include, tops=tops)
    tensors = [ExportedTensor(dotted_name(path_[len(_prefix(component)) :]), torch_dtypes()[e.dtype], e.shape, e.nbytes, path_) for path_, e in entries.items()]
    check_exportable(tensors)

    def read_shard(shard: list[ExportedTensor]) -> dict[str, torch.Tensor]:
        wanted = [entries[t.key_path] for t in shard]
        buffers = repo.pipeline.read_blobs(manifest, sorted({e.blob for e in wanted}), manifest_key=key)
        return {t.name: build_tensor(e, buffers[e.blob]) for t, e in zip(shard, wanted)}

    return _write_export(
        repo,
        path,
        commit,
        tensors,
        read_shard,
        format=format,
        with_files=component == "model",
        max_shard_size_bytes=max_shard_size_bytes,
        force=force,
        progress=progress,
    )


def _prefix(component: str | None) -> str:
    return "" if component is None else component.strip("/") + "/"


def _selected_state(
    repo: Repository, commit: Commit, *, component: str | None, include: str | Sequence[str] | None, exclude: str | Sequence[str] | None
) -> Any:
    """The state of ``commit`` (or its ``component``) as a ``.pt`` export writes it: what
    :meth:`~ckptstore.store.Store.checkout` returns, ``include``/``exclude`` applied."""
    state = repo.checkout(commit.id, include=include if include is not None or component is None else [component], exclude=exclude)
    if component is not None:
        if not isinstance(state, dict) or component not in state:
            raise ComponentsUnavailable(commit.id, missing=[component], available=sorted(map(str, state)) if isinstance(state, dict) else [])
        state = state[component]
    return state


def _exported_entries(
    repo: Repository,
    commit: Commit,
    manifest: Manifest,
    *,
    component: str | None,
    selection: KeySelection,
    include: str | Sequence[str] | None,
    tops: list[str],
) -> dict[str, TensorEntry]:
    """Key path → entry of every tensor a safetensors export of ``commit`` writes: those under
    ``component`` that the selection keeps (every path a tensor is held at; NumPy arrays left
    out). None, or one that GC dropped, is :class:`ComponentsUnavailable`."""
    prefix = _prefix(component)
    entries = {}
    for entry, paths in zip(manifest.tensors, manifest.key_paths):
        for path_ in paths:
            if path_.startswith(prefix) and selection.selected(path_) and entry.kind is not TensorKind.NDARRAY:
                entries[path_] = entry
    dropped = dropped_components(repo.objects, commit.id)
    lost = sorted({p for p in dropped for path_ in entries if path_under(path_, p)})
    if lost:
        raise ComponentsUnavailable(commit.id, dropped=lost)
    if not entries:
        raise ComponentsUnavailable(
            commit.id, missing=[component or "(selected tensors)"] if component else list(include or ["(selected tensors)"]), available=tops
        )
    return entries


def _write_export(
    repo: Repository,
    path: str,
    commit: Commit,
    tensors: list[ExportedTensor],
    read_shard: Callable[[list[ExportedTensor]], Mapping[str, torch.Tensor]],
    *,
    format: str,
    with_files: bool,
    max_shard_size_bytes: int,
    force: bool,
    progress: Progress | None,
) -> list[str]:
    """Write ``tensors`` as :func:`export` does in ``format`` ``safetensors`` or ``hf`` (a
    directory ``with_files`` gets the commit's model files too)."""
    if format == "safetensors":  # one file, whatever its size
        return write_file(path, tensors, read_shard, metadata={"ckptstore_commit": commit.id}, progress=progress, force=force)
    shards = plan_shards(tensors, max_shard_size_bytes=max_shard_size_bytes)
    files = model_files(repo, commit) if with_files else {}
    return write_directory(path, shards, read_shard, files=files, metadata={"ckptstore_commit": commit.id}, progress=progress, force=force)


def model_files(repo: Repository, commit: Commit) -> Mapping[Any, Any]:
    """The ``files`` of ``commit`` that belong in a model directory (all but
    :data:`~ckptstore.formats.hf.TRAINER_ONLY_FILES`); none if it has none, or GC dropped them
    (a warning)."""
    try:
        state = repo.checkout(commit.id, include=[FILES_KEY])
    except ComponentsUnavailable as exc:
        if exc.dropped:
            log.warning("exporting %s without its files: %s", commit.short_id, exc)
        return {}
    files = state.get(FILES_KEY) if isinstance(state, dict) else None
    if files is None:
        return {}
    if not isinstance(files, Mapping):
        raise UnsupportedValue(FILES_KEY, f"is a {type(files).__name__}, not a mapping of file names to bytes")
    return {name: data for name, data in files.items() if name not in TRAINER_ONLY_FILES}
