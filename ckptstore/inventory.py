"""The inventory: one listing of what a store holds, shared by gc, fsck and du.

"List the store, read the commits, graft the parents, work out what is needed" is done here
once. :func:`take_inventory` reads the refs first (a ref moves only after its commit is
stored, so the listing that follows holds every target), lists the store's objects, reads
every listed commit and works out the parents history follows (:mod:`ckptstore.history`).
What each commit needs (its manifest's chunks, delta bases included, less what a demotion
dropped) comes from the manifest itself, verified against its id, never from the catalog: a
damaged catalog must not make GC delete what a commit needs. Everything here only reads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .backends import ObjectInfo, ObjectStore
from .catalog import Catalog
from .commit import Commit
from .errors import CkptStoreError, IntegrityError, UnsupportedFormat
from .history import effective_parents, recorded_parents
from .layout import (
    CHUNKS_PREFIX,
    COMMITS_PREFIX,
    DELETION_ORDER,
    MANIFESTS_PREFIX,
    chunk_key,
    commit_key,
    demotion_key,
    id_of,
    is_commit_key,
    manifest_key,
    shallow_key,
)
from .manifest import Manifest
from .records import dropped_components
from .refs import RefKind, RefStore
from .tree import path_under


class Repository(Protocol):
    """What gc, fsck, du and repack need of a store."""

    objects: ObjectStore
    refs: RefStore
    catalog: Catalog
    config: Any  # StoreConfig: best_metric, greater_is_better

    def get_commit(self, commit_id: str) -> Commit: ...

    def read_commit(self, commit_id: str) -> Commit: ...

    def manifest_of(self, commit: Commit) -> Manifest: ...

    def sync_catalog(self) -> None: ...

    def parents_of(self, commit: Commit) -> list[str]: ...


def manifest_chunks(repo: Repository, commit: Commit) -> dict[str, int]:
    """Chunk id → raw size for every chunk a commit's manifest uses, delta bases included. From the
    manifest itself (verified against its id), never from the catalog: a damaged catalog
    must not make GC delete what a commit needs."""
    return _chunk_table(repo, commit)[0]


def manifest_chains(repo: Repository, commit: Commit) -> dict[str, tuple[str, ...]]:
    """Chunk id → its delta chain (bases, nearest first) for every chunk a commit's manifest
    uses, bases included (see :meth:`Manifest.chunk_chains`)."""
    return _chunk_table(repo, commit)[1]


def _chunk_table(repo: Repository, commit: Commit) -> tuple[dict[str, int], dict[str, tuple[str, ...]]]:
    """A manifest's chunk sizes and chains. A manifest is named by its content, so the answer
    for an id never changes: recent answers are remembered (any store)."""
    manifest_id = commit.manifest
    with _CHUNK_TABLES_LOCK:
        if manifest_id in _CHUNK_TABLES:
            _CHUNK_TABLES.move_to_end(manifest_id)
            return _CHUNK_TABLES[manifest_id]
    manifest = repo.manifest_of(commit)
    table = (manifest.chunk_sizes(), manifest.chunk_chains())
    with _CHUNK_TABLES_LOCK:
        _CHUNK_TABLES[manifest_id] = table
        while len(_CHUNK_TABLES) > 256:
            _CHUNK_TABLES.popitem(last=False)
    return table


_CHUNK_TABLES: OrderedDict[str, tuple[dict[str, int], dict[str, tuple[str, ...]]]] = OrderedDict()
_CHUNK_TABLES_LOCK = threading.Lock()


def kept_chunks(manifest: Manifest, dropped: Iterable[str]) -> set[str]:
    """The chunks a manifest still needs once the components under ``dropped`` are gone (a
    blob stays if any tensor uses it at a key path outside them), delta bases included."""
    dropped = tuple(dropped)
    needed_blobs = {
        e.blob for e, paths in zip(manifest.tensors, manifest.key_paths)
        if any(not any(path_under(path, p) for p in dropped) for path in paths)  # a kept path holds it
    }  # fmt: skip
    return set(manifest.chunk_sizes(needed_blobs))


def list_objects(objects: ObjectStore, prefixes: Iterable[str] = DELETION_ORDER) -> dict[str, ObjectInfo]:
    """Key → info of every object under ``prefixes``, listed in that order (the reverse of
    write order: a listing that shows a commit shows its manifest and chunks too, unless a
    collector removed them meanwhile)."""
    return {info.key: info for prefix in prefixes for info in objects.list_info(prefix)}


def stored_needs(repo: Repository, commit: Commit, listing: Container[str]) -> set[str]:
    """The listed objects (keys in ``listing``) ``commit`` needs: itself, its manifest and
    every chunk the manifest uses (a demoted commit's dropped chunks are gone, so not listed)."""
    keys = [commit_key(commit.id), manifest_key(commit.manifest), *map(chunk_key, manifest_chunks(repo, commit))]
    return {key for key in keys if key in listing}


@dataclass
class Inventory:
    """What :func:`take_inventory` found: refs, listed objects, readable commits and the
    parents history follows between them."""

    #: ``"branch NAME"`` / ``"tag NAME"`` → the commit it points at.
    ref_targets: dict[str, str] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    #: (kind, name) → why the ref could not be read.
    ref_errors: dict[tuple[RefKind, str], CkptStoreError] = field(default_factory=dict)
    listing: dict[str, ObjectInfo] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    #: Commit id → why its object could not be read (:class:`IntegrityError` or
    #: :class:`UnsupportedFormat`); with ``verify_commits``, the catalog's copy of such a
    #: commit, if it hashes to the id, is in :attr:`commits` (its history is still followed).
    unreadable: dict[str, CkptStoreError] = field(default_factory=dict)
    parents: dict[str, list[str]] = field(default_factory=dict)
    #: Commit id → why its shallow record could not be read (it keeps its own parents).
    damaged_grafts: dict[str, IntegrityError] = field(default_factory=dict)

    def stored_commit_ids(self) -> set[str]:
        return {id_of(key) for key in self.listing if is_commit_key(key)}

    def is_grafted(self, commit_id: str) -> bool:
        """Whether the commit had a shallow record when listed."""
        return shallow_key(commit_id) in self.listing

    def dropped(self, objects: ObjectStore, commit_id: str) -> tuple[str, ...]:
        """What a demotion listed with the store dropped of the commit (empty if none);
        :class:`IntegrityError` for a malformed record."""
        return dropped_components(objects, commit_id) if demotion_key(commit_id) in self.listing else ()


def _read_refs(repo: Repository, inventory: Inventory) -> None:
    for kind in RefKind:
        for name in repo.refs.names(kind):
            try:
                target = repo.refs.get(kind, name)
            except CkptStoreError as exc:
                inventory.ref_errors[kind, name] = exc
                continue
            if target is not None:  # else deleted between listing and reading
                inventory.ref_targets[f"{kind.noun} {name}"] = target
                if kind is RefKind.BRANCH:
                    inventory.branches[name] = target


def _read_commits(repo: Repository, inventory: Inventory, *, verify_commits: bool) -> None:
    for key in sorted(k for k in inventory.listing if is_commit_key(k)):
        cid = id_of(key)
        try:
            inventory.commits[cid] = repo.read_commit(cid) if verify_commits else repo.get_commit(cid)
        except (IntegrityError, UnsupportedFormat) as exc:
            inventory.unreadable[cid] = exc
            if verify_commits:
                try:  # the catalog's copy, if it hashes to the id, is that commit
                    inventory.commits[cid] = repo.get_commit(cid)
                except CkptStoreError:
                    pass


def take_inventory(repo: Repository, *, verify_commits: bool, keep_missing_parents: bool) -> Inventory:
    """List the store (the objects under :data:`~ckptstore.layout.DELETION_ORDER`) after
    reading its refs, and read every listed commit: from the store and verified
    (``verify_commits``, what fsck needs) or through the catalog (what gc needs, which reads
    commits again before it trusts them). Parents: with ``keep_missing_parents``, each
    commit's own, or the grafts of its listed shallow record, missing ones kept (fsck reports
    them; a record that cannot be read is in :attr:`Inventory.damaged_grafts`); else the
    parents history follows (:func:`~ckptstore.history.effective_parents`: missing ones
    dropped, a malformed record raises). Only reads."""
    inventory = Inventory()
    _read_refs(repo, inventory)
    inventory.listing = list_objects(repo.objects)
    _read_commits(repo, inventory, verify_commits=verify_commits)
    commits = inventory.commits
    if keep_missing_parents:
        inventory.parents, inventory.damaged_grafts = recorded_parents(repo.objects, commits, listed=inventory.listing)
    else:
        exists, grafted = commits.__contains__, inventory.is_grafted
        inventory.parents = {cid: effective_parents(repo.objects, c, exists=exists, grafted=grafted) for cid, c in commits.items()}
    return inventory


def unreferenced_since(repo: Repository, *, since_s: float) -> list[ObjectInfo]:
    """The manifests and chunks stored at or after ``since_s`` (by the storage's clock) that
    no commit references: what an interrupted or killed writer left behind, for a
    collection after the grace period to reclaim. Reads only the commits made since."""
    objects = repo.objects
    fresh = [info for prefix in (MANIFESTS_PREFIX, CHUNKS_PREFIX) for info in objects.list_info(prefix) if info.modified_s >= since_s]
    if not fresh:
        return []
    referenced: set[str] = set()
    for info in objects.list_info(COMMITS_PREFIX):
        if info.modified_s < since_s:
            continue  # an older commit's chunks were stored before (but for one repaired in place since)
        try:
            commit = repo.get_commit(id_of(info.key))
            referenced.add(manifest_key(commit.manifest))
            referenced.update(chunk_key(c) for c in manifest_chunks(repo, commit))
        except CkptStoreError:  # unreadable, or collected meanwhile: it references nothing
            continue
    return [info for info in fresh if info.key not in referenced]
