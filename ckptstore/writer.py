"""Writing commits: a checkpoint's chunks, then manifest → commit object → branch ref (the
commit point) → ``latest``, tags, ``best``, each step only once the one before is durable.

Every ref moves by compare-and-swap, retried: a branch another writer moved first gets the
commit re-parented onto its new head (the checkpoint is not written again), and a tag ends on
the right commit whatever the order of concurrent writers. Writing chunks is idempotent; a
crash before the branch moves leaves only unreferenced objects.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from .backends import ObjectStore
from .background import CommitFuture, CommitQueue
from .branching import check_namespace, check_tag_name
from .catalog import Catalog
from .codec import Kind, encode_object_bytes
from .commit import MAX_COMMIT_BYTES, Commit, CommitStats, check_metrics, commit_too_large, decode_commit, encode_commit
from .config import StoreConfig
from .errors import CkptStoreError, RefConflict, UnsupportedValue, WriterExpired
from .ids import content_id
from .layout import commit_key, manifest_key
from .lease import writing
from .manifest import BlobSource, ChunkRef, Manifest, encode_state
from .pipeline import CompressionMode, DeltaMode, Pipeline, Progress, WriteResult, check_compression_mode, check_delta_mode
from .records import dropped_components
from .refs import BEST, LATEST, RefKind, RefStore, check_ref_name, retry_cas
from .retention import greater_is_better_for
from .tree import pack_value, path_under, unpack_value

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ckptstore")

#: A commit object's bytes besides its message, metadata and metrics (ids, stats, field names).
COMMIT_OVERHEAD_BYTES = 4096
#: Times a commit writes its chunks again when its writer marker lapsed before it published.
WRITER_ATTEMPTS = 3


class Publish(Protocol):
    """What :meth:`CommitWriter.publisher` returns: it publishes a manifest whose chunks are
    stored. ``fence`` runs right before each ref update (a writer checks that its marker is
    still honoured)."""

    def __call__(self, manifest: Manifest, written: WriteResult, *, fence: Callable[[], None] | None = None) -> Commit: ...


class CommitWriter:
    """Writes the commits of one store (see :meth:`ckptstore.Store.commit`). ``get_commit``
    and ``manifest_of`` read what is already stored; ``index_commit`` adds a new commit to the
    catalog. ``max_ref_retries``: how many times a ref update is retried while other writers
    keep moving the ref first."""

    def __init__(
        self,
        objects: ObjectStore,
        *,
        refs: RefStore,
        catalog: Catalog,
        pipeline: Pipeline,
        config: StoreConfig,
        get_commit: Callable[[str], Commit],
        manifest_of: Callable[[Commit], Manifest],
        index_commit: Callable[[Commit, bytes], None],
        max_ref_retries: int,
    ) -> None:
        self.objects = objects
        self.refs = refs
        self.catalog = catalog
        self.pipeline = pipeline
        self.config = config
        self._get_commit = get_commit
        self._manifest_of = manifest_of
        self._index_commit = index_commit
        self.max_ref_retries = max_ref_retries
        self._commits = CommitQueue(objects.url)
        self._staging_spare: dict[int, list[torch.Tensor]] = {}  # buffers of the last async snapshot

    def flush(self) -> None:
        """Wait for the asynchronous commits made so far (see :meth:`ckptstore.Store.flush`)."""
        self._commits.flush()

    def close(self) -> None:
        """Wait for asynchronous commits to finish; raise the error of one that failed unseen."""
        try:
            self._commits.close()
            self._commits.flush()
        finally:
            self._staging_spare.clear()

    def commit(
        self,
        state: Mapping[str, Any],
        publish: Callable[..., Commit],
        *,
        branch: str | None,
        progress: Progress | None,
        blocking: bool,
        delta: DeltaMode | None,
        compression: CompressionMode | None,
    ) -> Commit | CommitFuture[Commit]:
        """Write the chunks of ``state`` under a writer marker and ``publish`` them (from
        :meth:`publisher`) on ``branch``; with ``blocking=False`` in the background, from a
        snapshot (see :meth:`ckptstore.Store.commit`). Commits land in call order."""

        def finish(manifest: Manifest, sources: dict[int, BlobSource]) -> Commit:
            for attempt in range(WRITER_ATTEMPTS):
                with writing(self.objects) as marker:  # a collector deletes nothing until the branch has moved
                    head = self.refs.get(RefKind.BRANCH, branch or self.config.default_branch)
                    written = self.write_chunks(manifest, sources, progress=progress, parent=head, delta=delta, compression=compression)
                    try:
                        return publish(manifest, written, fence=marker.check)
                    except WriterExpired as exc:  # a collector may have judged this writer dead
                        if attempt + 1 == WRITER_ATTEMPTS:
                            raise
                        log.warning("%s; writing the commit again", exc)
            raise AssertionError("unreachable")

        with self._commits.lock:  # commits land in call order: after the asynchronous ones before
            self._commits.wait()  # (and at most one snapshot is held in memory)
            manifest, sources = encode_state(state, inline_threshold_bytes=self.config.inline_threshold_bytes)
            if blocking:
                return finish(manifest, sources)
            spare, self._staging_spare = self._staging_spare, {}
            staged = {index: source.staged(spare) for index, source in sources.items()}
            copies = [staged[i].owner for i in staged if staged[i] is not sources[i]]

            def finish_and_recycle() -> Commit:
                try:
                    return finish(manifest, staged)
                finally:  # the next snapshot of the same shapes reuses these (already paged in)
                    for buffer in copies:
                        self._staging_spare.setdefault(buffer.numel(), []).append(buffer)

            return self._commits.submit(finish_and_recycle)

    def write_chunks(
        self,
        manifest: Manifest,
        sources: dict[int, BlobSource],
        *,
        progress: Progress | None = None,
        parent: str | None = None,
        delta: DeltaMode | None = None,
        parent_key_path: Callable[[str], str | None] | None = None,
        compression: CompressionMode | None = None,
    ) -> WriteResult:
        """Store the chunks of ``sources`` (see :meth:`ckptstore.Store.write_chunks`). Idempotent."""
        check_delta_mode(delta)
        check_compression_mode(compression)
        return self.pipeline.write_blobs(
            manifest,
            sources,
            chunk_size_bytes=self.config.chunk_size_bytes,
            compression_level=self.config.compression_level,
            parent_chunks=self._parent_chunks(manifest, parent, parent_key_path=parent_key_path) if parent else None,
            delta=delta or self.config.delta,  # type: ignore[arg-type]
            max_delta_chain=max(0, self.config.delta_keyframe_interval - 1),
            compression=compression or self.config.compression,  # type: ignore[arg-type]
            progress=progress,
        )

    def _parent_chunks(self, manifest: Manifest, parent: str, *, parent_key_path: Callable[[str], str | None] | None = None) -> dict[int, list[ChunkRef]]:
        """Blob index → the chunks of the same tensor (key path, dtype, shape, layout) in the
        commit ``parent``, for blobs whose parent holds all its components. ``parent``'s key
        paths are mapped by ``parent_key_path`` first (see :meth:`write_chunks`)."""
        try:
            commit = self._get_commit(parent)
            old = self._manifest_of(commit)
            dropped = dropped_components(self.objects, commit.id)
        except CkptStoreError as exc:  # no bases then: the commit itself must not fail
            log.warning("commit %s cannot serve as a delta base: %s", parent, exc)
            return {}
        kept = [e for e in old.tensors if not any(path_under(e.path, d) for d in dropped)]
        by_path = {path: e for e in kept if (path := e.path if parent_key_path is None else parent_key_path(e.path)) is not None}
        out: dict[int, list[ChunkRef]] = {}
        for entry in manifest.tensors:
            match = by_path.get(entry.path)
            if entry.blob in out or match is None or old.blobs[match.blob].inline is not None:
                continue
            same = (match.dtype, match.shape, match.stride, match.offset, match.kind) == (
                entry.dtype,
                entry.shape,
                entry.stride,
                entry.offset,
                entry.kind,
            )
            if same and old.blobs[match.blob].size == manifest.blobs[entry.blob].size:
                out[entry.blob] = old.blobs[match.blob].chunks
        return out

    def publisher(
        self,
        *,
        message: str = "",
        branch: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        best_metric: str | None = None,
        greater_is_better: bool | None = None,
    ) -> Publish:
        """Check the options of a commit now (nothing is written), and return the function
        that publishes a manifest whose chunks are stored (see :meth:`ckptstore.Store.publisher`)."""
        branch = check_ref_name(branch or self.config.default_branch, kind=RefKind.BRANCH)
        tags = [check_tag_name(t) for t in tags]
        check_namespace(self.refs, RefKind.BRANCH, [branch])
        check_namespace(self.refs, RefKind.TAG, tags)
        if not isinstance(message, str) or not _is_utf8(message):
            raise UnsupportedValue("message", "commit message must be a str of valid UTF-8 (no lone surrogates)")
        metrics_f = check_metrics(dict(metrics or {}))
        packed = pack_value(dict(metadata or {}), path="metadata")  # refuse bad metadata before anything is written
        metadata_copy: dict[str, Any] = unpack_value(packed, key="metadata")  # a deep copy: later changes by the caller do not count
        size = len(packed) + len(message.encode("utf-8", "surrogatepass")) + len(msgpack.packb(metrics_f)) + COMMIT_OVERHEAD_BYTES
        if size > MAX_COMMIT_BYTES:
            raise UnsupportedValue("metadata", commit_too_large(size))

        def publish(manifest: Manifest, written: WriteResult, *, fence: Callable[[], None] | None = None) -> Commit:
            commit = self._write_commit(manifest, written, branch=branch, message=message, metadata=metadata_copy, metrics=metrics_f, fence=fence)
            # The commit has landed: a tag that cannot be moved now is a warning, not an error
            # (a caller told it failed would commit again).
            moves: list[tuple[str, Callable[[], None]]] = [(tag, partial(self.advance_tag, tag, commit, newer=_never_newer)) for tag in [LATEST, *tags]]
            moves.append((BEST, partial(self._maybe_move_best, commit, best_metric, greater_is_better)))
            for name, move in moves:
                try:
                    move()
                except CkptStoreError as exc:
                    log.warning("commit %s landed on branch %s, but tag %s could not be moved: %s", commit.short_id, branch, name, exc)
            return commit

        return publish

    def _write_commit(
        self,
        manifest: Manifest,
        written: WriteResult,
        *,
        branch: str,
        message: str,
        metadata: dict[str, Any],
        metrics: dict[str, float],
        fence: Callable[[], None] | None = None,
    ) -> Commit:
        """Manifest → commit object → branch ref, for chunks already stored."""
        manifest_raw = manifest.to_bytes()
        manifest_id = content_id(manifest_raw)
        manifest_is_new = self._put_object(Kind.MANIFEST, manifest_key(manifest_id), manifest_raw)
        # A manifest already stored also carries the inline tensors and the tree already.
        in_manifest = manifest.logical_bytes - sum(b.size for b in manifest.blobs if b.inline is None)
        manifest_stored = self.objects.size(manifest_key(manifest_id)) if manifest_is_new else 0
        # A new manifest's inline tensors are tensor data (at most what it takes stored); the rest of it is metadata.
        inline_stored = min(sum(b.size for b in manifest.blobs if b.inline is not None), manifest_stored)
        stats = CommitStats(
            logical_bytes=manifest.logical_bytes,
            new_bytes=written.new_bytes + manifest_stored,
            new_chunks=written.new_chunks,
            reused_chunks=written.reused_chunks,
            reused_bytes=written.reused_bytes + (0 if manifest_is_new else in_manifest),
            delta_chunks=written.delta_chunks,
            new_metadata_bytes=written.new_frame_bytes + manifest_stored - inline_stored,
        )
        return self._commit_onto_branch(branch, manifest_id, len(manifest_raw), message, metadata, metrics, stats, fence=fence)

    def _commit_onto_branch(
        self,
        branch: str,
        manifest_id: str,
        manifest_size_bytes: int,
        message: str,
        metadata: dict[str, Any],
        metrics: dict[str, float],
        stats: CommitStats,
        *,
        fence: Callable[[], None] | None = None,
    ) -> Commit:
        """Commit object → branch ref (the commit point), re-parented onto a head another
        writer set meanwhile. ``fence`` runs right before each ref update (a writer checks
        that its marker is still honoured)."""
        head: str | None = None

        def attempt() -> Commit:
            nonlocal head
            head = self.refs.get(RefKind.BRANCH, branch)
            commit_id, raw = encode_commit(
                manifest=manifest_id, manifest_size_bytes=manifest_size_bytes, parents=(head,) if head else (), message=message,
                created_at=datetime.now(timezone.utc), branch=branch, metadata=metadata,
                metrics=metrics, stats=stats,
            )  # fmt: skip
            self._put_object(Kind.COMMIT, commit_key(commit_id), raw)
            if fence is not None:
                fence()
            self.refs.set_ref_if_equals(RefKind.BRANCH, branch, commit_id, expected=head)
            commit = decode_commit(commit_id, raw, key=commit_key(commit_id))
            self._index_commit(commit, raw)
            self.catalog.set_ref(RefKind.BRANCH.value, branch, commit_id)
            return commit

        def exhausted() -> RefConflict:
            return RefConflict(branch, expected=head, actual=self.refs.get(RefKind.BRANCH, branch))

        return retry_cas(attempt, conflicts=RefConflict, max_attempts=self.max_ref_retries, exhausted=exhausted)

    def _maybe_move_best(self, commit: Commit, best_metric: str | None, greater_is_better: bool | None) -> None:
        metric = best_metric or self.config.best_metric
        value = commit.metrics.get(metric)
        if value is None or math.isnan(value):
            return
        if greater_is_better is None:
            greater_is_better = self.config.greater_is_better
        greater_is_better = greater_is_better_for(metric, greater_is_better)

        def at_least_as_good(current: Commit) -> bool:
            best = current.metrics.get(metric)
            if best is None or math.isnan(best):
                return False
            return best >= value if greater_is_better else best <= value

        self.advance_tag(BEST, commit, newer=at_least_as_good)

    def advance_tag(self, name: str, commit: Commit, *, newer: Callable[[Commit], bool]) -> None:
        """Move tag ``name`` to ``commit`` unless the commit it points at is ``newer`` (for
        ``best``: at least as good; ``latest`` and ``tags=`` always move). Compare-and-swap, retried,
        so concurrent writers leave the tag on the right commit."""
        current: str | None = None

        def attempt() -> None:
            nonlocal current
            current = self.refs.get(RefKind.TAG, name)
            if current is not None and newer(self._get_commit(current)):
                return
            self.refs.set_ref_if_equals(RefKind.TAG, name, commit.id, expected=current)
            self.catalog.set_ref(RefKind.TAG.value, name, commit.id)

        def exhausted() -> RefConflict:
            return RefConflict(name, expected=current, actual=self.refs.get(RefKind.TAG, name))

        retry_cas(attempt, conflicts=RefConflict, max_attempts=self.max_ref_retries, exhausted=exhausted)

    def _put_object(self, kind: Kind, key: str, raw: bytes) -> bool:
        return self.objects.put_if_absent(key, encode_object_bytes(kind, raw, compression_level=self.config.compression_level))


def _never_newer(current: Commit) -> bool:
    """For a tag that always moves to the newest commit (``latest``, ``tags=``)."""
    return False


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
