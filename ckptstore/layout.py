"""The store's object keys: every prefix and key name, defined once.

A store's objects live under these prefixes of its root (``docs/design.md``, "Store layout"),
besides the single ``config`` object::

    commits/AB/ID      a commit (AB: the id's first two hex digits)
    manifests/AB/ID    a manifest
    chunks/AB/ID       a chunk of tensor bytes
    shallow/ID         the parents GC grafted onto a commit whose own parents it removed
    demotions/ID       the key paths GC dropped from a commit it kept
    refs/heads/NAME    a branch; refs/tags/NAME a tag
    locks/gc           the collector's lease; locks/writers/TOKEN a writer's marker

Nothing else under the root is the store's. This module imports nothing of the package.
"""

from __future__ import annotations

CONFIG_KEY = "config"
COMMITS_PREFIX = "commits/"
MANIFESTS_PREFIX = "manifests/"
CHUNKS_PREFIX = "chunks/"
SHALLOW_PREFIX = "shallow/"
DEMOTIONS_PREFIX = "demotions/"
REFS_PREFIX = "refs/"
LOCKS_PREFIX = "locks/"
LEASE_KEY = LOCKS_PREFIX + "gc"
WRITERS_PREFIX = LOCKS_PREFIX + "writers/"
#: Prefix of the probe objects a backend writes to test conditional writes.
PROBE_PREFIX = LOCKS_PREFIX + "probe-"

#: Prefixes of the objects GC may delete, in deletion order (the reverse of write order).
#: Chunks go in descending order of their delta chain's length, so that a delta is always
#: deleted before its bases.
DELETION_ORDER = (COMMITS_PREFIX, SHALLOW_PREFIX, DEMOTIONS_PREFIX, MANIFESTS_PREFIX, CHUNKS_PREFIX)
#: Every prefix the store's objects live under (besides ``config``), in the reverse of write
#: order: GC and ``du`` touch nothing else (a store's directory may hold other files, or
#: another store), and a listing in this order that shows a commit shows its manifest and
#: chunks too, unless a collector removed it meanwhile.
STORE_PREFIXES = (*DELETION_ORDER, REFS_PREFIX, LOCKS_PREFIX)


def _fanned(prefix: str, object_id: str) -> str:
    return f"{prefix}{object_id[:2]}/{object_id}"


def commit_key(commit_id: str) -> str:
    return _fanned(COMMITS_PREFIX, commit_id)


def manifest_key(manifest_id: str) -> str:
    return _fanned(MANIFESTS_PREFIX, manifest_id)


def chunk_key(chunk_id: str) -> str:
    return _fanned(CHUNKS_PREFIX, chunk_id)


def demotion_key(commit_id: str) -> str:
    return DEMOTIONS_PREFIX + commit_id


def shallow_key(commit_id: str) -> str:
    return SHALLOW_PREFIX + commit_id


def refs_prefix(kind: str) -> str:
    """The prefix of every ref of ``kind`` (``heads`` or ``tags``: a ``RefKind``'s value)."""
    return f"{REFS_PREFIX}{kind}/"


def ref_key(kind: str, name: str) -> str:
    """The key of ref ``name`` of ``kind`` (unchecked: :func:`ckptstore.refs.ref_key` checks
    the name)."""
    return refs_prefix(kind) + name


def writer_marker_key(token: str) -> str:
    return WRITERS_PREFIX + token


def id_of(key: str) -> str:
    """The id (or name) an object's key ends with: ``commits/ab/ab12…`` → ``ab12…``."""
    return key.rsplit("/", 1)[-1]


def kind_of(key: str) -> str:
    """The top-level folder of a key (``commits``, ``chunks``, ``refs``…; ``config``)."""
    return key.split("/", 1)[0]


def prefix_of(key: str) -> str:
    """The top-level prefix of a key, as in :data:`STORE_PREFIXES` (``commits/``…)."""
    return kind_of(key) + "/"


def is_commit_key(key: str) -> bool:
    return key.startswith(COMMITS_PREFIX)


def is_chunk_key(key: str) -> bool:
    return key.startswith(CHUNKS_PREFIX)
