"""The object store: a narrow key → bytes contract over fsspec.

This is the only module that imports fsspec or s3fs, and the only place where backend
exceptions are translated into :mod:`ckptstore.errors`.

The contract (every backend passes one shared test suite, ``tests/test_objectstore.py``):

``put_if_absent(key, data) -> bool``
    Create-only write of a bytes-like object or a sequence of them (written in order). Atomic: a reader sees the whole object or nothing. Idempotent: if the
    key exists, nothing is written and ``False`` is returned (``True`` if this very call's
    own earlier attempt stored it, its answer lost). Durable on return.
``get(key)``, ``get_range(key, start, end)``, ``size(key)``, ``exists(key)``
    Reads. A missing key raises :class:`ObjectNotFound`.
``reader(key)``
    A seekable binary file over an object, for ``readinto`` straight into a caller's buffer
    (the local backend reads the file; others fetch the object whole).
``will_read(key)``
    A hint that the object is read soon (a reader issues it a few objects ahead of what it
    decodes): the local backend asks the kernel to read the whole file into the page cache
    now (``posix_fadvise(WILLNEED)``), so the disk works while decoders do; elsewhere, and
    for a missing object, nothing. Never fails on I/O, never reads past the object.
``delete(key)``
    Idempotent: deleting a missing key is not an error.
``list(prefix)``
    Every key under ``prefix``, sorted.
``list_info(prefix)``
    The same keys as :class:`ObjectInfo` (size and last-modified time), for GC and ``du``.
``info(key)``
    One object's :class:`ObjectInfo`.
``clock_s()``
    The storage's clock: the time its modification times are stamped with (seconds since
    the epoch). Liveness and ages are judged on it, never on a process's own clock.
``delete_many(keys)``
    ``delete`` of each key, batched where the backend can (S3: 1,000 per request).
``remove_abandoned_uploads(older_than_s)``
    Remove what crashed writers left half-written (local temp files) older than this, under
    the store's own key prefixes only.
``writable()``
    Whether this process may write to the store, by an attempt that leaves nothing behind
    (local: a temp file created and removed; S3 cannot tell without writing: True).
``get_versioned(key) -> (data, version)``, ``put_if_version(key, data, version=...)``,
``delete_if_version(key, version=...)``
    Compare-and-swap for mutable objects (refs). ``version=None`` means "only if absent".
    A mismatch raises :class:`PreconditionFailed` and writes nothing; a mismatch caused by
    this very call's own earlier attempt (applied, its answer lost) is success.

Keys are relative, ``/``-separated, and use a safe alphabet (letters, digits, ``. _ -``).

Failures. Every backend error leaves as a :class:`StorageError` (an ``OSError`` whose
``errno`` is the backend's where it had one, so a full disk reads ``errno.ENOSPC``), including
errors from reading a :meth:`~ObjectStore.reader`. A write refused because the store can only
be read (a read-only mount, a directory this user may not write: ``EROFS``, ``EACCES``,
``EPERM``; S3 credentials without write permission: ``AccessDenied``) is a
:class:`ReadOnlyStore` naming the store and the object, so every writer gets the same typed
error before anything changed. Transient failures are retried in one
layer only, the lowest that can: S3 requests by botocore (a response body that fails midway,
which botocore does not retry, by ``read_attempts`` here); a local system call that fails with
a transient errno (:data:`TRANSIENT_ERRNOS`: a network or FUSE file system) by the local
backend, which redoes the whole operation (a fresh temp file, never a second ``fsync`` of the
same one). A listing is complete or raises, never silently partial.

Lost answers. A conditional write that was applied but whose answer was lost is resent and
then refused (S3: 412; local: the lock finds another version). It must count as done, once:
on S3 each conditional write carries a unique token in its metadata and, refused or failed,
looks for its own token on the object; locally a redone write that finds exactly its own
bytes (or, for a compare-and-delete, the object gone) succeeds.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import fcntl
import io
import os
import re
import socket
import stat
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar, Union

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

from .errors import (
    CkptStoreError,
    ConditionalWritesUnsupported,
    InvalidOption,
    ObjectNotFound,
    PreconditionFailed,
    ReadOnlyStore,
    StorageError,
    StoreNotFound,
)
from .ids import content_id
from .layout import PROBE_PREFIX
from .redaction import redact_credentials_in_logs

T = TypeVar("T")
Buffer = Union[bytes, bytearray, memoryview]
#: What a write accepts: one buffer, or a sequence of buffers written in order.
Data = Union[Buffer, Sequence[Buffer]]

_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*")
#: The local backend's temp files (``_write_temp``): the only hidden files it ever removes.
_TEMP_NAME_RE = re.compile(r"\.tmp-[0-9a-f]{32}")


def _parts(data: Data) -> list[memoryview]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = [data]
    return [memoryview(part).cast("B") for part in data]


def _joined(data: Data) -> bytes:
    parts = _parts(data)
    return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)


def check_key(key: str) -> str:
    """Return ``key`` if it is a well-formed object key, else raise :class:`InvalidOption` (a ``ValueError``)."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None or ".." in key.split("/"):
        raise InvalidOption("key", f"invalid object key {key!r}")
    return key


def _check_prefix(prefix: str) -> str:
    """Return a ``list`` prefix without its trailing ``/``: empty, or a well-formed key."""
    stripped = prefix.rstrip("/")
    if stripped:
        check_key(stripped)
    return stripped


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, size and last-modified time (seconds since the epoch)."""

    key: str
    size_bytes: int
    modified_s: float


class ObjectStore(ABC):
    """A flat namespace of immutable objects plus compare-and-swap objects, over fsspec."""

    #: The store's URL with any credentials removed; safe to log.
    url: str
    #: Whether the store lives in this process only (its catalog is then kept in memory too).
    is_ephemeral: bool = False
    #: The local directory of the store, for a local store; ``None`` otherwise.
    local_root: str | None = None

    @abstractmethod
    def put_if_absent(self, key: str, data: Data) -> bool: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def get_range(self, key: str, start: int, end: int) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]: ...

    @abstractmethod
    def list_info(self, prefix: str = "") -> list[ObjectInfo]: ...

    @abstractmethod
    def info(self, key: str) -> ObjectInfo: ...

    def clock_s(self) -> float:
        """The storage's clock (seconds since the epoch), which its modification times use."""
        return time.time()

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete every key in ``keys``. Idempotent."""
        for key in keys:
            self.delete(key)

    def remove_abandoned_uploads(self, *, older_than_s: float, prefixes: Iterable[str]) -> int:
        """Remove partial writes left by crashed writers, older than ``older_than_s``, under
        ``prefixes`` (and at the top of the store). Nothing else is touched: a store's
        directory may hold other files. Returns how many were removed."""
        return 0

    def reserve_space(self) -> None:
        """Keep a little room aside on a store whose disk can fill up, so that a collection
        can still take its lease there and free space (see :meth:`release_space`). Best
        effort, idempotent; a no-op where storage does not run out."""

    def release_space(self) -> bool:
        """Free the room :meth:`reserve_space` kept; whether there was any."""
        return False

    def writable(self) -> bool:
        """Whether this process may write to the store (False: every write raises
        :class:`ReadOnlyStore`). Leaves nothing behind. A backend that cannot tell without
        writing answers True, and its writes raise :class:`ReadOnlyStore` when refused."""
        return True

    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]: ...

    @abstractmethod
    def put_if_version(self, key: str, data: bytes, *, version: str | None) -> str: ...

    @abstractmethod
    def delete_if_version(self, key: str, *, version: str) -> None: ...

    def reader(self, key: str) -> BinaryIO:
        """A seekable binary file over the object ``key``, to read it straight into a
        caller's buffer with ``readinto``. A missing key raises :class:`ObjectNotFound`."""
        return io.BytesIO(self.get(key))

    def will_read(self, key: str) -> None:
        """A hint that ``key`` is read soon; returns at once. Does nothing unless the
        backend can start the read without holding its bytes (the local page cache)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


#: The actions (as :func:`_translated` names them) that change the store: refused with
#: :class:`ReadOnlyStore` where the storage says it may not be written.
_WRITING_ACTIONS = frozenset({"write", "update", "delete", "sync", "create the store directory of", "clean up temp files of"})
#: What a local file system answers a write to a read-only mount or to a directory this
#: user may not write (s3fs answers S3's ``AccessDenied`` with ``PermissionError``).
_READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def _is_refused_write(exc: BaseException) -> bool:
    """Whether ``exc`` says the store may not be written (rather than that a write failed)."""
    return isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno in _READ_ONLY_ERRNOS)


@contextlib.contextmanager
def _translated(url: str, key: str, action: str) -> Iterator[None]:
    """Turn a backend exception into the matching :class:`StorageError`, cause chained; a
    write refused by read-only storage into :class:`ReadOnlyStore` naming the store ``url``."""
    try:
        yield
    except CkptStoreError:
        raise
    except FileNotFoundError as exc:
        raise ObjectNotFound(f"object {key} not found", key=key) from exc
    except FileExistsError as exc:
        raise PreconditionFailed(f"object {key} already exists", key=key) from exc
    except Exception as exc:
        if _is_precondition_failure(exc):
            raise PreconditionFailed(f"object {key} changed concurrently", key=key) from exc
        if action in _WRITING_ACTIONS and _is_refused_write(exc):
            refused = ReadOnlyStore(url, action=action if key else action.removesuffix(" of"), key=key or None, reason=getattr(exc, "strerror", None) or str(exc))
            refused.errno = getattr(exc, "errno", None) or errno.EACCES
            raise refused from exc
        error = StorageError(f"could not {action} object {key}: {type(exc).__name__}: {exc}", key=key)
        if isinstance(exc, OSError) and exc.errno is not None:
            error.errno, error.strerror = exc.errno, exc.strerror  # ENOSPC stays ENOSPC
        raise error from exc


@contextlib.contextmanager
def _missing_is_mismatch(key: str) -> Iterator[None]:
    """S3 answers a write or delete conditional on the ETag of a missing object with 404; for
    the contract that is a version mismatch like any other."""
    try:
        yield
    except ObjectNotFound as exc:
        raise PreconditionFailed(f"object {key} does not exist", key=key) from exc


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and its causes (and contexts), outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _was_retried(exc: BaseException) -> bool:
    """Whether botocore sent the request that ``exc`` answers more than once (an earlier
    attempt may have been applied, its answer lost)."""
    for err in _chain(exc):
        response = getattr(err, "response", None)
        if isinstance(response, Mapping) and response.get("ResponseMetadata", {}).get("RetryAttempts", 0):
            return True
    return False


def _is_precondition_failure(exc: BaseException) -> bool:
    """S3's answer to a failed conditional write (412, or 409 for a concurrent one)."""
    for err in (exc, exc.__cause__, exc.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, Mapping):
            code = response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return True
    return False


# --------------------------------------------------------------------------------------------
# Local directory


def fsync_directory(path: str) -> None:
    """Make the entries of directory ``path`` durable (after a create, rename or unlink)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_for_read(path: str) -> Any:
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
        self._file: Any = None
        self._file = store._retrying(key, "read", lambda retry: self._open())

    def _open(self) -> Any:
        f = _open_for_read_raw(self._path)
        f.seek(self._pos)
        return f

    def _call(self, fn: Callable[[Any], T]) -> T:
        def attempt(retry: bool) -> T:
            if retry or self._file is None:
                if self._file is not None:
                    with contextlib.suppress(OSError):
                        self._file.close()
                    self._file = None
                self._file = self._open()
            return fn(self._file)

        return self._store._retrying(self._key, "read", attempt)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
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


def _open_for_read_raw(path: str) -> Any:
    """:func:`_open_for_read`, unbuffered."""
    try:
        return open(path, "rb", buffering=0)
    except (IsADirectoryError, NotADirectoryError) as exc:
        raise FileNotFoundError(path) from exc


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        self._fs = fsspec.filesystem("file")
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
        return io.BufferedReader(raw)  # type: ignore[return-value]

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
                entries = self._retry_call(lambda d=dirpath: _list_dir(d))
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
        directories = set()
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
            self._retrying(directory, "sync", lambda retry, d=directory: fsync_directory(d))

    def list(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        return self._retrying(prefix, "list", lambda retry: sorted(key for key, _ in self._walk(prefix)))

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        _check_prefix(prefix)

        def attempt(retry: bool) -> list[ObjectInfo]:
            out = []
            for key, path in self._walk(prefix):
                try:
                    st = self._retry_call(lambda p=path: os.stat(p))
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
                    if self._retry_call(lambda p=path: os.stat(p)).st_mtime < cutoff:
                        self._retry_call(lambda p=path: os.unlink(p))
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
                        f"object {key} is at version {current or '(absent)'}, "
                        f"not {version or '(absent)'}",
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


# --------------------------------------------------------------------------------------------
# Generic fsspec backends (memory, S3)


class _FsspecObjectStore(ObjectStore):
    """Reads, listing and deletes through an fsspec filesystem rooted at ``root``."""

    #: Attempts at a read whose response body fails midway (cut short, or failing its
    #: checksum). The request itself is retried below us, by botocore, and a failure it
    #: already retried is not retried again here, so the two never multiply.
    read_attempts = 1

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self._fs = fs
        self._root = root.rstrip("/")
        self.url = url

    def _path(self, key: str) -> str:
        return f"{self._root}/{check_key(key)}"

    def _attempts(self, key: str, action: str, fn: Callable[[], T]) -> T:
        """``fn()`` (a read) with backend errors translated, redone with backoff while it
        fails in a way the layer below did not retry; an answer (a missing object, a refused
        precondition) is never redone."""
        for attempt in range(self.read_attempts):
            try:
                with _translated(self.url, key, action):
                    return fn()
            except (ObjectNotFound, PreconditionFailed):
                raise
            except StorageError as exc:
                if attempt + 1 == self.read_attempts or _retried_below(exc):
                    raise
            time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    def _read(self, key: str, **kwargs: Any) -> bytes:
        path = self._path(key)
        return self._attempts(key, "read", lambda: self._fs.cat_file(path, **kwargs))

    def get(self, key: str) -> bytes:
        return self._read(key)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            self.size(key)  # still report a missing object
            return b""
        try:
            return self._read(key, start=start, end=end)
        except ObjectNotFound:
            raise
        except StorageError:
            if start < self.size(key):
                raise
            return b""  # S3 refuses a range that starts at or past the end (416)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return self.info(key).size_bytes

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(ObjectNotFound), _translated(self.url, key, "delete"):
            self._fs.rm_file(path)

    def info(self, key: str) -> ObjectInfo:
        path = self._path(key)

        def stat_object() -> ObjectInfo:
            info = self._fs.info(path)
            if info["type"] != "file":  # a prefix of other keys is no object
                raise FileNotFoundError(path)
            return ObjectInfo(key, int(info["size"]), _modified_s(info))

        return self._attempts(key, "stat", stat_object)

    def list(self, prefix: str = "") -> list[str]:
        return [info.key for info in self.list_info(prefix)]

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        prefix = _check_prefix(prefix)
        base = f"{self._root}/{prefix}".rstrip("/")

        def find() -> dict[str, Any]:
            try:
                return self._fs.find(base, detail=True)
            except FileNotFoundError:
                return {}

        found = self._attempts(prefix, "list", find)
        start = len(self._root.lstrip("/")) + 1
        under = prefix + "/" if prefix else ""  # find() of an object's own path returns it
        out = []
        for path, info in found.items():
            key = path.lstrip("/")[start:]
            if _KEY_RE.fullmatch(key) and key.startswith(under) and info.get("type", "file") == "file":
                out.append(ObjectInfo(key, int(info["size"]), _modified_s(info)))
        return sorted(out, key=lambda info: info.key)


def _retried_below(exc: BaseException) -> bool:
    """Whether botocore's retries already covered this failure: an answer from S3
    (``ClientError``: 5xx and throttling were retried), or a request that could not be sent
    or whose answer did not arrive (its ``ConnectionError`` and ``HTTPClientError``). A
    response body that fails while it is read (cut short, or failing its checksum) was not."""
    for err in _chain(exc):
        for cls in type(err).__mro__:
            if cls.__module__ == "botocore.exceptions":
                if cls.__name__ == "ResponseStreamingError":
                    return False
                if cls.__name__ in ("ClientError", "ConnectionError", "HTTPClientError"):
                    return True
    return False


def _modified_s(info: Mapping[str, Any]) -> float:
    """An fsspec listing entry's modification time (S3: ``LastModified``; memory: ``created``)."""
    stamp = info.get("LastModified", info.get("created", info.get("mtime")))
    if stamp is None:
        return time.time()
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)


class MemoryObjectStore(_FsspecObjectStore):
    """Objects in fsspec's process-wide memory filesystem (``memory://name``); for tests and
    throwaway work. Atomicity comes from one lock per process."""

    is_ephemeral = True
    _lock = threading.RLock()

    def __init__(self, root: str) -> None:
        root = "/" + root.strip("/")
        super().__init__(MemoryFileSystem(), root, f"memory://{root}")

    def put_if_absent(self, key: str, data: Data) -> bool:
        path = self._path(key)
        with self._lock, _translated(self.url, key, "write"):
            if self._fs.exists(path):
                return False
            self._fs.pipe_file(path, _joined(data))
            return True

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        with self._lock:
            data = self.get(key)
        return data, content_id(data)

    def put_if_version(self, key: str, data: bytes, *, version: str | None) -> str:
        path = self._path(key)
        with self._lock, _translated(self.url, key, "update"):
            current = content_id(self._fs.cat_file(path)) if self._fs.exists(path) else None
            if current != version:
                raise PreconditionFailed(f"object {key} changed concurrently", key=key)
            self._fs.pipe_file(path, bytes(data))
        return content_id(data)

    def delete_if_version(self, key: str, *, version: str) -> None:
        path = self._path(key)
        with self._lock, _translated(self.url, key, "delete"):
            current = content_id(self._fs.cat_file(path)) if self._fs.exists(path) else None
            if current != version:
                raise PreconditionFailed(f"object {key} changed concurrently", key=key)
            self._fs.rm_file(path)


#: S3 user metadata (``x-amz-meta-ckptstore-write``) naming the conditional write that
#: stored an object, so that a resent write can tell its own first attempt from another's.
WRITE_TOKEN = "ckptstore-write"


class S3ObjectStore(_FsspecObjectStore):
    """Objects in an S3 bucket under a prefix, through s3fs.

    Create-only writes send ``If-None-Match: *``; compare-and-swap sends ``If-Match`` with the
    ETag read before. Both are answered by S3 itself, so concurrent writers on different
    machines are safe. Both carry a write token (:data:`WRITE_TOKEN`) that tells a resent
    write its own applied first attempt from another writer's object.
    """

    read_attempts = 3

    #: Requests in flight at once (the connection pool; botocore's default is 10).
    max_connections = 64
    #: Pipeline threads by default: S3 answers each request after a round trip of tens of
    #: milliseconds, so throughput comes from many requests at once, not from cores.
    requests_in_flight = 32
    #: Bounds on one attempt of a request (botocore's defaults are 60 s each): with 5
    #: attempts, a stalled endpoint fails a request in about 2 minutes rather than 10.
    #: ``storage_options={"config_kwargs": {"read_timeout": ...}}`` overrides them.
    connect_timeout_s = 5.0
    read_timeout_s = 20.0

    def __init__(self, bucket_and_prefix: str, storage_options: Mapping[str, Any], *, part_size_bytes: int = 8 << 20) -> None:
        import s3fs  # imported here so that local use never pays for botocore

        redact_credentials_in_logs(_credential_values(storage_options))

        # Retries happen once, in botocore ("standard" mode: 5xx, throttling and connection
        # errors, with backoff and jitter); s3fs's own retry loop is turned off so the two do
        # not multiply. A resent conditional write that finds its own first attempt is
        # refused (412); the write token (see put_if_absent) turns that back into success.
        config = dict(storage_options.get("config_kwargs") or {})
        config.setdefault("retries", {"mode": "standard", "total_max_attempts": 5})
        config.setdefault("max_pool_connections", self.max_connections)
        config.setdefault("connect_timeout", self.connect_timeout_s)
        config.setdefault("read_timeout", self.read_timeout_s)
        options = {"use_listings_cache": False, "skip_instance_cache": True, **storage_options, "config_kwargs": config}
        fs = s3fs.S3FileSystem(**options)
        fs.retries = 1  # this instance only (skip_instance_cache): botocore retries instead
        root = bucket_and_prefix.strip("/")
        self.part_size_bytes = part_size_bytes
        #: The S3 endpoint (``client_kwargs.endpoint_url``, else AWS's) and bucket: what a
        #: check of conditional writes holds for. Safe to show.
        self.endpoint = f"{(storage_options.get('client_kwargs') or {}).get('endpoint_url') or 'https://s3.amazonaws.com'}/{root.split('/', 1)[0]}"
        super().__init__(fs, root, f"s3://{root}")

    def check_conditional_writes(self) -> None:
        """Raise :class:`ConditionalWritesUnsupported` if the endpoint ignores
        ``If-None-Match: *`` or ``If-Match`` (older MinIO, some gateways): without them two
        writers silently overwrite each other's refs. Writes, checks and removes one probe
        object, ``locks/probe-<random>``."""
        key = PROBE_PREFIX + uuid.uuid4().hex
        try:
            self.put_if_absent(key, b"first")
            ignored = []
            if self.put_if_absent(key, b"second"):
                ignored.append("If-None-Match: *")
            _, version = self.get_versioned(key)
            try:
                self.put_if_version(key, b"third", version='"00000000000000000000000000000000"' if version != '"00000000000000000000000000000000"' else '"1"')
                ignored.append("If-Match")
            except PreconditionFailed:
                pass
        finally:
            with contextlib.suppress(CkptStoreError):
                self.delete(key)
        if ignored:
            raise ConditionalWritesUnsupported(
                f"the S3 endpoint {self.endpoint} ignores conditional writes ({' and '.join(ignored)}): "
                "concurrent writers would silently lose commits there. Use an endpoint that supports them "
                "(AWS S3, current MinIO), or, if only one process at a time ever writes to this store, "
                "open it with single_writer=True (for the ckpt command: CKPTSTORE_SINGLE_WRITER=1)",
                endpoint=self.endpoint,
            )

    def remove_abandoned_uploads(self, *, older_than_s: float, prefixes: Iterable[str]) -> int:
        """Abort multipart uploads under the store's ``prefixes`` started more than
        ``older_than_s`` ago (left by writers that died mid-upload; S3 keeps and bills their
        parts)."""
        bucket, prefix, _ = self._fs.split_path(self._root + "/")
        store_prefix = prefix.rstrip("/") + "/"
        owned = tuple(store_prefix + p for p in prefixes)
        cutoff = self.clock_s() - older_than_s
        removed = 0
        with _translated(self.url, "", "list the multipart uploads of"):
            response = self._fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=store_prefix)
            for upload in response.get("Uploads", []):
                if upload["Key"].startswith(owned) and _modified_s({"LastModified": upload["Initiated"]}) < cutoff:
                    self._fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    removed += 1
        return removed

    def get(self, key: str) -> bytes:
        """One GET (s3fs's ``cat_file`` would first HEAD the object to decide whether to
        split the read into ranges)."""
        return self._read(key, max_concurrency=1)

    def exists(self, key: str) -> bool:
        """One HEAD (s3fs's ``info`` also lists the prefix when the key is missing)."""
        try:
            self.info(key)
        except ObjectNotFound:
            return False
        return True

    def info(self, key: str) -> ObjectInfo:
        """One HEAD."""
        bucket, object_key, _ = self._fs.split_path(self._path(key))
        head = self._attempts(key, "stat", lambda: self._fs.call_s3("head_object", Bucket=bucket, Key=object_key))
        return ObjectInfo(key, int(head["ContentLength"]), _modified_s(head))

    def clock_s(self) -> float:
        """The ``Date`` of S3's answer to a HEAD of the bucket (S3 stamps ``LastModified``
        with the same clock; both to the second, so the middle of that second)."""
        bucket, _, _ = self._fs.split_path(self._root + "/")
        response = self._attempts("", "read the clock of", lambda: self._fs.call_s3("head_bucket", Bucket=bucket))
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not date:
            return time.time()
        return email.utils.parsedate_to_datetime(date).timestamp() + 0.5

    def put_if_absent(self, key: str, data: Data) -> bool:
        """Create-only: ``If-None-Match: *`` (multipart above two parts, completed the same
        way), tagged with a write token. A write that is refused or fails after a resend
        (by botocore, or by aiohttp, which silently resends a PUT whose connection dropped)
        looks at the object: carrying its own token, its first attempt was applied and only
        the answer was lost, so it returns True."""
        path = self._path(key)
        token = uuid.uuid4().hex
        try:
            with _translated(self.url, key, "write"):
                self._fs.pipe_file(path, _joined(data), mode="create", chunksize=self.part_size_bytes, Metadata={WRITE_TOKEN: token})
        except StorageError as exc:
            if self._written_by(key, token) is not None:
                return True
            if isinstance(exc, PreconditionFailed):
                return False
            raise
        return True

    def _written_by(self, key: str, token: str) -> str | None:
        """The object's ETag if the write tagged ``token`` stored it; else (or if that
        cannot be told) None."""
        bucket, object_key, _ = self._fs.split_path(self._path(key))
        try:
            with _translated(self.url, key, "stat"):
                head = self._fs.call_s3("head_object", Bucket=bucket, Key=object_key)
        except StorageError:
            return None
        return head["ETag"] if (head.get("Metadata") or {}).get(WRITE_TOKEN) == token else None

    def delete_many(self, keys: Iterable[str]) -> None:
        paths = [self._path(key) for key in keys]
        for start in range(0, len(paths), 1000):
            batch = paths[start : start + 1000]
            with contextlib.suppress(ObjectNotFound), _translated(self.url, batch[0][len(self._root) + 1 :], "delete"):
                self._fs.rm(batch)  # s3fs sends one DeleteObjects request per 1,000 keys

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        from fsspec.asyn import sync

        bucket, object_key, _ = self._fs.split_path(self._path(key))

        async def fetch() -> tuple[bytes, str]:
            response = await self._fs._call_s3("get_object", Bucket=bucket, Key=object_key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        return self._attempts(key, "read", lambda: sync(self._fs.loop, fetch))

    def put_if_version(self, key: str, data: bytes, *, version: str | None) -> str:
        """``If-Match`` the ETag ``version`` (``If-None-Match: *`` for ``None``), tagged
        with a write token; returns the new ETag. A write that is refused or fails after a
        resend looks at the object: carrying its own token, its first attempt was applied
        and only the answer was lost, so it returns that ETag. Neither a spurious failure
        nor a second update."""
        path = self._path(key)
        token = uuid.uuid4().hex
        try:
            if version is None:
                with _translated(self.url, key, "update"):
                    response = self._fs.pipe_file(path, data, mode="create", Metadata={WRITE_TOKEN: token})
            else:
                with _missing_is_mismatch(key), _translated(self.url, key, "update"):
                    response = self._fs.pipe_file(path, data, IfMatch=version, Metadata={WRITE_TOKEN: token})
        except StorageError:
            etag = self._written_by(key, token)
            if etag is not None:
                return etag
            raise
        return response["ETag"]

    def delete_if_version(self, key: str, *, version: str) -> None:
        """``DELETE`` with ``If-Match``. If botocore resent the request and it then failed
        or was refused (404: already gone), an object now absent means the first attempt
        was applied: success. (A resend by aiohttp is invisible here: its 404 is a
        :class:`PreconditionFailed`, as for any object already gone.)"""
        bucket, object_key, _ = self._fs.split_path(self._path(key))
        try:
            with _missing_is_mismatch(key), _translated(self.url, key, "delete"):
                self._fs.call_s3("delete_object", Bucket=bucket, Key=object_key, IfMatch=version)
        except StorageError as exc:
            if _was_retried(exc) and not self._exists_quietly(key):
                return
            raise

    def _exists_quietly(self, key: str) -> bool:
        """``exists``, True where it cannot tell."""
        try:
            return self.exists(key)
        except StorageError:
            return True


def _credential_values(storage_options: Mapping[str, Any]) -> list[object]:
    """The credentials an S3 store may sign with that ckptstore can see: its options and
    the ``AWS_*`` environment variables."""
    client = storage_options.get("client_kwargs") or {}
    return [
        *(storage_options.get(name) for name in ("key", "secret", "token")),
        *(client.get(name) for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")),
        *(os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")),
    ]


def open_object_store(url: str, *, storage_options: Mapping[str, Any] | None = None, create: bool = True) -> ObjectStore:
    """Open the object store at ``url``: a local path (or ``file://``), ``memory://name`` or
    ``s3://bucket/prefix``. ``storage_options`` go to the backend (s3fs) and are never
    logged or shown. Without ``create``, a missing local directory is :class:`StoreNotFound`
    (and is not created)."""
    options = dict(storage_options or {})
    protocol, separator, rest = url.partition("://")
    if not separator:
        protocol, rest = "file", url
    if protocol in ("file", "local"):
        if options:
            raise InvalidOption("storage_options", "not used by a local store")
        if not create and not os.path.isdir(os.path.expanduser(rest)):
            raise StoreNotFound(f"no ckptstore store at {os.path.abspath(os.path.expanduser(rest))}")
        return LocalObjectStore(rest)
    if protocol == "memory":
        return MemoryObjectStore(rest or "default")
    if protocol in ("s3", "s3a"):
        if "@" in rest.split("/", 1)[0]:  # the URL itself is not repeated: it holds a secret
            raise InvalidOption("url", "an S3 store URL cannot carry credentials (KEY:SECRET@bucket): pass them in storage_options")
        if not rest.strip("/"):
            raise InvalidOption("url", f"S3 store URL {url!r} names no bucket")
        return S3ObjectStore(rest, options)
    raise InvalidOption(
        "url",
        f"unsupported store URL scheme {protocol!r} in {url!r}: use a local path, memory://NAME "
        "or s3://BUCKET/PREFIX (they are the backends with atomic create-only and "
        "compare-and-swap writes)"
    )
