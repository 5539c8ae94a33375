"""The catalog: a SQLite index of commits and refs, for fast log, lookup and queries.

The object store is the truth; the catalog is a cache of it that can be deleted at any
time and is rebuilt (and reconciled with the refs) when a store is opened. This is the only
module that imports sqlite-utils.

Tables::

    meta      (key PK, value)                       schema version
    commits   (id PK, manifest, message, created_at, branch, step, logical_bytes,
               new_bytes, object)                   object: the commit object's bytes
    parents   (commit, position, parent)            PK (commit, position)
    metrics   (commit, name, value)                 PK (commit, name)
    refs      (kind, name, commit)                  PK (kind, name)

A catalog file that SQLite cannot read, or that fails SQLite's integrity check, is moved
aside and rebuilt. What GC deletes is never decided from the catalog.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator

import sqlite_utils

log = logging.getLogger("ckptstore.catalog")

SCHEMA_VERSION = 4
#: Table → (columns, primary key). Created from this, and checked against it on open.
TABLES: dict[str, tuple[dict[str, type], str | tuple[str, ...]]] = {
    "meta": ({"key": str, "value": str}, "key"),
    "commits": (
        {"id": str, "manifest": str, "message": str, "created_at": float, "branch": str,
         "step": int, "logical_bytes": int, "new_bytes": int, "object": bytes},
        "id",
    ),
    "parents": ({"commit": str, "position": int, "parent": str}, ("commit", "position")),
    "metrics": ({"commit": str, "name": str, "value": float}, ("commit", "name")),
    "refs": ({"kind": str, "name": str, "commit": str}, ("kind", "name")),
}


class Catalog:
    """A SQLite catalog at ``path`` (``None``: in memory). Thread-safe; every method is
    one transaction (sqlite-utils would commit each insert on its own, and a process killed
    between two would leave a commit without its parents)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if path is None:
                raise
            aside = f"{path}.corrupt-{int(time.time())}"
            log.warning("catalog %s is unreadable (%s); moving it to %s and rebuilding it", path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.replace(path + suffix, aside + suffix)
            self._open()

    def _open(self) -> None:
        if self.path is None:
            conn = sqlite3.connect(":memory:", check_same_thread=False)
        else:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                problems = conn.execute("PRAGMA integrity_check").fetchall()
                if problems != [("ok",)]:
                    raise sqlite3.DatabaseError(f"integrity check: {problems[0][0]}")
            except sqlite3.DatabaseError:
                conn.close()
                raise
        self.db = sqlite_utils.Database(conn)
        try:
            self._create_schema()
        except sqlite3.DatabaseError:
            conn.close()
            raise

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, its lock taken at the start (``BEGIN IMMEDIATE``, waiting
        for other processes' writers): a transaction that read first could not upgrade."""
        with self._lock:
            self.db.conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.conn.execute("ROLLBACK")
                raise
            self.db.conn.execute("COMMIT")

    def _create_schema(self) -> None:
        """Create the tables, or rebuild a catalog of another schema version. One exclusive
        transaction, so processes opening a new store at once never see half a schema."""
        with self._lock, self.db.conn:
            self.db.conn.execute("BEGIN EXCLUSIVE")
            meta = self.db["meta"]
            if meta.exists():
                row = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if row is not None and row[0] == str(SCHEMA_VERSION):
                    for name, (columns, _) in TABLES.items():
                        if list(self.db[name].columns_dict) != list(columns):
                            raise sqlite3.DatabaseError(f"catalog table {name} has columns {list(self.db[name].columns_dict)}")
                    return
                for name in self.db.table_names():
                    self.db[name].drop()  # an older catalog: it is a cache, rebuild it
            for name, (columns, pk) in TABLES.items():
                self.db[name].create(columns, pk=pk)
            self.db["meta"].insert({"key": "schema", "value": str(SCHEMA_VERSION)})
            self.db["parents"].create_index(["parent"])

    def clear(self) -> None:
        """Forget everything (the catalog is then rebuilt from the store)."""
        with self._write():
            for table in ("commits", "parents", "metrics", "refs"):
                self.db.execute(f"DELETE FROM {table}")

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    # -- commits ---------------------------------------------------------------------------

    def add_commit(self, row: dict, parents: Iterable[str], metrics: dict[str, float]) -> None:
        """Index one commit. Idempotent."""
        with self._write():
            self.db["commits"].insert(row, replace=True)
            self.db["parents"].insert_all(
                ({"commit": row["id"], "position": i, "parent": p} for i, p in enumerate(parents)), replace=True
            )
            self.db["metrics"].insert_all(
                ({"commit": row["id"], "name": k, "value": v} for k, v in metrics.items()), replace=True
            )

    def remove_commits(self, ids: Iterable[str]) -> None:
        with self._write():
            for commit_id in ids:
                for table in ("parents", "metrics"):
                    self.db.execute(f"DELETE FROM {table} WHERE [commit] = ?", [commit_id])
                self.db.execute("DELETE FROM commits WHERE id = ?", [commit_id])

    def commit_rows(self) -> list[dict]:
        """Every commit's id, manifest, created_at and step, and its metrics as a dict."""
        with self._lock:
            rows = [dict(r) for r in self.db.query("SELECT id, manifest, created_at, step FROM commits")]
            metrics: dict[str, dict[str, float]] = {}
            for commit_id, name, value in self.db.execute("SELECT [commit], name, value FROM metrics"):
                metrics.setdefault(commit_id, {})[name] = value
        for row in rows:
            row["metrics"] = metrics.get(row["id"], {})
        return rows

    def commit_object(self, commit_id: str) -> bytes | None:
        with self._lock:
            row = self.db.execute("SELECT object FROM commits WHERE id = ?", [commit_id]).fetchone()
        return None if row is None else row[0]

    def commit_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self.db.execute("SELECT id FROM commits")}

    def ids_with_prefix(self, prefix: str) -> list[str]:
        with self._lock:
            rows = self.db.execute(
                "SELECT id FROM commits WHERE id >= ? AND id < ? ORDER BY id", [prefix, prefix + "g"]
            )
            return [r[0] for r in rows]

    def children(self, commit_id: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self.db.execute("SELECT [commit] FROM parents WHERE parent = ?", [commit_id])]

    # -- refs ------------------------------------------------------------------------------

    def refs(self, kind: str) -> dict[str, str]:
        with self._lock:
            rows = self.db.execute("SELECT name, [commit] FROM refs WHERE kind = ? ORDER BY name", [kind])
            return dict(rows.fetchall())

    def set_ref(self, kind: str, name: str, commit_id: str | None) -> None:
        with self._write():
            if commit_id is None:
                self.db.execute("DELETE FROM refs WHERE kind = ? AND name = ?", [kind, name])
            else:
                self.db["refs"].insert({"kind": kind, "name": name, "commit": commit_id}, replace=True)

    def replace_refs(self, kind: str, refs: dict[str, str]) -> None:
        """Make the catalog's refs of ``kind`` exactly ``refs``."""
        with self._write():
            self.db.execute("DELETE FROM refs WHERE kind = ?", [kind])
            self.db["refs"].insert_all(({"kind": kind, "name": n, "commit": c} for n, c in refs.items()), replace=True)
