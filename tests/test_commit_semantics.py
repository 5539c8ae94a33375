"""What a commit promises: a reported commit is stored (asynchronous ones too, however the
process ends), commits on a branch land in call order, ``latest`` moves to the commit just
made, a commit is refused before anything is written if it could not be read back, and a tag
that cannot move after the commit point does not turn a landed commit into an error.

Issue 16 items 2, 8 and 9 (first sentence); issue 17 items 1 and 8. The process-exit cases
run real child processes (tests/commit_child.py) on local stores.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
import torch

import ckptstore
from ckptstore.commit import MAX_COMMIT_BYTES
from ckptstore.errors import UnsupportedValue
from tests.commit_child import CHUNK_SIZE_BYTES, big_state, small_state

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(TESTS_DIR, "commit_child.py")
CHILD_TIMEOUT_S = 180


def _child_env(tmp: str) -> dict[str, str]:
    """The test's own tree first on the path, so a child imports the ckptstore under test."""
    root = os.path.dirname(TESTS_DIR)
    return {
        **os.environ,
        "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "CKPTSTORE_CACHE_DIR": os.path.join(tmp, "cache"),
    }


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def _files(root: str) -> dict[str, int]:
    """Every file under a local store (the catalog, a cache, aside) with its size."""
    out = {}
    for directory, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not (directory == root and d == ".catalog")]
        for name in names:
            path = os.path.join(directory, name)
            out[os.path.relpath(path, root)] = os.path.getsize(path)
    return out


# -- issue 16 item 2: an asynchronous commit pending at process exit ------------------------

#: How each child ends → the exit status ckptstore/background.py documents for it.
EXIT_STATUS = {
    "end": 0,
    "raise": 1,
    "exit": 0,
    "sigterm": 143,
    "checkpointer": 0,
    "fail-unseen": 1,
    "fail-seen": 0,
}


@pytest.fixture(scope="module")
def exited_children(tmp_path_factory):
    """Every exit case, in children forked from one process that imported torch and
    ckptstore (seconds) once: how → (store directory, return code, stdout, stderr)."""
    tmp = str(tmp_path_factory.mktemp("exit"))
    forker = subprocess.run(
        [sys.executable, CHILD, "exit", tmp, *EXIT_STATUS],
        env=_child_env(tmp), capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
    )  # fmt: skip
    assert forker.returncode == 0, forker.stderr
    codes = json.loads(forker.stdout.splitlines()[-1])
    out = {}
    for how in EXIT_STATUS:
        with open(os.path.join(tmp, f"{how}.out")) as stdout, open(os.path.join(tmp, f"{how}.err")) as stderr:
            out[how] = os.path.join(tmp, how), codes[how], stdout.read(), stderr.read()
    return out


@pytest.mark.parametrize("how", ["end", "raise", "exit", "sigterm"])
def test_async_commit_pending_at_exit_is_stored(exited_children, how):
    """The script ends (a), raises (b), calls ``sys.exit(0)`` (c) or gets SIGTERM (d) while
    its asynchronous commit is still being written: the commit lands, bit-exact, and the
    exit status is the documented one (0, 1, 0, 143)."""
    root, returncode, stdout, stderr = exited_children[how]
    assert "pending" in stdout, f"the commit finished before the script ended, so this case tests nothing\n{stderr}"
    assert returncode == EXIT_STATUS[how], stderr
    assert "asynchronous commit" not in stderr, stderr  # nothing failed
    assert how != "raise" or "RuntimeError: the training loop crashed" in stderr, stderr
    store = ckptstore.open(root, create=False)
    [commit] = store.log("main")
    assert commit.message == how and store.tags()["latest"] == commit.id
    _assert_same_tensors(store.checkout("main"), big_state(1))
    assert store.fsck().ok


def test_checkpointer_async_save_at_exit_is_stored(exited_children):
    """``Checkpointer.save(..., blocking=False)`` and the script ends: the checkpoint is kept
    (the store's exit hook finishes it; the Checkpointer itself has no close())."""
    root, returncode, stdout, stderr = exited_children["checkpointer"]
    assert "pending" in stdout, stderr
    assert returncode == 0, stderr
    store = ckptstore.open(root, create=False)
    [commit] = store.log("main")
    assert commit.metadata == {"step": 7}
    saved = store.checkout("main")
    assert saved["step"] == 7
    _assert_same_tensors(saved["model"], {k.replace(".", "_"): v for k, v in big_state(1).items()})


def test_async_commit_failing_unseen_makes_exit_status_1_and_says_why(exited_children):
    """(e) The commit fails in the worker (every chunk write: ``chunks`` is a regular file),
    nobody looks at its future: the process exits with status 1 and stderr names the failure."""
    root, returncode, stdout, stderr = exited_children["fail-unseen"]
    assert returncode == 1, stderr
    assert "could not write object chunks/" in stderr and "Not a directory" in stderr, stderr
    assert ckptstore.open(root, create=False).branches() == {}  # nothing was published


def test_async_commit_failure_that_was_looked_at_exits_0(exited_children):
    """(f) The script called ``future.exception()`` and got the error: that is handled, so
    the exit status stays 0."""
    root, returncode, stdout, stderr = exited_children["fail-seen"]
    assert "seen: StorageError(" in stdout and "chunks/" in stdout, stdout + stderr
    assert returncode == 0, stderr


# -- issue 16 item 8: call order, and metadata copied at call time --------------------------


def test_blocking_commit_after_an_async_one_lands_after_it(tmp_path):
    """An asynchronous commit of a large state, then at once a blocking one of a small state:
    the blocking one is the branch head and ``latest``, its parent is the asynchronous one,
    and the branch checks out to the small state."""
    store = ckptstore.open(str(tmp_path / "store"), chunk_size_bytes=CHUNK_SIZE_BYTES)
    future = store.commit(big_state(3), message="step 1", blocking=False)
    c2 = store.commit(small_state(4), message="step 2")
    waited = future.done()
    c1 = future.result(timeout=CHILD_TIMEOUT_S)
    assert store.branches()["main"] == c2.id and store.tags()["latest"] == c2.id
    assert c2.parents == (c1.id,)
    assert [c.id for c in store.log("main")] == [c2.id, c1.id]
    assert waited  # the blocking commit waited for the asynchronous one
    reopened = ckptstore.open(str(tmp_path / "store"), create=False)
    assert reopened.resolve("main") == c2.id and reopened.resolve("latest") == c2.id
    got = reopened.checkout("main")
    assert got["step"] == 4 and torch.equal(got["w"], small_state(4)["w"])
    _assert_same_tensors(reopened.checkout(c1.id), big_state(3))


def test_nested_metadata_changed_after_an_async_call_is_not_recorded(tmp_path):
    """The commit records the metadata as it was when the call was made, nested values too."""
    store = ckptstore.open(str(tmp_path / "store"), chunk_size_bytes=CHUNK_SIZE_BYTES)
    metadata = {"config": {"lr": 1, "layers": [1, 2]}}
    future = store.commit(big_state(5), metadata=metadata, blocking=False)
    metadata["config"]["lr"] = 2
    metadata["config"]["layers"].append(3)
    commit = future.result(timeout=CHILD_TIMEOUT_S)
    assert commit.metadata == {"config": {"lr": 1, "layers": [1, 2]}}
    reopened = ckptstore.open(str(tmp_path / "store"), create=False)
    assert reopened.commit_of("main").metadata == {"config": {"lr": 1, "layers": [1, 2]}}


# -- issue 17 item 1: one commit size limit for writers and readers -------------------------

TOO_LARGE = {  # the commit options that exceed the limit, made when a test needs them
    "metadata": lambda: {"metadata": {"notes": "x" * 9_000_000}},
    "message": lambda: {"message": "m" * 9_000_000},
    "metrics": lambda: {"metrics": {f"train/loss_{i:06d}": float(i) for i in range(400_000)}},
}


@pytest.mark.parametrize("what", list(TOO_LARGE))
def test_commit_over_the_size_limit_is_refused_before_anything_is_written(tmp_path, what):
    root = str(tmp_path / "store")
    store = ckptstore.open(root)
    first = store.commit(small_state(1), message="before")
    before = _files(root)
    with pytest.raises(UnsupportedValue, match="bytes"):
        store.commit(small_state(6), **TOO_LARGE[what]())  # a new state: anything written would show
    assert _files(root) == before
    reopened = ckptstore.open(root, create=False)
    assert reopened.branches() == {"main": first.id} and reopened.resolve("latest") == first.id


def test_largest_commit_accepted_reads_back_after_the_catalog_is_rebuilt(tmp_path):
    """The largest metadata a commit accepts (found by bisection; at most 9 MiB tried) makes
    a commit that ``log``, ``main~N`` and ``fsck`` read from the objects alone."""
    root = str(tmp_path / "store")
    store = ckptstore.open(root)
    store.commit(small_state(1), message="before")

    def accepted(size: int) -> bool:
        try:
            store.publisher(metadata={"notes": "x" * size}, message="largest")  # checks the options; writes nothing
        except UnsupportedValue:
            return False
        return True

    low, high = 0, 9 << 20  # low is accepted; the largest accepted size is in [low, high]
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if accepted(middle) else (low, middle)
    size = high if accepted(high) else low
    assert size > MAX_COMMIT_BYTES - (64 << 10)  # the limit is not needlessly strict
    commit = store.commit(small_state(7), metadata={"notes": "x" * size}, message="largest")
    store.close()
    shutil.rmtree(os.path.join(root, ".catalog"))
    reopened = ckptstore.open(root, create=False)
    assert [c.message for c in reopened.log("main")] == ["largest", "before"]
    assert reopened.resolve("main~0") == commit.id and reopened.commit_of("main~1").message == "before"
    assert reopened.commit_of("main").metadata == {"notes": "x" * size}
    assert reopened.fsck().ok


# -- issue 17 item 8: latest moves to the commit just made ----------------------------------


#: How far ahead the clock of the child that commits on branch "a" runs.
SKEWS_S = {"a-day-ahead": 86400.0, "30s-ahead": 30.0}


@pytest.fixture(scope="module")
def skewed_commits(tmp_path_factory):
    """A store per skew with a first commit on "main", then a commit on "a" of each by one
    child whose clock runs that far ahead for that store: name → (store directory, the real
    time before the child started, what the child said: a commit id or an error)."""
    tmp = str(tmp_path_factory.mktemp("skew"))
    roots = {name: os.path.join(tmp, name) for name in SKEWS_S}
    for root in roots.values():
        ckptstore.open(root).commit(small_state(1), message="first")
    before = datetime.now(timezone.utc)
    child = subprocess.run(
        [sys.executable, CHILD, "skewed", "a", *(str(x) for name in SKEWS_S for x in (SKEWS_S[name], roots[name]))],
        env=_child_env(tmp), capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    said = dict(line.split(" ", 1) for line in child.stdout.splitlines())
    return {name: (root, before, said[root]) for name, root in roots.items()}


@pytest.mark.parametrize("name", list(SKEWS_S))
def test_latest_follows_the_commit_just_made_whatever_the_clocks(skewed_commits, name):
    """A process whose clock runs ahead commits on branch "a"; then this process commits on
    "b": ``latest`` is the "b" commit.

    The child's clock is set ahead by replacing ``time.time`` and ``datetime.datetime.now``
    before ckptstore is imported (``datetime.now`` does not go through ``time.time``); the
    storage stamps files with its own clock, which is unaffected. A commit does not compare
    the clocks unless a collector is sweeping (ckptstore/lease.py: only ``storage_now``
    raises ``ClockSkew``, and commits call it only while waiting for a sweeping collector), so
    today the day-ahead child commits with a ``created_at`` a day ahead, which froze
    ``latest`` at ef55ec3. Should commits one day refuse such a clock with ``ClockSkew``, the
    day-ahead case still checks that ``latest`` follows this process's commit; the 30 s case
    (within the 60 s lease ttl, so never refused) must commit, and alone shows the freeze."""
    root, before, said = skewed_commits[name]
    skew_s = SKEWS_S[name]
    store = ckptstore.open(root, create=False)
    if said.startswith("ClockSkew:") and skew_s > 60:
        assert "a" not in store.branches()
    else:
        ahead = store.commit_of("a")
        assert ahead.id == said and store.resolve("latest") == ahead.id
        assert ahead.created_at >= before + timedelta(seconds=skew_s)  # the child's clock was ahead
    mine = store.commit(small_state(3), message="just made", branch="b")
    assert store.resolve("latest") == mine.id
    assert ckptstore.open(root, create=False).resolve("latest") == mine.id
    again = store.commit(small_state(4), message="and again", branch="main")
    assert store.resolve("latest") == again.id


# -- issue 16 item 9: a tag that cannot move after the commit point -------------------------

HOLD_LOCK = """
import fcntl, os, socket, sys, time
lock = sys.argv[1]
fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()} {socket.gethostname()} {time.time()}\\n".encode())
os.fsync(fd)
print("locked", flush=True)
sys.stdin.read()  # held until the test closes our stdin
os.unlink(lock)
"""


def test_commit_returns_when_latest_is_locked_by_another_process(tmp_path, caplog):
    """Another process holds the lock file of ``refs/tags/latest`` (created O_EXCL and
    flock-ed, as LocalObjectStore does) for longer than the commit's retries take: the
    commit has landed, so it returns the Commit; the branch moved, ``latest`` stays where
    it was with a warning, and there is exactly one new commit."""
    root = str(tmp_path / "store")
    store = ckptstore.open(root)
    first = store.commit(small_state(1), message="first")
    lock = os.path.join(root, "refs", "tags", ".latest.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, lock], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with open(lock, "rb") as f:  # really held: nobody else may flock it
            with pytest.raises(BlockingIOError):
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        store._writer.max_ref_retries = 4  # (Store(max_ref_retries=...) on open) the retries end while the lock is still held
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="ckptstore"):
            commit = store.commit(small_state(8), message="second")
        assert time.monotonic() - started < 30
        assert isinstance(commit, ckptstore.Commit)
        assert holder.poll() is None  # the lock was held throughout
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert commit.parents == (first.id,)
    reopened = ckptstore.open(root, create=False)
    assert reopened.branches() == {"main": commit.id}
    assert reopened.resolve("latest") == first.id
    assert [c.id for c in reopened.log("main")] == [commit.id, first.id]
    assert any("latest" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), caplog.text
