"""The local backend: objects as files under a directory, written atomically and durably,
compare-and-swap under lock files (see :class:`LocalObjectStore`)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import functools
import io
import os
import re
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from .._host import fsync_directory, pid_alive
from ..errors import PreconditionFailed, StorageError
from ..ids import content_id
from . import _KEY_RE, Data, ObjectInfo, ObjectStore, T, _check_prefix, _joined, _parts, _translated, check_key

#: The local backend's temp files (``_write_temp``): the only hidden files it ever removes.
_TEMP_NAME_RE = re.compile(r"\.tmp-[0-9a-f]{32}")


def _open_for_read(path: str) -> io.BufferedReader:
    """Open the object file at ``path``. A directory (a prefix of other keys) or a path below
    a file is no object: both raise ``FileNotFoundError``."""
    try:
        return open(path, "rb")
    except (IsADirectoryError, NotADirectoryError) as exc:
        raise FileNotFoundError(path) from exc


#: Errnos a retry may cure: a network or FUSE file system timing out or losing a handle, an
#: interrupted or would-block call. Not ENOSPC, EACCES, EROFS: they last.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.EINTR})


#: Lock files this process held and failed to remove, as (device, inode, stamp): nobody holds
#: them, so this process may break them at once (the stamp tells a new lock on a reused inode).
_ABANDONED_LOCKS: set[tuple[int, int, bytes]] = set()


def _list_dir(path: str) -> list[tuple[str, bool | None]]:
    """``(name, descend)`` of each entry of a directory: ``descend`` for a directory, None
    for a symlink to one (neither descended into nor listed, as ``os.walk`` does)."""
    with os.scandir(path) as entries:
        return [(entry.name, None if entry.is_symlink() else True) if entry.is_dir() else (entry.name, False) for entry in entries]


class _LocalReader(io.RawIOBase):
    """A read-only raw file over one object of a :class:`LocalObjectStore`. A read or seek
    that fails with a transient errno is redone on a fresh file at the same offset (objects
    are immutable); every failure leaves as a :class:`StorageError`."""

    def __init__(self, store: LocalObjectStore, key: str, path: str) -> None:
        super().__init__()
        self._store = store
        self._key = key
        self._path = path
        self._pos = 0
        self._file: io.FileIO | None = None
        self._file = store._retrying(key, "read", lambda retry: self._open())

    def _open(self) -> io.FileIO:
        f = _open_for_read_raw(self._path)
        f.seek(self._pos)
        return f

    def _call(self, fn: Callable[[io.FileIO], T]) -> T:
        def attempt(retry: bool) -> T:
            file = self._file
            if retry or file is None:
                if file is not None:
                    with contextlib.suppress(OSError):
                        file.close()
                    self._file = None
                self._file = file = self._open()
            return fn(file)

        return self._store._retrying(self._key, "read", attempt)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        if self._file is None:
            raise ValueError("I/O operation on closed file")
        return self._file.fileno()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = self._call(lambda f: f.seek(offset, whence) if whence != io.SEEK_CUR else f.seek(self._pos + offset))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = self._call(lambda f: f.readinto(buffer)) or 0
        self._pos += n
        return n

    def readall(self) -> bytes:
        data = self._call(lambda f: f.readall())
        self._pos += len(data)
        return data

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        super().close()


def _open_for_read_raw(path: str) -> io.FileIO:
    """:func:`_open_for_read`, unbuffered."""
    try:
        return open(path, "rb", buffering=0)
    except (IsADirectoryError, NotADirectoryError) as exc:
        raise FileNotFoundError(path) from exc


class LocalObjectStore(ObjectStore):
    """Objects as files under a directory.

    Writes go to a temp file in the destination directory, are fsync'd, then linked into
    place (create-only) or renamed over the old file under a lock (compare-and-swap); the
    directory is fsync'd after. Temp and lock files start with ``.`` and are never listed.
    An operation that fails with a transient errno (:data:`TRANSIENT_ERRNOS`) is redone
    whole, up to ``io_attempts`` times, with backoff.
    """

    #: A lock nobody holds a flock on, older than this, is abandoned even if its holder's
    #: liveness cannot be checked (another host).
    stale_lock_s = 30.0
    #: Attempts at an operation whose system calls fail with a transient errno.
    io_attempts = 5
    #: The wait before the second attempt; it doubles for each one after.
    retry_delay_s = 0.005

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = self.root
        self.local_root = self.root
        self._known_dirs: set[str] = set()
        self._host = socket.gethostname()
        with _translated(self.url, "", "create the store directory of"):
            self._ensure_dir(self.root)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def _retrying(self, key: str, action: str, attempt: Callable[[bool], T]) -> T:
        """``attempt(retry)`` with backend errors translated, redone while it fails with a
        transient errno; ``retry`` says whether an earlier attempt ran (and may have been
        applied before it failed)."""
        for n in range(self.io_attempts):
            try:
                with _translated(self.url, key, action):
                    return attempt(n > 0)
            except StorageError as exc:
                if exc.errno not in TRANSIENT_ERRNOS or n + 1 == self.io_attempts:
                    raise
            time.sleep(self.retry_delay_s * 2**n)
        raise AssertionError("unreachable")

    @staticmethod
    def _holds(path: str, data: Data) -> bool:
        """Whether the file at ``path`` holds exactly ``data``."""
        try:
            with _open_for_read(path) as f:
                return f.read() == _joined(data)
        except FileNotFoundError:
            return False

    def _ensure_dir(self, path: str) -> None:
        if path in self._known_dirs:
            return
        if not os.path.isdir(path):
            parent = os.path.dirname(path)
            if parent != path:
                self._ensure_dir(parent)
            with contextlib.suppress(FileExistsError):
                os.mkdir(path)
            fsync_directory(parent)
        self._known_dirs.add(path)

    def _write_temp(self, directory: str, data: Data) -> str:
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for view in _parts(data):
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def put_if_absent(self, key: str, data: Data) -> bool:
        """Create-only: write a temp file, fsync, ``link`` into place, fsync the directory.
        Idempotent. A retry that finds the object holding exactly ``data`` (its earlier
        attempt linked it, then failed) syncs the directory and returns True."""
        path = self._path(key)
        directory = os.path.dirname(path)

        def attempt(retry: bool) -> bool:
            if not os.path.exists(path):
                self._ensure_dir(directory)
                tmp = self._write_temp(directory, data)
                try:
                    os.link(tmp, path)
                    linked = True
                except FileExistsError:
                    linked = False
                finally:
                    with contextlib.suppress(OSError):  # litter at worst: remove_abandoned_uploads
                        os.unlink(tmp)
                if linked:
                    fsync_directory(directory)
                    return True
            if retry and self._holds(path, data):
                fsync_directory(directory)
                return True
            return False

        return self._retrying(key, "write", attempt)

    def get(self, key: str) -> bytes:
        path = self._path(key)

        def attempt(retry: bool) -> bytes:
            with _open_for_read(path) as f:
                return f.read()

        return self._retrying(key, "read", attempt)

    def reader(self, key: str) -> BinaryIO:
        """The file, read through a wrapper that redoes a read failing with a transient
        errno (reopening the file at the same offset: objects are immutable) and raises any
        other failure as a :class:`StorageError`."""
        raw = _LocalReader(self, key, self._path(key))
        return io.BufferedReader(raw)

    def will_read(self, key: str) -> None:
        """Ask the kernel to read the object's file into the page cache now (asynchronous
        readahead of exactly the file, ``POSIX_FADV_WILLNEED``), so that a reader finds it
        there. The page cache, not this process, holds what it reads; a file that cannot
        be opened is left to the read itself to report."""
        path = self._path(key)
        if not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        path = self._path(key)

        def attempt(retry: bool) -> bytes:
            with _open_for_read(path) as f:
                f.seek(start)
                return f.read(max(0, end - start))

        return self._retrying(key, "read", attempt)

    def exists(self, key: str) -> bool:
        """Whether the object exists; a failure to tell raises (it never reads as absent)."""
        path = self._path(key)

        def attempt(retry: bool) -> bool:
            try:
                return stat.S_ISREG(os.stat(path).st_mode)
            except (FileNotFoundError, NotADirectoryError):
                return False

        return self._retrying(key, "stat", attempt)

    def size(self, key: str) -> int:
        path = self._path(key)

        def attempt(retry: bool) -> int:
            with _open_for_read(path) as f:
                return os.fstat(f.fileno()).st_size

        return self._retrying(key, "stat", attempt)

    def delete(self, key: str) -> None:
        path = self._path(key)

        def attempt(retry: bool) -> None:
            try:
                os.unlink(path)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return  # no object there
            fsync_directory(os.path.dirname(path))

        self._retrying(key, "delete", attempt)

    def _walk(self, prefix: str, *, hidden: bool = False) -> Iterator[tuple[str, str]]:
        """``(key, path)`` of every file under ``prefix``; with ``hidden``, only the temp and
        lock files (names starting with ``.``) instead. Each directory listing is retried on
        its own (a listing of ``chunks/`` is hundreds of them); one that still fails fails the
        walk, which is never silently partial (GC relies on it to see every writer)."""
        prefix = _check_prefix(prefix)
        pending = [os.path.join(self.root, *prefix.split("/")) if prefix else self.root]
        while pending:
            dirpath = pending.pop()
            try:
                entries = self._retry_call(functools.partial(_list_dir, dirpath))
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone, or an object (a prefix is no directory)
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name, descend in entries:
                if descend is None:
                    continue
                if descend:
                    if not name.startswith("."):
                        pending.append(os.path.join(dirpath, name))
                elif hidden == name.startswith(".") and (hidden or _KEY_RE.fullmatch(name)):
                    yield (name if rel == "." else f"{rel}/{name}"), os.path.join(dirpath, name)

    def _retry_call(self, call: Callable[[], T]) -> T:
        """``call()``, one idempotent system call (or a few), redone while it fails with a
        transient errno."""
        for n in range(self.io_attempts):
            try:
                return call()
            except OSError as exc:
                if exc.errno not in TRANSIENT_ERRNOS or n + 1 == self.io_attempts:
                    raise
            time.sleep(self.retry_delay_s * 2**n)
        raise AssertionError("unreachable")

    def delete_many(self, keys: Iterable[str]) -> None:
        """Unlink every key, then fsync each directory once. Idempotent."""
        directories: set[str] = set()
        for key in keys:
            path = self._path(key)

            def attempt(retry: bool, path: str = path) -> None:
                try:
                    os.unlink(path)
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                    return
                directories.add(os.path.dirname(path))

            self._retrying(key, "delete", attempt)
        for directory in directories:

            def sync(retry: bool, directory: str = directory) -> None:
                fsync_directory(directory)

            self._retrying(directory, "sync", sync)

    def list(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        return self._retrying(prefix, "list", lambda retry: sorted(key for key, _ in self._walk(prefix)))

    def list_info(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        _check_prefix(prefix)

        def attempt(retry: bool) -> list[ObjectInfo]:
            out = []
            for key, path in self._walk(prefix):
                try:
                    st = self._retry_call(functools.partial(os.stat, path))
                except FileNotFoundError:
                    continue  # deleted while listing
                out.append(ObjectInfo(key, st.st_size, st.st_mtime))
            return sorted(out, key=lambda info: info.key)

        return self._retrying(prefix, "list", attempt)

    def info(self, key: str) -> ObjectInfo:
        path = self._path(key)

        def attempt(retry: bool) -> ObjectInfo:
            try:
                st = os.stat(path)
            except NotADirectoryError as exc:
                raise FileNotFoundError(path) from exc
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(path)
            return ObjectInfo(key, st.st_size, st.st_mtime)

        return self._retrying(key, "stat", attempt)

    def clock_s(self) -> float:
        """The time the file system stamps files with now (the kernel's, or a network file
        server's): the modification time of a probe file, created and removed at once. A
        store that cannot be written (a read-only mount) answers with this machine's clock."""
        probe = os.path.join(self.root, f".clock-{uuid.uuid4().hex}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            return time.time()
        try:
            return os.fstat(fd).st_mtime
        except OSError:  # the kernel's clock, then, which stamps a local disk's files anyway
            return time.time()
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)

    def writable(self) -> bool:
        """Whether this process may write the store's directory: not on a read-only mount
        (``ST_RDONLY``), and allowed by ``access(W_OK)``, which also answers ``EROFS`` for
        root. Writes nothing (the directory's mtime stays as it was). Where the filesystem
        only refuses at write time (a read-only network export), the write itself raises
        :class:`ReadOnlyStore`."""
        with contextlib.suppress(OSError):
            if os.statvfs(self.root).f_flag & os.ST_RDONLY:
                return False
        return os.access(self.root, os.W_OK)

    #: The room kept aside for a collection on a full disk: a hidden file, never listed.
    reserve_bytes = 1 << 20

    def reserve_space(self) -> None:
        path = os.path.join(self.root, ".reserve")
        try:
            if os.path.getsize(path) >= self.reserve_bytes:
                return
        except OSError:
            pass
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, self.reserve_bytes)
        except OSError:  # no room for it now (or no fallocate): none is kept
            with contextlib.suppress(OSError):
                os.unlink(path)
        finally:
            os.close(fd)

    def release_space(self) -> bool:
        try:
            os.unlink(os.path.join(self.root, ".reserve"))
        except OSError:
            return False
        return True

    def remove_abandoned_uploads(self, *, older_than_s: float, prefixes: Iterable[str]) -> int:
        """Remove this store's temp files (``.tmp-`` and 32 hex digits) older than
        ``older_than_s``, under ``prefixes`` and at the top of the store; lock files are the
        lock protocol's business, and other files (another store nested in this directory,
        a user's) are never touched."""
        cutoff = self.clock_s() - older_than_s
        prefixes = list(prefixes)

        def attempt(retry: bool) -> int:
            removed = 0
            top = [(name, os.path.join(self.root, name)) for name, descend in self._retry_call(lambda: _list_dir(self.root)) if descend is False]
            below = [found for prefix in prefixes for found in self._walk(prefix, hidden=True)]
            for _key, path in top + below:
                if not _TEMP_NAME_RE.fullmatch(os.path.basename(path)):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if self._retry_call(functools.partial(os.stat, path)).st_mtime < cutoff:
                        self._retry_call(functools.partial(os.unlink, path))
                        removed += 1
            return removed

        return self._retrying("", "clean up temp files of", attempt)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, content_id(data)

    # -- compare-and-swap under a lock file ----------------------------------------------

    @contextlib.contextmanager
    def _locked(self, key: str, path: str) -> Iterator[None]:
        """Hold the lock file ``.NAME.lock`` beside ``path``: created with O_EXCL, stamped
        with pid, host and time, and ``flock``-ed for as long as it is held, so that a lock
        whose holder died (the kernel drops its flock) can be told from a live one."""
        lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
        stamp = f"{os.getpid()} {self._host} {time.time()}\n".encode()
        for attempt in range(2):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if attempt == 0 and self._break_if_stale(lock):
                    continue
                raise PreconditionFailed(f"object {key} is being updated by another writer", key=key) from None
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a breaker inspects it
            view = memoryview(stamp)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            yield
        finally:
            try:
                self._release(lock, fd, stamp)
            finally:
                os.close(fd)

    def _release(self, lock: str, fd: int, stamp: bytes) -> None:
        """Unlink the lock file, still flock-ed (so no breaker takes it for stale), retried.
        If that fails, the lock is remembered as abandoned by this process, which then breaks
        it at once rather than after ``stale_lock_s`` (others still wait that long)."""

        def unlink() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)

        try:
            self._retry_call(unlink)
        except OSError:
            with contextlib.suppress(OSError):
                st = os.fstat(fd)
                _ABANDONED_LOCKS.add((st.st_dev, st.st_ino, stamp))
            raise

    def _break_if_stale(self, lock: str) -> bool:
        """Remove ``lock`` if it is abandoned: nobody holds its flock, and its holder is a
        dead process of this host or it is older than ``stale_lock_s``. Safe against other
        breakers: only the one holding the old lock's flock may unlink it, and only while the
        path still names that file. Returns whether the lock is gone."""
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live holder
            content = os.read(fd, 4096)
            st = os.fstat(fd)
            age_s = time.time() - st.st_mtime
            abandoned = (st.st_dev, st.st_ino, content)
            try:
                pid_text, host, _ = content.decode().split()
                dead = host == self._host and not pid_alive(int(pid_text))
            except ValueError:  # its writer died before writing the stamp
                dead = age_s > 1.0
            if not (dead or age_s > self.stale_lock_s or abandoned in _ABANDONED_LOCKS):
                return False
            try:
                if os.stat(lock).st_ino != st.st_ino:
                    return False  # already replaced by a new lock
            except FileNotFoundError:
                return True
            os.unlink(lock)
            _ABANDONED_LOCKS.discard(abandoned)
            return True
        finally:
            os.close(fd)

    @staticmethod
    def _current_version(path: str) -> str | None:
        try:
            with open(path, "rb") as f:
                return content_id(f.read())
        except FileNotFoundError:
            return None

    def put_if_version(self, key: str, data: bytes, *, version: str | None) -> str:
        """Compare-and-swap under the lock file: temp file, fsync, rename, fsync the
        directory. A retry that finds ``data`` already in place (its earlier attempt renamed
        it, then failed) syncs the directory and succeeds."""
        path = self._path(key)
        directory = os.path.dirname(path)
        new = content_id(data)

        def attempt(retry: bool) -> str:
            self._ensure_dir(directory)
            with self._locked(key, path):
                current = self._current_version(path)
                if current != version and not (retry and current == new):
                    raise PreconditionFailed(
                        f"object {key} is at version {current or '(absent)'}, not {version or '(absent)'}",
                        key=key,
                    )
                if current == version:  # else a retry found its own earlier write
                    tmp = self._write_temp(directory, data)
                    os.replace(tmp, path)
                fsync_directory(directory)
            return new

        return self._retrying(key, "update", attempt)

    def delete_if_version(self, key: str, *, version: str) -> None:
        """Compare-and-delete under the lock file. A retry that finds the object gone (its
        earlier attempt unlinked it, then failed) succeeds."""
        path = self._path(key)

        def attempt(retry: bool) -> None:
            with self._locked(key, path):
                current = self._current_version(path)
                if current is None and retry:
                    return
                if current != version:
                    raise PreconditionFailed(f"object {key} changed concurrently", key=key)
                os.unlink(path)
                fsync_directory(os.path.dirname(path))

        self._retrying(key, "delete", attempt)
