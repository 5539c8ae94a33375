"""The store: commits, checkouts, branches and tags over an object store and its catalog.

Write order of a commit (each step starts only when the one before is durable)::

    chunks → manifest → commit object → branch ref (the commit point) → tags, latest, best

A crash before the branch moves leaves only unreferenced objects (collected by GC); a crash
after leaves a complete commit. The catalog is updated last and is never needed for safety.

:class:`Store` is a facade over the modules that do the work: :mod:`~ckptstore.config` (the
settings, and opening), :mod:`~ckptstore.reader` (commits, manifests, checkouts),
:mod:`~ckptstore.revisions` (names of commits, history), :mod:`~ckptstore.branching`
(branches and tags), :mod:`~ckptstore.writer` (commits) and :mod:`~ckptstore.diff`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import transfer
from .backends import ObjectStore, open_object_store
from .background import CommitFuture
from .branching import Branching
from .catalog import Catalog
from .commit import Commit
from .config import StoreConfig, catalog_location, checked_overrides, session_config
from .diff import Diff, diff_commits
from .errors import InvalidOption
from .formats.safetensors import DEFAULT_MAX_SHARD_SIZE_BYTES
from .fsck import FsckReport
from .fsck import check as check_store
from .gc import DEFAULT_GRACE_PERIOD_S, DEFAULT_WRITER_TIMEOUT_S, GcPlan, collect
from .layout import WRITERS_PREFIX, manifest_key
from .lease import DEFAULT_LEASE_TTL_S, WriterMarker, wait_while_collector_sweeps
from .manifest import BlobSource, Manifest
from .pipeline import CompressionMode, DeltaMode, Pipeline, Progress, WriteResult, check_compression_mode, check_delta_mode, default_threads
from .reader import Reader
from .records import dropped_components
from .refs import BEST, LATEST, RefKind, RefStore, check_ref_name
from .repack import RepackReport
from .repack import repack as repack_chunks
from .retention import Retention
from .revisions import Revisions
from .usage import Usage
from .usage import measure as measure_usage
from .writer import CommitWriter, Publish

if TYPE_CHECKING:  # imported where tensors are handled: commands on refs and commits start without them
    import torch

__all__ = ["Store", "StoreConfig", "open_store"]

log = logging.getLogger("ckptstore")


class Store:
    """A checkpoint store. Open one with :func:`ckptstore.open`.

    Safe to use from several threads, and from several processes or machines on the same
    store: refs move only by compare-and-swap.
    """

    def __init__(
        self,
        objects: ObjectStore,
        *,
        config: StoreConfig,
        catalog_path: str | None,
        catalog_read_only: bool = False,
        threads: int,
        max_inflight_bytes: int,
        delta_base_cache_bytes: int = 1 << 30,
        max_ref_retries: int = 100,
    ) -> None:
        self.objects = objects
        self.config = config
        self.refs = RefStore(objects)
        self.catalog = Catalog(catalog_path, read_only=catalog_read_only)
        self.pipeline = Pipeline(objects, threads=threads, max_inflight_bytes=max_inflight_bytes, recent_chunks_bytes=delta_base_cache_bytes)
        self._reader = Reader(objects, self.catalog, self.pipeline)
        self._revisions = Revisions(objects, self.refs, self.catalog, get_commit=self.get_commit, sync_catalog=self.sync_catalog)
        self._branching = Branching(
            objects, self.refs, self.catalog, default_branch=config.default_branch, resolve=self.resolve,
            read_commit=self.read_commit, get_commit=self.get_commit, parents_of=self.parents_of,
        )  # fmt: skip
        self._writer = CommitWriter(
            objects, refs=self.refs, catalog=self.catalog, pipeline=self.pipeline, config=config, get_commit=self.get_commit,
            manifest_of=self.manifest_of, index_commit=self._reader.index_commit, max_ref_retries=max_ref_retries,
        )  # fmt: skip
        self.sync_catalog()

    @property
    def url(self) -> str:
        return self.objects.url

    def __repr__(self) -> str:
        return f"<ckptstore.Store {self.url!r}>"

    def flush(self) -> None:
        """Wait for the asynchronous commits made so far; raise the error of one that failed
        and whose future nobody looked at (so a failure is never silent)."""
        self._writer.flush()

    def close(self) -> None:
        """Wait for asynchronous commits to finish, then close the catalog. Raises the error
        of an asynchronous commit that failed unseen (see :meth:`flush`), after closing."""
        try:
            self._writer.close()
        finally:
            self.catalog.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- objects -------------------------------------------------------------------------

    def get_commit(self, commit_id: str) -> Commit:
        """The commit with this full id (from the catalog, else from the object store)."""
        return self._reader.get_commit(commit_id)

    def read_commit(self, commit_id: str) -> Commit:
        """The commit with this full id, read from the object store and verified; the
        catalog is neither used nor changed."""
        return self._reader.read_commit_object(commit_id)[0]

    def get_manifest(self, manifest_id: str, *, size_bytes: int | None = None) -> Manifest:
        """The manifest with this id, read and verified. ``size_bytes``: its raw size as
        its commit records it (``Commit.manifest_size_bytes``); an object declaring any
        other size is then refused before it is inflated."""
        return self._reader.get_manifest(manifest_id, size_bytes=size_bytes)

    def manifest_of(self, commit: Commit) -> Manifest:
        """The manifest of ``commit``, read and verified (see :meth:`get_manifest`)."""
        return self.get_manifest(commit.manifest, size_bytes=commit.manifest_size_bytes)

    # -- catalog -------------------------------------------------------------------------

    def sync_catalog(self) -> None:
        """Reconcile the catalog with the object store: index commits it lacks, drop commits
        the store no longer has, and take the refs from the store. Idempotent.

        A damaged commit object or ref is logged and left out (reading it later raises
        :class:`IntegrityError`), so one bad object never makes a store unopenable.
        """
        self._revisions.grafted = self._reader.sync_catalog(self.refs)

    # -- revisions -----------------------------------------------------------------------

    def resolve(self, rev: str) -> str:
        """The full commit id of a revision: a branch, a tag, a full id, a unique id prefix
        (4+ hex digits), any of them followed by ``~N`` or ``^`` (first parents). Each step
        follows the history as :meth:`log` shows it: where GC collected a first parent, the
        step goes to the nearest kept ancestor, so ``~N`` counts kept commits (see
        :meth:`collected_on_walk`)."""
        return self._revisions.walk(rev)[0]

    def collected_on_walk(self, rev: str) -> list[str]:
        """The first parents, collected by GC, that the ``~N``/``^`` steps of ``rev`` went
        across (each step then went to the nearest kept ancestor); empty if none."""
        return self._revisions.walk(rev)[1]

    def collected_parents(self, commit: Commit) -> list[str]:
        """The parents of ``commit`` that no longer exist (GC collected them; history goes on
        at :meth:`parents_of`)."""
        return self._revisions.collected_parents(commit)

    def parents_of(self, commit: Commit) -> list[str]:
        """The parents history follows from ``commit``: its own, or where GC removed some,
        the nearest kept ancestors it recorded (empty where the history ends)."""
        return self._revisions.parents_of(commit)

    def commit_of(self, rev: str) -> Commit:
        """The :class:`Commit` a revision names."""
        return self.get_commit(self.resolve(rev))

    # -- commit ----------------------------------------------------------------------------

    def commit(
        self,
        state: Mapping[str, Any],
        *,
        message: str = "",
        branch: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        best_metric: str | None = None,
        greater_is_better: bool | None = None,
        progress: Progress | None = None,
        blocking: bool = True,
        delta: DeltaMode | None = None,
        compression: CompressionMode | None = None,
    ) -> Commit | CommitFuture[Commit]:
        """Store ``state`` as a new commit on ``branch`` (default: the store's default branch,
        created if missing) and return it.

        Objects with ``state_dict()`` (modules, optimizers, schedulers) are stored as their
        state dicts. The branch moves by compare-and-swap; if another writer moved it first,
        the commit is re-parented onto the new head and retried (the checkpoint itself is not
        written again). Then ``latest`` moves, each of ``tags`` is created or moved, and
        ``best`` moves if ``metrics[best_metric]`` beats the current best. An unsupported
        value raises :class:`UnsupportedValue` naming its key path before anything is written.
        ``progress(phase, bytes_done, bytes_total)`` follows the chunk writes.

        With ``blocking=False`` the call returns a :class:`~ckptstore.background.CommitFuture` as
        soon as a snapshot of ``state`` is copied into memory of its own (tensors from a GPU
        are copied to the host either way); the caller may change every tensor right away.
        ``future.result()`` returns the :class:`Commit` or raises its error. A second
        asynchronous commit first waits for the one before it, so at most one snapshot is held.
        Unsupported values still raise from the call itself. Commits land in call order: a
        blocking commit waits for the asynchronous ones made before it. A commit still
        pending when the process exits is finished first; one that failed unseen is reported
        and makes the exit status 1 (see :mod:`ckptstore.background`).

        ``metadata`` is copied when the call is made (nested values included), as is the
        state. The commit is refused before anything is written if its message, metadata and
        metrics exceed the commit size limit (8 MiB).

        ``delta`` ("off", "on", "auto"; default: the store's setting) stores changed float
        chunks as deltas against the branch head's (see :mod:`ckptstore.codec`).
        ``compression`` ("auto", "always", "never"; default: the store's setting) says when
        chunks are encoded (see :meth:`write_chunks`).
        """
        self.check_write_options(delta=delta, compression=compression)
        publish = self.publisher(
            message=message, branch=branch, metadata=metadata, metrics=metrics, tags=tags,
            best_metric=best_metric, greater_is_better=greater_is_better,
        )  # fmt: skip
        return self._writer.commit(state, publish, branch=branch, progress=progress, blocking=blocking, delta=delta, compression=compression)

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
        """Store the chunks of ``sources`` (from :func:`~ckptstore.manifest.encode_state`) and
        fill in the manifest's chunk lists. Idempotent. Call it inside
        :func:`ckptstore.lease.writing` and publish before leaving it.

        ``parent``: a commit whose tensors of the same key path, dtype and shape are the
        bases of deltas (with ``delta``, default the store's setting) and whose unchanged
        chunks are reused without reading them. ``parent_key_path`` maps a key path of
        ``parent`` to the one the same tensor has in ``manifest`` (``None``: none); by
        default they are the same. One process of a multi-process commit writes a part of
        the commit's tree: the commit's key paths have a prefix its own lack.

        ``compression`` (default the store's setting): "always" encodes every chunk whose
        sample says an encoding pays; "auto" only while the sink, not the CPU, bounds the
        write (it measures both as it goes: see :class:`~ckptstore.balance.EncodingBalance`),
        writing the others raw; "never" writes every chunk raw and whole. Only the stored
        bytes depend on it, never the ids."""
        return self._writer.write_chunks(
            manifest, sources, progress=progress, parent=parent, delta=delta, parent_key_path=parent_key_path, compression=compression
        )

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
        that publishes a manifest whose chunks are stored: manifest → commit object → branch
        ref (the commit point) → ``latest``, ``tags``, ``best``. :meth:`commit` and the
        multi-process writers of :mod:`ckptstore.distributed` use it."""
        return self._writer.publisher(
            message=message, branch=branch, metadata=metadata, metrics=metrics, tags=tags,
            best_metric=best_metric, greater_is_better=greater_is_better,
        )  # fmt: skip

    def move_best(self, commit: Commit) -> None:
        """Point the ``best`` tag at ``commit`` whatever it points at now (compare-and-swap,
        retried): for an import that knows its best checkpoint other than by a metric."""
        self._writer.advance_tag(BEST, commit, newer=lambda current: False)

    # -- checkout --------------------------------------------------------------------------

    def checkout(
        self,
        rev: str = LATEST,
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        map_location: str | torch.device | None = None,
        progress: Progress | None = None,
    ) -> Any:
        """Return the state committed at ``rev``, with tensors on ``map_location`` (default:
        CPU). Every byte is verified against its hash; corruption raises
        :class:`IntegrityError` naming the object and the key path.

        ``include`` / ``exclude``: key patterns (``"model"``, ``"optimizer/state"``,
        ``"*.bias"``); a pattern selects a key path equal to it, below it, or matching it as a
        glob. Only the chunks of the selected tensors are read. Asking for components that a
        demoted commit no longer holds raises :class:`ComponentsUnavailable`.
        """
        return self._reader.checkout(self.commit_of(rev), include=include, exclude=exclude, map_location=map_location, progress=progress)

    def restore(self, rev: str, targets: Mapping[str, Any], *, map_location: str | torch.device | None = None) -> Any:
        """Load each component of ``rev`` into ``targets[name]`` in place with its
        ``load_state_dict``, and return the checked-out state: those components plus every
        top-level value that holds no tensors (step counters, RNG states); the tensors of other
        components are not read. A component the commit lacks raises
        :class:`ComponentsUnavailable`."""
        return self._reader.restore(self.commit_of(rev), targets, map_location=map_location)

    # -- refs ----------------------------------------------------------------------------

    def branches(self) -> dict[str, str]:
        """Every branch: name → head commit id."""
        return self._branching.listed(RefKind.BRANCH)

    def tags(self) -> dict[str, str]:
        """Every tag (``latest`` and ``best`` included): name → commit id."""
        return self._branching.listed(RefKind.TAG)

    def branch(self, name: str, *, at: str = LATEST, force: bool = False) -> Commit:
        """Create branch ``name`` at revision ``at`` (zero-copy: only a ref is written). An
        existing branch is an error unless ``force``, which moves it."""
        return self._branching.create(RefKind.BRANCH, name, at=at, force=force)

    def tag(self, name: str, *, at: str = LATEST, force: bool = False) -> Commit:
        """Create tag ``name`` at revision ``at``; ``force`` moves an existing tag."""
        return self._branching.create(RefKind.TAG, name, at=at, force=force)

    def delete_branch(self, name: str, *, force: bool = False) -> str:
        """Delete branch ``name`` and return the commit id it pointed at (its commits stay
        until garbage collection, which takes those no other ref reaches). Unless ``force``,
        refuses with :class:`ProtectedBranch`, deleting nothing, the default branch and a
        branch whose head no other branch or tag reaches (``latest`` and ``best`` do not
        count: the store moves them). A concurrent move of the branch raises :class:`RefConflict`."""
        return self._branching.delete_branch(name, force=force)

    def rename_branch(self, old: str, new: str) -> Commit:
        """Rename branch ``old`` to ``new`` (create ``new`` at its head, then delete ``old`` if
        it still points there; a concurrent move of ``old`` raises :class:`RefConflict` and
        leaves both)."""
        return self._branching.rename_branch(old, new)

    def delete_tag(self, name: str) -> str:
        """Delete tag ``name`` and return the commit id it pointed at. A concurrent move of
        the tag raises :class:`RefConflict`."""
        return self._branching.delete_tag(name)

    # -- history -------------------------------------------------------------------------

    def log(self, rev: str | None = None, *, limit: int | None = None) -> list[Commit]:
        """Commits reachable from ``rev`` (default: the default branch) along first parents,
        newest first. Where GC removed commits, the log goes on at the nearest kept ancestor
        (and ends where none is left)."""
        return self._revisions.first_parents(self.resolve(rev or self.config.default_branch), limit=limit)

    def diff(self, a: str, b: str, *, values: bool = False) -> Diff:
        """Tensors added, removed and changed from revision ``a`` to ``b``, by key path (a
        tensor held at several paths is listed at each), compared by the hashes of their
        bytes: no tensor data is read, except for a tensor whose layout differs between the two
        (a view of a larger storage, a transposed copy), whose values are read and compared,
        so that the same values in another layout are not a change. With ``values``, each
        changed tensor of the same dtype and shape is read (one pair at a time) for its
        largest absolute and its relative change."""
        ca, cb = self.commit_of(a), self.commit_of(b)
        return diff_commits(ca, self.manifest_of(ca), cb, self.manifest_of(cb), pipeline=self.pipeline, values=values)

    def dropped_components(self, rev: str) -> tuple[str, ...]:
        """The key-path prefixes GC dropped from a demoted commit (empty if it is whole)."""
        return dropped_components(self.objects, self.resolve(rev))

    def du(self) -> Usage:
        """Logical and physical bytes of the store, its branches and commits, with the dedup
        and compression ratios (see :mod:`ckptstore.usage`)."""
        return measure_usage(self)

    # -- import and export -----------------------------------------------------------------

    def import_checkpoint(self, path: str, *, message: str | None = None, **commit_options: Any) -> Commit:
        """Commit a checkpoint from disk: a ``.safetensors`` file, a Hugging Face style
        directory of safetensors shards (with ``model.safetensors.index.json``) or with a
        ``pytorch_model.bin``, a Trainer ``checkpoint-N`` folder, or a ``.pt`` file (read with
        ``weights_only=True``; legacy, non-zip files too). Safetensors files are
        memory-mapped (once per file) and stream through the pipeline. A directory's other
        files (``config.json``, tokenizer files, ``README.md``, ``1_Pooling/config.json``)
        become the ``files`` component, so that :meth:`export` writes the directory back
        whole (see :func:`ckptstore.formats.hf.read_extra_files` for what is left out). Other
        options are :meth:`commit`'s; a Trainer folder's ``step`` and ``epoch`` go into the
        metadata, and what its ``trainer_state.json`` logged at that step into the metrics.

        Everything is checked before anything is stored: a malformed file (a safetensors
        header with overlapping tensors, holes or a name twice, an index that disagrees with
        its shards, bad JSON, a FIFO or other non-regular file) raises
        :class:`InvalidCheckpoint` naming it, and the store is left as it was. The checkpoint
        files read (shards, index, weights, Trainer pickles, ``trainer_state.json``) may be
        symlinks, which are followed wherever they point, as in a Hugging Face cache
        snapshot; other files are kept only if they are regular files, not symlinks."""
        return transfer.import_checkpoint(self, path, message=message, **commit_options)

    def import_run(
        self, output_dir: str, *, branch: str | None = None, message: str | None = None, append: bool = False, **commit_options: Any
    ) -> list[Commit]:
        """Commit every ``checkpoint-N`` folder of the Trainer ``output_dir``, in step order,
        one commit each with its parent the one before, on ``branch`` (default: the store's
        default branch); returns the commits, oldest first. Each is what
        :meth:`import_checkpoint` makes of its folder, with message ``checkpoint-N`` (or
        ``MESSAGE (checkpoint-N)``) and as metrics what the run logged at that step in the
        ``log_history`` of its newest ``trainer_state.json`` (which holds the whole history).
        ``tags`` go on the last commit; ``progress`` phases are prefixed ``checkpoint-N``.
        Other options are :meth:`commit`'s. Chunks the checkpoints share (frozen weights,
        the config) are stored once.

        ``best`` follows the metric the run chose its ``best_model_checkpoint`` by
        (``best_metric=``/``greater_is_better=`` if given, else the ``eval_*`` value logged
        there that equals the run's ``best_metric``; see
        :func:`ckptstore.formats.hf.trainer_best_metric`), as it moves for any commit. If that
        cannot be told, ``best`` is set to the commit of ``best_model_checkpoint``'s step.

        A ``branch`` that already has commits is refused with :class:`RefExists` (the run
        would be chained onto another history, or imported twice) unless ``append=True``,
        which commits it on top of the head. Every folder is read and checked before the
        first commit (tensors stay memory-mapped, so this holds little memory): a malformed
        file, or a folder whose ``global_step`` is not its ``N``, is
        :class:`InvalidCheckpoint` and the store is left as it was."""
        return transfer.import_run(self, output_dir, branch=branch, message=message, append=append, **commit_options)

    def export(
        self,
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
        """Write the tensors of ``rev`` under ``component`` (default: ``model`` if the commit
        has one, else the whole state) as a Hugging Face style directory at ``path``: one
        ``model.safetensors``, or shards of at most ``max_shard_size_bytes`` plus
        ``model.safetensors.index.json``. Tensor names are key paths below the component with
        ``/`` turned into ``.``. One shard's chunks are read at a time. A ``path`` ending in
        ``.safetensors`` gets one safetensors file, and one ending in ``.pt`` the selected
        state of the component (``include``/``exclude`` applied) as one ``torch.save`` file.
        ``format`` (one of ``hf``, ``safetensors``, ``pt``) says which whatever the path's
        suffix; ``format="pt"`` writes the whole state (or ``component``), with
        ``include``/``exclude`` applied, exactly as :meth:`checkout` returns it, as one file
        that ``torch.load(path, weights_only=True)`` reads back bit-exact, tied tensors still
        sharing storage; a value that it could not read (a numpy array) raises
        :class:`UnsupportedValue` naming its key path. Returns the files written (names
        inside ``path``, or ``path`` itself). Selecting no tensor raises
        :class:`ComponentsUnavailable`.

        Nothing is replaced unless ``force``: a file already at ``path`` (or a directory
        with entries, for a directory export) raises :class:`TargetExists`, checked before
        anything is read, and left byte for byte as it was. An empty directory is exported
        into. A missing parent directory, a file where the directory goes (or the reverse,
        which ``force`` does not replace either), a permission denied or a read-only
        filesystem raise :class:`StorageError` naming the path.

        A commit saved through ``torch.distributed.checkpoint`` (:class:`~ckptstore.distributed.StoreWriter`)
        exports the same way: each tensor whole, laid together from every rank's chunks,
        named by its path in the state dict that was saved (``model/bert.pooler.dense.bias``
        as ``bert.pooler.dense.bias``). Where that cannot be done (a tensor its chunks do not
        cover, no DCP planner data to tell the nesting, a selected value that is not a
        tensor) it raises :class:`NotExportable` saying why, and writes nothing.

        A directory export of the ``model`` component also writes the commit's ``files``
        (``config.json``, ``generation_config.json``, tokenizer files, ``1_Pooling/config.json``:
        what an import or the Trainer integration kept) beside the weights, so that
        ``AutoModel.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` load
        it; Trainer-only files (``training_args.bin``) are left out. Each name is checked
        first: one that is not a relative POSIX path inside ``path`` (absolute, ``..``) raises
        :class:`InvalidFileName` and nothing is written. Single-file exports write no files.

        Atomic: a directory is built beside ``path`` (its parent must be writable) and
        swapped in whole, so ``path`` holds exactly one export, never a mix of two, and a
        failed or killed export leaves it as it was. A forced export replaces only its own files
        there (``model.safetensors``, the index, ``model-NNNNN-of-NNNNN.safetensors``, the
        commit's files) and keeps every other entry (a README of your own). Each file is written to a temp
        file created exclusively under a random name, fsync'd and linked (forced: renamed) into place. A
        second export to the same ``path`` while one runs raises :class:`ExportBusy`."""
        return transfer.export(
            self, rev, path, component=component, include=include, exclude=exclude, max_shard_size_bytes=max_shard_size_bytes,
            format=format, force=force, progress=progress,
        )  # fmt: skip

    # -- for writers beside commit() (the ranks of a multi-process commit) -------------------

    def hold_writer_marker(self) -> WriterMarker:
        """Create a writer marker (``locks/writers/ID``, kept fresh by a heartbeat) and return
        it once no live collector is deleting: from then until it is released, and while it is
        fresh, no object a writer finds stored is deleted. Call its ``check()`` right before
        publishing (:class:`WriterExpired` if it may have been judged dead), and its
        ``release()`` (idempotent, never raises) after. :meth:`commit` holds one per commit;
        this is for a writer whose marker outlives one call."""
        marker = WriterMarker.create(self.objects)
        try:
            wait_while_collector_sweeps(self.objects, marker)
        except BaseException:
            marker.release()
            raise
        return marker

    def writer_marker_exists(self, key: str) -> bool:
        """Whether the writer marker ``key`` (a marker's ``key``, of any process) is still
        stored: a marker that lapsed removed itself, and a collector removes those it judged
        dead. Reads only."""
        return self.objects.exists(self._writer_marker_key(key))

    def remove_writer_marker(self, key: str) -> None:
        """Delete the writer marker ``key`` (another process's, which then stops renewing it
        at its next heartbeat). Idempotent: a marker already gone is no error."""
        self.objects.delete(self._writer_marker_key(key))

    def _writer_marker_key(self, key: str) -> str:
        if not isinstance(key, str) or not key.startswith(WRITERS_PREFIX) or "/" in key[len(WRITERS_PREFIX) :]:
            raise InvalidOption("key", f"{key!r} is not the key of a writer marker")
        return key

    def branch_head(self, name: str) -> str | None:
        """The commit id branch ``name`` points at, read from the store now (never the
        catalog), or ``None`` if there is no such branch. Read it inside a writer marker to
        use the head's chunks as delta bases (as :meth:`commit` does)."""
        return self.refs.get(RefKind.BRANCH, check_ref_name(name, kind=RefKind.BRANCH))

    def check_write_options(self, *, delta: DeltaMode | None = None, compression: CompressionMode | None = None) -> None:
        """Refuse a ``delta`` or ``compression`` that :meth:`write_chunks` does not take
        (:class:`InvalidOption`) now, before anything is written. Reads nothing."""
        check_delta_mode(delta)
        check_compression_mode(compression)

    def manifest_key_of(self, commit: Commit) -> str:
        """The key of ``commit``'s manifest object: what an :class:`IntegrityError` about the
        manifest's contents names."""
        return manifest_key(commit.manifest)

    def read_blobs(
        self, commit: Commit, blob_indices: Iterable[int], *, manifest: Manifest | None = None, progress: Progress | None = None
    ) -> dict[int, torch.Tensor]:
        """The blobs ``blob_indices`` of ``commit``'s manifest (``manifest``: that manifest, if
        already read with :meth:`manifest_of`), each in a new uint8 CPU tensor; every chunk is
        verified against its id (:class:`IntegrityError` naming the chunk, the key path and the
        manifest). Reads only. :func:`ckptstore.manifest.build_tensor` makes a tensor of one."""
        manifest = self.manifest_of(commit) if manifest is None else manifest
        return self.pipeline.read_blobs(manifest, blob_indices, manifest_key=manifest_key(commit.manifest), progress=progress)

    # -- garbage collection and checks -----------------------------------------------------

    def gc(
        self,
        retention: Retention = None,
        *,
        dry_run: bool = False,
        grace_period_s: float = DEFAULT_GRACE_PERIOD_S,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        writer_timeout_s: float = DEFAULT_WRITER_TIMEOUT_S,
        progress: Progress | None = None,
    ) -> GcPlan:
        """Apply ``retention`` (a :class:`~ckptstore.retention.Policy` or rule for every
        branch, a mapping of branch patterns to policies, or ``None`` to keep every commit a
        branch or tag reaches) and delete what no kept commit needs.

        Branch heads and tagged commits are always kept whole. Nothing younger than
        ``grace_period_s`` (by the storage's clock) is deleted, and nothing a live commit in
        progress may use (its writer marker is renewed while it runs; markers of ckptstore 0.1
        writers live ``writer_timeout_s``). ``dry_run`` returns the plan and changes nothing.
        Safe while other processes commit: deletions wait until no commit is mid-write, and
        what a commit made meanwhile needs is spared. The lease lapses ``lease_ttl_s`` after
        its holder's last heartbeat. Raises :class:`CollectorBusy` if another collector holds
        the lease, :class:`PolicyMatchesNothing` if a rule matches no commit (nothing is
        deleted), :class:`ClockSkew` if this machine's clock is far from the storage's. A
        killed collector leaves every kept commit whole; run it again to finish.
        """
        return collect(
            self, retention, dry_run=dry_run, grace_period_s=grace_period_s, lease_ttl_s=lease_ttl_s,
            writer_timeout_s=writer_timeout_s, progress=progress,
        )  # fmt: skip

    def repack(
        self,
        revs: Iterable[str] | None = None,
        *,
        compression_level: int | None = None,
        dry_run: bool = False,
        threads: int | None = None,
        progress: Progress | None = None,
    ) -> RepackReport:
        """Re-encode the chunks of ``revs`` (default: every commit a branch or tag reaches)
        that are stored raw or as plain zstd, with byte planes and zstd at
        ``compression_level`` (default the store's, else 3), replacing each object under the
        same id where that is smaller (see :mod:`ckptstore.repack`). Safe while other
        processes commit, check out and collect: each swap is atomic and made under a writer
        marker; a chunk removed meanwhile is never written again. ``dry_run`` writes nothing.
        Idempotent; a killed repack leaves every commit whole."""
        commit_ids = None if revs is None else [self.resolve(rev) for rev in revs]
        return repack_chunks(self, commit_ids, compression_level=compression_level, dry_run=dry_run, threads=threads, progress=progress)

    def fsck(
        self,
        *,
        read_data: bool = False,
        read_data_subset: float | None = None,
        repair: bool = False,
        progress: Progress | None = None,
    ) -> FsckReport:
        """Check the store; ``report.ok`` says whether it is healthy. ``read_data`` re-hashes
        every chunk (``read_data_subset``: a random fraction of them); ``repair`` rebuilds the
        catalog. Writes nothing to the object store."""
        return check_store(
            self, read_data=read_data, read_data_subset=read_data_subset, repair=repair,
            threads=self.pipeline.threads, progress=progress,
        )  # fmt: skip


def open_store(
    url: str = "ckpts",
    *,
    storage_options: Mapping[str, Any] | None = None,
    create: bool = True,
    chunk_size_bytes: int | None = None,
    inline_threshold_bytes: int | None = None,
    compression_level: int | None | object = ...,
    compression: CompressionMode | None = None,
    delta: DeltaMode | None = None,
    delta_keyframe_interval: int | None = None,
    default_branch: str | None = None,
    best_metric: str | None = None,
    greater_is_better: bool | None = None,
    threads: int | None = None,
    max_inflight_bytes: int = 512 << 20,
    delta_base_cache_bytes: int = 1 << 30,
    cache_dir: str | None = None,
    single_writer: bool | None = None,
) -> Store:
    """Open (and with ``create``, create if missing) the store at ``url``.

    ``url`` is a local directory, ``memory://NAME`` or ``s3://BUCKET/PREFIX``;
    ``storage_options`` go to s3fs and are never logged. Settings given here are written
    into a new store's config; for an existing store they override the stored ones for this
    session (``chunk_size_bytes`` then only affects new writes).

    ``compression`` ("auto", the default; "always"; "never") says when a commit encodes its
    chunks: "auto" where the sample says an encoding pays and the storage, not the CPU,
    bounds the commit (measured as it runs), "always" wherever the sample says it pays.

    ``delta`` ("off", the default; "on"; "auto") stores changed float chunks as XOR deltas
    against the parent commit's, with a keyframe at least every ``delta_keyframe_interval``
    commits; ``delta_base_cache_bytes`` of recently written chunks are kept in memory so that
    the next commit need not read its bases back.

    An S3 endpoint is checked once (then remembered for a day in ``cache_dir``) for
    conditional writes, which concurrent writers rely on: one that ignores them raises
    :class:`ConditionalWritesUnsupported`, unless ``single_writer`` (default:
    ``$CKPTSTORE_SINGLE_WRITER``) says that only one process at a time ever writes to the
    store (commits, branches, tags and gc all count as writes).

    A new store is logged (INFO, ``created a new store at URL``). A store that cannot be
    written (a read-only mount, S3 credentials that allow only reads) opens and reads as any
    other, changing nothing in it (a local one's catalog is served from a read-only copy in
    memory); every write to it raises :class:`ReadOnlyStore`.
    """
    overrides = checked_overrides({
        "chunk_size_bytes": chunk_size_bytes, "inline_threshold_bytes": inline_threshold_bytes, "compression_level": compression_level,
        "compression": compression, "delta": delta, "delta_keyframe_interval": delta_keyframe_interval,
        "default_branch": default_branch, "best_metric": best_metric, "greater_is_better": greater_is_better,
    })  # fmt: skip
    objects = open_object_store(url, storage_options=storage_options, create=create)  # after the checks: a bad option creates nothing
    config = session_config(objects, overrides, create=create, single_writer=single_writer, cache_dir=cache_dir)
    catalog_path, catalog_read_only = catalog_location(objects, cache_dir=cache_dir)
    return Store(
        objects,
        config=config,
        catalog_path=catalog_path,
        catalog_read_only=catalog_read_only,
        threads=threads or default_threads(objects),
        max_inflight_bytes=max_inflight_bytes,
        delta_base_cache_bytes=delta_base_cache_bytes,
    )
