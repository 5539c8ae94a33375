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
stored as plain values in the commit's tree, never pickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable, Mapping
from typing import Any

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

from .commit import Commit
from .errors import CkptStoreError, IntegrityError, UnsupportedValue, WriterExpired
from .gc import manifest_key
from .lease import WriterMarker, wait_while_collector_sweeps, writing
from .manifest import (
    Manifest,
    TensorRef,
    build_tensor,
    encode_state,
    merge_manifests,
    unpack_value,
)
from .pipeline import WriteResult as ChunkWrites
from .store import Store

DCP_FORMAT = 1


def _sum_writes(parts: list[ChunkWrites]) -> ChunkWrites:
    return ChunkWrites(*(sum(getattr(w, f.name) for w in parts) for f in dataclasses.fields(ChunkWrites)))


def _fence(store: Store, own: WriterMarker, marker_keys: list[str]) -> Callable[[], None]:
    """The check the coordinator makes right before the ref update that publishes what every
    rank wrote: its own marker is fresh, and every rank's marker is still there (a rank whose
    marker lapsed removed it, and a collector removes the markers it judged dead)."""

    def check() -> None:
        own.check()
        for key in marker_keys:
            if key != own.key and not store.objects.exists(key):
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
    with writing(store.objects) as marker:  # held until the coordinator has published
        dist.barrier(group=group)  # so every rank's first "already stored?" comes after the coordinator's marker
        manifest, sources = encode_state(state, inline_threshold_bytes=store.config.inline_threshold_bytes)
        written = store.write_chunks(manifest, sources)
        parts: list[Any] = [None] * dist.get_world_size(group) if rank == coordinator else []
        dist.gather_object((manifest.to_bytes(), written, marker.key), parts if rank == coordinator else None, dst=coordinator, group=group)
        result: list[Any] = [None]
        if rank == coordinator:
            try:
                manifests = {r: Manifest.from_bytes(raw, key=f"(rank {r})") for r, (raw, _, _) in enumerate(parts)}
                fence = _fence(store, marker, [key for _, _, key in parts])
                result[0] = publish(merge_manifests(manifests), _sum_writes([w for _, w, _ in parts]), fence=fence).id  # type: ignore[misc]
            except Exception as exc:  # tell the other ranks, then raise here
                result[0] = exc
        dist.broadcast_object_list(result, src=coordinator, group=group)
    if isinstance(result[0], Exception):
        raise result[0]
    return store.get_commit(result[0])


# --------------------------------------------------------------------------------------------
# torch.distributed.checkpoint


def _item_key(index: MetadataIndex) -> str:
    offset = "-" if index.offset is None else ",".join(map(str, index.offset))
    return f"{index.fqn}|{offset}|{index.index}"


def _encode_metadata(metadata: Metadata, locations: Mapping[str, tuple[int, str]]) -> dict[str, Any]:
    """DCP's ``Metadata`` as plain values (no pickle): per fqn, its kind, dtype, size and
    chunks; and where each stored item lives (rank, item key)."""
    entries: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            entries[fqn] = {"kind": "bytes"}
        else:
            entries[fqn] = {
                "kind": "tensor", "dtype": md.properties.dtype, "requires_grad": md.properties.requires_grad,
                "size": list(md.size), "chunks": [[list(c.offsets), list(c.sizes)] for c in md.chunks],
            }  # fmt: skip
    stored = [[key, rank, local] for key, (rank, local) in sorted(locations.items())]
    planner_data = metadata.planner_data
    try:
        encode_state({"p": planner_data}, inline_threshold_bytes=0)
    except UnsupportedValue:
        planner_data = None  # not plain values: DCP's default planners rebuild it
    return {"format": DCP_FORMAT, "entries": entries, "stored": stored, "planner_data": planner_data, "version": metadata.version}


def _decode_metadata(doc: Any, key: str) -> tuple[Metadata, dict[str, tuple[int, str]]]:
    try:
        if doc["format"] != DCP_FORMAT:
            raise IntegrityError(f"unknown DCP format {doc['format']!r}", key=key)
        state_dict_metadata: dict[str, Any] = {}
        for fqn, e in doc["entries"].items():
            if e["kind"] == "bytes":
                state_dict_metadata[fqn] = BytesStorageMetadata()
            else:
                props = TensorProperties(dtype=e["dtype"], requires_grad=bool(e["requires_grad"]))
                chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in e["chunks"]]
                state_dict_metadata[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(e["size"]), chunks=chunks)
        locations = {k: (int(r), str(local)) for k, r, local in doc["stored"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"malformed DCP metadata: {exc}", key=key) from exc
    metadata = Metadata(state_dict_metadata=state_dict_metadata, planner_data=doc.get("planner_data"), version=doc.get("version"))
    return metadata, locations


class StoreWriter(StorageWriter):
    """``dcp.save(state_dict, storage_writer=StoreWriter(store))``: every rank writes the
    chunks of its items; the coordinator commits (options as :meth:`Store.commit`'s). The
    commit is :attr:`commit` on the coordinator.

    Writer markers (:mod:`ckptstore.lease`) protect what the ranks reuse: the coordinator
    takes one in ``prepare_global_plan``, before any rank writes, and holds it (renewed)
    until it has published; each rank holds its own from its ``write_data`` on. DCP calls no
    hook on the other ranks after their ``write_data``, so the coordinator removes every
    rank's marker once the commit is published (or failed), and each rank's heartbeat then
    stops renewing it.
    """

    def __init__(self, store: Store, **commit_options: Any) -> None:
        super().__init__()
        self.store = store
        self.commit_options = commit_options
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
            marker = self._marker = WriterMarker.create(self.store.objects)
            try:
                wait_while_collector_sweeps(self.store.objects, marker)
            except BaseException:
                marker.release()
                self._marker = None
                raise
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
            written = self.store.write_chunks(manifest, sources)
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
            merged = merge_manifests(manifests, extra={"dcp": _encode_metadata(metadata, locations)})
            publish = self.store.publisher(**self.commit_options)
            self.commit = publish(merged, _sum_writes(writes), fence=_fence(self.store, own, markers))
        finally:  # the other ranks' markers go too: their heartbeats stop when they find them gone
            for key in markers:
                if own is None or key != own.key:
                    with contextlib.suppress(CkptStoreError):
                        self.store.objects.delete(key)
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
    """``dcp.load(state_dict, storage_reader=StoreReader(store, "latest"))``: DCP reshards
    what a ``StoreWriter`` saved onto the loading world; each rank reads only the chunks of
    the items it needs, verified as every checkout is."""

    def __init__(self, store: Store, rev: str = "latest") -> None:
        super().__init__()
        self.store = store
        self.rev = rev

    def reset(self, checkpoint_id: Any = None) -> None:
        if checkpoint_id is not None:
            self.rev = str(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        commit = self.store.commit_of(self.rev)
        self._key = manifest_key(commit.manifest)
        self._manifest = self.store.manifest_of(commit)
        tensors = [TensorRef(i) for i in range(len(self._manifest.tensors))]
        tree = unpack_value(self._manifest.tree, key=self._key, tensors=tensors)
        if not isinstance(tree, dict) or "dcp" not in tree:
            raise IntegrityError(f"commit {commit.id[:12]} was not saved through torch.distributed.checkpoint", key=self._key)
        metadata, locations = _decode_metadata(tree["dcp"], self._key)
        try:
            self._values = {key: tree[rank][local] for key, (rank, local) in locations.items()}
        except (KeyError, TypeError) as exc:
            raise IntegrityError(f"DCP item {exc} is not in the commit", key=self._key) from None
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not hasattr(self, "_manifest"):
            self.read_metadata()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        manifest = self._manifest
        refs = {req.storage_index: self._values[_item_key(req.storage_index)] for req in plan.items}
        blobs = sorted({manifest.tensors[v.index].blob for v in refs.values() if isinstance(v, TensorRef)})
        buffers = self.store.pipeline.read_blobs(manifest, blobs, manifest_key=self._key)
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
