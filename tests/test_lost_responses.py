"""Lost answers: a conditional write that the backend applied, whose answer never arrived.

On S3, the fault proxy (``tests/faults.py``) forwards the first matching request to moto,
which applies it, and then resets the connection instead of answering (``lost``) or sends
half of the answer (``truncate``). The request is resent, by aiohttp (which silently resends
a PUT or DELETE whose connection dropped) or by botocore, and the resend is refused: 412 for
``If-None-Match: *`` (the object now exists) and for ``If-Match`` (its ETag has moved on).
Locally, the same happens when ``link``, ``rename`` or ``unlink`` is done and then reports
EIO (an NFS reply lost after the server applied the call), and the store redoes the operation.

Either way the write must count as done, once: ``put_if_absent`` returns True,
``put_if_version`` returns the version it wrote, a commit moves its branch exactly once (no
second commit re-parented on the first), and GC keeps its lease.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from faults import LocalFaults, S3FaultProxy, matches
from soak import scaled
from test_faults import (
    STORE_SETTINGS,
    check_store_whole,
    local_lock_files,
    make_state,
)

import ckptstore
from ckptstore.backends.local import LocalObjectStore
from ckptstore.backends.s3 import S3ObjectStore
from ckptstore.errors import PreconditionFailed
from ckptstore.retention import KeepLast

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ANSWER_FAULTS = ("lost", "truncate")


@contextlib.contextmanager
def s3_objects(s3_server: str, s3_url: tuple[str, dict], *, attempts: int | None = None) -> Iterator[tuple[S3ObjectStore, S3FaultProxy]]:
    url, options = s3_url
    with S3FaultProxy(s3_server) as proxy:
        options = proxy.storage_options(options)
        if attempts is not None:
            options["config_kwargs"] = {"retries": {"mode": "standard", "total_max_attempts": attempts}}
        yield S3ObjectStore(url[len("s3://") :], options), proxy


def resends(proxy: S3FaultProxy, key: str, method: str = "PUT") -> int:
    """Requests for ``key`` after the first matching one (counted by a catch-all rule that
    passes them through)."""
    return sum(1 for r in proxy.rules[-1].hits if r.method == method and r.path.endswith("/" + key))


def watch(proxy: S3FaultProxy) -> None:
    """Record every request that no earlier rule took, without a fault."""
    proxy.add_rule(lambda request: True, "none", count=10**9)


# --------------------------------------------------------------------------------------------
# S3 object store


@pytest.mark.s3
@pytest.mark.parametrize("fault", ANSWER_FAULTS)
def test_s3_put_if_absent_lost_answer_is_success(s3_server, s3_url, fault):
    with s3_objects(s3_server, s3_url) as (objects, proxy):
        rule = proxy.add_rule(matches("PUT", header="if-none-match", path_contains="/chunks/aa"), fault)
        watch(proxy)
        assert objects.put_if_absent("chunks/aa", b"payload" * 100) is True
        assert rule.hits and resends(proxy, "chunks/aa") >= 1, "the write was not resent: the scenario did not happen"
        assert objects.get("chunks/aa") == b"payload" * 100
        # Not fooled the other way: the same bytes stored by another write are not ours.
        assert objects.put_if_absent("chunks/aa", b"payload" * 100) is False


@pytest.mark.s3
@pytest.mark.parametrize("fault", ANSWER_FAULTS)
def test_s3_put_if_version_create_lost_answer_returns_the_version(s3_server, s3_url, fault):
    with s3_objects(s3_server, s3_url) as (objects, proxy):
        rule = proxy.add_rule(matches("PUT", header="if-none-match", path_contains="/refs/x"), fault)
        watch(proxy)
        version = objects.put_if_version("refs/x", b"one", version=None)
        assert rule.hits and resends(proxy, "refs/x") >= 1
        assert objects.get_versioned("refs/x") == (b"one", version)
        with pytest.raises(PreconditionFailed):  # a second create is still refused
            objects.put_if_version("refs/x", b"one", version=None)


@pytest.mark.s3
@pytest.mark.parametrize("fault", ANSWER_FAULTS)
def test_s3_put_if_version_update_lost_answer_is_one_update(s3_server, s3_url, fault):
    with s3_objects(s3_server, s3_url) as (objects, proxy):
        v1 = objects.put_if_version("refs/x", b"one", version=None)
        rule = proxy.add_rule(matches("PUT", header="if-match", path_contains="/refs/x"), fault)
        watch(proxy)
        v2 = objects.put_if_version("refs/x", b"two", version=v1)
        assert rule.hits and resends(proxy, "refs/x") >= 1
        assert objects.get_versioned("refs/x") == (b"two", v2)
        with pytest.raises(PreconditionFailed):  # the old version is stale: one update happened
            objects.put_if_version("refs/x", b"three", version=v1)
        assert objects.put_if_version("refs/x", b"three", version=v2)  # the returned version is current


@pytest.mark.s3
def test_s3_lost_answer_then_server_errors_is_success(s3_server, s3_url):
    """The first attempt is applied and its answer lost; every resend gets 500 until botocore
    gives up (after three attempts here, to keep the test short). The write still finds that
    it was applied."""
    with s3_objects(s3_server, s3_url, attempts=3) as (objects, proxy):
        v1 = objects.put_if_version("refs/x", b"one", version=None)
        proxy.add_rule(matches("PUT", header="if-match", path_contains="/refs/x"), "lost")
        proxy.add_rule(matches("PUT", header="if-match", path_contains="/refs/x"), "500", count=10)
        v2 = objects.put_if_version("refs/x", b"two", version=v1)
        assert objects.get_versioned("refs/x") == (b"two", v2)
        proxy.add_rule(matches("PUT", header="if-none-match", path_contains="/chunks/bb"), "lost")
        proxy.add_rule(matches("PUT", header="if-none-match", path_contains="/chunks/bb"), "500", count=10)
        assert objects.put_if_absent("chunks/bb", b"data") is True
        assert proxy.stats["fault.500"] >= 2


@pytest.mark.s3
def test_s3_refused_write_of_another_writer_stays_refused(s3_server, s3_url):
    """A conditional write refused because another writer got there first (with the very same
    bytes) is still refused: the check looks for this write's own token, not equal bytes."""
    url, options = s3_url
    with s3_objects(s3_server, s3_url) as (objects, _proxy):
        other = S3ObjectStore(url[len("s3://") :], options)
        v1 = other.put_if_version("refs/x", b"one", version=None)
        other.put_if_version("refs/x", b"two", version=v1)
        with pytest.raises(PreconditionFailed):
            objects.put_if_version("refs/x", b"two", version=v1)
        other.put_if_absent("chunks/cc", b"same")
        assert objects.put_if_absent("chunks/cc", b"same") is False


@pytest.mark.s3
@pytest.mark.parametrize("fault", ANSWER_FAULTS)
def test_s3_delete_if_version_lost_answer_deletes_once(s3_server, s3_url, fault):
    """A compare-and-delete whose answer is lost: the object is gone and nothing else was
    deleted. (The resend answers 404; without a record of the first attempt the store cannot
    tell it from "already gone", so it may report PreconditionFailed: typed, and harmless to
    the lease, which ignores it.)"""
    with s3_objects(s3_server, s3_url) as (objects, proxy):
        version = objects.put_if_version("refs/x", b"one", version=None)
        objects.put_if_absent("refs/y", b"keep")
        rule = proxy.add_rule(matches("DELETE", path_contains="/refs/x"), fault)
        with contextlib.suppress(PreconditionFailed):
            objects.delete_if_version("refs/x", version=version)
        assert rule.hits
        assert not objects.exists("refs/x") and objects.get("refs/y") == b"keep"


# --------------------------------------------------------------------------------------------
# Store level, S3: commits and GC whose conditional writes lose their answers

STORE_CASES = {
    "branch-create": ("PUT", "if-none-match", "/refs/heads/main"),
    "branch-update": ("PUT", "if-match", "/refs/heads/main"),
    "latest-update": ("PUT", "if-match", "/refs/tags/latest"),
    "chunk-create": ("PUT", "if-none-match", "/chunks/"),
    "manifest-create": ("PUT", "if-none-match", "/manifests/"),
    "commit-create": ("PUT", "if-none-match", "/commits/"),
    "gc-lease-create": ("PUT", "if-none-match", "/locks/gc"),
    "gc-lease-renew": ("PUT", "if-match", "/locks/gc"),
}


@pytest.mark.s3
def test_s3_store_lost_answers(s3_server, s3_url):
    """For each case in turn (on one store, the branch's creation first), the first
    matching request of a commit (or a GC) is applied and its answer lost. Each commit
    succeeds once: the branch moves to it, its parent is the commit before (not a duplicate
    of itself), ``latest`` follows; each GC keeps its lease and finishes."""
    url, options = s3_url
    expected: dict[int, Any] = {}
    with S3FaultProxy(s3_server) as proxy:
        store = ckptstore.open(url, storage_options=proxy.storage_options(options), **STORE_SETTINGS)
        try:
            parent: tuple[str, ...] = ()
            for step, (case, (method, header, path)) in enumerate(STORE_CASES.items(), start=1):
                rule = proxy.add_rule(matches(method, header=header, path_contains=path), "lost")
                expected[step] = make_state(step)
                commit = store.commit(expected[step], metadata={"step": step})
                if case.startswith("gc-"):
                    store.gc(KeepLast(len(STORE_CASES)), grace_period_s=0)
                assert rule.hits, f"{case}: no {method} {header} {path} request was made: the scenario did not happen"
                assert [c.metadata["step"] for c in store.log("main")] == sorted(expected, reverse=True), f"{case}: a commit was duplicated or lost"
                assert store.branches()["main"] == commit.id and store.tags()["latest"] == commit.id, case
                assert commit.parents == parent, case
                parent = (commit.id,)
            assert proxy.stats["fault.lost"] == len(STORE_CASES)
            check_store_whole(store, expected)
        finally:
            store.close()


# --------------------------------------------------------------------------------------------
# Local: link, rename and unlink done, then EIO


def test_local_object_store_lost_answers(tmp_path):
    """Every ``link``, ``rename``, ``unlink`` and ``mkdir`` is done, then reports EIO. Each
    operation still succeeds, once."""
    objects = LocalObjectStore(str(tmp_path / "store"))
    with LocalFaults(rate=1.0, faults=("eio_after",)) as faults:
        assert objects.put_if_absent("chunks/aa/x", b"data") is True
        assert objects.put_if_absent("chunks/aa/x", b"other") is False
        v1 = objects.put_if_version("refs/heads/main", b"one", version=None)
        v2 = objects.put_if_version("refs/heads/main", b"two", version=v1)
        with pytest.raises(PreconditionFailed):
            objects.put_if_version("refs/heads/main", b"three", version=v1)
        objects.delete_if_version("refs/heads/main", version=v2)
        objects.delete("chunks/aa/x")
        assert faults.stats["fault.eio_after"] >= 8
    assert objects.list("") == []
    assert local_lock_files(objects.root) == []


def test_local_store_lost_answers(tmp_path):
    """Commits, checkouts, tag deletion and GC on a local store where every ``link``,
    ``rename``, ``unlink`` and ``mkdir`` reports EIO after doing its work: each commit moves
    its branch once, and the store is whole."""
    expected: dict[int, Any] = {}
    store = ckptstore.open(str(tmp_path / "store"), **STORE_SETTINGS)
    with LocalFaults(rate=1.0, faults=("eio_after",)) as faults:
        commits = []
        for step in range(1, scaled(6, 40) + 1):
            expected[step] = make_state(step)
            commits.append(store.commit(expected[step], metadata={"step": step}))
        store.tag("keep", at=commits[0].id)
        store.delete_tag("keep")
        store.gc(KeepLast(3), grace_period_s=0)
        assert faults.stats["fault.eio_after"] > 0
        faults.enabled = False
        assert [c.id for c in store.log("main")] == [c.id for c in reversed(commits[-3:])]
        assert [c.parents for c in commits[1:]] == [(c.id,) for c in commits[:-1]]
        check_store_whole(store, {s: expected[s] for s in expected})
        assert local_lock_files(store.objects.local_root) == []
    store.close()


@pytest.mark.s3
def test_s3_refs_delete_with_lost_answer_is_not_a_conflict(s3_server, s3_url):
    """Deleting a tag whose DELETE is applied but whose answer is lost (the resend gets 404)."""
    url, options = s3_url
    with S3FaultProxy(s3_server) as proxy:
        store = ckptstore.open(url, storage_options=proxy.storage_options(options), **STORE_SETTINGS)
        try:
            c = store.commit(make_state(1), metadata={"step": 1})
            store.tag("release", at=c.id)
            proxy.add_rule(matches("DELETE", path_contains="/refs/tags/release"), "lost")
            store.delete_tag("release")
            assert "release" not in store.tags()
        finally:
            store.close()
