"""Fault injection for the store's tests, at the lowest layer each backend has.

- :class:`S3FaultProxy`: an HTTP/1.1 proxy between s3fs and moto's server (the way
  bench/io.py's latency proxy sits there) that, request by request, answers 500 or 503
  itself, resets the connection before forwarding, forwards and then drops the response
  (the server applied the request; the client never hears), forwards and sends only part of
  the response (a truncated body), flips a byte of a response body, or adds latency. One-shot
  :class:`Rule` objects target a request that matches a predicate (say, the first ``PUT``
  with ``If-Match``).
- :class:`LocalFaults`: replaces the ``os`` module and the ``open`` builtin that
  ``ckptstore.backends.local`` and ``ckptstore._host`` call, so every system call a :class:`LocalObjectStore` makes
  can fail with an errno (EIO, ENOSPC), write or read fewer bytes than asked (short writes and
  short reads, which POSIX allows), end a read early (a torn file), or wait. A full disk is
  ``disk_full = True``: from then on every write fails with ENOSPC (after a partial write).

Both count what they did in ``stats`` so that a test can show the faults happened.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import errno
import io
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------------------------
# S3: an HTTP proxy in front of moto

#: Fault kinds of the proxy. ``500``/``503``: an error answer, not forwarded. ``reset``: the
#: connection is reset before the request is forwarded. ``lost``: forwarded (the server
#: applies it), then the connection is reset instead of answering. ``truncate``: forwarded,
#: then only part of the response is sent before the connection closes. ``flip``: forwarded,
#: one byte of a non-empty response body inverted (corruption on the wire, length intact).
#: ``stall`` (by rule only): the request is read and never answered.
TRANSIENT_HTTP_FAULTS = ("500", "503", "reset", "lost", "truncate")


@dataclass
class Request:
    """One HTTP request as the proxy read it."""

    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    head: bytes
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""


@dataclass
class Rule:
    """Apply ``fault`` to the next ``count`` requests for which ``match(request)`` is true
    (rules take precedence over the random faults, the first matching rule wins; ``"none"``
    only records). ``hits`` records the requests."""

    match: Callable[[Request], bool]
    fault: str
    count: int = 1
    hits: list[Request] = field(default_factory=list)


def _error_response(status: int) -> bytes:
    reason, code = {500: ("Internal Server Error", "InternalError"), 503: ("Slow Down", "SlowDown")}[status]
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>injected by the fault proxy</Message><RequestId>fault</RequestId></Error>'
    ).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def _abort(writer: asyncio.StreamWriter) -> None:
    """Reset the connection (RST, not FIN): the client sees ``connection reset``."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """The raw bytes of a chunked body, trailers included."""
    out = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        out += line
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, then an empty line
                trailer = await reader.readuntil(b"\r\n")
                out += trailer
                if trailer == b"\r\n":
                    return bytes(out)
        out += await reader.readexactly(size + 2)


class S3FaultProxy:
    """An HTTP proxy in front of ``upstream`` (moto's endpoint URL) on 127.0.0.1, run in an
    event loop thread of its own. Use as a context manager; ``url`` is the endpoint to give
    s3fs.

    ``rate``: the probability that a request gets one of ``faults`` (chosen uniformly, from
    a ``random.Random(seed)``). ``latency_s``: each request is delayed by a uniform time in
    ``[0, latency_s]``. ``where(request)``, if given, limits the random faults to the
    requests it accepts. ``enabled = False`` passes everything through untouched. Each request
    is forwarded on a connection of its own (``Connection: close`` upstream), so a fault on
    one never disturbs another.
    """

    def __init__(
        self, upstream: str, *, rate: float = 0.0, faults: tuple[str, ...] = TRANSIENT_HTTP_FAULTS, latency_s: float = 0.0,
        where: Callable[[Request], bool] | None = None, seed: int = 0, drop_headers: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        host_port = upstream.split("://", 1)[-1].rstrip("/")
        #: Request headers (lower-case names) removed before forwarding: an endpoint that
        #: ignores them, as one without conditional writes ignores If-None-Match and If-Match.
        self.drop_headers = frozenset(drop_headers)
        self.where = where
        self._up_host, port = host_port.rsplit(":", 1)
        self._up_port = int(port)
        self.rate = rate
        self.faults = tuple(faults)
        self.latency_s = latency_s
        self.enabled = True
        self.rules: list[Rule] = []
        self.stats: collections.Counter[str] = collections.Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s3-fault-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self.url = ""

    def __enter__(self):  # returns self
        self._thread.start()
        start = asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 20)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(10)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def add_rule(self, match: Callable[[Request], bool], fault: str, *, count: int = 1) -> Rule:
        rule = Rule(match, fault, count)
        with self._lock:
            self.rules.append(rule)
        return rule

    def storage_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` (from the ``s3_url`` fixture) with the endpoint moved to this proxy."""
        return {**options, "client_kwargs": {**options.get("client_kwargs", {}), "endpoint_url": self.url}}

    def _choose(self, request: Request) -> str | None:
        with self._lock:
            self.stats["requests"] += 1
            self.stats[f"requests.{request.method}"] += 1
            if not self.enabled:
                return None
            for rule in self.rules:
                if rule.count > 0 and rule.match(request):
                    rule.count -= 1
                    rule.hits.append(request)
                    if rule.fault == "none":  # a rule that only watches
                        return None
                    self.stats[f"fault.{rule.fault}"] += 1
                    return rule.fault
            if self.rate and (self.where is None or self.where(request)) and self._random.random() < self.rate:
                fault = self._random.choice(self.faults)
                self.stats[f"fault.{fault}"] += 1
                return fault
            return None

    def _delay(self) -> float:
        with self._lock:
            return self._random.uniform(0, self.latency_s) if self.enabled and self.latency_s else 0.0

    def _cut(self, n: int, low: int) -> int:
        with self._lock:
            return self._random.randrange(low, n) if n > low else low

    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head[:-4].split(b"\r\n")
        method, target, _ = lines[0].decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        kept = [lines[0]]
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
            if name.strip().lower() not in ("connection", "keep-alive", "expect", *self.drop_headers):
                kept.append(line)
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        else:
            body = b""
        upstream_head = b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n"
        return Request(method, target, headers, upstream_head, body)

    async def _forward(self, request: Request) -> bytes:
        up_r, up_w = await asyncio.open_connection(self._up_host, self._up_port, limit=1 << 20)
        try:
            up_w.write(request.head + request.body)
            await up_w.drain()
            return await up_r.read()  # the server closes after answering (Connection: close)
        finally:
            up_w.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await self._read_request(reader, writer)
                if request is None:
                    break
                fault = self._choose(request)
                delay = self._delay()
                if delay:
                    await asyncio.sleep(delay)
                if fault in ("500", "503"):
                    answer = _error_response(int(fault))
                    if request.method == "HEAD":  # headers only: a HEAD answer has no body
                        answer = answer[: answer.find(b"\r\n\r\n") + 4]
                    writer.write(answer)
                    await writer.drain()
                    continue
                if fault == "reset":
                    _abort(writer)
                    return
                if fault == "stall":  # never answers (a hung endpoint): the client must give up
                    await asyncio.sleep(3600)
                    return
                response = await self._forward(request)
                if fault == "lost":
                    _abort(writer)
                    return
                head_end = response.find(b"\r\n\r\n") + 4
                if fault == "truncate":
                    # Somewhere in the body if there is one, else in the head: the client
                    # reads a short body (or a broken head), then the connection closes.
                    low = head_end if len(response) > head_end and request.method != "HEAD" else 1
                    writer.write(response[: self._cut(len(response), low)])
                    await writer.drain()
                    writer.close()
                    return
                if fault == "flip" and len(response) > head_end and request.method != "HEAD":
                    at = self._cut(len(response), head_end)
                    response = response[:at] + bytes([response[at] ^ 0xFF]) + response[at + 1 :]
                writer.write(response)
                await writer.drain()
                if b"\r\nconnection: close" in response[:head_end].lower():
                    break
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            _abort(writer)
            raise
        with contextlib.suppress(Exception):
            writer.close()


def matches(method: str, *, header: str | None = None, path_contains: str = "") -> Callable[[Request], bool]:
    """A :class:`Rule` predicate: ``method``, with ``header`` present, path containing
    ``path_contains``."""

    def match(request: Request) -> bool:
        return request.method == method and (header is None or header in request.headers) and path_contains in request.path

    return match


# --------------------------------------------------------------------------------------------
# Local: the system calls of LocalObjectStore

#: Fault kinds of :class:`LocalFaults`. ``eio``: the call fails with EIO, what a disk, an NFS
#: mount or a FUSE filesystem reports for a failed I/O (transient: the store retries it).
#: ``eio_after``: a ``link``, ``replace``, ``unlink`` or ``mkdir`` is done, then reports EIO
#: (an NFS reply lost after the server applied the call: the local lost response).
#: ``short_write``/``short_read``: ``write``/``read`` move fewer bytes than asked (allowed by
#: POSIX; not an error). ``enospc``: a write, fsync, mkdir or create fails with ENOSPC.
#: ``torn_read``: a read reports the end of the file early (a torn or truncated object:
#: corruption, which verification must catch).
TRANSIENT_LOCAL_FAULTS = ("eio", "eio_after", "short_write", "short_read")
#: Calls an ``eio_after`` fault applies to.
APPLIED_THEN_FAILED = ("link", "replace", "unlink", "mkdir")


def _oserror(code: int, what: str) -> OSError:
    return OSError(code, f"{os.strerror(code)} (injected into {what})")


class LocalFaults:
    """Replace the ``os`` module and ``open`` seen by ``ckptstore.backends.local`` (``os`` also in ``ckptstore._host``) with ones
    that inject faults; ``install()``/``uninstall()`` or a ``with`` block. ``rate``: the
    probability that one system call gets a fault that applies to it (of ``faults``, chosen
    uniformly); ``latency_s``: each call waits a uniform time in ``[0, latency_s]``.
    ``calls``, if given, limits the random faults to those calls (names as in ``FAILING``);
    ``where(path)``, to calls on paths it accepts. ``enabled = False`` turns injection off
    without uninstalling."""

    #: Calls that may fail with an errno, and which of them write (ENOSPC applies to those).
    FAILING = (
        "open",
        "create",
        "write",
        "fsync",
        "link",
        "unlink",
        "replace",
        "mkdir",
        "stat",
        "fstat",
        "read",
        "scandir",
        "walk",
        "readinto",
        "exists",
        "isfile",
        "isdir",
    )
    WRITING = ("write", "fsync", "mkdir", "create")

    def __init__(
        self, *, rate: float = 0.0, faults: tuple[str, ...] = TRANSIENT_LOCAL_FAULTS, latency_s: float = 0.0,
        calls: tuple[str, ...] | None = None, where: Callable[[str], bool] | None = None, seed: int = 0,
    ) -> None:  # fmt: skip
        self.calls = calls
        self.where = where
        self.rate = rate
        self.faults = tuple(faults)
        self.latency_s = latency_s
        self.enabled = True
        self.disk_full = False
        self.stats: collections.Counter[str] = collections.Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._saved: dict[str, Any] = {}

    # -- installation ----------------------------------------------------------------------

    def install(self) -> LocalFaults:
        from ckptstore import _host
        from ckptstore.backends import local

        self._saved = {"os": local.os, "open": local.__dict__.get("open"), "host_os": _host.os}
        local.os = _FaultyOS(self)  # type: ignore[attr-defined]
        local.open = self._open  # type: ignore[attr-defined]
        _host.os = local.os  # type: ignore[attr-defined]  # fsync_directory
        return self

    def uninstall(self) -> None:
        from ckptstore import _host
        from ckptstore.backends import local

        local.os = self._saved["os"]  # type: ignore[attr-defined]
        _host.os = self._saved["host_os"]  # type: ignore[attr-defined]
        if self._saved["open"] is None:
            del local.open  # type: ignore[attr-defined]
        else:
            local.open = self._saved["open"]  # type: ignore[attr-defined]

    def __enter__(self):  # returns self
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No faults (and no full disk) inside the block."""
        enabled, full = self.enabled, self.disk_full
        self.enabled, self.disk_full = False, False
        try:
            yield
        finally:
            self.enabled, self.disk_full = enabled, full

    # -- decisions -------------------------------------------------------------------------

    def _pick(self, call: str, what: str = "") -> str | None:
        """The fault for one call of ``call`` on ``what`` (or None), counted in ``stats``."""
        with self._lock:
            self.stats[f"calls.{call}"] += 1
            if not self.enabled:
                return None
            if self.disk_full and call in self.WRITING:
                self.stats["fault.enospc"] += 1
                return "enospc"
            delay = self._random.uniform(0, self.latency_s) if self.latency_s else 0.0
            fault = None
            targeted = (self.calls is None or call in self.calls) and (self.where is None or self.where(what))
            if self.rate and targeted and self._random.random() < self.rate:
                applicable = [f for f in self.faults if self._applies(f, call)]
                if applicable:
                    fault = self._random.choice(applicable)
                    self.stats[f"fault.{fault}"] += 1
        if delay:
            time.sleep(delay)
        return fault

    def _applies(self, fault: str, call: str) -> bool:
        if fault == "eio":
            return call in self.FAILING
        if fault == "eio_after":
            return call in APPLIED_THEN_FAILED
        if fault == "enospc":
            return call in self.WRITING
        if fault == "short_write":
            return call == "write"
        if fault in ("short_read", "torn_read"):
            return call == "readinto"
        return False

    def _fraction(self, n: int) -> int:
        """A count in ``[0, n)`` (at least 1 where ``n > 1``) for a partial transfer."""
        with self._lock:
            return self._random.randrange(1, n) if n > 1 else 0

    def check(self, call: str, what: str = "") -> str | None:
        """Raise the errno fault picked for ``call``; return any other fault for the caller."""
        fault = self._pick(call, what)
        return self.raise_for(fault, call, what)

    def raise_for(self, fault: str | None, call: str, what: str = "") -> str | None:
        if fault == "eio":
            raise _oserror(errno.EIO, f"{call} {what}".strip())
        if fault == "enospc":
            raise _oserror(errno.ENOSPC, f"{call} {what}".strip())
        return fault

    # -- the replaced calls ----------------------------------------------------------------

    def _open(self, path: Any, mode: str = "r", buffering: int = -1, *args: Any, **kwargs: Any) -> Any:
        if "b" not in mode or any(c in mode for c in "wax+"):
            return builtins.open(path, mode, buffering, *args, **kwargs)
        self.check("open", str(path))
        raw = _FaultyRaw(self, io.FileIO(path, "r"))
        return raw if buffering == 0 else io.BufferedReader(raw)


class _FaultyRaw(io.RawIOBase):
    """A file opened for reading whose reads may fail, come up short, or end early."""

    def __init__(self, faults: LocalFaults, raw: io.FileIO) -> None:
        super().__init__()
        self._faults = faults
        self._raw = raw
        self.name = raw.name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readinto(self, buffer: Any) -> int | None:
        view = memoryview(buffer).cast("B")
        fault = self._faults.check("readinto", str(self.name))
        if fault == "torn_read" and len(view):
            return 0
        if fault == "short_read" and len(view) > 1:
            view = view[: self._faults._fraction(len(view))]
        return self._raw.readinto(view)

    def readall(self) -> bytes:
        fault = self._faults.check("readinto", str(self.name))
        data = self._raw.readall()
        if fault in ("torn_read", "short_read") and len(data) > 1:
            cut = self._faults._fraction(len(data))
            if fault == "short_read":  # a short read, then the rest on the next call
                return data[:cut] + data[cut:]
            return data[:cut]
        return data

    def close(self) -> None:
        self._raw.close()
        super().close()


class _FaultyPath:
    """``os.path`` with fault-injecting ``exists``/``isfile``/``isdir``: like the real ones,
    they answer False when the underlying stat fails."""

    def __init__(self, faults: LocalFaults) -> None:
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(os.path, name)

    def _probe(self, call: str, path: Any, real: Callable[[Any], bool]) -> bool:
        try:
            self._faults.check(call, str(path))
        except OSError:
            return False
        return real(path)

    def exists(self, path: Any) -> bool:
        return self._probe("exists", path, os.path.exists)

    def isfile(self, path: Any) -> bool:
        return self._probe("isfile", path, os.path.isfile)

    def isdir(self, path: Any) -> bool:
        return self._probe("isdir", path, os.path.isdir)


class _FaultyScandir:
    """An ``os.scandir`` iterator whose iteration may fail with an errno midway."""

    def __init__(self, faults: LocalFaults, it: Any, path: str) -> None:
        self._faults = faults
        self._it = it
        self._path = path

    def __enter__(self):  # returns self
        return self

    def __exit__(self, *exc: object) -> None:
        self._it.close()

    def close(self) -> None:
        self._it.close()

    def __iter__(self) -> Iterator[os.DirEntry]:
        for n, entry in enumerate(self._it):
            if n and n % 32 == 0:  # one more getdents call
                self._faults.check("scandir", self._path)
            yield entry


class _FaultyOS:
    """The ``os`` module with its file system calls wrapped; everything else passes through."""

    def __init__(self, faults: LocalFaults) -> None:
        self._faults = faults
        self.path = _FaultyPath(faults)
        self._pending = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _after(self, fault: str | None, call: str, path: Any) -> None:
        """Remember an ``eio_after`` fault until the call is done (this thread only)."""
        self._pending.fault = fault

    def _after_done(self, call: str, path: Any) -> None:
        if getattr(self._pending, "fault", None) == "eio_after":
            self._pending.fault = None
            raise _oserror(errno.EIO, f"{call} {path}, after it was done")

    def open(self, path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        self._faults.check("create" if flags & os.O_CREAT else "open", str(path))
        return os.open(path, flags, mode, **kwargs)

    def write(self, fd: int, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._faults.disk_full and self._faults.enabled and len(view) > 1:
            os.write(fd, view[: self._faults._fraction(len(view))])  # some of it fits
        fault = self._faults.check("write", f"fd {fd}")
        if fault == "short_write" and len(view) > 1:
            return os.write(fd, view[: self._faults._fraction(len(view))])
        return os.write(fd, view)

    def read(self, fd: int, n: int) -> bytes:
        self._faults.check("read", f"fd {fd}")
        return os.read(fd, n)

    def fsync(self, fd: int) -> None:
        self._faults.check("fsync", f"fd {fd}")
        os.fsync(fd)

    def link(self, src: Any, dst: Any, **kwargs: Any) -> None:
        self._after(self._faults.check("link", str(dst)), "link", dst)
        os.link(src, dst, **kwargs)
        self._after_done("link", dst)

    def unlink(self, path: Any, **kwargs: Any) -> None:
        self._after(self._faults.check("unlink", str(path)), "unlink", path)
        os.unlink(path, **kwargs)
        self._after_done("unlink", path)

    def replace(self, src: Any, dst: Any, **kwargs: Any) -> None:
        self._after(self._faults.check("replace", str(dst)), "replace", dst)
        os.replace(src, dst, **kwargs)
        self._after_done("replace", dst)

    def mkdir(self, path: Any, mode: int = 0o777, **kwargs: Any) -> None:
        self._after(self._faults.check("mkdir", str(path)), "mkdir", path)
        os.mkdir(path, mode, **kwargs)
        self._after_done("mkdir", path)

    def stat(self, path: Any, **kwargs: Any) -> os.stat_result:
        self._faults.check("stat", str(path))
        return os.stat(path, **kwargs)

    def fstat(self, fd: int) -> os.stat_result:
        self._faults.check("fstat", f"fd {fd}")
        return os.fstat(fd)

    def scandir(self, path: Any = ".") -> Any:
        """``os.scandir``, whose listing may fail as it starts or midway (``getdents``)."""
        self._faults.check("scandir", str(path))
        return _FaultyScandir(self._faults, os.scandir(path), str(path))

    def walk(self, top: Any, topdown: bool = True, onerror: Any = None, followlinks: bool = False) -> Iterator[tuple[str, list[str], list[str]]]:
        """``os.walk``, where listing a directory may fail: as the real one does, the failure
        goes to ``onerror`` (ignored without one) and the directory is skipped."""
        for dirpath, dirnames, filenames in os.walk(top, topdown, onerror, followlinks):
            try:
                self._faults.check("walk", dirpath)
            except OSError as exc:
                if onerror is not None:
                    onerror(exc)
                dirnames[:] = []
                continue
            yield dirpath, dirnames, filenames
