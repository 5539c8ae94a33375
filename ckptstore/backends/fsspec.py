"""The fsspec backends: reads, listing and deletes through an fsspec filesystem
(:class:`_FsspecObjectStore`, which :class:`~ckptstore.backends.s3.S3ObjectStore` builds on),
and :class:`MemoryObjectStore` over fsspec's process-wide memory filesystem.

Named after the library it wraps: imports are absolute, so ``fsspec`` here is the library."""

from __future__ import annotations

import builtins
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from fsspec.implementations.memory import MemoryFileSystem

from ..errors import ObjectNotFound, PreconditionFailed, StorageError
from ..ids import content_id
from . import _KEY_RE, Data, ObjectInfo, ObjectStore, T, _chain, _check_prefix, _joined, _translated, check_key


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

        def cat() -> bytes:
            data: bytes = self._fs.cat_file(path, **kwargs)
            return data

        return self._attempts(key, "read", cat)

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

    def list_info(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        prefix = _check_prefix(prefix)
        base = f"{self._root}/{prefix}".rstrip("/")

        def find() -> dict[str, Any]:
            try:
                listing: dict[str, Any] = self._fs.find(base, detail=True)
                return listing
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
