"""Refs: branches and tags as small objects that move only by compare-and-swap.

``refs/heads/NAME`` is a branch, ``refs/tags/NAME`` a tag; each holds one commit id in an
object frame. A ref is created only if absent and updated or deleted only if it still holds
the value the caller read, so a lost race is a :class:`RefConflict`, never a lost commit.
Every name passes :func:`check_ref_name`, the one set of rules for branch and tag names.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from enum import Enum
from typing import TypeVar

from .backends import ObjectStore
from .codec import Kind, decode_object, encode_object_bytes
from .errors import (
    CkptStoreError,
    IntegrityError,
    InvalidRefName,
    ObjectNotFound,
    PreconditionFailed,
    RefConflict,
)
from .ids import is_full_id
from .layout import REFS_PREFIX, refs_prefix
from .layout import ref_key as _ref_key

LATEST = "latest"
BEST = "best"
#: Tags the store moves itself: no branch may take their names, and no one may set them by hand.
STORE_TAGS = (LATEST, BEST)
MAX_NAME_LENGTH = 200
# A portable alphabet, safe as an object key on every backend; git allows more.
_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")
_FORBIDDEN = "~^:?*[\\"

T = TypeVar("T")


def jittered_pause_s(attempt: int) -> float:
    """The pause after failed attempt ``attempt`` (0 first) of a compare-and-swap that many
    processes race on: random, up to 5 ms doubling each time, at most 0.5 s."""
    return random.uniform(0, min(0.5, 0.005 * 2**attempt))


def retry_cas(
    attempt: Callable[[], T],
    *,
    conflicts: type[Exception] | tuple[type[Exception], ...],
    max_attempts: int,
    exhausted: Callable[[], CkptStoreError],
    pause_s: Callable[[int], float] = jittered_pause_s,
) -> T:
    """Run ``attempt`` (read the current value, decide, compare-and-swap) until it returns
    without raising one of ``conflicts`` (someone else changed the value in between), pausing
    ``pause_s(n)`` after failed attempt ``n``. After ``max_attempts`` conflicts, raise
    ``exhausted()``. ``attempt`` must be idempotent: it re-reads what it swaps each time."""
    for n in range(max_attempts):
        try:
            return attempt()
        except conflicts:
            if n + 1 < max_attempts:
                time.sleep(pause_s(n))
    raise exhausted()


class RefKind(Enum):
    BRANCH = "heads"
    TAG = "tags"

    @property
    def noun(self) -> str:
        return "branch" if self is RefKind.BRANCH else "tag"


def _broken_rule(kind: RefKind, name: str, *, existing: bool) -> str | None:
    """The first rule ``name`` breaks as a name of ``kind``, or ``None``."""
    parts = name.split("/")
    rules = (  # git check-ref-format's, then the portable alphabet's, then the reserved names
        (not name, "it is empty"),
        (len(name) > MAX_NAME_LENGTH, f"it is longer than {MAX_NAME_LENGTH} characters"),
        (any(c <= " " or c == "\x7f" for c in name), "it contains a space or a control character"),
        (any(c in _FORBIDDEN for c in name), f"it contains {next((c for c in name if c in _FORBIDDEN), '')!r} (none of ~ ^ : ? * [ \\ may appear)"),
        (".." in name, "it contains '..'"),
        ("@{" in name, "it contains '@{'"),
        (name == "@", "it is '@'"),
        (name.startswith("-"), "it starts with '-'"),
        (name.startswith("/") or name.endswith("/") or "//" in name, "it starts or ends with '/', or contains '//'"),
        (name.endswith("."), "it ends with '.'"),
        (any(p.startswith(".") for p in parts), "a /-separated part of it starts with '.'"),
        (any(p.endswith(".lock") for p in parts), "a /-separated part of it ends with '.lock'"),
        (any(_PART_RE.fullmatch(p) is None for p in parts), "each /-separated part must start with a letter or digit and hold only letters, digits and . _ -"),
        (is_full_id(name), "it looks like a commit id (32 hex digits)"),
        (not existing and name == "HEAD", "'HEAD' is reserved (git's name for the current commit)"),
        (not existing and (name == REFS_PREFIX.rstrip("/") or name.startswith(REFS_PREFIX)), "names starting with 'refs/' are reserved (branch and tag names are given without it)"),
        (not existing and kind is RefKind.BRANCH and name in STORE_TAGS, f"{name!r} is a tag the store moves itself"),
    )  # fmt: skip
    return next((rule for broken, rule in rules if broken), None)


def check_ref_name(name: str, *, kind: RefKind, existing: bool = False) -> str:
    """Return ``name`` if it may name a ref of ``kind``; else raise :class:`InvalidRefName`
    naming it and the rule it breaks. The rules are git's (``git check-ref-format``), with
    parts of letters, digits and ``. _ -`` only, no 32-hex-digit name (it would read as an
    id), and reserved names: ``HEAD``, ``refs/...``, and ``latest``/``best`` for a branch.
    ``existing``: skip the reserved names, to read or delete a ref made before they were."""
    if not isinstance(name, str):
        raise InvalidRefName(f"{kind.noun} name must be a str, not {type(name).__name__}", rule="not a str")
    rule = _broken_rule(kind, name, existing=existing)
    if rule is not None:
        raise InvalidRefName(f"invalid {kind.noun} name {name!r}: {rule}", name=name, rule=rule)
    return name


def ref_key(kind: RefKind, name: str) -> str:
    return _ref_key(kind.value, check_ref_name(name, kind=kind, existing=True))


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
        prefix = refs_prefix(kind.value)
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
                raise InvalidRefName(
                    f"{kind.noun} {name!r} clashes with existing {kind.noun} {other!r}",
                    name=name,
                    rule=f"it would be both a {kind.noun} and a folder of them",
                )

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
