"""Revisions: what names a commit (a branch, a tag, a full id or a unique id prefix, each
optionally followed by ``~N`` or ``^`` steps along first parents), and the history those
steps follow: a commit's parents, or where GC collected some, the nearest kept ancestors it
recorded. Reads only.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from .backends import ObjectStore
from .catalog import Catalog
from .commit import Commit
from .errors import AmbiguousRef, IntegrityError, InvalidRefName, UnknownRef
from .history import effective_parents
from .ids import is_full_id, is_id_prefix, parse_revision
from .layout import commit_key
from .refs import RefKind, RefStore


class Revisions:
    """Resolves revisions of one store and follows its history. ``get_commit`` reads a
    commit (and indexes it in the catalog); ``sync_catalog`` brings the catalog up to date
    (and sets :attr:`grafted`)."""

    def __init__(
        self,
        objects: ObjectStore,
        refs: RefStore,
        catalog: Catalog,
        *,
        get_commit: Callable[[str], Commit],
        sync_catalog: Callable[[], None],
    ) -> None:
        self.objects = objects
        self.refs = refs
        self.catalog = catalog
        self._get_commit = get_commit
        self._sync_catalog = sync_catalog
        self.grafted: set[str] = set()  # commits with a shallow/ record, as of the last sync

    def walk(self, rev: str) -> tuple[str, list[str]]:
        """The full commit id ``rev`` names, and the collected first parents its ``~N``/``^``
        steps went across (see :meth:`ckptstore.Store.resolve`)."""
        revision = parse_revision(rev)
        commit_id = self._resolve_base(revision.base, rev)
        crossed: list[str] = []
        for step in range(revision.ancestors):
            commit = self._get_commit(commit_id)
            parents = self.parents_of(commit)
            if commit.parents and (not parents or parents[0] != commit.parents[0]):
                crossed.append(commit.parents[0])
            if not parents:
                raise UnknownRef(rev, suggestions=[f"{revision.base}~{step}"] if step else [])
            commit_id = parents[0]
        return commit_id, crossed

    def first_parents(self, head: str, *, limit: int | None = None) -> list[Commit]:
        """Commit ``head`` and its ancestors along first parents, newest first, at most
        ``limit`` (see :meth:`ckptstore.Store.log`)."""
        commit_id: str | None = head
        out: list[Commit] = []
        seen: set[str] = set()
        while commit_id is not None and (limit is None or len(out) < limit):
            if commit_id in seen:
                raise IntegrityError(f"history loops back to commit {commit_id}", key=commit_key(commit_id))
            seen.add(commit_id)
            commit = self._get_commit(commit_id)
            out.append(commit)
            parents = self.parents_of(commit)  # across what GC removed, or the end of history
            commit_id = parents[0] if parents else None
        return out

    def parents_of(self, commit: Commit) -> list[str]:
        """The parents history follows from ``commit`` (see :meth:`ckptstore.Store.parents_of`)."""
        return effective_parents(self.objects, commit, exists=self.has_commit, grafted=self.grafted.__contains__)

    def collected_parents(self, commit: Commit) -> list[str]:
        """The parents of ``commit`` that no longer exist."""
        return [p for p in commit.parents if not self.has_commit(p)]

    def has_commit(self, commit_id: str) -> bool:
        return self.catalog.commit_object(commit_id) is not None or self.objects.exists(commit_key(commit_id))

    def _resolve_base(self, base: str, rev: str) -> str:
        if is_full_id(base):
            if self.catalog.commit_object(base) is None and not self.objects.exists(commit_key(base)):
                raise UnknownRef(rev)
            return base
        candidates = {}
        for kind in RefKind:
            try:
                target = self.refs.get(kind, base)
            except InvalidRefName:
                target = None
            if target is not None:
                candidates[kind] = target
        if len(candidates) == 2 and len(set(candidates.values())) == 2:
            raise AmbiguousRef(rev, [f"branch {base}", f"tag {base}"])
        if candidates:
            return next(iter(candidates.values()))
        if is_id_prefix(base):
            matches = self.catalog.ids_with_prefix(base)
            if not matches:
                self._sync_catalog()
                matches = self.catalog.ids_with_prefix(base)
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise AmbiguousRef(rev, matches)
        names = list(self.catalog.refs(RefKind.BRANCH.value)) + list(self.catalog.refs(RefKind.TAG.value))
        raise UnknownRef(rev, suggestions=difflib.get_close_matches(base, names, n=3, cutoff=0.6))
