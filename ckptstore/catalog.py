"""The catalog: a SQLite index of commits and refs, for fast log, lookup and queries.

The object store is the truth; the catalog is a cache of it that can be deleted at any
time and is rebuilt (and reconciled with the refs) when a store is opened. This is the only
module that imports sqlite3.

Tables::

    meta      (key PK, value)                       schema version
    commits   (id PK, manifest, message, created_at, branch, step, logical_bytes,
               new_bytes, object)                   object: the commit object's bytes
    parents   (commit, position, parent)            PK (commit, position)
    metrics   (commit, name, value)                 PK (commit, name)
    refs      (kind, name, commit)                  PK (kind, name)

What a file catalog's failures mean (:func:`_failure`):

* *busy* (another process holds it): waited out, with backoff, for up to
  :data:`BUSY_TIMEOUT_S`, then taken as unwritable;
* *corrupt* (SQLite says so, or the integrity or schema check fails): moved aside as
  ``catalog.sqlite.corrupt-TIME`` and rebuilt;
* *unwritable* (disk full, read-only, cannot be opened or created; on open, or by any
  later statement): this process goes on with an in-memory catalog (a copy of the file's
  rows where they can be read), logged once, and the file is left as it is.

The catalog of a store that cannot be written (a read-only mount) is opened ``read_only``:
the file is read once, through SQLite's read-only URI (``mode=ro``, else ``immutable=1``
where a WAL file's index cannot be made), into memory, and nothing is written beside it:
no lock file, no WAL, nothing moved aside.

Opening (checking, moving aside, creating) holds an exclusive ``flock`` on
``catalog.sqlite.lock``, so processes opening one new store at once never take each
other's fresh catalog for a damaged one. What GC deletes is never decided from the catalog.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

log = logging.getLogger("ckptstore.catalog")

SCHEMA_VERSION = 4
#: Table → (columns, primary key). Created from this, and checked against it on open.
TABLES: dict[str, tuple[dict[str, type], str | tuple[str, ...]]] = {
    "meta": ({"key": str, "value": str}, "key"),
    "commits": (
        {
            "id": str,
            "manifest": str,
            "message": str,
            "created_at": float,
            "branch": str,
            "step": int,
            "logical_bytes": int,
            "new_bytes": int,
            "object": bytes,
        },
        "id",
    ),
    "parents": ({"commit": str, "position": int, "parent": str}, ("commit", "position")),
    "metrics": ({"commit": str, "name": str, "value": float}, ("commit", "name")),
    "refs": ({"kind": str, "name": str, "commit": str}, ("kind", "name")),
}
_SQL_TYPES = {str: "TEXT", int: "INTEGER", float: "FLOAT", bytes: "BLOB"}

#: How long opening the catalog, or one statement, waits for other processes before this
#: process gives up on the file (and keeps its catalog in memory).
BUSY_TIMEOUT_S = 60.0

#: SQLite's primary result codes by what they mean for a cache, and the messages they come
#: with (Python before 3.11 gives only the message).
_FAILURES: dict[str, dict[int, str]] = {
    "busy": {5: "database is locked", 6: "database table is locked"},
    "corrupt": {11: "malformed", 26: "file is not a database"},
    "unwritable": {
        3: "access permission denied",
        8: "readonly database",
        10: "disk i/o error",
        13: "database or disk is full",
        14: "unable to open database file",
        22: "large file support",
    },
}

_warned: set[str | None] = set()  # catalog files this process said it cannot use
_warned_lock = threading.Lock()


class _Damaged(sqlite3.DatabaseError):
    """A catalog file SQLite reads but that fails the integrity or schema check."""


def _failure(exc: BaseException) -> str | None:
    """``"busy"``, ``"corrupt"`` or ``"unwritable"`` for a failure of the catalog file, else
    ``None`` (a bug, or a closed catalog: raised)."""
    if isinstance(exc, _Damaged):
        return "corrupt"
    if isinstance(exc, OSError):  # the catalog's directory or lock file
        return "unwritable"
    if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, sqlite3.ProgrammingError | sqlite3.IntegrityError):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    message = str(exc).lower()
    for failure, codes in _FAILURES.items():
        if ((code & 0xFF) in codes) if code is not None else any(m in message for m in codes.values()):
            return failure
    return None


_Result = TypeVar("_Result")
_Params = ParamSpec("_Params")


def _falls_back(method: Callable[Concatenate[Catalog, _Params], _Result]) -> Callable[Concatenate[Catalog, _Params], _Result]:
    """Run a catalog method under the catalog's lock; if the file fails it (full, read-only,
    busy past the timeout, damaged while open), go on in memory and run it again there. An
    iterator argument is read into a list first, so the second run sees the same items."""

    again: Callable[..., _Result] = method  # called on the arguments with iterators read into lists

    @functools.wraps(method)
    def run(self: Catalog, /, *args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
        listed = tuple(list(a) if isinstance(a, Iterator) else a for a in args)
        listed_kwargs = {k: list(v) if isinstance(v, Iterator) else v for k, v in kwargs.items()}
        with self._lock:
            try:
                return again(self, *listed, **listed_kwargs)
            except sqlite3.DatabaseError as exc:
                if self.in_memory or _failure(exc) is None:
                    raise
                self._fall_back(exc)
            return again(self, *listed, **listed_kwargs)

    return run


@contextlib.contextmanager
def _exclusive(lock_path: str, *, deadline: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if absent, never removed; read
    access is enough); :class:`TimeoutError` if another process holds it past ``deadline``."""
    fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        delay_s = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{lock_path} held by another process for {BUSY_TIMEOUT_S:.0f} s") from None
                time.sleep(delay_s)
                delay_s = min(2 * delay_s, 0.05)
        yield
    finally:
        os.close(fd)  # drops the flock


def _insert(db: sqlite3.Connection, table: str, rows: Iterable[dict[str, Any]]) -> None:
    """Insert ``rows`` (column → value) into ``table``, each replacing the row of its primary
    key. In the caller's transaction."""
    for row in rows:
        columns = ", ".join(f"[{c}]" for c in row)
        db.execute(f"INSERT OR REPLACE INTO [{table}] ({columns}) VALUES ({', '.join('?' * len(row))})", list(row.values()))


class Catalog:
    """A SQLite catalog at ``path`` (``None``: in memory). Thread-safe; every method is
    one transaction (a process killed between two would otherwise leave a commit without
    its parents).

    Never fails because of the file: one that cannot be written (or stays locked past
    :data:`BUSY_TIMEOUT_S`) is left as it is and the catalog is kept in memory from then on
    (:attr:`in_memory`), starting from a copy of the file's rows where they can be read.
    With ``read_only`` (the file is in a store that cannot be written) the catalog is such a
    copy from the start, and the file is only read.
    """

    def __init__(self, path: str | None, *, read_only: bool = False) -> None:
        self.path = path
        self._lock = threading.RLock()
        #: Whether the catalog is kept in memory: no path, read-only, or the file could not be used.
        self.in_memory = path is None or read_only
        if path is None:
            self.db = self._memory()
            return
        if read_only:
            self.db = self._copy_of(path)
            return
        try:
            self.db = self._open_file(path)
        except (OSError, sqlite3.DatabaseError) as exc:
            if _failure(exc) is None:
                raise
            self._warn(exc)
            self.in_memory = True
            self.db = self._memory()

    def _open_file(self, path: str) -> sqlite3.Connection:
        """Open the catalog file, checked, with its schema, under the open lock: waits out
        other processes (busy), and moves a corrupt file aside once and starts a new one."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _exclusive(f"{path}.lock", deadline=deadline):
            moved_aside = False
            delay_s = 0.01
            while True:
                try:
                    return self._connect(path, timeout_s=max(deadline - time.monotonic(), 0.0))
                except sqlite3.DatabaseError as exc:
                    failure = _failure(exc)
                    if failure == "busy" and time.monotonic() + delay_s < deadline:
                        time.sleep(delay_s)
                        delay_s = min(2 * delay_s, 0.2)
                    elif failure == "corrupt" and not moved_aside:
                        aside = f"{path}.corrupt-{int(time.time())}"
                        log.warning("catalog %s is damaged (%s); moving it to %s and rebuilding it", path, exc, aside)
                        for suffix in ("", "-wal", "-shm"):
                            with contextlib.suppress(FileNotFoundError):
                                os.replace(path + suffix, aside + suffix)
                        moved_aside = True
                    else:
                        raise

    def _connect(self, path: str, *, timeout_s: float) -> sqlite3.Connection:
        """The checked catalog file with its schema; its statements wait ``timeout_s`` for
        other processes while opening, :data:`BUSY_TIMEOUT_S` afterwards."""
        conn = sqlite3.connect(path, check_same_thread=False, timeout=timeout_s)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            problems = conn.execute("PRAGMA integrity_check").fetchall()
            if problems != [("ok",)]:
                raise _Damaged(f"integrity check: {problems[0][0]}")
            self._create_schema(conn)
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _memory(self) -> sqlite3.Connection:
        db = sqlite3.connect(":memory:", check_same_thread=False)
        self._create_schema(db)
        return db

    def _copy_of(self, path: str) -> sqlite3.Connection:
        """An in-memory copy of the rows of the catalog file at ``path``, which is opened
        read-only and never written (nor anything beside it); empty where the file is
        missing, unreadable, damaged or of another schema (the store's sync fills it)."""
        uri = "file:" + urllib.parse.quote(os.path.abspath(path))
        for mode in ("mode=ro", "immutable=1"):  # a WAL file's index (-shm) cannot be made on a read-only mount
            memory = sqlite3.connect(":memory:", check_same_thread=False)
            try:
                with contextlib.closing(sqlite3.connect(f"{uri}?{mode}", uri=True, check_same_thread=False)) as conn:
                    problems = conn.execute("PRAGMA integrity_check").fetchall()
                    if problems != [("ok",)]:
                        raise _Damaged(f"integrity check: {problems[0][0]}")
                    conn.backup(memory)
                copy = memory
                self._create_schema(copy)
            except sqlite3.DatabaseError as exc:
                memory.close()
                log.debug("catalog %s could not be read (%s) with %s", path, exc, mode)
                continue
            log.debug("catalog %s is in a store that cannot be written; serving a copy of it from memory", path)
            return copy
        log.debug("catalog %s could not be read; building it in memory from the store", path)
        return self._memory()

    def _fall_back(self, exc: sqlite3.DatabaseError) -> None:
        """Go on in memory, from a copy of the file's rows if they can still be read (else
        empty: the store's next sync fills it). The file is left as it is."""
        self._warn(exc)
        memory = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            self.db.backup(memory)
            copy = memory
            self._create_schema(copy)
        except sqlite3.DatabaseError:
            memory.close()
            copy = self._memory()
        with contextlib.suppress(sqlite3.Error):
            self.db.close()
        self.db = copy
        self.in_memory = True

    def _warn(self, exc: BaseException) -> None:
        """Say once per process and file that the file is not used, and why."""
        with _warned_lock:
            first = self.path not in _warned
            _warned.add(self.path)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "catalog %s cannot be used (%s); keeping the catalog in memory for this process "
            "(it is a cache of the store: nothing is lost, commands work, lookups are slower)",
            self.path,
            exc,
        )

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, its lock taken at the start (``BEGIN IMMEDIATE``, waiting
        for other processes' writers): a transaction that read first could not upgrade.
        Run by a :func:`_falls_back` method, which holds the catalog's lock."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.db.in_transaction:  # SQLite ends it itself on some errors (disk full)
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @staticmethod
    def _create_schema(db: sqlite3.Connection) -> None:
        """Create the tables, or rebuild a catalog of another schema version. One exclusive
        transaction, so processes opening a new store at once never see half a schema."""
        with db:
            db.execute("BEGIN EXCLUSIVE")
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            if "meta" in tables:
                row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if row is not None and row[0] == str(SCHEMA_VERSION):
                    for name, (columns, _) in TABLES.items():
                        found = [r[1] for r in db.execute(f"PRAGMA table_info([{name}])")]
                        if found != list(columns):
                            raise _Damaged(f"catalog table {name} has columns {found}")
                    return
                for name in tables:
                    db.execute(f"DROP TABLE [{name}]")  # an older catalog: it is a cache, rebuild it
            for name, (columns, pk) in TABLES.items():
                keys = ", ".join(f"[{c}]" for c in ((pk,) if isinstance(pk, str) else pk))
                db.execute(f"CREATE TABLE [{name}] ({', '.join(f'[{c}] {_SQL_TYPES[t]}' for c, t in columns.items())}, PRIMARY KEY ({keys}))")
            _insert(db, "meta", [{"key": "schema", "value": str(SCHEMA_VERSION)}])
            db.execute("CREATE INDEX [idx_parents_parent] ON [parents] ([parent])")

    @_falls_back
    def clear(self) -> None:
        """Forget everything (the catalog is then rebuilt from the store)."""
        with self._write():
            for table in ("commits", "parents", "metrics", "refs"):
                self.db.execute(f"DELETE FROM {table}")

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- commits ---------------------------------------------------------------------------

    @_falls_back
    def add_commit(self, row: dict[str, Any], parents: Iterable[str], metrics: dict[str, float]) -> None:
        """Index one commit. Idempotent."""
        with self._write():
            _insert(self.db, "commits", [row])
            _insert(self.db, "parents", ({"commit": row["id"], "position": i, "parent": p} for i, p in enumerate(parents)))
            _insert(self.db, "metrics", ({"commit": row["id"], "name": k, "value": v} for k, v in metrics.items()))

    @_falls_back
    def remove_commits(self, ids: Iterable[str]) -> None:
        with self._write():
            for commit_id in ids:
                for table in ("parents", "metrics"):
                    self.db.execute(f"DELETE FROM {table} WHERE [commit] = ?", [commit_id])
                self.db.execute("DELETE FROM commits WHERE id = ?", [commit_id])

    @_falls_back
    def commit_rows(self) -> list[dict[str, Any]]:
        """Every commit's id, manifest, created_at and step, and its metrics as a dict."""
        columns = ("id", "manifest", "created_at", "step")
        rows = [dict(zip(columns, r)) for r in self.db.execute(f"SELECT {', '.join(columns)} FROM commits")]
        metrics: dict[str, dict[str, float]] = {}
        for commit_id, name, value in self.db.execute("SELECT [commit], name, value FROM metrics"):
            metrics.setdefault(commit_id, {})[name] = value
        for row in rows:
            row["metrics"] = metrics.get(row["id"], {})
        return rows

    @_falls_back
    def commit_object(self, commit_id: str) -> bytes | None:
        row = self.db.execute("SELECT object FROM commits WHERE id = ?", [commit_id]).fetchone()
        return None if row is None else row[0]

    @_falls_back
    def commit_ids(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT id FROM commits")}

    @_falls_back
    def ids_with_prefix(self, prefix: str) -> list[str]:
        rows = self.db.execute("SELECT id FROM commits WHERE id >= ? AND id < ? ORDER BY id", [prefix, prefix + "g"])
        return [r[0] for r in rows]

    @_falls_back
    def children(self, commit_id: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT [commit] FROM parents WHERE parent = ?", [commit_id])]

    # -- refs ------------------------------------------------------------------------------

    @_falls_back
    def refs(self, kind: str) -> dict[str, str]:
        rows = self.db.execute("SELECT name, [commit] FROM refs WHERE kind = ? ORDER BY name", [kind])
        return dict(rows.fetchall())

    @_falls_back
    def set_ref(self, kind: str, name: str, commit_id: str | None) -> None:
        with self._write():
            if commit_id is None:
                self.db.execute("DELETE FROM refs WHERE kind = ? AND name = ?", [kind, name])
            else:
                _insert(self.db, "refs", [{"kind": kind, "name": name, "commit": commit_id}])

    @_falls_back
    def replace_refs(self, kind: str, refs: dict[str, str]) -> None:
        """Make the catalog's refs of ``kind`` exactly ``refs``."""
        with self._write():
            self.db.execute("DELETE FROM refs WHERE kind = ?", [kind])
            _insert(self.db, "refs", ({"kind": kind, "name": n, "commit": c} for n, c in refs.items()))
