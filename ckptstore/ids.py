"""Object ids and revision expressions (ref names: :func:`ckptstore.refs.check_ref_name`).

An id is the xxh3-128 digest of an object's raw, uncompressed bytes, written as 32 lowercase
hex digits. Chunks are named by their bytes, manifests and commits by their encoded bytes,
so the same content always has the same id whatever the codec or the thread count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import xxhash

from .errors import InvalidRefName, UnsupportedFormat

HASH_ALGORITHM = "xxh3-128"
ID_HEX_LENGTH = 32
MIN_PREFIX_LENGTH = 4

_HEX_RE = re.compile(r"[0-9a-f]+")
_REVISION_RE = re.compile(r"(?P<base>[^~^]+)(?P<ops>(?:~\d*|\^)*)")


def content_id(data: bytes | bytearray | memoryview) -> str:
    """The id of ``data``: xxh3-128 of the raw bytes, as 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(data)


def check_hash_algorithm(name: str) -> None:
    """Refuse a store whose config names a hash this version does not implement."""
    if name != HASH_ALGORITHM:
        raise UnsupportedFormat(f"store uses hash algorithm {name!r}; this version of ckptstore supports {HASH_ALGORITHM!r}")


def is_full_id(text: str) -> bool:
    return len(text) == ID_HEX_LENGTH and _HEX_RE.fullmatch(text) is not None


def is_id_prefix(text: str) -> bool:
    return MIN_PREFIX_LENGTH <= len(text) <= ID_HEX_LENGTH and _HEX_RE.fullmatch(text) is not None


@dataclass(frozen=True)
class Revision:
    """A parsed revision: a base (branch, tag, id or id prefix) and a count of first-parent
    steps back (``main~2`` is ``Revision("main", 2)``; ``main^`` is ``main~1``)."""

    base: str
    ancestors: int = 0


def parse_revision(text: str) -> Revision:
    """Parse ``name``, ``name~N``, ``name~``, ``name^`` and chains of them (git's syntax for
    first parents)."""
    if not isinstance(text, str) or not text:
        raise InvalidRefName(f"invalid revision {text!r}")
    match = _REVISION_RE.fullmatch(text.strip())
    if match is None:
        raise InvalidRefName(f"invalid revision {text!r}: expected NAME, NAME~N or NAME^")
    steps = 0
    for op in re.findall(r"~\d*|\^", match["ops"]):
        steps += int(op[1:]) if op.startswith("~") and len(op) > 1 else 1
    return Revision(match["base"], steps)
