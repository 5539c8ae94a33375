"""The object store: a narrow key → bytes contract, and :func:`open_object_store`.

This package is the only place that imports fsspec or s3fs, and :func:`_translated` the only
place where backend exceptions become :mod:`ckptstore.errors`. The backends:
:mod:`.local` (files under a directory), :mod:`.fsspec` (fsspec's memory filesystem, and
the reads shared with S3) and :mod:`.s3` (s3fs).

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
a transient errno (:data:`.local.TRANSIENT_ERRNOS`: a network or FUSE file system) by the local
backend, which redoes the whole operation (a fresh temp file, never a second ``fsync`` of the
same one). A listing is complete or raises, never silently partial.

Lost answers. A conditional write that was applied but whose answer was lost is resent and
then refused (S3: 412; local: the lock finds another version). It must count as done, once:
on S3 each conditional write carries a unique token in its metadata and, refused or failed,
looks for its own token on the object; locally a redone write that finds exactly its own
bytes (or, for a compare-and-delete, the object gone) succeeds.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from ..errors import (
    CkptStoreError,
    InvalidOption,
    ObjectNotFound,
    PreconditionFailed,
    ReadOnlyStore,
    StorageError,
    StoreNotFound,
)

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview
#: What a write accepts: one buffer, or a sequence of buffers written in order.
Data = Buffer | Sequence[Buffer]

_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*")


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
    def list_info(self, prefix: str = "") -> builtins.list[ObjectInfo]: ...

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
            refused = ReadOnlyStore(
                url,
                action=action if key else action.removesuffix(" of"),
                key=key or None,
                reason=getattr(exc, "strerror", None) or str(exc),
            )
            refused.errno = getattr(exc, "errno", None) or errno.EACCES
            raise refused from exc
        error = StorageError(f"could not {action} object {key}: {type(exc).__name__}: {exc}", key=key)
        if isinstance(exc, OSError) and exc.errno is not None:
            error.errno, error.strerror = exc.errno, exc.strerror  # ENOSPC stays ENOSPC
        raise error from exc


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and its causes (and contexts), outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_precondition_failure(exc: BaseException) -> bool:
    """S3's answer to a failed conditional write (412, or 409 for a concurrent one)."""
    for err in (exc, exc.__cause__, exc.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, Mapping):
            code = response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return True
    return False


def open_object_store(url: str, *, storage_options: Mapping[str, Any] | None = None, create: bool = True) -> ObjectStore:
    """Open the object store at ``url``: a local path (or ``file://``), ``memory://name`` or
    ``s3://bucket/prefix``. ``storage_options`` go to the backend (s3fs) and are never
    logged or shown. Without ``create``, a missing local directory is :class:`StoreNotFound`
    (and is not created)."""
    from .fsspec import MemoryObjectStore  # the backends build on this module: imported here
    from .local import LocalObjectStore
    from .s3 import S3ObjectStore

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
        "compare-and-swap writes)",
    )
