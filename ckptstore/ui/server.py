"""Serving the UI's pages (``ckpt ui``) and writing them as files (``ckpt ui --export``).

The server is the standard library's ``ThreadingHTTPServer``: the app is a handful of GET
routes over pages rendered in Python, so a framework would add a dependency and nothing
else (see docs/ui.md). It answers GET and HEAD only, binds 127.0.0.1 unless told another
address, and never writes to the store.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Callable
from html import escape
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import unquote, urlsplit

from ..errors import CkptStoreError
from ..store import Store
from .model import History
from .pages import Site

LOOPBACK = "127.0.0.1"
STATIC_FILES = ("ui.css", "ui.js")
_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".html": "text/html; charset=utf-8"}


def static_file(name: str) -> bytes:
    """A file the UI serves from the package (``ckptstore/ui/static``)."""
    return resources.files("ckptstore.ui").joinpath("static", name).read_bytes()


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_HEAD(self) -> None:
        self.do_GET(body=False)

    def do_GET(self, body: bool = True) -> None:
        path = unquote(urlsplit(self.path).path).lstrip("/")
        if path.startswith("static/") and path[len("static/") :] in STATIC_FILES:
            return self._send(HTTPStatus.OK, static_file(path[len("static/") :]), path, body=body)
        try:
            try:
                html = self.server.site().page(path)
            except CkptStoreError:  # perhaps a gc in another process removed what the history named: read it again, once
                html = self.server.site(reread=True).page(path)
        except CkptStoreError as exc:
            return self._send(HTTPStatus.INTERNAL_SERVER_ERROR, f"<pre>{escape(str(exc))}</pre>".encode(), ".html", body=body)
        if html is None:
            return self._send(
                HTTPStatus.NOT_FOUND, b"<p>no such page (a commit no branch or tag reaches any more, or a path this site does not have)</p>", ".html", body=body
            )
        self._send(HTTPStatus.OK, html.encode(), ".html" if path else "index.html", body=body)

    def _send(self, status: HTTPStatus, data: bytes, path: str, *, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", _TYPES.get(os.path.splitext(path)[1], "text/html; charset=utf-8"))
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: Store, history: History, reload: Callable[[], History] | None) -> None:
        super().__init__(address, _Handler)
        self._store = store
        self._site = self._warmed(Site(store, history))
        self._reload = reload
        self._lock = threading.Lock()

    def site(self, *, reread: bool = False) -> Site:
        """The pages, read again when a branch or tag moved since they were read, or when
        ``reread`` (a page found gone what the history named: collected meanwhile)."""
        with self._lock:
            history = self._site.history
            if self._reload is not None and (reread or self._store.branches() != history.branches or self._store.tags() != history.tags):
                self._site = self._warmed(Site(self._store, self._reload()))
            return self._site

    @staticmethod
    def _warmed(site: Site) -> Site:
        """``site``, with what its storage page needs being read in the background."""
        threading.Thread(target=_warm, args=(site,), name="ckpt-ui-warm", daemon=True).start()
        return site


def _warm(site: Site) -> None:
    try:
        site.warm()
    except CkptStoreError:
        pass  # the page itself reads again, and shows the error


def serve(
    store: Store,
    history: History,
    *,
    host: str | None = None,
    port: int = 8765,
    announce: Callable[[str], None] = print,
    reload: Callable[[], History] | None = None,
) -> None:
    """Serve the pages on ``host:port`` (default 127.0.0.1) until interrupted. ``host`` is
    the address asked for: the default binds loopback only."""
    address = host if host is not None else LOOPBACK
    server = _Server((address, port), store, history, reload)
    try:
        bound_host, bound_port = str(server.server_address[0]), server.server_address[1]
        announce(f"serving {store.url} at http://{bound_host}:{bound_port}/ (read-only; Ctrl-C stops)")
        if not is_loopback(address):
            announce(f"warning: {address} is not loopback: anyone who can reach this machine can read the store's history")
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def export_site(store: Store, history: History, directory: str) -> int:
    """Write every page (and the stylesheet and script) under ``directory`` as static files
    whose links are relative; returns how many pages. Each file is written whole (to a
    temporary name, then renamed)."""
    site = Site(store, history)
    count = 0
    for path in site.paths():
        html = site.page(path)
        assert html is not None, path
        _write(os.path.join(directory, path), html.encode())
        count += 1
    for name in STATIC_FILES:
        _write(os.path.join(directory, "static", name), static_file(name))
    return count


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
