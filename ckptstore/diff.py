"""Diffs between two commits: tensors added, removed and changed by key path, compared by
the hashes of their bytes (tensor data is read only where a layout differs, or for the
size of each change), and whether the non-tensor values differ. Reads only; writes nothing.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from .commit import Commit
from .layout import manifest_key
from .manifest import Manifest, TensorEntry, build_tensor
from .pipeline import Pipeline
from .tree import unpack_value


@dataclass(frozen=True)
class TensorChange:
    """One tensor in a :class:`Diff`: its key path, and dtype/shape/bytes on each side
    (``None`` where absent)."""

    path: str
    dtype: tuple[str | None, str | None]
    shape: tuple[tuple[int, ...] | None, tuple[int, ...] | None]
    nbytes: tuple[int, int]
    #: With ``diff(..., values=True)``, for a changed tensor of unchanged dtype and shape: the
    #: largest absolute change, and the norm of the change over the norm of the old tensor.
    max_abs_change: float | None = None
    relative_change: float | None = None


@dataclass(frozen=True)
class Diff:
    """Tensors added, removed and changed from ``a`` to ``b`` (commit ids), and whether the
    non-tensor values differ."""

    a: str
    b: str
    added: list[TensorChange] = field(default_factory=list)
    removed: list[TensorChange] = field(default_factory=list)
    changed: list[TensorChange] = field(default_factory=list)
    unchanged: int = 0
    values_changed: bool = False

    @property
    def added_bytes(self) -> int:
        return sum(c.nbytes[1] for c in self.added)

    @property
    def removed_bytes(self) -> int:
        return sum(c.nbytes[0] for c in self.removed)

    @property
    def changed_bytes(self) -> int:
        return sum(c.nbytes[1] for c in self.changed)


def diff_commits(ca: Commit, ma: Manifest, cb: Commit, mb: Manifest, *, pipeline: Pipeline, values: bool = False) -> Diff:
    """The :class:`Diff` from commit ``ca`` (manifest ``ma``) to ``cb`` (``mb``), as
    :meth:`ckptstore.Store.diff` describes it; tensors are read through ``pipeline``."""
    ta, tb = _fingerprints(ma), _fingerprints(mb)
    result = Diff(ca.id, cb.id)
    for path, (entry, fp) in tb.items():
        if path not in ta:
            result.added.append(_change(path, None, entry))
        elif ta[path][1] != fp and not _same_values(pipeline, ma, ta[path][0], ca.manifest, mb, entry, cb.manifest):
            result.changed.append(_change(path, ta[path][0], entry))
        else:
            object.__setattr__(result, "unchanged", result.unchanged + 1)
    for path, (entry, _) in ta.items():
        if path not in tb:
            result.removed.append(_change(path, entry, None))
    values_a = unpack_value(ma.tree, key=manifest_key(ca.manifest), tensors=[_TENSOR] * len(ma.tensors))
    values_b = unpack_value(mb.tree, key=manifest_key(cb.manifest), tensors=[_TENSOR] * len(mb.tensors))
    object.__setattr__(result, "values_changed", _values_differ(values_a, values_b))
    if values:
        for i, change in enumerate(result.changed):
            if change.dtype[0] == change.dtype[1] and change.shape[0] == change.shape[1]:
                old = _read_tensor(pipeline, ma, ta[change.path][0], ca.manifest)
                new = _read_tensor(pipeline, mb, tb[change.path][0], cb.manifest)
                result.changed[i] = _with_change_stats(change, old, new)
    return result


def _same_values(pipeline: Pipeline, ma: Manifest, ea: TensorEntry, ida: str, mb: Manifest, eb: TensorEntry, idb: str) -> bool:
    """Whether two tensors of different fingerprints hold the same bytes: read only where
    a fingerprint may differ for another reason than the values (a layout that differs, or
    a view of a storage that may have changed elsewhere)."""
    import numpy as np
    import torch

    if (ea.dtype, ea.shape, ea.kind) != (eb.dtype, eb.shape, eb.kind):
        return False

    def whole(e: TensorEntry, m: Manifest) -> bool:
        return e.stride is None and e.offset == 0 and m.blobs[e.blob].size == e.nbytes

    if whole(ea, ma) and whole(eb, mb):
        return False  # each is its blob's only bytes: a different fingerprint is a change
    old, new = _read_tensor(pipeline, ma, ea, ida), _read_tensor(pipeline, mb, eb, idb)

    def as_bytes(t: Any) -> Any:  # an ndarray or a tensor, as its bytes
        return t.reshape(-1).view(np.uint8) if isinstance(t, np.ndarray) else t.detach().contiguous().reshape(-1).view(torch.uint8)

    return bool((as_bytes(old) == as_bytes(new)).all()) if isinstance(old, np.ndarray) else torch.equal(as_bytes(old), as_bytes(new))


def _read_tensor(pipeline: Pipeline, manifest: Manifest, entry: TensorEntry, manifest_id: str) -> Any:
    buffers = pipeline.read_blobs(manifest, [entry.blob], manifest_key=manifest_key(manifest_id))
    return build_tensor(entry, buffers[entry.blob])


def _fingerprints(manifest: Manifest) -> dict[str, tuple[TensorEntry, str]]:
    """Key path (every path a tensor is held at) → (entry, a hash of its dtype, geometry
    and the bytes of its blob)."""
    blob_ids = []
    for blob in manifest.blobs:
        h = hashlib.blake2b(digest_size=16)
        h.update(blob.inline if blob.inline is not None else b"".join(c.id.encode() for c in blob.chunks))
        blob_ids.append(h.hexdigest())
    return {
        path: (e, f"{e.dtype}|{e.shape}|{e.stride}|{e.offset}|{blob_ids[e.blob]}") for e, paths in zip(manifest.tensors, manifest.key_paths) for path in paths
    }


def _with_change_stats(change: TensorChange, old: Any, new: Any) -> TensorChange:
    import torch

    if not isinstance(old, torch.Tensor):
        old, new = torch.from_numpy(old), torch.from_numpy(new)
    if old.is_complex() or old.dtype == torch.bool or not old.numel():
        return change
    delta = new.double() - old.double()
    norm = float(torch.linalg.vector_norm(old.double()))
    change_norm = float(torch.linalg.vector_norm(delta))
    return TensorChange(
        change.path, change.dtype, change.shape, change.nbytes,
        max_abs_change=float(delta.abs().max()),
        relative_change=change_norm / norm if norm else (0.0 if change_norm == 0 else math.inf),
    )  # fmt: skip


def _change(path: str, a: TensorEntry | None, b: TensorEntry | None) -> TensorChange:
    return TensorChange(
        path=path,
        dtype=(a.dtype if a else None, b.dtype if b else None),
        shape=(a.shape if a else None, b.shape if b else None),
        nbytes=(a.nbytes if a else 0, b.nbytes if b else 0),
    )


_TENSOR = object()  # stands for a tensor in trees compared by _values_differ


def _values_differ(a: Any, b: Any) -> bool:
    """Whether the non-tensor values of two decoded trees differ (tensors, compared
    separately, are ``_TENSOR`` and ignored; dict order is not a difference). NaN-aware."""
    if isinstance(a, dict) and isinstance(b, dict):
        a = {k: v for k, v in a.items() if v is not _TENSOR}
        b = {k: v for k, v in b.items() if v is not _TENSOR}
    if type(a) is not type(b):
        return True
    if isinstance(a, dict):
        return a.keys() != b.keys() or any(_values_differ(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) != len(b) or any(_values_differ(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a and b != b:
        return False
    try:
        return bool(a != b)
    except (TypeError, ValueError):
        return repr(a) != repr(b)
