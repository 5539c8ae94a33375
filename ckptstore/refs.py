"""Refs: branches and tags as small objects that move only by compare-and-swap.

``refs/heads/NAME`` is a branch, ``refs/tags/NAME`` a tag; each holds one commit id in an
object frame. A ref is created only if absent and updated or deleted only if it still holds
the value the caller read, so a lost race is a :class:`RefConflict`, never a lost commit.
"""

from __future__ import annotations

from enum import Enum

from .codec import Kind, decode_object, encode_object_bytes
from .errors import (
    IntegrityError,
    InvalidRefName,
    ObjectNotFound,
    PreconditionFailed,
    RefConflict,
)
from .ids import check_ref_name, is_full_id
from .objectstore import ObjectStore


class RefKind(Enum):
    BRANCH = "heads"
    TAG = "tags"

    @property
    def noun(self) -> str:
        return "branch" if self is RefKind.BRANCH else "tag"


def ref_key(kind: RefKind, name: str) -> str:
    return f"refs/{kind.value}/{check_ref_name(name, kind=kind.noun)}"


class RefStore:
    """Branches and tags of one object store."""

    def __init__(self, objects: ObjectStore) -> None:
        self._objects = objects

    def _decode(self, key: str, data: bytes) -> str:
        commit_id = bytes(decode_object(data, key=key, kind=Kind.REF, max_raw_size=64)).decode("ascii", "replace")
        if not is_full_id(commit_id):
            raise IntegrityError("ref does not hold a commit id", key=key)
        return commit_id

    def _read(self, key: str) -> tuple[str, str] | None:
        try:
            data, version = self._objects.get_versioned(key)
        except ObjectNotFound:
            return None
        return self._decode(key, data), version

    def get(self, kind: RefKind, name: str) -> str | None:
        """The commit id ``name`` points at, or ``None`` if there is no such ref."""
        found = self._read(ref_key(kind, name))
        return None if found is None else found[0]

    def names(self, kind: RefKind) -> list[str]:
        """The names of every ref of ``kind``, sorted."""
        prefix = f"refs/{kind.value}/"
        return [key[len(prefix) :] for key in self._objects.list(prefix)]

    def list(self, kind: RefKind) -> dict[str, str]:
        """Every ref of ``kind``: name → commit id, sorted by name."""
        out = {}
        for name in self.names(kind):
            found = self.get(kind, name)
            if found is not None:  # deleted between listing and reading
                out[name] = found
        return out

    def set_ref_if_equals(self, kind: RefKind, name: str, new: str, *, expected: str | None) -> None:
        """Point ``name`` at ``new`` if it points at ``expected`` now (``None``: absent).

        Atomic. Idempotent: if the ref already holds ``new`` (say a retried request whose
        first answer was lost), it succeeds. Raises :class:`RefConflict` otherwise.
        """
        key = ref_key(kind, name)
        current = self._read(key)
        actual, version = (None, None) if current is None else current
        if actual == new:
            return
        if actual != expected:
            raise RefConflict(name, expected=expected, actual=actual)
        if actual is None:
            self._check_no_path_clash(kind, name)
        try:
            self._objects.put_if_version(key, encode_object_bytes(Kind.REF, new.encode(), compression_level=None), version=version)
        except PreconditionFailed:
            after = self.get(kind, name)
            if after != new:
                raise RefConflict(name, expected=expected, actual=after) from None

    def _check_no_path_clash(self, kind: RefKind, name: str) -> None:
        """Refuse ``a/b`` beside ``a`` (and the reverse), as git does: one would have to be
        both a ref and a folder of refs."""
        for other in self.names(kind):
            if other.startswith(name + "/") or name.startswith(other + "/"):
                raise InvalidRefName(f"{kind.noun} {name!r} clashes with existing {kind.noun} {other!r}")

    def delete_ref_if_equals(self, kind: RefKind, name: str, *, expected: str) -> None:
        """Delete ``name`` if it points at ``expected``; raise :class:`RefConflict` if not.
        Idempotent: deleting a ref that is already gone succeeds."""
        key = ref_key(kind, name)
        current = self._read(key)
        if current is None:
            return
        actual, version = current
        if actual != expected:
            raise RefConflict(name, expected=expected, actual=actual)
        try:
            self._objects.delete_if_version(key, version=version)
        except PreconditionFailed:
            after = self.get(kind, name)
            if after is None:  # gone as asked (a resent delete whose first answer was lost)
                return
            raise RefConflict(name, expected=expected, actual=after) from None
