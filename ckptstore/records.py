"""Records: the small msgpack maps the store keeps beside its objects, in one codec.

A record object is an object frame of kind ``record`` holding a msgpack map, stored raw. The
collector's lease and the writers' markers (:mod:`ckptstore.lease`) are records, and so are
the two GC leaves behind for readers:

- ``demotions/ID`` (``{"dropped": [prefix, …], "at_s": …}``): the key paths a kept commit no
  longer holds;
- ``shallow/ID`` (``{"parents": [id, …], "at_s": …}``): the parents GC grafted onto a commit
  whose own parents it removed (its nearest kept ancestors; empty where history ends).

A record that cannot be decoded, or says what it cannot mean, is :class:`IntegrityError`
naming its key (a ``ValueError`` too). Reading never writes.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .backends import ObjectStore
from .codec import Kind, decode_object, encode_object_bytes
from .errors import CkptStoreError, IntegrityError, ObjectNotFound
from .ids import is_full_id
from .layout import demotion_key, id_of, shallow_key

#: The largest record read: demotion and shallow records list commit ids and key paths.
MAX_RECORD_BYTES = 1 << 20


def encode_record(record: dict[str, Any]) -> bytes:
    """A record object (frame kind ``record``, raw): a msgpack map."""
    return encode_object_bytes(Kind.RECORD, msgpack.packb(record, use_bin_type=True), compression_level=None)


def decode_record(data: bytes, key: str) -> dict[str, Any]:
    """The map of a record object; a malformed one is :class:`IntegrityError` naming ``key``."""
    try:
        doc = msgpack.unpackb(decode_object(data, key=key, kind=Kind.RECORD, max_raw_size=MAX_RECORD_BYTES), raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        if isinstance(exc, CkptStoreError):
            raise
        raise IntegrityError(f"malformed record: {exc}", key=key) from exc
    if not isinstance(doc, dict):
        raise IntegrityError("malformed record: not a map", key=key)
    return doc


def read_record(objects: ObjectStore, key: str) -> tuple[dict[str, Any], str] | None:
    """The record at ``key`` and its version, or ``None`` if there is none."""
    try:
        data, version = objects.get_versioned(key)
    except ObjectNotFound:
        return None
    return decode_record(data, key), version


def dropped_components(objects: ObjectStore, commit_id: str) -> tuple[str, ...]:
    """The key-path prefixes GC dropped from a demoted commit (empty if it is whole)."""
    found = read_demotion(objects, commit_id)
    return () if found is None else found[0]


def read_demotion(objects: ObjectStore, commit_id: str) -> tuple[tuple[str, ...], str] | None:
    """What a demoted commit no longer holds and its record's version; ``None`` if it is whole."""
    key = demotion_key(commit_id)
    found = read_record(objects, key)
    if found is None:
        return None
    prefixes = found[0].get("dropped")
    if not isinstance(prefixes, list) or not all(isinstance(p, str) and p for p in prefixes):
        raise IntegrityError("malformed demotion record", key=key)
    return tuple(prefixes), found[1]


def demoted_commit_ids(objects: ObjectStore) -> set[str]:
    """The ids of every commit with a demotion record (one listing: cheaper than reading
    each commit's record where few commits are demoted)."""
    return {id_of(key) for key in objects.list(demotion_key(""))}


def grafted_parents(objects: ObjectStore, commit_id: str) -> tuple[list[str], str] | None:
    """The parents GC gave this commit when it removed some of its own (its nearest kept
    ancestors; empty where the history ends) and the record's version; ``None`` if GC never
    removed a parent of it."""
    key = shallow_key(commit_id)
    found = read_record(objects, key)
    if found is None:
        return None
    parents = found[0].get("parents")
    if not isinstance(parents, list) or not all(isinstance(p, str) and is_full_id(p) for p in parents):
        raise IntegrityError("malformed shallow record", key=key)
    return parents, found[1]
