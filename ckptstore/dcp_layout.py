"""The record of a ``torch.distributed.checkpoint`` save in a commit's tree, and the whole
tensors it holds.

A commit made through :class:`ckptstore.integrations.distributed.StoreWriter` has the tree::

    {0: {item key: value, ...}, 1: {...}, ..., "dcp": record}

Each rank's items sit under the rank that wrote them: a tensor chunk, or the bytes DCP made
of a non-tensor value, named by its item key ``fqn|offsets|index`` (see :func:`item_key`).
The record is DCP's ``Metadata`` as plain values, never pickled: per fqn its kind, dtype,
size and chunks; which rank stored each item; and DCP's ``planner_data``, the path of each
flattened fqn in the nested state dict (``model.bert.pooler.dense.bias`` →
``("model", "bert.pooler.dense.bias")``).

This module reads that layout without ``torch.distributed``, so the store can export such a
commit: :meth:`DcpSave.whole_tensors` lays every rank's chunks of a tensor at their offsets
and names the tensor by its path below the component, as an export of the same state
committed whole would; where it cannot, it raises :class:`NotExportable` saying why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .codec import torch_dtype_names
from .errors import ComponentsUnavailable, IntegrityError, NotExportable, Said
from .formats.safetensors import ExportedTensor
from .manifest import Manifest, TensorEntry, build_tensor
from .tree import KeySelection, TensorRef, dotted_name, key_segment, path_under, split_key_path, unpack_value

if TYPE_CHECKING:  # imported where a tensor is made whole
    import torch

#: Version of the record's layout.
DCP_FORMAT = 1
#: The key of the record in a DCP commit's tree (beside the ranks' int keys).
RECORD_KEY = "dcp"
#: The selection of every key path (a frozen value: safe as a default).
EVERY_KEY = KeySelection()


def item_key(fqn: str, offset: Sequence[int] | None, index: int | None) -> str:
    """The name of one saved item (DCP's ``MetadataIndex``): its fqn, the offsets of its chunk
    (``-`` for bytes) and DCP's index hint, as ``fqn|offsets|index``."""
    offsets = "-" if offset is None else ",".join(map(str, offset))
    return f"{fqn}|{offsets}|{index}"


def _item_fqn_and_offsets(key: str) -> tuple[str, tuple[int, ...] | None]:
    fqn, offsets, _ = key.rsplit("|", 2)  # an fqn may itself hold "|"
    return fqn, None if offsets == "-" else tuple(int(o) for o in offsets.split(",") if o)


@dataclass(frozen=True)
class TensorInfo:
    """DCP's metadata of one tensor: dtype, global size, and its chunks as ``(offsets, sizes)``."""

    dtype: torch.dtype
    requires_grad: bool
    size: tuple[int, ...]
    chunks: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]


@dataclass(frozen=True)
class DcpRecord:
    """The record of one save: ``entries`` maps each fqn to its :class:`TensorInfo` (``None``
    for a bytes item); ``stored`` each item key to ``(rank, key in that rank's tree)``;
    ``planner_data`` each fqn to its path in the nested state dict (``None`` where the
    planner gave none, or not as plain values)."""

    entries: dict[str, TensorInfo | None]
    stored: dict[str, tuple[int, str]]
    planner_data: dict[str, tuple[str | int, ...]] | None = None
    version: str | None = None

    def to_doc(self) -> dict[str, Any]:
        """The record as plain values, for the commit's tree."""
        entries: dict[str, Any] = {}
        for fqn, info in self.entries.items():
            if info is None:
                entries[fqn] = {"kind": "bytes"}
            else:
                entries[fqn] = {
                    "kind": "tensor", "dtype": info.dtype, "requires_grad": info.requires_grad,
                    "size": list(info.size), "chunks": [[list(o), list(s)] for o, s in info.chunks],
                }  # fmt: skip
        stored = [[key, rank, local] for key, (rank, local) in sorted(self.stored.items())]
        return {"format": DCP_FORMAT, "entries": entries, "stored": stored, "planner_data": self.planner_data, "version": self.version}

    @classmethod
    def from_doc(cls, doc: Any, *, key: str) -> DcpRecord:
        """Read a record from the tree; a malformed one is :class:`IntegrityError` naming ``key``."""
        try:
            if doc["format"] != DCP_FORMAT:
                raise IntegrityError(f"unknown DCP format {doc['format']!r}", key=key)
            entries: dict[str, TensorInfo | None] = {}
            for fqn, e in doc["entries"].items():
                if e["kind"] == "bytes":
                    entries[fqn] = None
                else:
                    chunks = tuple((tuple(map(int, o)), tuple(map(int, s))) for o, s in e["chunks"])
                    entries[fqn] = TensorInfo(e["dtype"], bool(e["requires_grad"]), tuple(map(int, e["size"])), chunks)
            stored = {str(k): (int(r), str(local)) for k, r, local in doc["stored"]}
            planner_data = doc.get("planner_data")
            if planner_data is not None:
                planner_data = {str(fqn): tuple(path) for fqn, path in planner_data.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"malformed DCP metadata: {exc}", key=key) from exc
        return cls(entries, stored, planner_data, doc.get("version"))


@dataclass(frozen=True)
class Piece:
    """One saved chunk of a tensor: where it starts in the whole, and its manifest entry."""

    offsets: tuple[int, ...]
    entry: TensorEntry


@dataclass(frozen=True)
class WholeTensor:
    """A tensor of a DCP save as one tensor: ``name`` (its path below the component, keys
    joined by ``.``), ``key_path`` (its path in the nested state dict), and its pieces."""

    name: str
    key_path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def blobs(self) -> set[int]:
        return {p.entry.blob for p in self.pieces}

    def assemble(self, buffers: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """The whole tensor from its pieces' blob buffers (a view of the buffer where one
        piece is the whole tensor, else a new tensor with each piece copied in place)."""
        import torch

        if len(self.pieces) == 1 and self.pieces[0].entry.shape == self.shape:
            view: torch.Tensor = build_tensor(self.pieces[0].entry, buffers[self.pieces[0].entry.blob])  # a DCP piece is a tensor
            return view
        whole = torch.empty(self.shape, dtype=self.dtype)
        with torch.no_grad():
            for piece in self.pieces:
                part = build_tensor(piece.entry, buffers[piece.entry.blob])
                target = whole
                for dim, (start, length) in enumerate(zip(piece.offsets, part.shape)):
                    target = target.narrow(dim, start, length)
                target.copy_(part)
        return whole


@dataclass(frozen=True)
class DcpSave:
    """A commit saved through ``torch.distributed.checkpoint``: its record, and each stored
    item's value (a :class:`TensorRef` into ``manifest`` or bytes) by item key, with the key
    path it is stored at."""

    record: DcpRecord
    items: dict[str, Any]
    item_paths: dict[str, str]
    manifest: Manifest
    key: str

    @classmethod
    def of(cls, manifest: Manifest, *, key: str) -> DcpSave | None:
        """The save ``manifest`` (named ``key``) holds, or ``None`` if it was not made through
        ``torch.distributed.checkpoint``. A record that disagrees with the tree is
        :class:`IntegrityError`."""
        tree = unpack_value(manifest.tree, key=key, tensors=[TensorRef(i) for i in range(len(manifest.tensors))])
        if not isinstance(tree, dict) or RECORD_KEY not in tree:
            return None
        record = DcpRecord.from_doc(tree[RECORD_KEY], key=key)
        try:
            items = {k: tree[rank][local] for k, (rank, local) in record.stored.items()}
        except (KeyError, TypeError) as exc:
            raise IntegrityError(f"DCP item {exc} is not in the commit", key=key) from None
        paths = {k: f"{key_segment(rank)}/{key_segment(local)}" for k, (rank, local) in record.stored.items()}
        return cls(record, items, paths, manifest, key)

    def whole_tensors(
        self, commit_id: str, *, component: str | None = None, selection: KeySelection = EVERY_KEY, dropped: Iterable[str] = ()
    ) -> list[WholeTensor]:
        """The tensors under ``component`` (default: ``model`` where the state had one, else
        all) that ``selection`` selects, each whole from every rank's chunks, named by its
        path below the component (keys joined by ``.``, as :meth:`Store.export` names the
        tensors of a commit made whole). Key paths are those of the nested state dict
        (``model/bert.pooler.dense.bias``), as for a commit of the same state.

        Raises :class:`NotExportable` saying why where that cannot be done: the save has no
        ``planner_data`` (so which part of an fqn is the component is unknown), a selected
        item is not a tensor, or a tensor's stored chunks do not cover it exactly;
        :class:`ComponentsUnavailable` where nothing is selected or garbage collection
        dropped what is."""
        record = self.record
        if record.planner_data is None:
            raise NotExportable(
                commit_id,
                "it was saved through torch.distributed.checkpoint without planner_data (flatten_state_dict=False, or a planner that records none), so the nesting of its fqns, and the names of its tensors, are unknown",
            )
        paths: dict[str, str] = {}
        for fqn in record.entries:
            nested = record.planner_data.get(fqn)
            if nested is None:
                raise NotExportable(commit_id, f"the planner_data of its torch.distributed.checkpoint save has no path for {fqn!r}")
            paths[fqn] = "/".join(key_segment(k) for k in nested)
        tops = sorted({split_key_path(p)[0] for p in paths.values() if p}, key=str)
        if component is None and "model" in tops:
            component = "model"
        prefix = "" if component is None else component.strip("/")
        selected = {fqn: p for fqn, p in paths.items() if path_under(p, prefix) and p != prefix and selection.selected(p)}
        not_tensors = sorted(p for fqn, p in selected.items() if record.entries[fqn] is None)
        if not_tensors:
            shown = ", ".join(not_tensors[:5]) + (f" and {len(not_tensors) - 5} more" if len(not_tensors) > 5 else "")
            selecting = Said("include= or exclude=", "--include or --exclude")
            raise NotExportable(
                commit_id,
                [f"values that are not tensors are selected (DCP saved them as bytes): {shown}; select only tensors with ", selecting],
                path=not_tensors[0],
            )
        if not selected:
            wanted = [component] if component else list(selection.include or ["(selected tensors)"])
            raise ComponentsUnavailable(commit_id, missing=wanted, available=[str(t) for t in tops])
        pieces: dict[str, list[tuple[tuple[int, ...], str]]] = {fqn: [] for fqn in selected}
        for k in record.stored:
            fqn, offsets = _item_fqn_and_offsets(k)
            if fqn in pieces:
                pieces[fqn].append((offsets or (), k))
        lost = sorted({d for fqn in selected for _, k in pieces[fqn] for d in dropped if path_under(self.item_paths[k], d)})
        if lost:
            raise ComponentsUnavailable(commit_id, dropped=lost)
        whole = []
        for fqn, path in selected.items():
            info = record.entries[fqn]
            assert info is not None
            parts = tuple(self._piece(fqn, offsets, k, info) for offsets, k in pieces[fqn])
            _check_cover(commit_id, path, info.size, [(p.offsets, p.entry.shape) for p in parts])
            whole.append(WholeTensor(dotted_name(path[len(prefix) :]), path, info.dtype, info.size, parts))
        return whole

    def exported(
        self,
        commit_id: str,
        *,
        component: str | None,
        selection: KeySelection,
        dropped: Iterable[str],
        read_blobs: Callable[[list[int]], Mapping[int, torch.Tensor]],
    ) -> tuple[list[ExportedTensor], Callable[[list[ExportedTensor]], dict[str, torch.Tensor]]]:
        """:meth:`whole_tensors` as an export writes them: the tensors, and the function that
        makes a shard of them whole from their blobs (read by ``read_blobs``, one shard's at
        a time)."""
        whole = {w.key_path: w for w in self.whole_tensors(commit_id, component=component, selection=selection, dropped=dropped)}

        def read(shard: list[ExportedTensor]) -> dict[str, torch.Tensor]:
            wanted = [whole[t.key_path] for t in shard]
            buffers = read_blobs(sorted(set().union(*(w.blobs for w in wanted))))
            return {w.name: w.assemble(buffers) for w in wanted}

        return [ExportedTensor(w.name, w.dtype, w.shape, w.nbytes, w.key_path) for w in whole.values()], read

    def _piece(self, fqn: str, offsets: tuple[int, ...], item: str, info: TensorInfo) -> Piece:
        value = self.items[item]
        if not isinstance(value, TensorRef):
            raise IntegrityError(f"DCP item {item} should be a tensor", key=self.key)
        entry = self.manifest.tensors[value.index]
        if torch_dtype_names().get(info.dtype) != entry.dtype or len(offsets) != len(info.size) or len(entry.shape) != len(info.size):
            raise IntegrityError(
                f"DCP item {item} is stored as {entry.dtype} {tuple(entry.shape)}, not as a chunk of {fqn}'s {info.dtype} {info.size}",
                key=self.key,
            )
        return Piece(offsets, entry)


def _check_cover(commit_id: str, path: str, size: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    """Refuse unless ``boxes`` (offsets, sizes) lie within ``size`` and cover it exactly once."""
    why = None
    if any(o < 0 or o + n > s for offsets, shape in boxes for o, n, s in zip(offsets, shape, size)):
        why = "a stored chunk lies outside the tensor"
    elif sum(math.prod(shape) for _, shape in boxes) != math.prod(size):
        why = f"its stored chunks hold {sum(math.prod(shape) for _, shape in boxes)} of its {math.prod(size)} elements (saved by only some ranks, as by dcp.save(no_dist=True) of a sharded tensor)"
    elif size and _overlap(boxes):  # (a 0-d tensor's one element is one box)
        why = "two of its stored chunks overlap"
    if why is not None:
        raise NotExportable(commit_id, f"tensor {path} {tuple(size)} cannot be reassembled: {why}", path=path)


def _overlap(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Whether two non-empty boxes (of at least one dimension) overlap: a sweep along
    dimension 0 (as DCP's own check), comparing each box only with those open where it starts."""
    boxes = sorted((b for b in boxes if math.prod(b[1])), key=lambda b: b[0])
    open_: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for offsets, shape in boxes:
        open_ = [b for b in open_ if b[0][0] + b[1][0] > offsets[0]]
        if any(all(o < po + pn and po < o + n for o, n, po, pn in zip(offsets, shape, *b)) for b in open_):
            return True
        open_.append((offsets, shape))
    return False
