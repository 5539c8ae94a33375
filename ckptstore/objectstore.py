"""The object store: a narrow key → bytes contract over fsspec.

This is the only module that imports fsspec or s3fs, and the only place where backend
exceptions are translated into :mod:`ckptstore.errors`.

The contract (every backend passes one shared test suite, ``tests/test_objectstore.py``):

``put_if_absent(key, data) -> bool``
    Create-only write of a bytes-like object or a sequence of them (written in order). Atomic: a reader sees the whole object or nothing. Idempotent: if the
    key exists, nothing is written and ``False`` is returned. Durable on return.
``get(key)``, ``get_range(key, start, end)``, ``size(key)``, ``exists(key)``
    Reads. A missing key raises :class:`ObjectNotFound`.
``reader(key)``
    A seekable binary file over an object, for ``readinto`` straight into a caller's buffer
    (the local backend reads the file; others fetch the object whole).
``delete(key)``
    Idempotent: deleting a missing key is not an error.
``list(prefix)``
    Every key under ``prefix``, sorted.
``list_info(prefix)``
    The same keys as :class:`ObjectInfo` (size and last-modified time), for GC and ``du``.
``delete_many(keys)``
    ``delete`` of each key, batched where the backend can (S3: 1,000 per request).
``remove_abandoned_uploads(older_than_s)``
    Remove what crashed writers left half-written (local temp files) older than this.
``get_versioned(key) -> (data, version)``, ``put_if_version(key, data, version=...)``,
``delete_if_version(key, version=...)``
    Compare-and-swap for mutable objects (refs). ``version=None`` means "only if absent".
    A mismatch raises :class:`PreconditionFailed` and writes nothing.

Keys are relative, ``/``-separated, and use a safe alphabet (letters, digits, ``. _ -``).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Union

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

from .errors import CkptStoreError, ObjectNotFound, PreconditionFailed, StorageError, StoreNotFound
from .ids import content_id

Buffer = Union[bytes, bytearray, memoryview]
#: What a write accepts: one buffer, or a sequence of buffers written in order.
Data = Union[Buffer, Sequence[Buffer]]

_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*")


def _parts(data: Data) -> list[memoryview]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = [data]
    return [memoryview(part).cast("B") for part in data]


def _joined(data: Data) -> bytes:
    parts = _parts(data)
    return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)


def check_key(key: str) -> str:
    """Return ``key`` if it is a well-formed object key, else raise ``ValueError``."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None or ".." in key.split("/"):
        raise ValueError(f"invalid object key {key!r}")
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

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete every key in ``keys``. Idempotent."""
        for key in keys:
            self.delete(key)

    def remove_abandoned_uploads(self, *, older_than_s: float) -> int:
        """Remove partial writes left by crashed writers, older than ``older_than_s``.
        Returns how many were removed."""
        return 0

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


@contextlib.contextmanager
def _translated(key: str, action: str) -> Iterator[None]:
    """Turn a backend exception into the matching :class:`StorageError`, cause chained."""
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
        raise StorageError(f"could not {action} object {key}: {type(exc).__name__}: {exc}", key=key) from exc


@contextlib.contextmanager
def _missing_is_mismatch(key: str) -> Iterator[None]:
    """S3 answers a write or delete conditional on the ETag of a missing object with 404; for
    the contract that is a version mismatch like any other."""
    try:
        yield
    except ObjectNotFound as exc:
        raise PreconditionFailed(f"object {key} does not exist", key=key) from exc


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


def _fsync_dir(path: str) -> None:
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
    """

    #: A lock nobody holds a flock on, older than this, is abandoned even if its holder's
    #: liveness cannot be checked (another host).
    stale_lock_s = 30.0

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = self.root
        self.local_root = self.root
        self._fs = fsspec.filesystem("file")
        self._known_dirs: set[str] = set()
        self._host = socket.gethostname()
        with _translated("", "create the store directory of"):
            self._ensure_dir(self.root)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def _ensure_dir(self, path: str) -> None:
        if path in self._known_dirs:
            return
        if not os.path.isdir(path):
            parent = os.path.dirname(path)
            if parent != path:
                self._ensure_dir(parent)
            with contextlib.suppress(FileExistsError):
                os.mkdir(path)
            _fsync_dir(parent)
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
        path = self._path(key)
        if os.path.exists(path):
            return False
        with _translated(key, "write"):
            directory = os.path.dirname(path)
            self._ensure_dir(directory)
            tmp = self._write_temp(directory, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            _fsync_dir(directory)
            return True

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with _translated(key, "read"), _open_for_read(path) as f:
            return f.read()

    def reader(self, key: str) -> BinaryIO:
        path = self._path(key)
        with _translated(key, "read"):
            return _open_for_read(path)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        path = self._path(key)
        with _translated(key, "read"), _open_for_read(path) as f:
            f.seek(start)
            return f.read(max(0, end - start))

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def size(self, key: str) -> int:
        path = self._path(key)
        with _translated(key, "stat"), _open_for_read(path) as f:
            return os.fstat(f.fileno()).st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError), _translated(key, "delete"):
            try:
                os.unlink(path)
            except (IsADirectoryError, NotADirectoryError) as exc:
                raise FileNotFoundError(path) from exc  # no object there
            _fsync_dir(os.path.dirname(path))

    def _walk(self, prefix: str, *, hidden: bool = False) -> Iterator[tuple[str, str]]:
        """``(key, path)`` of every file under ``prefix``; with ``hidden``, only the temp and
        lock files (names starting with ``.``) instead."""
        prefix = _check_prefix(prefix)
        base = os.path.join(self.root, *prefix.split("/")) if prefix else self.root
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in filenames:
                if hidden != name.startswith(".") or (not hidden and _KEY_RE.fullmatch(name) is None):
                    continue
                yield (name if rel == "." else f"{rel}/{name}"), os.path.join(dirpath, name)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Unlink every key, then fsync each directory once."""
        directories = set()
        for key in keys:
            path = self._path(key)
            with contextlib.suppress(FileNotFoundError), _translated(key, "delete"):
                try:
                    os.unlink(path)
                except (IsADirectoryError, NotADirectoryError) as exc:
                    raise FileNotFoundError(path) from exc
                directories.add(os.path.dirname(path))
        for directory in directories:
            with _translated(directory, "sync"):
                _fsync_dir(directory)

    def list(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        with _translated(prefix, "list"):
            return sorted(key for key, _ in self._walk(prefix))

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        _check_prefix(prefix)
        out = []
        with _translated(prefix, "list"):
            for key, path in self._walk(prefix):
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue  # deleted while listing
                out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return sorted(out, key=lambda info: info.key)

    def remove_abandoned_uploads(self, *, older_than_s: float) -> int:
        """Remove ``.tmp-*`` files older than ``older_than_s`` (lock files are the lock
        protocol's business)."""
        removed = 0
        cutoff = time.time() - older_than_s
        with _translated("", "clean up temp files of"):
            for _key, path in self._walk("", hidden=True):
                if not os.path.basename(path).startswith(".tmp-"):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(path).st_mtime < cutoff:
                        os.unlink(path)
                        removed += 1
        return removed

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
            os.write(fd, stamp)
            os.fsync(fd)
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)  # while still flock-ed: no breaker can take it for stale
            os.close(fd)

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
            age_s = time.time() - os.fstat(fd).st_mtime
            try:
                pid_text, host, _ = content.decode().split()
                dead = host == self._host and not pid_alive(int(pid_text))
            except ValueError:  # its writer died before writing the stamp
                dead = age_s > 1.0
            if not (dead or age_s > self.stale_lock_s):
                return False
            try:
                if os.stat(lock).st_ino != os.fstat(fd).st_ino:
                    return False  # already replaced by a new lock
            except FileNotFoundError:
                return True
            os.unlink(lock)
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
        path = self._path(key)
        with _translated(key, "update"):
            directory = os.path.dirname(path)
            self._ensure_dir(directory)
            with self._locked(key, path):
                current = self._current_version(path)
                if current != version:
                    raise PreconditionFailed(
                        f"object {key} is at version {current or '(absent)'}, "
                        f"not {version or '(absent)'}",
                        key=key,
                    )
                tmp = self._write_temp(directory, data)
                os.replace(tmp, path)
                _fsync_dir(directory)
        return content_id(data)

    def delete_if_version(self, key: str, *, version: str) -> None:
        path = self._path(key)
        with _translated(key, "delete"), self._locked(key, path):
            if self._current_version(path) != version:
                raise PreconditionFailed(f"object {key} changed concurrently", key=key)
            os.unlink(path)
            _fsync_dir(os.path.dirname(path))


# --------------------------------------------------------------------------------------------
# Generic fsspec backends (memory, S3)


class _FsspecObjectStore(ObjectStore):
    """Reads, listing and deletes through an fsspec filesystem rooted at ``root``."""

    #: Attempts at a read whose body fails midway (the request itself is retried below us,
    #: by botocore, so this never multiplies its retries: it covers what comes after).
    read_attempts = 1

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self._fs = fs
        self._root = root.rstrip("/")
        self.url = url

    def _path(self, key: str) -> str:
        return f"{self._root}/{check_key(key)}"

    def _read(self, key: str, **kwargs: Any) -> bytes:
        """``cat_file``, retried with backoff on a failure that is not an answer (a missing
        object or a refused precondition is)."""
        path = self._path(key)
        for attempt in range(self.read_attempts):
            try:
                with _translated(key, "read"):
                    return self._fs.cat_file(path, **kwargs)
            except (ObjectNotFound, PreconditionFailed):
                raise
            except StorageError:
                if attempt + 1 == self.read_attempts:
                    raise
                time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

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
        path = self._path(key)
        with _translated(key, "stat"):
            info = self._fs.info(path)
            if info["type"] != "file":  # a prefix of other keys is no object
                raise FileNotFoundError(path)
            return int(info["size"])

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(ObjectNotFound), _translated(key, "delete"):
            self._fs.rm_file(path)

    def list(self, prefix: str = "") -> list[str]:
        return [info.key for info in self.list_info(prefix)]

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        prefix = _check_prefix(prefix)
        base = f"{self._root}/{prefix}".rstrip("/")
        with _translated(prefix, "list"):
            try:
                found = self._fs.find(base, detail=True)
            except FileNotFoundError:
                return []
        start = len(self._root.lstrip("/")) + 1
        under = prefix + "/" if prefix else ""  # find() of an object's own path returns it
        out = []
        for path, info in found.items():
            key = path.lstrip("/")[start:]
            if _KEY_RE.fullmatch(key) and key.startswith(under) and info.get("type", "file") == "file":
                out.append(ObjectInfo(key, int(info["size"]), _modified_s(info)))
        return sorted(out, key=lambda info: info.key)


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
        with self._lock, _translated(key, "write"):
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
        with self._lock, _translated(key, "update"):
            current = content_id(self._fs.cat_file(path)) if self._fs.exists(path) else None
            if current != version:
                raise PreconditionFailed(f"object {key} changed concurrently", key=key)
            self._fs.pipe_file(path, bytes(data))
        return content_id(data)

    def delete_if_version(self, key: str, *, version: str) -> None:
        path = self._path(key)
        with self._lock, _translated(key, "delete"):
            current = content_id(self._fs.cat_file(path)) if self._fs.exists(path) else None
            if current != version:
                raise PreconditionFailed(f"object {key} changed concurrently", key=key)
            self._fs.rm_file(path)


class S3ObjectStore(_FsspecObjectStore):
    """Objects in an S3 bucket under a prefix, through s3fs.

    Create-only writes send ``If-None-Match: *``; compare-and-swap sends ``If-Match`` with the
    ETag read before. Both are answered by S3 itself, so concurrent writers on different
    machines are safe.
    """

    read_attempts = 3

    #: Requests in flight at once (the connection pool; botocore's default is 10).
    max_connections = 64
    #: Pipeline threads by default: S3 answers each request after a round trip of tens of
    #: milliseconds, so throughput comes from many requests at once, not from cores.
    requests_in_flight = 32

    def __init__(self, bucket_and_prefix: str, storage_options: Mapping[str, Any], *, part_size_bytes: int = 8 << 20) -> None:
        import s3fs  # imported here so that local use never pays for botocore

        # Retries happen once, in botocore ("standard" mode: 5xx, throttling and connection
        # errors, with backoff and jitter); s3fs's own retry loop is turned off so the two do
        # not multiply. A retried create-only write that finds its own first attempt answers
        # 412, which put_if_absent reads as "already stored": the outcome is the same.
        config = dict(storage_options.get("config_kwargs") or {})
        config.setdefault("retries", {"mode": "standard", "total_max_attempts": 5})
        config.setdefault("max_pool_connections", self.max_connections)
        options = {"use_listings_cache": False, "skip_instance_cache": True, **storage_options, "config_kwargs": config}
        fs = s3fs.S3FileSystem(**options)
        fs.retries = 1  # this instance only (skip_instance_cache): botocore retries instead
        root = bucket_and_prefix.strip("/")
        self.part_size_bytes = part_size_bytes
        super().__init__(fs, root, f"s3://{root}")

    def remove_abandoned_uploads(self, *, older_than_s: float) -> int:
        """Abort multipart uploads under the prefix started more than ``older_than_s`` ago
        (left by writers that died mid-upload; S3 keeps and bills their parts)."""
        bucket, prefix, _ = self._fs.split_path(self._root + "/")
        cutoff = time.time() - older_than_s
        removed = 0
        with _translated("", "list the multipart uploads of"):
            response = self._fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
            for upload in response.get("Uploads", []):
                if _modified_s({"LastModified": upload["Initiated"]}) < cutoff:
                    self._fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    removed += 1
        return removed

    def put_if_absent(self, key: str, data: Data) -> bool:
        path = self._path(key)
        try:
            with _translated(key, "write"):  # multipart above 2 parts, completed create-only
                self._fs.pipe_file(path, _joined(data), mode="create", chunksize=self.part_size_bytes)
        except PreconditionFailed:
            return False
        return True

    def delete_many(self, keys: Iterable[str]) -> None:
        paths = [self._path(key) for key in keys]
        for start in range(0, len(paths), 1000):
            batch = paths[start : start + 1000]
            with contextlib.suppress(ObjectNotFound), _translated(batch[0][len(self._root) + 1 :], "delete"):
                self._fs.rm(batch)  # s3fs sends one DeleteObjects request per 1,000 keys

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        from fsspec.asyn import sync

        bucket, object_key, _ = self._fs.split_path(self._path(key))

        async def fetch() -> tuple[bytes, str]:
            response = await self._fs._call_s3("get_object", Bucket=bucket, Key=object_key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        with _translated(key, "read"):
            return sync(self._fs.loop, fetch)

    def put_if_version(self, key: str, data: bytes, *, version: str | None) -> str:
        path = self._path(key)
        if version is None:
            with _translated(key, "update"):
                response = self._fs.pipe_file(path, data, mode="create")
        else:
            with _missing_is_mismatch(key), _translated(key, "update"):
                response = self._fs.pipe_file(path, data, IfMatch=version)
        return response["ETag"]

    def delete_if_version(self, key: str, *, version: str) -> None:
        bucket, object_key, _ = self._fs.split_path(self._path(key))
        with _missing_is_mismatch(key), _translated(key, "delete"):
            self._fs.call_s3("delete_object", Bucket=bucket, Key=object_key, IfMatch=version)


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
            raise ValueError("storage_options are not used by a local store")
        if not create and not os.path.isdir(os.path.expanduser(rest)):
            raise StoreNotFound(f"no ckptstore store at {os.path.abspath(os.path.expanduser(rest))}")
        return LocalObjectStore(rest)
    if protocol == "memory":
        return MemoryObjectStore(rest or "default")
    if protocol in ("s3", "s3a"):
        if not rest.strip("/"):
            raise ValueError(f"S3 store URL {url!r} names no bucket")
        return S3ObjectStore(rest, options)
    raise ValueError(
        f"unsupported store URL scheme {protocol!r} in {url!r}: use a local path, memory://NAME "
        "or s3://BUCKET/PREFIX (they are the backends with atomic create-only and "
        "compare-and-swap writes)"
    )
