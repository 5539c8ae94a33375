"""Commit objects: a manifest id, parents, message, metadata, metrics and write statistics.

A commit object is a msgpack map; its id is the xxh3-128 of those bytes. It is immutable:
moving a branch or tag never rewrites a commit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import msgpack

from .errors import CkptStoreError, IntegrityError, UnsupportedFormat, UnsupportedValue
from .ids import content_id, is_full_id
from .tree import pack_value, unpack_value

COMMIT_FORMAT_VERSION = 1
#: The largest commit object, written or read: one limit for both, so a commit that is
#: published can always be read back.
MAX_COMMIT_BYTES = 8 << 20


@dataclass(frozen=True)
class CommitStats:
    """What writing a commit cost.

    ``logical_bytes``: bytes of the checkpoint (tensor data, each shared storage once, plus
    the encoded tree). ``new_bytes``: bytes this commit added to the store (new chunks as
    stored, compressed or not, plus a new manifest), of which ``new_metadata_bytes`` are not
    tensor data: the chunks' frames and the manifest but for the inline tensors it carries
    (``None`` in commits written before it was recorded); ``new_data_bytes`` is the rest,
    never more than the tensor data it stores. ``reused_bytes``: raw bytes of chunks that
    were already stored. ``delta_chunks``: new chunks stored as deltas against the parent's.
    """

    logical_bytes: int = 0
    new_bytes: int = 0
    new_chunks: int = 0
    reused_chunks: int = 0
    reused_bytes: int = 0
    delta_chunks: int = 0
    new_metadata_bytes: int | None = None

    @property
    def new_data_bytes(self) -> int | None:
        """Tensor bytes this commit added to the store, as stored (``None`` where the commit
        predates the split)."""
        return None if self.new_metadata_bytes is None else self.new_bytes - self.new_metadata_bytes

    @property
    def dedup_ratio(self) -> float:
        """Logical bytes over the logical bytes that were not already stored (1.0: nothing
        deduplicated; ``inf``: everything was)."""
        fresh = self.logical_bytes - self.reused_bytes
        return math.inf if fresh <= 0 else self.logical_bytes / fresh

    def to_list(self) -> list[int]:
        fields = [self.logical_bytes, self.new_bytes, self.new_chunks, self.reused_chunks, self.reused_bytes]
        return fields + [self.delta_chunks] if self.delta_chunks else fields  # as before deltas, where none


@dataclass(frozen=True)
class Commit:
    """A commit: ``id``, ``parents`` (newest history first), ``message``, ``metadata``,
    ``metrics``, ``created_at`` (UTC), the ``branch`` it was made on, the ``manifest`` id of
    its checkpoint and its write ``stats``. ``manifest_size_bytes``: the manifest's raw size,
    so that reading it can refuse a forged object declaring another size before inflating
    it (``None`` in commits written before it was recorded)."""

    id: str
    manifest: str
    parents: tuple[str, ...]
    message: str
    created_at: datetime
    branch: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    stats: CommitStats = field(default_factory=CommitStats)
    manifest_size_bytes: int | None = None

    @property
    def short_id(self) -> str:
        return self.id[:12]


def check_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """Metrics as ``{str: float}``; numbers of any kind (0-d tensors, numpy scalars) accepted."""
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if not isinstance(name, str):
            raise UnsupportedValue("metrics", f"metric names must be str, not {type(name).__name__}")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise UnsupportedValue("metrics", f"metric name {name!r} is not valid UTF-8 (lone surrogates)") from None
        try:
            if isinstance(value, bool):
                raise TypeError
            out[name] = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError):
            raise UnsupportedValue(f"metrics/{name}", f"metric value {value!r} is not a number") from None
    return out


def encode_commit(
    *, manifest: str, manifest_size_bytes: int, parents: tuple[str, ...], message: str, created_at: datetime,
    branch: str | None, metadata: dict[str, Any], metrics: dict[str, float], stats: CommitStats,
) -> tuple[str, bytes]:  # fmt: skip
    """Encode a commit object; returns ``(id, bytes)``."""
    if not isinstance(message, str):
        raise UnsupportedValue("message", "commit message must be a str")
    if not isinstance(metadata, dict):
        raise UnsupportedValue("metadata", "commit metadata must be a dict")
    doc = {
        "format": COMMIT_FORMAT_VERSION,
        "manifest": manifest,
        "parents": list(parents),
        "message": message,
        "created_at": created_at.timestamp(),
        "branch": branch,
        "metadata": pack_value(metadata, path="metadata"),
        "metrics": metrics,
        "stats": stats.to_list(),
        "manifest_size": manifest_size_bytes,  # a field older readers ignore
    }
    if stats.new_metadata_bytes is not None:
        doc["new_metadata_bytes"] = stats.new_metadata_bytes  # as is this one
    data = msgpack.packb(doc, use_bin_type=True)
    if len(data) > MAX_COMMIT_BYTES:
        raise UnsupportedValue("metadata", commit_too_large(len(data)))
    return content_id(data), data


def commit_too_large(size_bytes: int) -> str:
    return (
        f"the commit's message, metadata and metrics take {size_bytes:,} bytes; a commit holds at most "
        f"{MAX_COMMIT_BYTES:,} (store large values in the state, not the metadata)"
    )


def decode_commit(commit_id: str, data: bytes | memoryview, *, key: str) -> Commit:
    """Decode and validate a commit object (its id is checked by the caller's frame read)."""
    try:
        doc = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise IntegrityError(f"malformed commit: {exc}", key=key) from exc
    if not isinstance(doc, dict):
        raise IntegrityError("malformed commit: not a map", key=key)
    if type(doc.get("format")) is not int or doc.get("format") != COMMIT_FORMAT_VERSION:
        raise UnsupportedFormat(f"commit {key} has format version {doc.get('format')!r}; this version of ckptstore reads version {COMMIT_FORMAT_VERSION}")
    try:
        parents = tuple(doc["parents"])
        stats = doc["stats"]
        metrics = doc["metrics"]
        manifest_size = doc.get("manifest_size")
        new_metadata_bytes = doc.get("new_metadata_bytes")
        ok = (
            is_full_id(doc["manifest"])
            and all(isinstance(p, str) and is_full_id(p) for p in parents)
            and isinstance(doc["message"], str)
            and isinstance(doc["created_at"], float)
            and (doc["branch"] is None or isinstance(doc["branch"], str))
            and isinstance(doc["metadata"], bytes)
            and isinstance(metrics, dict)
            and all(isinstance(k, str) and isinstance(v, float) for k, v in metrics.items())
            and isinstance(stats, list) and len(stats) in (5, 6) and all(type(s) is int for s in stats)
            and (manifest_size is None or (type(manifest_size) is int and 0 < manifest_size < 2**62))
            and (new_metadata_bytes is None or (type(new_metadata_bytes) is int and 0 <= new_metadata_bytes <= stats[1]))
        )  # fmt: skip
        if not ok:
            raise ValueError("a field has the wrong type")
        metadata = unpack_value(doc["metadata"], key=key)
        return Commit(
            id=commit_id,
            manifest=doc["manifest"],
            parents=parents,
            message=doc["message"],
            created_at=datetime.fromtimestamp(doc["created_at"], tz=timezone.utc),
            branch=doc["branch"],
            metadata=metadata,
            metrics=metrics,
            stats=replace(CommitStats(*stats), new_metadata_bytes=new_metadata_bytes),
            manifest_size_bytes=manifest_size,
        )
    except CkptStoreError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError, OSError) as exc:
        raise IntegrityError(f"malformed commit: {exc}", key=key) from exc
