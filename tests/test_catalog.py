"""The catalog is a cache: concurrent first opens, a busy, full or read-only catalog never
fail a command, and only a catalog SQLite calls corrupt is moved aside.

* Six processes open one new store at the same moment (a round per store), then each
  commits and reads the log: all succeed, on the file catalog, nothing is moved aside and
  the history holds all six commits. 12 rounds; ``CKPTSTORE_SOAK=1`` runs 200. The race
  is won or lost in the moment a new file is switched to WAL mode (a write transaction in
  rollback mode, with an fsync), so how often a round hits it depends on the machine; the
  next test sets up that moment on purpose.
* A new catalog file another process holds in a write transaction, still in rollback
  mode (where ``PRAGMA journal_mode=WAL`` answers "database is locked" at once, without
  SQLite's busy timeout), is waited for, not moved aside.
* On a real full filesystem (a tmpfs mounted in a private mount namespace) ``open``,
  ``log``, ``du``, ``checkout``, a planned ``gc`` and ``ckpt log`` work with 0 bytes free
  and leave the healthy catalog file as it is; a ``gc`` run once a little space is freed
  frees the space, and the file catalog is used again afterwards. A write that fails
  mid-session with "database or disk is full" (four threads at once) goes on in memory.
* On a read-only filesystem (the same tmpfs, remounted read-only) a store with and without
  a catalog opens and reads; a catalog directory the user may not write (``chmod 0o555``,
  which root ignores: root runs it in a user namespace, as nobody) likewise.

The filesystem tests are skipped, with the reason, where ``unshare`` cannot mount a tmpfs.
Child processes are this file run as a script, with the ckptstore the test imported.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from soak import SOAK

import ckptstore
from ckptstore.catalog import Catalog

ROUNDS = 200 if SOAK else 12
RANKS = 6
CATALOG = Path(".catalog") / "catalog.sqlite"


def _child_env() -> dict[str, str]:
    """The environment for a child: it imports the ckptstore this test imported."""
    source = str(Path(ckptstore.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}


def _moved_aside(root: Path) -> list[str]:
    directory = root / CATALOG.parent
    return sorted(p.name for p in directory.iterdir() if ".corrupt-" in p.name) if directory.is_dir() else []


# --------------------------------------------------------------------------------------------
# Concurrent first opens


@pytest.mark.slow
def test_six_processes_opening_one_new_store_at_once_all_succeed(tmp_path: Path) -> None:
    errors = [(tmp_path / f"rank-{rank}.err").open("w") for rank in range(RANKS)]
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, "rank", str(rank)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors[rank],
            text=True,
            env=_child_env(),
        )
        for rank in range(RANKS)
    ]
    try:
        for proc in ranks:
            assert proc.stdout.readline() == "ready\n", (tmp_path / f"rank-{ranks.index(proc)}.err").read_text()
        for round_ in range(ROUNDS):
            root = tmp_path / f"store-{round_}"
            for proc in ranks:  # each rank waits on this line: they all start within microseconds
                proc.stdin.write(f"{root}\n")
                proc.stdin.flush()
            results = [json.loads(proc.stdout.readline() or '{"error": "the rank died"}') for proc in ranks]
            where = f"round {round_}"
            assert [r.get("error") for r in results] == [None] * RANKS, where
            for rank, result in enumerate(results):
                assert f"rank {rank}" in result["log"], (where, rank, result)
                assert result["in_memory"] is False, (where, rank, "gave up on the file catalog")
            assert _moved_aside(root) == [], where
            with ckptstore.open(str(root), create=False) as store:
                assert sorted(c.message for c in store.log()) == sorted(f"rank {rank}" for rank in range(RANKS)), where
                assert {r["commit"] for r in results} <= store.catalog.commit_ids()
    finally:
        for proc in ranks:
            proc.stdin.close()
        for proc in ranks:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for stream in errors:
            stream.close()
    warnings = [line for rank in range(RANKS) for line in (tmp_path / f"rank-{rank}.err").read_text().splitlines() if "catalog" in line]
    assert warnings == []


def _rank(rank: int) -> None:
    """Open, commit to and read the log of each store named on stdin, one line per store."""
    import torch

    print("ready", flush=True)
    for line in sys.stdin:
        try:
            with ckptstore.open(line.strip()) as store:
                commit = store.commit({"rank": torch.tensor([rank])}, message=f"rank {rank}")
                result = {
                    "commit": commit.id,
                    "log": [c.message for c in store.log()],
                    "in_memory": getattr(store.catalog, "in_memory", False),
                }
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)


def test_a_catalog_locked_by_another_process_is_waited_for_not_moved_aside(tmp_path: Path) -> None:
    """Another process holds a write transaction on a new catalog file, still in rollback
    mode: ``PRAGMA journal_mode=WAL`` answers "database is locked" at once."""
    path = tmp_path / CATALOG
    path.parent.mkdir()
    holder = subprocess.Popen([sys.executable, __file__, "hold", str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    outcome: list[Catalog | BaseException] = []

    def open_catalog() -> None:
        try:
            outcome.append(Catalog(str(path)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    opener = threading.Thread(target=open_catalog)
    try:
        assert holder.stdout.readline() == "locked\n"
        opener.start()
        opener.join(timeout=1.0)
        waited_while_held = opener.is_alive()
        moved_while_held = _moved_aside(tmp_path)
    finally:
        holder.communicate("release\n", timeout=120)
        opener.join(timeout=120)
    assert moved_while_held == [] and _moved_aside(tmp_path) == []
    assert holder.returncode == 0  # its file was not moved away under it
    assert waited_while_held, outcome
    [catalog] = outcome
    assert isinstance(catalog, Catalog) and not catalog.in_memory, catalog
    assert catalog.db.execute("SELECT x FROM held").fetchall() == [(1,)]  # the holder's file, and row
    assert catalog.commit_ids() == set()
    catalog.close()


def _hold(path: str) -> None:
    """Create ``path`` and hold a write transaction on it until a line comes on stdin."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE held (x)")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO held VALUES (1)")
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("COMMIT")
    conn.close()


def test_a_corrupt_catalog_is_still_moved_aside_and_rebuilt(tmp_path: Path) -> None:
    import torch

    root = tmp_path / "store"
    with ckptstore.open(str(root)) as store:
        commit = store.commit({"w": torch.ones(3)}, message="one")
    (root / CATALOG).write_bytes(b"not a database at all, " * 1000)
    with ckptstore.open(str(root)) as store:
        assert [c.id for c in store.log()] == [commit.id]
    assert len(_moved_aside(root)) == 1
    rebuilt = sqlite3.connect(root / CATALOG)
    assert rebuilt.execute("SELECT id FROM commits").fetchall() == [(commit.id,)]
    rebuilt.close()


# --------------------------------------------------------------------------------------------
# A full or read-only filesystem


def _in_small_filesystem(tmp_path: Path, mode: str, *, size_bytes: int) -> subprocess.CompletedProcess:
    """Run this file as ``mode`` with a fresh tmpfs of ``size_bytes`` mounted at a directory
    (its one argument) in a private mount namespace; skip where none can be mounted."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed: no small filesystem can be mounted")
    namespace = [unshare, "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    script = 'mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@"'
    probe = subprocess.run([*namespace, "sh", "-c", script, "sh", "64k", str(mount_point), "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()}")
    command = [*namespace, "sh", "-c", script, "sh", str(size_bytes), str(mount_point), sys.executable, __file__, mode, str(mount_point)]
    proc = subprocess.run(command, capture_output=True, text=True, env=_child_env(), timeout=600)
    assert proc.returncode == 0, f"{mode} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_a_full_disk_fails_no_command_and_moves_no_catalog_aside(tmp_path: Path) -> None:
    proc = _in_small_filesystem(tmp_path, "full-disk", size_bytes=4 << 20)
    assert proc.stderr.count("cannot be used") == 1, proc.stderr  # warned once, for two opens


def test_a_catalog_write_that_finds_the_disk_full_goes_on_in_memory(tmp_path: Path) -> None:
    _in_small_filesystem(tmp_path, "full-mid-session", size_bytes=1 << 20)


def test_a_read_only_filesystem_fails_no_command(tmp_path: Path) -> None:
    _in_small_filesystem(tmp_path, "read-only", size_bytes=4 << 20)


def test_a_catalog_directory_the_user_may_not_write_fails_no_command(tmp_path: Path) -> None:
    """Run as a user without root's powers over files: root (which writes into a 0o555
    directory) runs it in a user namespace of its own, where it is nobody."""
    command = [sys.executable, __file__, "unwritable-directory", str(tmp_path)]
    if os.geteuid() == 0:
        unshare = shutil.which("unshare")
        probe = subprocess.run([unshare, "--user", "true"], capture_output=True, text=True) if unshare else None
        if probe is None or probe.returncode != 0:
            pytest.skip(f"running as root, and no user namespace to drop root's powers in: {probe and probe.stderr.strip()}")
        command = [unshare, "--user", *command]
    proc = subprocess.run(command, capture_output=True, text=True, env=_child_env(), timeout=600)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert proc.stderr.count("cannot be used") == 2, proc.stderr  # one catalog each


# -- what runs inside the small filesystem ------------------------------------------------------


def _fill(directory: str) -> str:
    """Fill the filesystem of ``directory`` to the last byte; the filler file's path."""
    filler = os.path.join(directory, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, bytes(size))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


def _free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _full_disk(directory: str) -> None:
    import torch

    root = Path(directory) / "store"
    kept = {"w": torch.arange(1000, dtype=torch.float32)}
    with ckptstore.open(str(root)) as store:
        store.commit({"noise": torch.randn(1 << 16)}, message="dropped", branch="scratch")  # 256 KiB
        store.delete_branch("scratch", force=True)
        store.commit(kept, message="kept")  # and ``latest``
    before = _digest(root / CATALOG)
    filler = _fill(directory)

    # 0 bytes free: every command that needs no new object works.
    with ckptstore.open(str(root), create=False) as store:
        assert [c.message for c in store.log()] == ["kept"]
        assert torch.equal(store.checkout("main")["w"], kept["w"])
        assert store.du().branches[0].name == "main"
        plan = store.gc(dry_run=True, grace_period_s=0)
        assert [store.read_commit(c).message for c in plan.removed_commits] == ["dropped"]
        assert store.catalog.in_memory
    cli = subprocess.run([sys.executable, "-m", "ckptstore", "--store", str(root), "log", "--oneline"], capture_output=True, text=True)
    assert cli.returncode == 0 and "kept" in cli.stdout, cli.stderr
    assert _moved_aside(root) == []
    assert _digest(root / CATALOG) == before  # the healthy file, untouched

    # Still 0 bytes free: gc takes its lease in the room the store kept aside, and frees space.
    with ckptstore.open(str(root), create=False) as store:
        assert _free_bytes(directory) == 0
        done = store.gc(grace_period_s=0)
        assert done.executed and done.freed_bytes > 200_000, done
        assert _free_bytes(directory) > 200_000
        assert [c.message for c in store.log()] == ["kept"]
        assert (root / ".reserve").exists()  # kept aside again for the next time
    assert _moved_aside(root) == []

    os.unlink(filler)
    with ckptstore.open(str(root), create=False) as store:
        assert not store.catalog.in_memory  # the file again, and it is current
        assert [c.message for c in store.log()] == ["kept"]
        assert len(store.catalog.commit_ids()) == 1
    assert _moved_aside(root) == []


def _full_mid_session(directory: str) -> None:
    path = os.path.join(directory, "catalog.sqlite")

    def row(i: int, size: int) -> dict:
        return {
            "id": f"{i:032x}",
            "manifest": "m",
            "message": f"commit {i}",
            "created_at": float(i),
            "branch": "main",
            "step": i,
            "logical_bytes": 0,
            "new_bytes": 0,
            "object": os.urandom(size),
        }

    catalog = Catalog(path)
    for i in range(5):
        catalog.add_commit(row(i, 100), [f"{i - 1:032x}"] if i else [], {"loss": 1.0 / (i + 1)})
    catalog.set_ref("heads", "main", f"{4:032x}")
    filler = _fill(directory)

    failures: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            catalog.add_commit(row(i, 64 << 10), [f"{i - 1:032x}"], {"loss": 0.0})  # more than the log holds
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(5, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert catalog.in_memory
    assert catalog.commit_ids() == {f"{i:032x}" for i in range(9)}  # what the file held, and the new rows
    assert catalog.refs("heads") == {"main": f"{4:032x}"}
    assert catalog.children(f"{6:032x}") == [f"{7:032x}"]
    catalog.set_ref("heads", "main", f"{8:032x}")
    catalog.close()
    assert not [name for name in os.listdir(directory) if ".corrupt-" in name]

    os.unlink(filler)
    reopened = Catalog(path)
    assert not reopened.in_memory
    assert reopened.commit_ids() == {f"{i:032x}" for i in range(5)}  # as the file was: healthy
    assert reopened.refs("heads") == {"main": f"{4:032x}"}
    reopened.close()


def _read_only(directory: str) -> None:
    import torch

    commits = {}
    for name, keep_catalog in (("with-catalog", True), ("without-catalog", False)):
        root = Path(directory) / name
        with ckptstore.open(str(root)) as store:
            commits[name] = store.commit({"w": torch.ones(3)}, message=name).id
        if not keep_catalog:
            shutil.rmtree(root / CATALOG.parent)
    subprocess.run(["mount", "-o", "remount,ro", directory], check=True)
    for name, commit_id in commits.items():
        root = Path(directory) / name
        with ckptstore.open(str(root), create=False) as store:
            assert store.catalog.in_memory
            assert [c.id for c in store.log()] == [commit_id]
            assert torch.equal(store.checkout()["w"], torch.ones(3))
            assert store.resolve(commit_id[:8]) == commit_id
            assert store.fsck().ok
        if (root / CATALOG.parent).exists():
            assert _moved_aside(root) == []


def _unwritable_directory(directory: str) -> None:
    import torch

    assert os.geteuid() != 0
    for name, keep_catalog in (("with-catalog", True), ("without-catalog", False)):
        root = Path(directory) / name
        with ckptstore.open(str(root)) as store:
            commit = store.commit({"w": torch.ones(3)}, message=name)
        if not keep_catalog:
            for path in (root / CATALOG.parent).iterdir():
                path.unlink()
        (root / CATALOG.parent).chmod(0o555)
        assert not os.access(root / CATALOG.parent, os.W_OK)
        try:
            with ckptstore.open(str(root)) as store:
                assert store.catalog.in_memory
                assert [c.id for c in store.log()] == [commit.id]
                assert torch.equal(store.checkout()["w"], torch.ones(3))
            assert _moved_aside(root) == []
        finally:
            (root / CATALOG.parent).chmod(0o755)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    mode, *args = sys.argv[1:]
    if mode == "rank":
        _rank(int(args[0]))
    elif mode == "hold":
        _hold(args[0])
    else:
        scenarios = {
            "full-disk": _full_disk,
            "full-mid-session": _full_mid_session,
            "read-only": _read_only,
            "unwritable-directory": _unwritable_directory,
        }
        scenarios[mode](args[0])
