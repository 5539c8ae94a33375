"""Reading a store: commits and manifests, each verified against its id (the catalog is a
cache of commits, verified too, never trusted), and checkouts of a commit's state, reading
only the chunks of the tensors selected. Reads only, but for the catalog: a commit read from
the object store is indexed there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .backends import ObjectStore
from .catalog import Catalog
from .codec import Kind, decode_object
from .commit import MAX_COMMIT_BYTES, Commit, decode_commit
from .errors import ComponentsUnavailable, IntegrityError, ObjectNotFound, UnsupportedFormat
from .ids import content_id, is_full_id
from .layout import COMMITS_PREFIX, SHALLOW_PREFIX, commit_key, id_of, manifest_key
from .manifest import Manifest, TensorKind, build_tensor
from .pipeline import Pipeline, Progress
from .records import dropped_components
from .refs import RefKind, RefStore
from .tree import KeySelection, key_segment, path_under, tree_key_paths, unpack_value

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ckptstore")

#: Caps on what a header may declare for these objects before they are decompressed.
MAX_MANIFEST_BYTES = 1 << 32


class Reader:
    """Reads the commits, manifests and checkpoints of one store."""

    def __init__(self, objects: ObjectStore, catalog: Catalog, pipeline: Pipeline) -> None:
        self.objects = objects
        self.catalog = catalog
        self.pipeline = pipeline

    def get_object(self, kind: Kind, key: str, object_id: str, max_raw_size: int) -> bytes | memoryview:
        """Read an immutable object and check that its bytes hash to its id."""
        try:
            data = self.objects.get(key)
        except ObjectNotFound:
            raise IntegrityError(f"{kind.name.lower()} object is missing", key=key) from None
        raw = decode_object(data, key=key, kind=kind, max_raw_size=max_raw_size)
        if content_id(raw) != object_id:
            raise IntegrityError(f"{kind.name.lower()} content does not match its id", key=key)
        return raw

    def get_commit(self, commit_id: str) -> Commit:
        """The commit with this full id (from the catalog, else from the object store, then
        indexed in the catalog)."""
        raw = self.catalog.commit_object(commit_id)
        if isinstance(raw, bytes) and content_id(raw) == commit_id:  # the catalog is a cache: verify it
            return decode_commit(commit_id, raw, key=commit_key(commit_id))
        if raw is not None:
            log.warning("the catalog's copy of commit %s is damaged; reading it from the store", commit_id)
        commit, raw = self.read_commit_object(commit_id)
        self.index_commit(commit, raw)
        return commit

    def read_commit_object(self, commit_id: str) -> tuple[Commit, bytes]:
        """The commit with this full id and its bytes, read from the object store and
        verified; the catalog is neither used nor changed."""
        key = commit_key(commit_id)
        raw = bytes(self.get_object(Kind.COMMIT, key, commit_id, MAX_COMMIT_BYTES))
        return decode_commit(commit_id, raw, key=key), raw

    def index_commit(self, commit: Commit, raw: bytes) -> None:
        """Add ``commit`` (its object ``raw``) to the catalog. Idempotent."""
        step = commit.metadata.get("step") if isinstance(commit.metadata, dict) else None
        row = {
            "id": commit.id,
            "manifest": commit.manifest,
            "message": commit.message,
            "created_at": commit.created_at.timestamp(),
            "branch": commit.branch,
            "step": step if type(step) is int and abs(step) < 2**63 else None,
            "logical_bytes": commit.stats.logical_bytes,
            "new_bytes": commit.stats.new_bytes,
            "object": raw,
        }
        self.catalog.add_commit(row, commit.parents, commit.metrics)

    def sync_catalog(self, refs: RefStore) -> set[str]:
        """Reconcile the catalog with the object store and ``refs`` (see
        :meth:`ckptstore.Store.sync_catalog`). Idempotent. Returns the commits with a
        ``shallow/`` record (GC grafted their parents), listed right after the commits."""
        stored = {id_of(key) for key in self.objects.list(COMMITS_PREFIX)}
        grafted = {id_of(key) for key in self.objects.list(SHALLOW_PREFIX)}
        known = self.catalog.commit_ids()
        for commit_id in sorted(stored - known):
            if is_full_id(commit_id):
                try:
                    self.get_commit(commit_id)
                except (IntegrityError, UnsupportedFormat) as exc:
                    if not self.objects.exists(commit_key(commit_id)):
                        continue  # collected since it was listed: no damage
                    log.warning("skipping commit %s while indexing: %s", commit_id, exc)
        self.catalog.remove_commits(known - stored)
        for kind in RefKind:
            targets = {}
            for name in refs.names(kind):
                try:
                    target = refs.get(kind, name)
                except (IntegrityError, UnsupportedFormat) as exc:
                    log.warning("skipping %s %s while indexing: %s", kind.noun, name, exc)
                    continue
                if target is not None:
                    targets[name] = target
            self.catalog.replace_refs(kind.value, targets)
        return grafted

    def get_manifest(self, manifest_id: str, *, size_bytes: int | None = None) -> Manifest:
        """The manifest with this id, read and verified (see :meth:`ckptstore.Store.get_manifest`)."""
        key = manifest_key(manifest_id)
        raw = self.get_object(Kind.MANIFEST, key, manifest_id, MAX_MANIFEST_BYTES if size_bytes is None else size_bytes)
        if size_bytes is not None and len(raw) != size_bytes:
            raise IntegrityError(f"manifest is {len(raw)} bytes; its commit records {size_bytes}", key=key)
        return Manifest.from_bytes(raw, key=key)

    def checkout(
        self,
        commit: Commit,
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        map_location: str | torch.device | None = None,
        progress: Progress | None = None,
    ) -> Any:
        """The state committed in ``commit`` (see :meth:`ckptstore.Store.checkout`)."""
        selection = KeySelection.of(include, exclude)
        key = manifest_key(commit.manifest)
        manifest = self.get_manifest(commit.manifest, size_bytes=commit.manifest_size_bytes)
        dropped = dropped_components(self.objects, commit.id)
        # A tensor held at several key paths is wanted if any of them is selected.
        selected = [[p for p in paths if selection.selected(p)] for paths in manifest.key_paths]
        lost = sorted({d for d in dropped for paths in selected for p in paths if path_under(p, d)})
        if lost:
            raise ComponentsUnavailable(commit.id, dropped=lost)
        if selection.include is not None:
            shape = unpack_value(manifest.tree, key=key, tensors=[None] * len(manifest.tensors))
            missing = selection.unmatched(tree_key_paths(shape))
            if missing:
                available = sorted(map(key_segment, shape)) if isinstance(shape, dict) else []
                raise ComponentsUnavailable(commit.id, missing=missing, available=available)
        blob_indices = sorted({e.blob for e, paths in zip(manifest.tensors, selected) if paths})
        buffers = self.pipeline.read_blobs(manifest, blob_indices, manifest_key=key, progress=progress)
        import torch

        device = torch.device(map_location) if map_location is not None else None
        tensors: list[Any] = []
        moved: dict[int, torch.Tensor] = {}
        for entry, paths in zip(manifest.tensors, selected):
            if entry.blob not in buffers or not paths:
                tensors.append(None)
                continue
            buffer = buffers[entry.blob]
            if device is not None and device.type != "cpu" and entry.kind is not TensorKind.NDARRAY:
                if entry.blob not in moved:
                    moved[entry.blob] = buffer.to(device)
                buffer = moved[entry.blob]
            tensors.append(build_tensor(entry, buffer))
        state = unpack_value(manifest.tree, key=key, tensors=tensors)
        return state if selection.everything else selection.prune(state)

    def restore(self, commit: Commit, targets: Mapping[str, Any], *, map_location: str | torch.device | None = None) -> Any:
        """Load the components of ``commit`` into ``targets`` (see :meth:`ckptstore.Store.restore`)."""
        manifest = self.get_manifest(commit.manifest, size_bytes=commit.manifest_size_bytes)
        components = {p.split("/", 1)[0] for paths in manifest.key_paths for p in paths}
        others = sorted(components - {key_segment(name) for name in targets})
        state = self.checkout(commit, exclude=others, map_location=map_location)
        missing = [name for name in targets if not isinstance(state, dict) or name not in state]
        if missing:
            available = sorted({*map(str, state), *others}) if isinstance(state, dict) else []
            raise ComponentsUnavailable(commit.id, missing=missing, available=available)
        for name, target in targets.items():
            target.load_state_dict(state[name])
        return state
