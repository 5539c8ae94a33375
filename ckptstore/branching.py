"""Branching: creating, moving, renaming and deleting the branches and tags of a store, each
by compare-and-swap with the catalog kept in step, and the rules that keep the two kinds
apart (one namespace; ``latest`` and ``best`` are the store's own) and protect a branch
whose commits no other ref reaches.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterable

from .backends import ObjectStore
from .catalog import Catalog
from .commit import Commit
from .errors import InvalidRefName, ProtectedBranch, RefExists, Said, UnknownRef, WrongRefKind, option
from .history import ancestors
from .lease import writing
from .refs import STORE_TAGS, RefKind, RefStore, check_ref_name

log = logging.getLogger("ckptstore")


class Branching:
    """Edits the refs of one store. ``resolve`` turns a revision into a commit id;
    ``read_commit`` reads one from the object store; ``get_commit`` and ``parents_of`` follow
    history (see :class:`~ckptstore.revisions.Revisions`)."""

    def __init__(
        self,
        objects: ObjectStore,
        refs: RefStore,
        catalog: Catalog,
        *,
        default_branch: str,
        resolve: Callable[[str], str],
        read_commit: Callable[[str], Commit],
        get_commit: Callable[[str], Commit],
        parents_of: Callable[[Commit], list[str]],
    ) -> None:
        self.objects = objects
        self.refs = refs
        self.catalog = catalog
        self.default_branch = default_branch
        self._resolve = resolve
        self._read_commit = read_commit
        self._get_commit = get_commit
        self._parents_of = parents_of

    def listed(self, kind: RefKind) -> dict[str, str]:
        """Every ref of ``kind``: name → commit id (the catalog takes them too)."""
        out = self.refs.list(kind)
        self.catalog.replace_refs(kind.value, out)
        return out

    def create(self, kind: RefKind, name: str, *, at: str, force: bool) -> Commit:
        """Create (or with ``force`` move) branch or tag ``name`` at revision ``at``, by
        compare-and-swap; a concurrent change raises :class:`RefConflict`."""
        if kind is RefKind.BRANCH:
            check_ref_name(name, kind=RefKind.BRANCH)
        else:
            check_tag_name(name)
        check_namespace(self.refs, kind, [name])
        with writing(self.objects) as marker:  # a collector must not delete the commit as it gains a ref
            target = self._resolve(at)
            commit = self._read_commit(target)  # it must still be in the store
            current = self.refs.get(kind, name)
            if current is not None and not force:
                raise RefExists.saying(f"{kind.noun} {name!r} already exists (at {current[:12]}); use ", option("force"), " to move it")
            marker.check()  # still honoured: the commit read above is still there
            self.refs.set_ref_if_equals(kind, name, target, expected=current)
        self.catalog.set_ref(kind.value, name, target)
        return commit

    def delete_branch(self, name: str, *, force: bool = False) -> str:
        """Delete branch ``name`` (see :meth:`ckptstore.Store.delete_branch`); the commit id
        it pointed at."""
        head = self._ref_to_delete(RefKind.BRANCH, name)
        if not force:
            default = name == self.default_branch
            lost = self._reached_only_by(
                head,
                [c for n, c in self.listed(RefKind.BRANCH).items() if n != name] + [c for n, c in self.listed(RefKind.TAG).items() if n not in STORE_TAGS],
            )
            if default or lost:
                raise ProtectedBranch(name, head, default=default, lost_commits=lost, force=option("force", flag="-D"))
        self._delete_ref(RefKind.BRANCH, name, expected=head)
        return head

    def rename_branch(self, old: str, new: str) -> Commit:
        """Rename branch ``old`` to ``new`` (see :meth:`ckptstore.Store.rename_branch`)."""
        head = self.refs.get(RefKind.BRANCH, check_ref_name(old, kind=RefKind.BRANCH, existing=True))
        if head is None:
            raise UnknownRef(old, suggestions=difflib.get_close_matches(old, self.refs.names(RefKind.BRANCH), n=3))
        commit = self.create(RefKind.BRANCH, new, at=head, force=False)
        self.refs.delete_ref_if_equals(RefKind.BRANCH, old, expected=head)
        self.catalog.set_ref(RefKind.BRANCH.value, old, None)
        if self.default_branch == old:
            log.warning("renamed the default branch %r; commits that name no branch will recreate it", old)
        return commit

    def delete_tag(self, name: str) -> str:
        """Delete tag ``name``; the commit id it pointed at."""
        check_tag_name(name, existing=True)
        target = self._ref_to_delete(RefKind.TAG, name)
        self._delete_ref(RefKind.TAG, name, expected=target)
        return target

    def _reached_only_by(self, head: str, others: Iterable[str]) -> int:
        """How many commits ``head`` reaches (along every parent, across what GC removed) that
        none of ``others`` does."""
        others = set(others)
        if head in others:
            return 0

        def parents(cid: str) -> list[str]:
            return self._parents_of(self._get_commit(cid))

        reached_by_others = set(ancestors(others, parents))
        return len(ancestors([head], lambda cid: None if cid in reached_by_others else parents(cid)))

    def _ref_to_delete(self, kind: RefKind, name: str) -> str:
        """The commit id ref ``name`` holds; :class:`WrongRefKind` if it is a ref of the other
        kind, :class:`UnknownRef` if neither."""
        current = self.refs.get(kind, check_ref_name(name, kind=kind, existing=True))
        if current is not None:
            return current
        other = RefKind.TAG if kind is RefKind.BRANCH else RefKind.BRANCH
        if self.refs.get(other, name) is not None:
            how = Said(f"delete_{other.noun}({name!r})", f"ckpt {other.noun} -d {name}")
            raise WrongRefKind(name, asked=kind.noun, found=other.noun, hint=["delete it with ", how])
        raise UnknownRef(name, suggestions=difflib.get_close_matches(name, self.refs.names(kind), n=3))

    def _delete_ref(self, kind: RefKind, name: str, *, expected: str) -> None:
        self.refs.delete_ref_if_equals(kind, name, expected=expected)
        self.catalog.set_ref(kind.value, name, None)


def check_tag_name(name: str, *, existing: bool = False) -> str:
    """``name`` if it may name a tag set by hand: a valid ref name and not one of the tags
    the store moves itself (``latest``, ``best``)."""
    check_ref_name(name, kind=RefKind.TAG, existing=existing)
    if name in STORE_TAGS:
        rule = "the store moves it itself; it cannot be set or deleted by hand"
        raise InvalidRefName(f"tag {name!r} is managed by the store: {rule}", name=name, rule=rule)
    return name


def check_namespace(refs: RefStore, kind: RefKind, names: Iterable[str]) -> None:
    """Branches and tags share one namespace: refuse a name the other kind holds."""
    other = RefKind.TAG if kind is RefKind.BRANCH else RefKind.BRANCH
    for name in names:
        if (other is RefKind.TAG and name in STORE_TAGS) or refs.get(other, name) is not None:
            raise InvalidRefName(f"{name!r} is a {other.noun}; branches and tags share one namespace")
