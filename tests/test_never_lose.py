"""Where features meet: a delta next to GC, liveness across pid namespaces, clock skew, and an
S3 endpoint without conditional writes (issue 16, defects 1, 3, 4 and 6, and the bounded S3
timeouts of item 9). Each test drives the public API, with real processes where the defect
needs two."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from faults import S3FaultProxy, matches
from states import assert_same

import ckptstore
from ckptstore import KeepLast
from ckptstore.errors import ConditionalWritesUnsupported, IntegrityError, StorageError
from ckptstore.gc import collect, plan
from ckptstore.layout import LEASE_KEY, chunk_key
from ckptstore.lease import CollectorLease, writing
from ckptstore.pipeline import ChunkReader

SMALL = {"chunk_size_bytes": 4096, "inline_threshold_bytes": 256}


def fine_tuning(steps: int, *, seed: int = 0) -> list[dict]:
    """States of a fine-tuning run: bf16 weights of which a few values move each step, so
    every changed chunk is stored as a delta against the one before."""
    g = torch.Generator().manual_seed(seed)
    weights = {f"layer{i}": torch.randn(8192, generator=g).to(torch.bfloat16) for i in range(4)}
    out = []
    for _ in range(steps):
        weights = {k: v.clone() for k, v in weights.items()}
        for v in weights.values():
            index = torch.randint(0, v.numel(), (64,), generator=g)
            v[index] += torch.randn(64, generator=g).to(torch.bfloat16) * 0.01
        out.append({"model": weights})
    return out


def chains_of_every_chunk(store) -> dict[str, tuple[str, ...]]:
    reader = ChunkReader(store.objects)
    return {key.rsplit("/", 1)[-1]: reader.bases_of(key.rsplit("/", 1)[-1]) for key in store.objects.list("chunks/")}


def assert_no_delta_without_its_bases(store) -> None:
    """The invariant: an object that exists has every object it needs."""
    chains = chains_of_every_chunk(store)
    broken = {c: [b for b in chain if b not in chains] for c, chain in chains.items() if chain and any(b not in chains for b in chain)}
    assert not broken, f"{len(broken)} delta chunks outlive their bases: {sorted(broken)[:3]}"


# -- Defect 1: delta chunks outlive their bases ------------------------------------------------


def test_gc_deletes_every_delta_before_its_bases_in_every_batch(tmp_path):
    """Deletions are ordered dependents first and no batch mixes chain lengths, so a
    collection that fails after any batch leaves no delta without its bases."""
    root = str(tmp_path / "store")
    store = ckptstore.open(root, delta="on", delta_keyframe_interval=8, **SMALL)
    for state in fine_tuning(6):
        store.commit(state)
    store.commit({"model": {"other": torch.zeros(4096)}})  # the head needs none of them
    result, _ = plan(store, KeepLast(1), grace_period_s=0)
    chains = chains_of_every_chunk(store)
    position = {info.key: i for i, info in enumerate(result.deletions)}
    deltas = [c for c in chains if chains[c] and chunk_key(c) in position]
    assert len(deltas) >= 20, "the run stored too few deltas to mean anything"
    for chunk_id in deltas:
        for base in chains[chunk_id]:
            assert position[chunk_key(chunk_id)] < position.get(chunk_key(base), len(position)), (chunk_id, base)

    deleted = []
    real_delete_many = store.objects.delete_many

    def fail_halfway(keys):  # the collection dies after half the chunk batches
        keys = list(keys)
        if any(k.startswith("chunks/") for k in keys) and len(deleted) >= len(deltas) // 2:
            raise StorageError("the collector died here")
        deleted.extend(keys)
        real_delete_many(keys)

    store.objects.delete_many = fail_halfway
    with pytest.raises(StorageError):
        collect(store, KeepLast(1), grace_period_s=0, batch_size=1)
    store.objects.delete_many = real_delete_many
    assert any(k.startswith("chunks/") for k in deleted)
    assert_no_delta_without_its_bases(store)


def test_a_young_delta_keeps_its_old_bases(tmp_path):
    """Nothing younger than the grace period is deleted, and what stays keeps its chain: a
    young delta whose base is old keeps the base."""
    root = tmp_path / "store"
    store = ckptstore.open(str(root), delta="on", **SMALL)
    states = fine_tuning(3)
    head = store.commit(states[0]).id
    old = time.time() - 7200
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))
    with writing(store.objects):  # a commit killed after writing its chunks: young deltas
        manifest, sources = ckptstore.manifest.encode_state(states[1], inline_threshold_bytes=256)
        written = store.write_chunks(manifest, sources, parent=head)
    assert written.delta_chunks > 0
    store.delete_branch("main", force=True)  # nothing keeps the old commit or its chunks...
    store.commit({"model": {"other": torch.zeros(4096)}}, branch="side")
    store.gc(KeepLast(1), grace_period_s=3600)  # ...but the deltas are young, so their bases stay
    assert_no_delta_without_its_bases(store)
    again = ckptstore.open(str(root), delta="on", **SMALL)  # a new process: no cached bases
    assert_same(states[1], again.checkout(again.commit(states[1], branch="rollback").id))


def test_a_delta_whose_base_is_gone_is_never_reused(tmp_path):
    """A delta left without its base (by a collector of an older version, killed mid-way) is
    not reused by a commit of the same bytes: the chunk is stored whole again, in place."""
    root = str(tmp_path / "store")
    store = ckptstore.open(root, delta="on", **SMALL)
    states = fine_tuning(2)
    first = store.commit(states[0])
    second = store.commit(states[1])
    chains = chains_of_every_chunk(store)
    deltas = [c for c, chain in chains.items() if chain]
    assert deltas
    bases = {chains[c][0] for c in deltas}
    store.objects.delete_many(chunk_key(b) for b in bases)  # what a key-ordered, killed GC left
    with pytest.raises(IntegrityError):
        store.checkout(second.id)
    again = ckptstore.open(root, delta="on", **SMALL)
    rollback = again.commit(states[1], branch="rollback")  # the same bytes as the broken commit
    assert_same(states[1], again.checkout(rollback.id))
    assert_same(states[1], ckptstore.open(root).checkout(second.id))  # healed in place, same ids
    assert_no_delta_without_its_bases(again)
    problems = again.fsck(read_data=True).problems
    assert problems and {p.commit for p in problems} == {first.id}  # it did lose its chunks


# -- Defect 3: liveness across pid namespaces ---------------------------------------------------


def _unshare_prefix() -> list[str]:
    """``unshare`` into a new pid namespace (same hostname: a sidecar container), or skip."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        pytest.skip("needs Linux and unshare(1) for a real pid namespace")
    probe = subprocess.run(["unshare", "-p", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a pid namespace here (unshare -p: {probe.stderr.decode().strip()})")
    return ["unshare", "-p", "--fork", "--mount-proc"]


def _in_namespace(code: str, *args: str) -> list[str]:
    """A command running ``code`` in a new pid namespace, as a process whose pid (999991
    there) names no process outside it."""
    script = 'echo 999990 > /proc/sys/kernel/ns_last_pid 2>/dev/null; "$@"'  # a fork: the next pid
    return [*_unshare_prefix(), "sh", "-c", script, "sh", sys.executable, "-c", textwrap.dedent(code), *args]


def _env() -> dict[str, str]:
    tests = str(Path(__file__).parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}


def test_a_collector_in_another_pid_namespace_waits_for_a_live_writer(tmp_path):
    """A collector in a sidecar container (another pid namespace, same hostname) cannot see
    the writer's pid; it must judge the writer by its heartbeat, not as dead."""
    root = str(tmp_path / "store")
    store = ckptstore.open(root, **SMALL)
    states = fine_tuning(2, seed=3)
    store.commit(states[0])
    store.commit({"model": {"other": torch.zeros(4096)}})  # the head: old's chunks are unneeded
    collector = _in_namespace(
        """
        import sys, time, ckptstore
        from ckptstore import KeepLast
        store = ckptstore.open(sys.argv[1])
        print("collecting", flush=True)
        started = time.monotonic()
        plan = store.gc(KeepLast(1), grace_period_s=0)
        print(round(time.monotonic() - started, 2), len(plan.removed_commits), flush=True)
        """,
        root,
    )
    with writing(store.objects) as marker:
        manifest, sources = ckptstore.manifest.encode_state(states[0], inline_threshold_bytes=256)
        written = store.write_chunks(manifest, sources)  # reuses every chunk of `old`
        assert written.new_chunks == 0
        child = subprocess.Popen(collector, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        assert child.stdout.readline().strip() == "collecting", child.communicate()
        time.sleep(3.0)  # the collector has planned and is waiting for this writer
        assert child.poll() is None, f"the collector did not wait for the live writer: {child.communicate()}"
        assert all(store.objects.exists(chunk_key(c.id)) for b in manifest.blobs for c in b.chunks)
        commit = store.publisher(branch="again")(manifest, written, fence=marker.check)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    waited_s, removed = out.split()
    assert float(waited_s) >= 2.5 and int(removed) >= 1
    assert_same(states[0], store.checkout(commit.id))
    assert store.fsck(read_data=True).ok


def test_a_writer_waits_for_a_sweeping_collector_in_another_pid_namespace(tmp_path):
    """The other way round: a live collector's sweeping lease, held in another pid
    namespace, is honoured by a writer that cannot see its pid."""
    root = str(tmp_path / "store")
    ckptstore.open(root)
    holder = subprocess.Popen(
        _in_namespace(
            """
            import sys, time
            from ckptstore.backends import open_object_store
            from ckptstore.lease import CollectorLease
            lease = CollectorLease(open_object_store(sys.argv[1]))
            lease.acquire()
            lease.renew(sweeping=True)
            print("sweeping", flush=True)
            time.sleep(3)
            lease.release()
            """,
            root,
        ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "sweeping", holder.communicate()
    store = ckptstore.open(root)
    started = time.monotonic()
    with writing(store.objects):
        waited_s = time.monotonic() - started
        assert not store.objects.exists(LEASE_KEY), "a writer went ahead while a live collector swept"
    holder.communicate(timeout=60)
    assert waited_s >= 2.0


# -- Defect 4: clock skew ----------------------------------------------------------------------


def _skewed(code: str, skew_s: float) -> list[str]:
    """A child process whose wall clock is ``skew_s`` off the storage's (its ``time.time``
    shifted before anything else runs: a machine with a wrong clock)."""
    prelude = f"import time\n_real = time.time\ntime.time = lambda: _real() + {skew_s!r}\n"
    return [sys.executable, "-c", prelude + textwrap.dedent(code)]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def shared_store(request, tmp_path):
    """``(url, storage_options)`` of a store two processes share."""
    if request.param == "local":
        return str(tmp_path / "store"), {}
    return request.getfixturevalue("s3_url")


def _child_env(options: dict) -> dict[str, str]:
    env = _env()
    if options:
        env["CKPT_TEST_OPTIONS"] = json.dumps(options)
    return env


OPEN = "import json, os, sys, ckptstore\nstore = ckptstore.open(sys.argv[1], storage_options=json.loads(os.environ.get('CKPT_TEST_OPTIONS', 'null')))\n"


def test_a_writer_with_a_fast_clock_never_enters_while_a_collector_sweeps(shared_store):
    """A writer whose clock is ahead of the collector's by more than the lease's ttl must
    not take the sweeping lease for expired: it waits, or refuses to run (ClockSkew)."""
    url, options = shared_store
    store = ckptstore.open(url, storage_options=options or None)
    lease = CollectorLease(store.objects)
    lease.acquire()
    lease.renew(sweeping=True)
    try:
        code = OPEN + "from ckptstore.lease import writing\nprint('ready', flush=True)\nwith writing(store.objects):\n    print('entered', flush=True)\n"
        child = subprocess.Popen([*_skewed(code, 900), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(options))
        assert child.stdout.readline().strip() == "ready", child.communicate()
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
        reader.start()
        reader.join(4.0)  # the writer reads the sweeping lease meanwhile
        assert "entered\n" not in lines, "a writer with a fast clock went ahead while the collector swept"
    finally:
        lease.release()
    child.wait(timeout=60)
    reader.join(10)
    err = child.stderr.read()
    assert (child.returncode == 0 and "entered\n" in lines) or "ClockSkew" in err, (lines, err)


def test_a_collector_with_a_fast_clock_is_refused_and_deletes_nothing(shared_store):
    """A collector whose clock is an hour and more ahead would take a live writer's marker
    for abandoned (and young objects for old): it refuses to run instead."""
    url, options = shared_store
    store = ckptstore.open(url, storage_options=options or None, **SMALL)
    states = fine_tuning(2, seed=5)
    for state in states:
        store.commit(state)
    before = set(store.objects.list(""))
    with writing(store.objects):
        child = subprocess.run(
            [*_skewed(OPEN + "from ckptstore import KeepLast\nstore.gc(KeepLast(1), grace_period_s=0)\n", 4000), url],
            capture_output=True, text=True, env=_child_env(options), timeout=120,
        )  # fmt: skip
        assert child.returncode != 0 and "ClockSkew" in child.stderr, (child.stdout, child.stderr[-2000:])
        assert before <= set(store.objects.list("")), "a collector with a skewed clock deleted objects"
    assert_same(states[-1], store.checkout("main"))


def test_skew_within_the_ttl_is_harmless(tmp_path):
    """A collector whose clock is 20 s ahead (less than the leases' ttl) collects normally,
    and waits for a live writer as any collector does."""
    root = str(tmp_path / "store")
    store = ckptstore.open(root, **SMALL)
    for state in fine_tuning(3, seed=7):
        store.commit(state)
    with writing(store.objects):
        child = subprocess.Popen(
            [*_skewed(OPEN + "from ckptstore import KeepLast\nprint(len(store.gc(KeepLast(1), grace_period_s=0).removed_commits))\n", 20), root],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        )  # fmt: skip
        time.sleep(3.0)
        assert child.poll() is None, "the collector did not wait for the live writer"
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0 and out.strip() == "2", err
    assert store.fsck(read_data=True).ok


# -- Defect 6: an S3 endpoint that ignores conditional writes -----------------------------------


@pytest.mark.s3
def test_an_endpoint_without_conditional_writes_is_refused(s3_url, s3_server, tmp_path, monkeypatch):
    url, options = s3_url
    monkeypatch.setenv("CKPTSTORE_CACHE_DIR", str(tmp_path / "cache"))
    with S3FaultProxy(s3_server, drop_headers=("if-none-match", "if-match")) as proxy:
        with pytest.raises(ConditionalWritesUnsupported) as info:
            ckptstore.open(url, storage_options=proxy.storage_options(options))
        assert proxy.url in info.value.endpoint and proxy.url in str(info.value)
        assert isinstance(info.value, StorageError)
        # A single writer may opt in, knowingly; it then works as before.
        store = ckptstore.open(url, storage_options=proxy.storage_options(options), single_writer=True)
        state = fine_tuning(1)[0]
        assert_same(state, store.checkout(store.commit(state).id))
        assert not [k for k in store.objects.list("locks/") if "probe" in k]


@pytest.mark.s3
def test_the_conditional_write_check_is_made_once_per_endpoint(s3_url, s3_server, tmp_path, monkeypatch):
    url, options = s3_url
    monkeypatch.setenv("CKPTSTORE_CACHE_DIR", str(tmp_path / "cache"))
    from ckptstore import config as config_module

    monkeypatch.setattr(config_module, "_CONDITIONAL_WRITES_OK", set())
    with S3FaultProxy(s3_server) as proxy:
        probes = proxy.add_rule(matches("PUT", path_contains="/locks/probe-"), "none", count=1000)
        ckptstore.open(url, storage_options=proxy.storage_options(options))
        assert len(probes.hits) == 3  # create, create again (refused), update with a wrong ETag
        config_module._CONDITIONAL_WRITES_OK.clear()  # a new process: the cache directory remembers
        ckptstore.open(url, storage_options=proxy.storage_options(options))
        assert len(probes.hits) == 3


# -- Item 9: a stalled S3 endpoint ------------------------------------------------------------


@pytest.mark.s3
def test_a_stalled_s3_endpoint_fails_a_commit_in_bounded_time(s3_url, s3_server):
    """Every request attempt is bounded (connect and read timeouts), so a hung endpoint
    fails a commit with a StorageError instead of holding it for ten minutes."""
    url, options = s3_url
    store = ckptstore.open(url, storage_options=options)
    assert store.objects._fs.config_kwargs["read_timeout"] == store.objects.read_timeout_s <= 30
    assert store.objects._fs.config_kwargs["connect_timeout"] == store.objects.connect_timeout_s <= 10
    with S3FaultProxy(s3_server) as proxy:
        quick = {**proxy.storage_options(options), "config_kwargs": {"read_timeout": 1, "connect_timeout": 1}}
        slow = ckptstore.open(url, storage_options=quick)
        proxy.add_rule(matches("PUT", path_contains="/chunks/"), "stall", count=1000)
        started = time.monotonic()
        with pytest.raises(StorageError):
            slow.commit({"w": torch.randn(100_000)})
        assert time.monotonic() - started < 60
    assert "main" not in store.branches()
