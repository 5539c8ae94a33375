"""The one record codec (lease, writer markers, demotion and shallow records), the key layout
and the one compare-and-swap retry."""

import msgpack
import pytest

from ckptstore.backends.local import LocalObjectStore
from ckptstore.codec import Kind, encode_object_bytes
from ckptstore.errors import CkptStoreError, CollectorBusy, IntegrityError, PreconditionFailed, RefConflict
from ckptstore.layout import LEASE_KEY, chunk_key, commit_key, demotion_key, id_of, kind_of, shallow_key, writer_marker_key
from ckptstore.lease import read_lease
from ckptstore.records import (
    MAX_RECORD_BYTES,
    decode_record,
    dropped_components,
    encode_record,
    grafted_parents,
    read_record,
)
from ckptstore.refs import retry_cas

CID = "0123456789abcdef0123456789abcdef"


def _raw_record(payload: bytes) -> bytes:
    return encode_object_bytes(Kind.RECORD, payload, compression_level=None)


def test_round_trip_and_read(tmp_path):
    objects = LocalObjectStore(str(tmp_path))
    objects.put_if_absent("locks/x", encode_record({"a": 1, "b": [CID]}))
    doc, version = read_record(objects, "locks/x")
    assert doc == {"a": 1, "b": [CID]} and version
    assert read_record(objects, "locks/absent") is None


@pytest.mark.parametrize(
    "data",
    [
        b"not a frame at all",
        _raw_record(b"\xc1"),  # msgpack's never-used byte
        _raw_record(msgpack.packb([1, 2])),  # not a map
        _raw_record(msgpack.packb({"a": 1}) + b"\x00"),  # trailing bytes
        _raw_record(b"\x00" * (MAX_RECORD_BYTES + 1)),  # over the one size cap
    ],
)
def test_malformed_record_is_integrity_error_naming_its_key(data):
    with pytest.raises(IntegrityError) as caught:
        decode_record(data, "demotions/" + CID)
    assert caught.value.key == "demotions/" + CID
    assert isinstance(caught.value, ValueError)  # the builtin mixin: callers catching ValueError still do


def test_malformed_gc_records_name_their_keys(tmp_path):
    objects = LocalObjectStore(str(tmp_path))
    objects.put_if_absent(demotion_key(CID), encode_record({"dropped": "optimizer"}))
    objects.put_if_absent(shallow_key(CID), encode_record({"parents": ["not an id"]}))
    with pytest.raises(IntegrityError) as demotion:
        dropped_components(objects, CID)
    assert demotion.value.key == demotion_key(CID)
    with pytest.raises(IntegrityError) as shallow:
        grafted_parents(objects, CID)
    assert shallow.value.key == shallow_key(CID)


def test_lease_and_gc_records_share_the_codec(tmp_path):
    """A lease record as large as a GC record is read by the same codec, with the same cap."""
    objects = LocalObjectStore(str(tmp_path))
    objects.put_if_absent(LEASE_KEY, encode_record({"host": "h", "pid": 1, "ttl_s": 300.0, "pad": "x" * (100 << 10)}))
    state, _ = read_lease(objects)
    assert state is not None and state.host == "h"
    objects.delete(LEASE_KEY)
    objects.put_if_absent(LEASE_KEY, b"garbage")
    state, _ = read_lease(objects)  # an undecodable lease reads as held by nobody known
    assert state is not None and state.host == "?"


def test_layout_keys_and_parsers():
    assert commit_key(CID) == f"commits/01/{CID}" and id_of(commit_key(CID)) == CID
    assert kind_of(chunk_key(CID)) == "chunks" and kind_of("config") == "config"
    assert writer_marker_key("t").startswith("locks/writers/")


def test_retry_cas_retries_conflicts_then_gives_up():
    calls = []

    def attempt():
        calls.append(1)
        if len(calls) < 3:
            raise PreconditionFailed("changed", key="k")
        return "done"

    assert retry_cas(attempt, conflicts=PreconditionFailed, max_attempts=5, pause_s=lambda n: 0.0, exhausted=lambda: CollectorBusy("busy")) == "done"
    assert len(calls) == 3

    def always():
        raise RefConflict("main", expected=None, actual=CID)

    with pytest.raises(CollectorBusy):
        retry_cas(
            always,
            conflicts=(RefConflict, PreconditionFailed),
            max_attempts=3,
            pause_s=lambda n: 0.0,
            exhausted=lambda: CollectorBusy("busy"),
        )


def test_retry_cas_lets_other_errors_through():
    def broken():
        raise IntegrityError("bad", key="k")

    with pytest.raises(IntegrityError):
        retry_cas(broken, conflicts=PreconditionFailed, max_attempts=3, pause_s=lambda n: 0.0, exhausted=lambda: CollectorBusy("busy"))
    assert issubclass(CollectorBusy, CkptStoreError)
