"""The object store contract (see ``ckptstore.backends``), run against every backend,
plus local-only tests of temp files, lock files and crash safety."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ckptstore.backends import ObjectStore, open_object_store
from ckptstore.backends.local import LocalObjectStore
from ckptstore.errors import ObjectNotFound, PreconditionFailed, StorageError

REPO_ROOT = Path(__file__).resolve().parents[1]
N_THREADS = 8


@pytest.fixture
def store(store_url) -> ObjectStore:
    url, storage_options = store_url
    return open_object_store(url, storage_options=storage_options)


@pytest.fixture
def local_store(tmp_path) -> LocalObjectStore:
    store = open_object_store(str(tmp_path / "store"))
    assert isinstance(store, LocalObjectStore)
    return store


def run_in_threads(fn, n: int = N_THREADS) -> list:
    """Call ``fn(i)`` for i in range(n), all threads released at once; return the results
    (an exception instance where a call raised)."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 - collected for the caller to check
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def hidden_files(root: str) -> list[str]:
    """Every file or directory under ``root`` whose name starts with '.'."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if n.startswith(".")]
    return found


def lock_path(store: LocalObjectStore, key: str) -> str:
    """The lock file ``LocalObjectStore._locked`` takes for ``key``: ``.<name>.lock`` beside
    the object."""
    *dirs, name = key.split("/")
    return os.path.join(store.root, *dirs, f".{name}.lock")


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------------------------
# Create-only writes and reads


def test_put_if_absent_creates_once_and_never_overwrites(store):
    assert store.put_if_absent("obj", b"first") is True
    assert store.put_if_absent("obj", b"second") is False
    assert store.get("obj") == b"first"
    assert store.size("obj") == 5


@pytest.mark.parametrize("data", [memoryview(b"view bytes"), bytearray(b"array bytes")], ids=lambda d: type(d).__name__)
def test_put_if_absent_accepts_bytes_like(store, data):
    assert store.put_if_absent("obj", data) is True
    assert store.get("obj") == bytes(data)


def test_put_if_absent_accepts_non_byte_memoryview(store):
    data = memoryview(bytearray(range(16))).cast("I")  # 4 items of 4 bytes
    assert store.put_if_absent("obj", data) is True
    assert store.get("obj") == bytes(range(16))


def test_put_if_absent_accepts_a_sequence_of_buffers(store):
    parts = [b"head-", bytearray(b"body-"), memoryview(b"tail")]
    assert store.put_if_absent("obj", parts) is True
    assert store.get("obj") == b"head-body-tail"
    assert store.put_if_absent("obj", [b"other"]) is False
    assert store.put_if_absent("none", []) is True
    assert store.get("none") == b""


def test_empty_object(store):
    assert store.put_if_absent("empty", b"") is True
    assert store.exists("empty")
    assert store.get("empty") == b""
    assert store.size("empty") == 0
    assert store.list("") == ["empty"]


def test_reads(store):
    data = bytes(range(256)) * 4
    store.put_if_absent("dir/sub/obj", data)
    assert store.exists("dir/sub/obj")
    assert not store.exists("dir/sub/other")
    assert store.get("dir/sub/obj") == data
    assert store.size("dir/sub/obj") == len(data)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (0, 10, b"0123456789"),
        (2, 5, b"234"),
        (7, 100, b"789"),  # end past the end
        (10, 20, b""),  # starts at the end
        (15, 20, b""),  # starts past the end
        (4, 4, b""),  # empty range
        (6, 3, b""),  # reversed range
    ],
)
def test_get_range(store, start, end, expected):
    store.put_if_absent("obj", b"0123456789")
    assert store.get_range("obj", start, end) == expected


@pytest.mark.parametrize("key", ["dir", "dir/obj/below"], ids=["prefix", "below_object"])
def test_prefixes_and_paths_below_objects_are_not_objects(store, key):
    store.put_if_absent("dir/obj", b"data")
    assert not store.exists(key)
    for read in (store.get, store.size, lambda k: store.get_range(k, 0, 2)):
        with pytest.raises(ObjectNotFound):
            read(key)
    store.delete(key)
    assert store.get("dir/obj") == b"data"


@pytest.mark.parametrize(
    "read",
    [
        lambda s, k: s.get(k),
        lambda s, k: s.get_range(k, 0, 10),
        lambda s, k: s.get_range(k, 3, 3),
        lambda s, k: s.size(k),
        lambda s, k: s.get_versioned(k),
    ],
    ids=["get", "get_range", "get_range_empty", "size", "get_versioned"],
)
def test_missing_object_raises_object_not_found(store, read):
    store.put_if_absent("other", b"x")
    with pytest.raises(ObjectNotFound) as info:
        read(store, "missing/obj")
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, StorageError)
    assert info.value.key == "missing/obj"
    assert not store.exists("missing/obj")


def test_delete_is_idempotent(store):
    store.put_if_absent("a/obj", b"x")
    store.put_if_absent("a/keep", b"y")
    store.delete("a/obj")
    assert not store.exists("a/obj")
    with pytest.raises(ObjectNotFound):
        store.get("a/obj")
    store.delete("a/obj")
    store.delete("never/existed")
    assert store.list("") == ["a/keep"]
    assert store.put_if_absent("a/obj", b"again") is True
    assert store.get("a/obj") == b"again"


# --------------------------------------------------------------------------------------------
# Listing


def test_list(store):
    keys = ["b/2", "a/x", "a/sub/deep/z", "ab/y", "a/sub/w", "top", "b/1"]
    for key in keys:
        store.put_if_absent(key, key.encode())
    assert store.list("") == sorted(keys)
    assert store.list() == sorted(keys)
    assert store.list("a") == ["a/sub/deep/z", "a/sub/w", "a/x"]
    assert store.list("a/") == ["a/sub/deep/z", "a/sub/w", "a/x"]
    assert store.list("a/sub") == ["a/sub/deep/z", "a/sub/w"]
    assert store.list("ab") == ["ab/y"]
    assert store.list("b") == ["b/1", "b/2"]
    assert store.list("missing") == []
    assert store.list("a/missing") == []
    assert store.list("a/x") == []  # an object is not a prefix of itself


def test_list_of_empty_store(store):
    assert store.list("") == []


def test_stores_with_overlapping_names_are_separate(store_url):
    url, options = store_url
    first = open_object_store(url, storage_options=options)
    second = open_object_store(url + "2", storage_options=options)
    first.put_if_absent("obj", b"1")
    assert second.list("") == []
    assert not second.exists("obj")
    assert second.put_if_absent("obj", b"2") is True
    assert first.get("obj") == b"1"


# --------------------------------------------------------------------------------------------
# Compare-and-swap


def test_put_if_version_create_and_update(store):
    v1 = store.put_if_version("refs/main", b"one", version=None)
    assert store.get_versioned("refs/main") == (b"one", v1)

    with pytest.raises(PreconditionFailed):
        store.put_if_version("refs/main", b"other", version=None)
    assert store.get_versioned("refs/main") == (b"one", v1)

    v2 = store.put_if_version("refs/main", b"two", version=v1)
    assert v2 != v1
    assert store.get_versioned("refs/main") == (b"two", v2)
    assert store.get("refs/main") == b"two"

    with pytest.raises(PreconditionFailed):
        store.put_if_version("refs/main", b"stale", version=v1)
    assert store.get_versioned("refs/main") == (b"two", v2)


def test_put_if_version_of_missing_object_with_a_version_fails(store):
    v1 = store.put_if_version("refs/main", b"one", version=None)
    with pytest.raises(PreconditionFailed):
        store.put_if_version("refs/other", b"x", version=v1)
    assert not store.exists("refs/other")


def test_delete_if_version(store):
    v1 = store.put_if_version("refs/main", b"one", version=None)
    v2 = store.put_if_version("refs/main", b"two", version=v1)

    with pytest.raises(PreconditionFailed):
        store.delete_if_version("refs/main", version=v1)
    assert store.get_versioned("refs/main") == (b"two", v2)

    store.delete_if_version("refs/main", version=v2)
    assert not store.exists("refs/main")
    assert store.list("refs") == []

    with pytest.raises(PreconditionFailed):
        store.delete_if_version("refs/main", version=v2)
    assert store.put_if_version("refs/main", b"three", version=None)


def test_concurrent_put_if_version_has_one_winner(store):
    v0 = store.put_if_version("refs/main", b"base", version=None)

    results = run_in_threads(lambda i: store.put_if_version("refs/main", f"thread {i}".encode(), version=v0))

    winners = [i for i, r in enumerate(results) if isinstance(r, str)]
    assert len(winners) == 1, results
    assert all(isinstance(r, PreconditionFailed) for r in results if not isinstance(r, str))
    (winner,) = winners
    assert store.get_versioned("refs/main") == (f"thread {winner}".encode(), results[winner])


def test_concurrent_put_if_absent_has_one_winner(store):
    results = run_in_threads(lambda i: store.put_if_absent("obj", f"thread {i}".encode() * 1000))

    assert results.count(True) == 1 and results.count(False) == N_THREADS - 1, results
    winner = results.index(True)
    assert store.get("obj") == f"thread {winner}".encode() * 1000


# --------------------------------------------------------------------------------------------
# Keys and URLs


INVALID_KEYS = ["../x", "/abs", "a//b", "a/../b", "", "a\x00b", ".hidden", "a/", "a/./b", "a b"]


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_key_raises_value_error(store, key):
    calls = {
        "put_if_absent": lambda: store.put_if_absent(key, b"x"),
        "get": lambda: store.get(key),
        "get_range": lambda: store.get_range(key, 0, 1),
        "exists": lambda: store.exists(key),
        "size": lambda: store.size(key),
        "delete": lambda: store.delete(key),
        "get_versioned": lambda: store.get_versioned(key),
        "put_if_version": lambda: store.put_if_version(key, b"x", version=None),
        "delete_if_version": lambda: store.delete_if_version(key, version="v"),
    }
    for name, call in calls.items():
        try:
            call()
        except ValueError:
            continue
        pytest.fail(f"{name}({key!r}) did not raise ValueError")
    assert store.list("") == []


@pytest.mark.parametrize("prefix", ["..", "../x", "/abs", "a//b", "a/../b", ".hidden"])
def test_invalid_list_prefix_raises_value_error(store, prefix):
    with pytest.raises(ValueError):
        store.list(prefix)


def test_valid_key_alphabet(store):
    key = "A-z_0.9/sub.dir/obj-1_2.bin"
    assert store.put_if_absent(key, b"x") is True
    assert store.list("") == [key]


@pytest.mark.parametrize("url", ["gs://bucket/x", "ftp://host/x", "s3://", "s3:///", "s3a://"])
def test_open_object_store_rejects_bad_urls(url):
    with pytest.raises(ValueError):
        open_object_store(url)


def test_open_object_store_local_forms(tmp_path):
    plain = open_object_store(str(tmp_path / "a"))
    file_url = open_object_store(f"file://{tmp_path / 'a'}")
    assert isinstance(plain, LocalObjectStore) and isinstance(file_url, LocalObjectStore)
    assert plain.local_root == file_url.local_root == str(tmp_path / "a")
    plain.put_if_absent("obj", b"x")
    assert file_url.get("obj") == b"x"
    with pytest.raises(ValueError):
        open_object_store(str(tmp_path / "b"), storage_options={"key": "x"})


# --------------------------------------------------------------------------------------------
# Local backend: temp files and lock files


def test_local_leaves_no_temp_or_lock_files(local_store):
    local_store.put_if_absent("a/b/obj", b"x")
    local_store.put_if_absent("a/b/obj", b"y")
    v1 = local_store.put_if_version("refs/main", b"1", version=None)
    with pytest.raises(PreconditionFailed):
        local_store.put_if_version("refs/main", b"2", version="stale")
    with pytest.raises(PreconditionFailed):
        local_store.delete_if_version("refs/main", version="stale")
    v2 = local_store.put_if_version("refs/main", b"2", version=v1)
    local_store.put_if_version("refs/other", b"1", version=None)
    local_store.delete_if_version("refs/other", version=local_store.get_versioned("refs/other")[1])
    run_in_threads(lambda i: local_store.put_if_version("refs/main", b"%d" % i, version=v2))
    run_in_threads(lambda i: local_store.put_if_absent("race", b"%d" % i))

    assert hidden_files(local_store.root) == []
    assert local_store.list("") == ["a/b/obj", "race", "refs/main"]


def test_local_list_skips_hidden_files(local_store):
    local_store.put_if_absent("dir/obj", b"x")
    for name in ["dir/.tmp-0123abcd", "dir/.obj.lock", ".tmp-xyz", ".hidden/obj"]:
        path = Path(local_store.root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"junk")
    assert local_store.list("") == ["dir/obj"]
    assert local_store.list("dir") == ["dir/obj"]


def test_local_breaks_lock_of_dead_process(local_store):
    v1 = local_store.put_if_version("refs/main", b"1", version=None)
    lock = lock_path(local_store, "refs/main")
    Path(lock).write_text(f"{dead_pid()} {socket.gethostname()} {time.time()}\n")

    v2 = local_store.put_if_version("refs/main", b"2", version=v1)

    assert local_store.get_versioned("refs/main") == (b"2", v2)
    assert not os.path.exists(lock)


def test_local_breaks_old_lock_of_unknown_holder(local_store):
    v1 = local_store.put_if_version("refs/main", b"1", version=None)
    lock = lock_path(local_store, "refs/main")
    Path(lock).write_text(f"{os.getpid()} some-other-host {time.time()}\n")
    old = time.time() - 2 * local_store.stale_lock_s
    os.utime(lock, (old, old))

    local_store.delete_if_version("refs/main", version=v1)

    assert not local_store.exists("refs/main")
    assert not os.path.exists(lock)


def test_local_respects_lock_of_live_process(local_store):
    v1 = local_store.put_if_version("refs/main", b"1", version=None)
    lock = lock_path(local_store, "refs/main")
    stamp = f"{os.getpid()} {socket.gethostname()} {time.time()}\n"
    Path(lock).write_text(stamp)

    with pytest.raises(PreconditionFailed):
        local_store.put_if_version("refs/main", b"2", version=v1)
    with pytest.raises(PreconditionFailed):
        local_store.delete_if_version("refs/main", version=v1)

    assert local_store.get_versioned("refs/main") == (b"1", v1)
    assert Path(lock).read_text() == stamp  # neither broken nor released by the losers


def test_local_never_breaks_a_flocked_lock_however_old(local_store):
    """A holder on another host, slow past ``stale_lock_s``, still holds its flock."""
    v1 = local_store.put_if_version("refs/main", b"1", version=None)
    lock = lock_path(local_store, "refs/main")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL)\n"
         "os.write(fd, b'1 some-other-host 0\\n')\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\n"
         "time.sleep(60)\n", lock],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        old = time.time() - 2 * local_store.stale_lock_s
        os.utime(lock, (old, old))
        with pytest.raises(PreconditionFailed):
            local_store.put_if_version("refs/main", b"2", version=v1)
        assert os.path.exists(lock)
    finally:
        holder.kill()
        holder.wait()
    # Its holder gone, the old lock is abandoned and broken.
    assert local_store.put_if_version("refs/main", b"2", version=v1)


# --------------------------------------------------------------------------------------------
# Local backend: SIGKILL during writes

CRASH_OBJECT_SIZE = 8 * 2**20

# Run as: python -c _CRASH_CHILD PACKAGE_DIR TESTS_DIR STORE_ROOT PREFIX
_CRASH_CHILD = """
import sys, types
package_dir, tests_dir, root, prefix = sys.argv[1:]
# Load ckptstore's modules without running ckptstore/__init__.py, which imports torch and
# would make every child take seconds to start.
package = types.ModuleType("ckptstore")
package.__path__ = [package_dir]
sys.modules["ckptstore"] = package
sys.path.insert(0, tests_dir)
from test_objectstore import crash_payload
from ckptstore.backends import open_object_store

store = open_object_store(root)
print("ready", flush=True)
i = 0
while True:
    key = f"{prefix}/obj-{i:05d}"
    store.put_if_absent(key, crash_payload(key))
    i += 1
"""


def crash_payload(key: str) -> bytes:
    """A CRASH_OBJECT_SIZE object whose every 32-byte block derives from ``key``, so a
    truncated, empty or mixed-up object is detected."""
    block = hashlib.sha256(key.encode()).digest()
    return block * (CRASH_OBJECT_SIZE // len(block))


def test_local_put_if_absent_survives_sigkill(local_store):
    rng = random.Random()
    written = 0
    for round_ in range(5):
        prefix = f"round{round_}"
        args = [REPO_ROOT / "ckptstore", Path(__file__).parent, local_store.root, prefix]
        child = subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, *map(str, args)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL

        keys = local_store.list(prefix)
        # The child writes keys in order: what it finished is a gap-free run from 0.
        assert keys == [f"{prefix}/obj-{i:05d}" for i in range(len(keys))]
        for key in keys:
            assert local_store.size(key) == CRASH_OBJECT_SIZE, key
            assert local_store.get(key) == crash_payload(key), key
        # The object being written at the kill was not created, and can be written now.
        interrupted = f"{prefix}/obj-{len(keys):05d}"
        assert not local_store.exists(interrupted)
        assert local_store.put_if_absent(interrupted, crash_payload(interrupted)) is True
        written += len(keys)

    assert written > 0, "the child never finished an object before it was killed"


def test_reader_reads_the_object_into_a_buffer(store):
    store.put_if_absent("a/obj", b"0123456789")
    buffer = bytearray(4)
    with store.reader("a/obj") as f:
        f.seek(3)
        assert f.readinto(buffer) == 4
        assert f.read() == b"789"
    assert buffer == b"3456"
    with pytest.raises(ObjectNotFound):
        store.reader("a/missing")


# -- list_info, delete_many, abandoned uploads (every backend) ------------------------------


def test_info_and_clock(store):
    """``info`` gives one object's size and modification time, stamped by the clock that
    ``clock_s`` reads (the storage's, not necessarily this process's)."""
    before = store.clock_s()
    store.put_if_absent("locks/writers/one", b"12345")
    info = store.info("locks/writers/one")
    after = store.clock_s()
    assert info.key == "locks/writers/one" and info.size_bytes == 5
    assert before - 2 <= info.modified_s <= after + 2  # S3 stamps to the second
    assert abs(after - time.time()) < 5
    with pytest.raises(ObjectNotFound):
        store.info("locks/writers/missing")
    with pytest.raises(ObjectNotFound):
        store.info("locks/writers")  # a prefix is no object


def test_list_info_and_delete_many(store):
    store.put_if_absent("chunks/aa/one", b"12345")
    store.put_if_absent("chunks/bb/two", b"1")
    store.put_if_absent("other", b"xyz")
    before = time.time()
    infos = store.list_info("chunks/")
    assert [(i.key, i.size_bytes) for i in infos] == [("chunks/aa/one", 5), ("chunks/bb/two", 1)]
    assert all(abs(i.modified_s - before) < 120 for i in infos)  # a real timestamp (server clock)
    store.delete_many(["chunks/aa/one", "chunks/bb/two", "chunks/cc/never"])  # idempotent
    assert store.list() == ["other"]


def test_remove_abandoned_uploads_spares_young_temp_files(local_store):
    directory = Path(local_store.root) / "chunks"
    directory.mkdir()
    old, young = directory / f".tmp-{'a' * 32}", directory / f".tmp-{'b' * 32}"
    old.write_bytes(b"x")
    young.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert local_store.remove_abandoned_uploads(older_than_s=3600, prefixes=["chunks/"]) == 1
    assert not old.exists() and young.exists()


def test_remove_abandoned_uploads_touches_only_the_stores_own_temp_files(local_store):
    """Temp files are removed under the given prefixes and at the top of the store, and only
    names the store makes: another store nested in the directory, and a user's files, are
    never touched (issue 17, item 11)."""
    root = Path(local_store.root)
    ours = [root / f".tmp-{'c' * 32}", root / "chunks" / "ab" / f".tmp-{'d' * 32}"]
    theirs = [
        root / "nested" / "chunks" / "ab" / f".tmp-{'e' * 32}",  # another store inside this one
        root / "notes" / f".tmp-{'f' * 32}",  # a user's directory
        root / "chunks" / ".tmp-draft",  # not a name the store makes
        root / ".tmp-mine",
    ]
    for path in ours + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    assert local_store.remove_abandoned_uploads(older_than_s=3600, prefixes=["chunks/", "manifests/"]) == 2
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


# -- S3 specifics: multipart, abandoned uploads, one layer of retries ----------------------


@pytest.mark.s3
def test_s3_multipart_write_is_create_only(s3_url):
    from ckptstore.backends.s3 import S3ObjectStore

    url, options = s3_url
    store = S3ObjectStore(url[len("s3://") :], options, part_size_bytes=5 << 20)
    data = os.urandom(11 << 20)  # above two parts: a multipart upload, completed If-None-Match
    assert store.put_if_absent("chunks/big", data) is True
    assert store.put_if_absent("chunks/big", os.urandom(11 << 20)) is False
    assert store.get("chunks/big") == data and store.size("chunks/big") == len(data)


@pytest.mark.s3
def test_s3_abandoned_multipart_uploads_are_aborted(s3_url):
    import boto3

    from ckptstore.backends.s3 import S3ObjectStore

    url, options = s3_url
    bucket, prefix = url[len("s3://") :].split("/", 1)
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id=options["key"], aws_secret_access_key=options["secret"], **options["client_kwargs"])
    client.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/chunks/aa/half-written")
    client.create_multipart_upload(Bucket=bucket, Key="elsewhere/not-ours")
    client.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/nested/chunks/aa/another-stores")
    store = S3ObjectStore(url[len("s3://") :], options)
    # (moto reports a fixed 2010 start time for every upload, so age cannot be tested here)
    assert store.remove_abandoned_uploads(older_than_s=1, prefixes=["chunks/", "manifests/"]) == 1
    left = sorted(u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))
    assert left == sorted(["elsewhere/not-ours", f"{prefix}/nested/chunks/aa/another-stores"])


@pytest.mark.s3
def test_s3_retries_are_botocores_alone(s3_url):
    from ckptstore.backends.s3 import S3ObjectStore

    url, options = s3_url
    store = S3ObjectStore(url[len("s3://") :], options)
    store.put_if_absent("x", b"1")
    assert store._fs.retries == 1  # s3fs's loop is off...
    retries = store._fs.s3._client_config.retries
    assert retries["mode"] == "standard" and retries["total_max_attempts"] == 5  # ...botocore's is on
    assert store._fs.s3._client_config.max_pool_connections >= 16
