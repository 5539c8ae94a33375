"""Storage faults under commit, checkout and GC, on a local store and on S3 (moto).

Faults are injected at the lowest layer each backend has (see ``tests/faults.py``): for S3,
an HTTP proxy between s3fs and moto's server (500, 503, connection resets, answers lost
after the server applied the request, truncated bodies, flipped bytes, latency); for a local
store, the system calls ``LocalObjectStore`` makes (EIO, EIO after the call was done, short
writes, short reads, torn reads, ENOSPC, latency). What must hold, whatever the faults:

- no silent corruption: a checkout returns bit-exact data or raises a ``CkptStoreError``;
- no partial commit visible: once the faults stop, every branch and tag names a commit
  that checks out whole and exact, and ``fsck(read_data=True)`` is clean;
- every error is typed: nothing but ``CkptStoreError`` subclasses leave the store;
- at a 1% transient fault rate, retries make at least 99.9% of commits succeed.

Counts are small by default; ``CKPTSTORE_SOAK=1`` runs the soak counts. Each run prints its
figures (``-s`` shows them); ``CKPTSTORE_FAULT_REPORT=path`` also appends them to a file as
JSON lines.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from faults import (
    TRANSIENT_HTTP_FAULTS,
    TRANSIENT_LOCAL_FAULTS,
    LocalFaults,
    S3FaultProxy,
    matches,
)
from soak import scaled

import ckptstore
from ckptstore.backends import open_object_store
from ckptstore.backends.local import LocalObjectStore
from ckptstore.errors import CkptStoreError, StorageError
from ckptstore.layout import commit_key
from ckptstore.lease import read_lease
from ckptstore.retention import KeepLast

#: Store settings that make every commit write several chunks, some of them shared.
STORE_SETTINGS = {"chunk_size_bytes": 4096, "inline_threshold_bytes": 256, "threads": 4}
_FROZEN = torch.randn(64, 64, generator=torch.Generator().manual_seed(1234))


def make_state(step: int) -> dict[str, Any]:
    """The state committed at ``step``: a frozen tensor (deduplicated from the second
    commit on), tensors that change every step (multi-chunk, and one inline), plain values."""
    g = torch.Generator().manual_seed(step)
    return {
        "model": {
            "frozen": _FROZEN,
            "w": torch.randn(40, 50, generator=g),
            "h": torch.randn(3000, generator=g).to(torch.bfloat16),
            "b": torch.randn(20, generator=g),
        },
        "optimizer": {"step": torch.tensor(float(step)), "lr": 1e-3},
        "step": step,
    }


def same(a: Any, b: Any) -> bool:
    """Bit-exact equality of two states (tensors by dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) == bytes(b.contiguous().reshape(-1).view(torch.uint8).numpy())
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------------------------
# The workload and its tally


@dataclass
class Tally:
    """What a workload under faults did."""

    label: str
    commits: int = 0
    commits_ok: int = 0
    checkouts: int = 0
    checkouts_ok: int = 0
    gcs: int = 0
    gcs_ok: int = 0
    #: Checkouts that returned data other than what was committed (must stay 0).
    corrupt: int = 0
    #: Typed errors raised, by class name.
    errors: collections.Counter = field(default_factory=collections.Counter)
    #: Errors that were not CkptStoreError (must stay empty).
    untyped: list[str] = field(default_factory=list)
    #: The first typed errors, with their messages.
    samples: list[str] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def attempt(self, what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            return True, fn()
        except CkptStoreError as exc:
            self.errors[f"{what}: {type(exc).__name__}"] += 1
            if len(self.samples) < 20:
                self.samples.append(f"{what}: {type(exc).__name__}: {exc}")
            return False, exc
        except Exception as exc:  # noqa: BLE001 - an untyped error is what this test looks for
            self.untyped.append(f"{what}: {type(exc).__module__}.{type(exc).__name__}: {exc}")
            return False, exc

    def figures(self) -> dict[str, Any]:
        def rate(ok: int, n: int) -> float | None:
            return round(ok / n, 5) if n else None

        return {
            "label": self.label,
            "commits": self.commits,
            "commit_success": rate(self.commits_ok, self.commits),
            "checkouts": self.checkouts,
            "checkout_success": rate(self.checkouts_ok, self.checkouts),
            "gcs": self.gcs,
            "gc_success": rate(self.gcs_ok, self.gcs),
            "corrupt_checkouts_returned": self.corrupt,
            "untyped_errors": len(self.untyped),
            "errors": dict(self.errors),
            "error_samples": self.samples[:5],
            "faults_injected": self.faults,
            "elapsed_s": round(self.elapsed_s, 1),
        }

    def report(self) -> None:
        figures = self.figures()
        print(f"\n[fault figures] {json.dumps(figures, sort_keys=True)}")
        path = os.environ.get("CKPTSTORE_FAULT_REPORT")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(figures, sort_keys=True) + "\n")


def run_workload(
    store: ckptstore.Store, tally: Tally, expected: dict[int, Any], *, commits: int, seed: int, checkout_every: int = 2, gc_every: int = 10
) -> None:
    """``commits`` commits on ``main`` (with ``eval_loss``, so ``best`` moves too); after
    every ``checkout_every``-th, a checkout of a random commit of the branch's history, checked
    bit-exact against what was committed at its step; after every ``gc_every``-th, a GC that
    keeps the last three commits of each branch (grace period 0)."""
    rng = random.Random(seed)
    start = max(expected, default=0) + 1
    t0 = time.monotonic()
    for step in range(start, start + commits):
        state = make_state(step)
        expected[step] = state
        tally.commits += 1
        ok, _ = tally.attempt(
            "commit",
            lambda s=state, n=step: store.commit(s, message=f"step {n}", metadata={"step": n}, metrics={"eval_loss": rng.random()}),
        )
        tally.commits_ok += ok
        if step % checkout_every == 0:
            found, history = tally.attempt("log", lambda: store.log("main"))
            if found and history:
                commit = rng.choice(history)
                tally.checkouts += 1
                ok, got = tally.attempt("checkout", lambda c=commit: store.checkout(c.id))
                if ok:
                    if same(got, expected[commit.metadata["step"]]):
                        tally.checkouts_ok += 1
                    else:
                        tally.corrupt += 1
        if step % gc_every == 0:
            tally.gcs += 1
            ok, _ = tally.attempt("gc", lambda: store.gc(KeepLast(3), grace_period_s=0))
            tally.gcs_ok += ok
    tally.elapsed_s += time.monotonic() - t0


def check_store_whole(store: ckptstore.Store, expected: dict[int, Any]) -> None:
    """With the faults stopped: every branch and tag names a commit that checks out whole
    and bit-exact, the history of ``main`` is made of complete commits, and fsck (reading
    every byte) finds no problem."""
    store.sync_catalog()
    refs = {**{f"branch {b}": c for b, c in store.branches().items()}, **{f"tag {t}": c for t, c in store.tags().items()}}
    assert refs, "no refs at all"
    checked = set()
    for name, commit_id in refs.items():
        commit = store.read_commit(commit_id)
        if commit_id not in checked:
            assert same(store.checkout(commit_id), expected[commit.metadata["step"]]), f"{name} ({commit_id}) checks out other data"
            checked.add(commit_id)
    for commit in store.log("main"):
        if commit.id not in checked:
            assert same(store.checkout(commit.id), expected[commit.metadata["step"]]), f"commit {commit.id} of main checks out other data"
            checked.add(commit.id)
    report = store.fsck(read_data=True)
    assert report.ok, report.problems


def assert_outcomes(tally: Tally, *, min_commit_success: float | None) -> None:
    tally.report()
    assert not tally.untyped, "untyped errors escaped the store:\n" + "\n".join(tally.untyped[:20])
    assert tally.corrupt == 0, f"{tally.corrupt} checkouts returned data other than what was committed"
    assert sum(tally.faults.values()) > 0, "no fault was injected: the test proves nothing"
    if min_commit_success is not None:
        assert tally.commits_ok >= min_commit_success * tally.commits, tally.figures()


def local_fault_counts(faults: LocalFaults) -> dict[str, int]:
    return {k: v for k, v in sorted(faults.stats.items()) if k.startswith("fault.")}


def proxy_fault_counts(proxy: S3FaultProxy) -> dict[str, int]:
    return {k: v for k, v in sorted(proxy.stats.items()) if k.startswith("fault.") or k == "requests"}


@contextlib.contextmanager
def s3_store_behind_proxy(
    s3_server: str, s3_url: tuple[str, dict], *, config_kwargs: dict | None = None, **proxy_options: Any
) -> Iterator[tuple[ckptstore.Store, S3FaultProxy]]:
    url, options = s3_url
    with S3FaultProxy(s3_server, **proxy_options) as proxy:
        proxy.enabled = False  # the store is created fault-free
        options = proxy.storage_options(options)
        if config_kwargs:
            options["config_kwargs"] = config_kwargs
        store = ckptstore.open(url, storage_options=options, **STORE_SETTINGS)
        proxy.enabled = True
        try:
            yield store, proxy
        finally:
            proxy.enabled = False
            store.close()


@contextlib.contextmanager
def local_store_with_faults(path: str, **fault_options: Any) -> Iterator[tuple[ckptstore.Store, LocalFaults]]:
    store = ckptstore.open(path, **STORE_SETTINGS)
    with LocalFaults(**fault_options) as faults:
        try:
            yield store, faults
        finally:
            faults.enabled = False
            store.close()


def local_lock_files(root: str) -> list[str]:
    """The object store's lock files left under ``root`` (the catalog's own lock file, which
    it keeps, is no object-store lock)."""
    out = []
    for directory, dirs, names in os.walk(root):
        if ".catalog" in dirs:
            dirs.remove(".catalog")
        out += [os.path.join(directory, n) for n in names if n.endswith(".lock")]
    return out


# --------------------------------------------------------------------------------------------
# 1% transient faults: everything typed, nothing corrupt, >= 99.9% of commits succeed


@pytest.mark.slow
def test_local_transient_faults_soak(tmp_path):
    """1% of the store's system calls fail with EIO (some after doing their work), write
    short or read short; each waits up to 0.2 ms. The local backend's retries carry every
    commit, checkout and GC through."""
    expected: dict[int, Any] = {}
    tally = Tally("local, 1% transient syscall faults (EIO, EIO after the call, short write, short read)")
    with local_store_with_faults(str(tmp_path / "store"), rate=0.01, faults=TRANSIENT_LOCAL_FAULTS, latency_s=0.0002, seed=1) as (
        store,
        faults,
    ):
        run_workload(store, tally, expected, commits=scaled(30, 2000), seed=1)
        tally.faults = local_fault_counts(faults)
        faults.enabled = False
        check_store_whole(store, expected)
        assert local_lock_files(store.objects.local_root) == []
    assert_outcomes(tally, min_commit_success=0.999)
    assert tally.checkouts_ok == tally.checkouts and tally.gcs_ok == tally.gcs, tally.figures()


@pytest.mark.slow
@pytest.mark.s3
def test_s3_transient_faults_soak(s3_server, s3_url):
    """1% of the HTTP requests between s3fs and moto get a 500 or 503, a reset connection,
    a lost answer (after moto applied the request) or a truncated answer; each waits up to
    2 ms. botocore's retries, the store's read retries and its lost-answer checks carry every
    commit through."""
    expected: dict[int, Any] = {}
    tally = Tally("s3, 1% transient HTTP faults (500, 503, reset, lost answer, truncated answer)")
    with s3_store_behind_proxy(s3_server, s3_url, rate=0.01, faults=TRANSIENT_HTTP_FAULTS, latency_s=0.002, seed=2) as (store, proxy):
        run_workload(store, tally, expected, commits=scaled(6, 1000), seed=2, gc_every=3)
        tally.faults = proxy_fault_counts(proxy)
        proxy.enabled = False
        check_store_whole(store, expected)
    assert_outcomes(tally, min_commit_success=0.999)


# --------------------------------------------------------------------------------------------
# Harsh faults, corruption among them: typed errors, never wrong data, no partial commit


@pytest.mark.slow
def test_local_harsh_faults_never_corrupt(tmp_path):
    """5% of the system calls fail (EIO, EIO after the call, ENOSPC) or misbehave (short
    writes, short reads, and torn reads that end a file early: corrupt data). Operations may
    fail, always with a typed error; no checkout returns wrong data; afterwards every ref
    names a whole commit."""
    expected: dict[int, Any] = {}
    tally = Tally("local, 5% syscall faults incl. torn reads and ENOSPC")
    kinds = (*TRANSIENT_LOCAL_FAULTS, "torn_read", "enospc")
    with local_store_with_faults(str(tmp_path / "store"), rate=0.05, faults=kinds, seed=3) as (store, faults):
        run_workload(store, tally, expected, commits=scaled(40, 600), seed=3, gc_every=7)
        tally.faults = local_fault_counts(faults)
        faults.enabled = False
        assert store.branches(), "no commit at all succeeded"
        check_store_whole(store, expected)
        assert local_lock_files(store.objects.local_root) == []
    assert_outcomes(tally, min_commit_success=None)
    assert tally.faults.get("fault.torn_read") and tally.faults.get("fault.enospc")


@pytest.mark.slow
@pytest.mark.s3
def test_s3_harsh_faults_never_corrupt(s3_server, s3_url):
    """4% of the HTTP requests get a fault, flipped bytes in answers among them (corruption
    on the wire, length intact). Typed errors only, no wrong data, and every ref names a
    whole commit afterwards."""
    expected: dict[int, Any] = {}
    tally = Tally("s3, 4% HTTP faults incl. flipped bytes")
    with s3_store_behind_proxy(s3_server, s3_url, rate=0.04, faults=(*TRANSIENT_HTTP_FAULTS, "flip"), seed=4) as (store, proxy):
        proxy.add_rule(matches("GET", path_contains="/chunks/"), "flip", count=scaled(3, 30))  # some for sure
        run_workload(store, tally, expected, commits=scaled(5, 150), seed=4, gc_every=3)
        tally.faults = proxy_fault_counts(proxy)
        proxy.enabled = False
        assert store.branches(), "no commit at all succeeded"
        check_store_whole(store, expected)
    assert_outcomes(tally, min_commit_success=None)
    assert tally.faults.get("fault.flip")


# --------------------------------------------------------------------------------------------
# Focused faults


def test_local_short_reads_and_writes_are_transparent(tmp_path):
    """Every write and every read moves fewer bytes than asked (as POSIX allows): commits,
    checkouts and GC work and return bit-exact data."""
    expected: dict[int, Any] = {}
    tally = Tally("local, every read and write short")
    with local_store_with_faults(str(tmp_path / "store"), rate=1.0, faults=("short_write", "short_read"), seed=5) as (store, faults):
        run_workload(store, tally, expected, commits=8, seed=5, checkout_every=1, gc_every=4)
        tally.faults = local_fault_counts(faults)
    assert_outcomes(tally, min_commit_success=1.0)
    assert tally.checkouts_ok == tally.checkouts and tally.gcs_ok == tally.gcs
    assert tally.faults["fault.short_write"] > 50 and tally.faults["fault.short_read"] > 50


def test_local_full_disk(tmp_path):
    """A full disk (ENOSPC after a partial write): commit and GC fail with a StorageError
    whose errno is ENOSPC, the refs stay on the last whole commit, no temp or lock file is
    left behind, and once space is freed commits resume."""
    expected: dict[int, Any] = {}
    with local_store_with_faults(str(tmp_path / "store")) as (store, faults):
        for step in (1, 2):
            expected[step] = make_state(step)
            store.commit(expected[step], metadata={"step": step})
        before = (store.branches(), store.tags())
        faults.disk_full = True
        expected[3] = make_state(3)
        with pytest.raises(StorageError) as info:
            store.commit(expected[3], metadata={"step": 3})
        assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
        with pytest.raises(StorageError) as info:
            store.gc(KeepLast(1), grace_period_s=0)
        assert info.value.errno == errno.ENOSPC
        assert faults.stats["fault.enospc"] > 0
        faults.disk_full = False
        faults.enabled = False
        assert (store.branches(), store.tags()) == before
        root = store.objects.local_root
        assert [n for d, _, names in os.walk(root) for n in names if n.startswith(".tmp-")] + local_lock_files(root) == []
        faults.enabled = True
        expected[4] = make_state(4)
        store.commit(expected[4], metadata={"step": 4})
        faults.enabled = False
        check_store_whole(store, expected)
        assert [c.metadata["step"] for c in store.log("main")] == [4, 2, 1]


@pytest.mark.s3
def test_s3_outage_fails_typed_and_leaves_refs_whole(s3_server, s3_url):
    """Every request answered 503 (an outage longer than botocore's attempts, two here to
    keep the test short): commit, checkout and GC raise StorageError; once S3 is back the
    refs are where they were and the next commit works."""
    expected: dict[int, Any] = {}
    retries = {"retries": {"mode": "standard", "total_max_attempts": 2}}
    with s3_store_behind_proxy(s3_server, s3_url, config_kwargs=retries, seed=6) as (store, proxy):
        expected[1] = make_state(1)
        store.commit(expected[1], metadata={"step": 1})
        before = (store.branches(), store.tags())
        proxy.rate, proxy.faults = 1.0, ("503",)
        for operation in (
            lambda: store.commit(make_state(2), metadata={"step": 2}),
            lambda: store.checkout(before[0]["main"]),
            lambda: store.gc(KeepLast(1), grace_period_s=0),
        ):
            with pytest.raises(StorageError):
                operation()
        assert proxy.stats["fault.503"] >= 6
        proxy.rate = 0.0
        assert (store.branches(), store.tags()) == before
        expected[3] = make_state(3)
        store.commit(expected[3], metadata={"step": 3})
        proxy.enabled = False
        check_store_whole(store, expected)


def test_local_listing_is_complete_or_fails(tmp_path):
    """A directory that cannot be listed (EIO from the walk) fails ``list``: a listing is
    never silently partial (GC relies on listings of writers and objects)."""
    store = ckptstore.open(str(tmp_path / "store"), **STORE_SETTINGS)
    keys = [f"chunks/{i:02x}/{i:02x}{'0' * 30}" for i in range(64)]
    for key in keys:
        store.objects.put_if_absent(key, key.encode())
    store.close()
    objects = open_object_store(str(tmp_path / "store"))
    with LocalFaults(rate=0.05, faults=("eio",), seed=7) as faults:
        objects.io_attempts = 1  # no retries: each failure must surface
        listed = failed = 0
        for _ in range(40):
            try:
                found = objects.list("chunks/")
            except StorageError:
                failed += 1
                continue
            assert found == keys
            listed += 1
    assert failed and listed, (failed, listed, faults.stats)


# --------------------------------------------------------------------------------------------
# GC cut short by a fault, at any point (deletions included)


def gc_interrupted_rounds(
    store: ckptstore.Store, switch: Callable[[bool], None], tally: Tally, expected: dict[int, Any], *, rounds: int, commits: int = 3
) -> int:
    """Rounds of: ``commits`` commits (no faults), then a GC (KeepLast(2)) under faults that are
    not retried, then, with the faults off, the check that every ref and the history of
    ``main`` are whole; then a GC without faults finishes the job and fsck must be clean.
    Returns how many GCs failed after deleting something.

    A GC whose fault also made releasing its lease fail leaves the lease until it expires
    (``lease_ttl_s``, short here); the finishing GC waits for that, and ``tally.errors``
    counts it as ``lease left``."""
    cut_mid_deletion = 0
    for _ in range(rounds):
        for _ in range(commits):
            step = max(expected, default=0) + 1
            expected[step] = make_state(step)
            store.commit(expected[step], metadata={"step": step})
        before = set(store.objects.list(""))
        switch(True)
        tally.gcs += 1
        ok, _ = tally.attempt("gc", lambda: store.gc(KeepLast(2), grace_period_s=0, lease_ttl_s=0.5))
        switch(False)
        tally.gcs_ok += ok
        lease, _ = read_lease(store.objects)
        if lease is not None and lease.live:
            tally.errors["lease left"] += 1
            time.sleep(max(0.0, lease.ttl_s - lease.age_s) + 0.05)
        if not ok and before - set(store.objects.list("")):
            cut_mid_deletion += 1
        store.sync_catalog()
        for name, commit_id in {**store.branches(), **store.tags()}.items():
            commit = store.read_commit(commit_id)
            assert same(store.checkout(commit_id), expected[commit.metadata["step"]]), name
        for commit in store.log("main"):
            assert same(store.checkout(commit.id), expected[commit.metadata["step"]])
        store.gc(KeepLast(2), grace_period_s=0)
        check_store_whole(store, expected)
    return cut_mid_deletion


@pytest.mark.slow
def test_local_gc_cut_short_by_faults(tmp_path):
    """GCs that fail at a random ``unlink`` or ``fsync`` (4% EIO, some after the unlink was
    done; no retries), so deletions are cut short too: every ref and the history of
    ``main`` stay whole, and the next GC finishes the job."""
    expected: dict[int, Any] = {}
    tally = Tally("local, GC cut short (4% EIO on unlink and fsync, no retries)")
    with local_store_with_faults(str(tmp_path / "store"), rate=0.04, faults=("eio", "eio_after"), calls=("unlink", "fsync"), seed=8) as (
        store,
        faults,
    ):
        faults.enabled = False

        def switch(on: bool) -> None:
            faults.enabled = on
            store.objects.io_attempts = 1 if on else LocalObjectStore.io_attempts

        cut = gc_interrupted_rounds(store, switch, tally, expected, rounds=scaled(5, 60))
        tally.faults = local_fault_counts(faults)
    assert_outcomes(tally, min_commit_success=None)
    assert cut >= 1, f"no GC was cut short mid-deletion: the test proves nothing ({tally.figures()})"


@pytest.mark.slow
@pytest.mark.s3
def test_s3_gc_cut_short_by_faults(s3_server, s3_url):
    """GCs on S3 that fail at a random write or delete request (25% of them get a 500, a
    reset or a lost answer; no retries), deletions included: every ref and the history of
    ``main`` stay whole, and the next GC finishes the job."""
    expected: dict[int, Any] = {}
    tally = Tally("s3, GC cut short (25% HTTP faults on PUT, POST, DELETE; no botocore retries)")
    retries = {"retries": {"mode": "standard", "total_max_attempts": 1}}

    def writes(request: Any) -> bool:
        return request.method in ("PUT", "POST", "DELETE")

    with s3_store_behind_proxy(s3_server, s3_url, config_kwargs=retries, rate=0.25, faults=("500", "reset", "lost"), where=writes, seed=9) as (store, proxy):
        proxy.enabled = False

        def switch(on: bool) -> None:
            proxy.enabled = on

        rounds = 0  # at least the count, and on until a GC failed (the faults are random)
        while rounds < scaled(2, 15) or (tally.gcs_ok == tally.gcs and rounds < scaled(10, 30)):
            gc_interrupted_rounds(store, switch, tally, expected, rounds=1, commits=2)
            rounds += 1
        tally.faults = proxy_fault_counts(proxy)
    assert_outcomes(tally, min_commit_success=None)
    assert tally.gcs_ok < tally.gcs, "no GC failed: the test proves nothing"


def test_local_gc_does_not_collect_past_a_commit_it_cannot_read(tmp_path):
    """Reads of one commit object end early (a torn read: IntegrityError, the catalog being
    rebuilt so that the object is read). A GC that keeps everything a branch reaches must not
    take that commit's ancestors for garbage: it keeps them, or refuses to run."""
    expected = {step: make_state(step) for step in range(1, 5)}
    store = ckptstore.open(str(tmp_path / "store"), **STORE_SETTINGS)
    commits = [store.commit(expected[step], metadata={"step": step}) for step in expected]
    store.close()
    shutil.rmtree(tmp_path / "store" / ".catalog")
    unreadable = commit_key(commits[2].id).split("/")[-1]
    with LocalFaults(rate=1.0, faults=("torn_read",), where=lambda path: path.endswith(unreadable)) as faults:
        store = ckptstore.open(str(tmp_path / "store"), **STORE_SETTINGS)
        with contextlib.suppress(CkptStoreError):
            store.gc(None, grace_period_s=0)
        assert faults.stats["fault.torn_read"] > 0
    store.close()
    store = ckptstore.open(str(tmp_path / "store"), **STORE_SETTINGS)
    for commit in commits:
        assert same(store.checkout(commit.id), expected[commit.metadata["step"]]), f"commit {commit.id[:12]} was collected"
    store.close()
