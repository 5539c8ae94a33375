"""torch.distributed: one commit from many ranks, and a ``torch.distributed.checkpoint``
storage layer.

Every rank hashes and writes its own chunks in parallel; only the small rank-local manifests
travel (over the process group, as bytes) to the coordinator, which merges them into one
manifest and makes one commit. Identical bytes on several ranks (replicated tensors) are one
chunk in the store, whoever writes it first.

``commit(store, state)`` is the direct API: every rank calls it with its own state; the
commit's tree maps each rank to its state (``checkout(rev)[rank]``).

``StoreWriter`` / ``StoreReader`` plug a store into ``dcp.save`` / ``dcp.load`` (and
``dcp.async_save``): DCP plans the save (deduplicating replicated tensors across ranks) and
the load (resharding to the loading world), and the store keeps the bytes. DCP's metadata is
stored as plain values in the commit's tree, never pickled (see :mod:`ckptstore.dcp_layout`,
which also lets the store export such a commit as whole tensors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import (
    StorageReader,
    StorageWriter,
    WriteResult,
)
from torch.futures import Future

from ..commit import Commit
from ..dcp_layout import RECORD_KEY, DcpRecord, DcpSave, TensorInfo, item_key
from ..errors import CkptStoreError, IntegrityError, RefConflict, UnsupportedValue, WriterExpired
from ..manifest import (
    Manifest,
    TensorRef,
    build_tensor,
    encode_state,
    merge_manifests,
)
from ..store import Store
from .training import resume_ref

if TYPE_CHECKING:  # the types of what Store.hold_writer_marker and Store.write_chunks return
    from ..lease import WriterMarker
    from ..pipeline import DeltaMode
    from ..pipeline import WriteResult as ChunkWrites


def _sum_writes(parts: list[ChunkWrites]) -> ChunkWrites:
    """The write statistics of several ranks' :meth:`Store.write_chunks` as one (``parts``: at least one)."""
    return dataclasses.replace(parts[0], **{f.name: sum(getattr(w, f.name) for w in parts) for f in dataclasses.fields(parts[0])})


def _fence(store: Store, own: WriterMarker, marker_keys: list[str]) -> Callable[[], None]:
    """The check the coordinator makes right before the ref update that publishes what every
    rank wrote: its own marker is fresh, and every rank's marker is still there (a rank whose
    marker lapsed removed it, and a collector removes the markers it judged dead)."""

    def check() -> None:
        own.check()
        for key in marker_keys:
            if key != own.key and not store.writer_marker_exists(key):
                raise WriterExpired(f"writer marker {key} of another rank lapsed before the commit was published; nothing was published")

    return check


def commit(store: Store, state: Mapping[str, Any], *, group: dist.ProcessGroup | None = None, coordinator: int = 0, **commit_options: Any) -> Commit:
    """Commit every rank's ``state`` as one commit; call it on every rank of ``group``.

    Each rank writes its chunks (in parallel with the others), then the coordinator
    publishes one commit whose tree is ``{rank: state}``; every rank returns it. Options are
    :meth:`Store.commit`'s (checked on the coordinator before anything is written).
    """
    rank = dist.get_rank(group)
    publish = store.publisher(**commit_options) if rank == coordinator else None
    marker = store.hold_writer_marker()  # held until the coordinator has published
    try:
        dist.barrier(group=group)  # so every rank's first "already stored?" comes after the coordinator's marker
        manifest, sources = encode_state(state, inline_threshold_bytes=store.config.inline_threshold_bytes)
        written = store.write_chunks(manifest, sources)
        parts: list[Any] = [None] * dist.get_world_size(group) if rank == coordinator else []
        dist.gather_object((manifest.to_bytes(), written, marker.key), parts if rank == coordinator else None, dst=coordinator, group=group)
        result: list[Any] = [None]
        if publish is not None:  # the coordinator
            try:
                manifests = {r: Manifest.from_bytes(raw, key=f"(rank {r})") for r, (raw, _, _) in enumerate(parts)}
                fence = _fence(store, marker, [key for _, _, key in parts])
                result[0] = publish(merge_manifests(manifests), _sum_writes([w for _, w, _ in parts]), fence=fence).id
            except Exception as exc:  # tell the other ranks, then raise here
                result[0] = exc
        dist.broadcast_object_list(result, src=coordinator, group=group)
    finally:
        marker.release()
    if isinstance(result[0], Exception):
        raise result[0]
    return store.get_commit(result[0])


# --------------------------------------------------------------------------------------------
# torch.distributed.checkpoint


def _item_key(index: MetadataIndex) -> str:
    return item_key(index.fqn, index.offset, index.index)


def _record(metadata: Metadata, locations: Mapping[str, tuple[int, str]]) -> DcpRecord:
    """DCP's ``Metadata`` as the plain values of a :class:`DcpRecord` (no pickle), with
    where each stored item lives (rank, item key)."""
    entries: dict[str, TensorInfo | None] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            entries[fqn] = None
        else:
            chunks = tuple((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks)
            entries[fqn] = TensorInfo(md.properties.dtype, md.properties.requires_grad, tuple(md.size), chunks)
    planner_data = metadata.planner_data
    try:
        encode_state({"p": planner_data}, inline_threshold_bytes=0)
    except UnsupportedValue:
        planner_data = None  # not plain values: DCP's default planners rebuild it
    return DcpRecord(entries, dict(locations), planner_data, metadata.version)


def _metadata(record: DcpRecord) -> Metadata:
    """The ``Metadata`` DCP saved, from its record."""
    state_dict_metadata: dict[str, Any] = {}
    for fqn, info in record.entries.items():
        if info is None:
            state_dict_metadata[fqn] = BytesStorageMetadata()
        else:
            props = TensorProperties(dtype=info.dtype, requires_grad=info.requires_grad)
            chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(n)) for o, n in info.chunks]
            state_dict_metadata[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(info.size), chunks=chunks)
    return Metadata(state_dict_metadata=state_dict_metadata, planner_data=record.planner_data, version=record.version)


def _without_rank(path: str) -> str | None:
    """The key path of a DCP commit's tensor in the rank-local manifest of whichever rank
    saves that item (``1/model.w|0,0|0`` → ``model.w|0,0|0``): items are matched to their
    delta bases by item key, whichever rank saved them."""
    return path.partition("/")[2] or None


class StoreWriter(StorageWriter):
    """``dcp.save(state_dict, storage_writer=StoreWriter(store, ...))``: every rank writes the
    chunks of its items; the coordinator commits them as one commit, :attr:`commit` (on the
    coordinator; ``None`` elsewhere).

    Options, as :meth:`Store.commit`'s: ``branch`` (default: the store's default branch,
    created if missing), ``message``, ``metadata``, ``metrics``, ``tags``, ``best_metric``,
    ``greater_is_better``, and ``delta`` ("off", "on", "auto"; default: the store's
    setting). Every rank constructs its writer with the same options; a bad one raises
    its typed error from the constructor, before anything is written. The commit's parent
    is the branch head (re-parented, as every commit, onto a head another writer set
    meanwhile). Each rank looks up the branch head when it writes and stores its changed
    float chunks as deltas against the head's chunks of the same item (fqn and chunk
    offsets), whichever rank saved that item then: DCP's planner may give a replicated
    item to another rank from one save to the next, and it still finds its base.

    Writer markers (:meth:`Store.hold_writer_marker`) protect what the ranks reuse: the coordinator
    takes one in ``prepare_global_plan``, before any rank writes, and holds it (renewed)
    until it has published; each rank holds its own from its ``write_data`` on. DCP calls no
    hook on the other ranks after their ``write_data``, so the coordinator removes every
    rank's marker once the commit is published (or failed), and each rank's heartbeat then
    stops renewing it.
    """

    def __init__(
        self,
        store: Store,
        *,
        branch: str | None = None,
        message: str = "",
        metadata: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        best_metric: str | None = None,
        greater_is_better: bool | None = None,
        delta: DeltaMode | None = None,
    ) -> None:
        super().__init__()
        store.check_write_options(delta=delta)
        self.store = store
        self.branch = branch or store.config.default_branch
        self.delta = delta
        self.commit_options: dict[str, Any] = dict(
            branch=self.branch, message=message, metadata=metadata, metrics=metrics, tags=list(tags),
            best_metric=best_metric, greater_is_better=greater_is_better,
        )  # fmt: skip
        store.publisher(**self.commit_options)  # refuse bad options now, before dcp.save starts
        self.commit: Commit | None = None
        self.rank = 0
        self.is_coordinator = True
        self._marker: WriterMarker | None = None

    def reset(self, checkpoint_id: Any = None) -> None:
        self.commit = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        if self._marker is not None:  # an earlier save's (the coordinator removed it): a new one each save
            self._marker.release()
            self._marker = None
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if is_coordinator:
            self.store.publisher(**self.commit_options)  # refuse bad options before any write

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """On the coordinator, before any rank writes: take the coordinator's marker, which
        it holds (renewed) until it has published, so that no rank's reuse of a stored chunk
        is ever unprotected, whatever happens to that rank's own marker."""
        self._hold_marker()
        return plans

    def _hold_marker(self) -> WriterMarker:
        if self._marker is None or self._marker.lost:
            self._marker = self.store.hold_writer_marker()
        return self._marker

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        items: dict[str, Any] = {}
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                items[_item_key(item.index)] = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
            else:
                items[_item_key(item.index)] = data.detach()
        marker = self._hold_marker()  # held until the coordinator publishes
        try:
            manifest, sources = encode_state(items, inline_threshold_bytes=self.store.config.inline_threshold_bytes)
            head = self.store.branch_head(self.branch)  # inside the marker, as Store.commit reads it
            written = self.store.write_chunks(manifest, sources, parent=head, delta=self.delta, parent_key_path=_without_rank)
        except BaseException:
            marker.release()
            self._marker = None
            raise
        part = {"rank": self.rank, "manifest": manifest.to_bytes(), "written": written, "marker": marker.key}
        results = [
            WriteResult(index=item.index, size_in_bytes=_nbytes(items[_item_key(item.index)]), storage_data=part if i == 0 else {"rank": self.rank})
            for i, item in enumerate(plan.items)
        ]
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        manifests: dict[int, Manifest] = {}
        writes: list[ChunkWrites] = []
        markers: list[str] = []
        locations: dict[str, tuple[int, str]] = {}
        for rank_results in results:
            for r in rank_results:
                if "manifest" in r.storage_data:
                    rank = r.storage_data["rank"]
                    manifests[rank] = Manifest.from_bytes(r.storage_data["manifest"], key=f"(rank {rank})")
                    writes.append(r.storage_data["written"])
                    markers.append(r.storage_data["marker"])
                locations[_item_key(r.index)] = (r.storage_data["rank"], _item_key(r.index))
        own = self._marker
        try:
            if own is None:
                raise WriterExpired("the coordinator wrote no data of its own; nothing was published")
            merged = merge_manifests(manifests, extra={RECORD_KEY: _record(metadata, locations).to_doc()})
            publish = self.store.publisher(**self.commit_options)
            self.commit = publish(merged, _sum_writes(writes), fence=_fence(self.store, own, markers))
        finally:  # the other ranks' markers go too: their heartbeats stop when they find them gone
            for key in markers:
                if own is None or key != own.key:
                    with contextlib.suppress(CkptStoreError):
                        self.store.remove_writer_marker(key)
            if own is not None:
                own.release()
            self._marker = None

    def storage_meta(self) -> Any:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else len(value)


class StoreReader(StorageReader):
    """``dcp.load(state_dict, storage_reader=StoreReader(store))``: DCP reshards what a
    ``StoreWriter`` saved onto the loading world; each rank reads only the chunks of the
    items it needs, verified as every checkout is.

    ``rev`` is the revision to load. By default a job resumes its own branch's head, as
    every integration does (:func:`ckptstore.integrations.training.resume_ref`): ``$CKPTSTORE_REF``, else
    the head of ``$CKPTSTORE_BRANCH``, else of the store's default branch; never ``latest``,
    which another branch's commits move."""

    def __init__(self, store: Store, rev: str | None = None) -> None:
        super().__init__()
        self.store = store
        self.rev = resume_ref(store, ref=rev)

    def reset(self, checkpoint_id: Any = None) -> None:
        if checkpoint_id is not None:
            self.rev = str(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        commit = self.store.commit_of(self.rev)
        self._commit_id = commit.id
        self._commit = commit
        self._key = self.store.manifest_key_of(commit)
        self._manifest = self.store.manifest_of(commit)
        save = DcpSave.of(self._manifest, key=self._key)
        if save is None:
            raise IntegrityError(f"commit {commit.id[:12]} was not saved through torch.distributed.checkpoint", key=self._key)
        self._values = save.items
        return _metadata(save.record)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not hasattr(self, "_manifest"):
            self.read_metadata()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return dataclasses.replace(plan, storage_data=self._commit_id)  # for the coordinator's check

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """On the coordinator: every rank resolved :attr:`rev` on its own; refuse a load in
        which they found different commits (one landed on the branch meanwhile), rather than
        let the ranks restore two different checkpoints."""
        found = sorted({plan.storage_data for plan in plans if plan.storage_data is not None})
        if len(found) > 1:
            raise RefConflict(self.rev, expected=found[0], actual=found[-1])  # the ranks found two commits: load again
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        manifest = self._manifest
        refs = {req.storage_index: self._values[_item_key(req.storage_index)] for req in plan.items}
        blobs = sorted({manifest.tensors[v.index].blob for v in refs.values() if isinstance(v, TensorRef)})
        buffers = self.store.read_blobs(self._commit, blobs, manifest=manifest)
        for req in plan.items:
            value = refs[req.storage_index]
            if req.type == LoadItemType.BYTE_IO:
                if not isinstance(value, bytes):
                    raise IntegrityError(f"DCP item {req.storage_index.fqn} should be bytes", key=self._key)
                planner.load_bytes(req, io.BytesIO(value))
                continue
            if not isinstance(value, TensorRef):
                raise IntegrityError(f"DCP item {req.storage_index.fqn} should be a tensor", key=self._key)
            entry = manifest.tensors[value.index]
            tensor = build_tensor(entry, buffers[entry.blob])
            for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                tensor = tensor.narrow(dim, start, length)
            target = planner.resolve_tensor(req).detach()
            if target.size() != tensor.size():
                raise IntegrityError(f"DCP item {req.storage_index.fqn}: stored {tuple(tensor.size())}, asked {tuple(target.size())}", key=self._key)
            target.copy_(tensor)
            planner.commit_tensor(req, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False
