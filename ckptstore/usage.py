"""Disk usage: logical against physical bytes, per store, branch and commit (``ckpt du``).

*Logical* bytes are what the commits would take as plain files (every tensor's bytes, each
commit counted in full). *Physical* bytes are what the object store holds. The dedup ratio
is logical bytes over the raw bytes of the distinct chunks; the compression ratio is those
raw bytes over the chunks' stored bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .gc import Repository, chunk_key, commit_key, manifest_chunks, manifest_key
from .objectstore import ObjectInfo
from .refs import RefKind


@dataclass(frozen=True)
class CommitUsage:
    id: str
    logical_bytes: int
    #: Stored bytes this commit added when it was made.
    new_bytes: int
    #: Stored bytes of the objects no other commit needs (what removing it would free).
    exclusive_bytes: int


@dataclass(frozen=True)
class BranchUsage:
    name: str
    commits: int
    logical_bytes: int
    #: Stored bytes of every object the branch's history needs.
    physical_bytes: int


@dataclass
class Usage:
    """The result of :meth:`Store.du`."""

    physical_bytes: int = 0
    #: Object count and stored bytes per kind (``chunks``, ``manifests``, ``commits``, ``refs``…).
    objects: dict[str, tuple[int, int]] = field(default_factory=dict)
    logical_bytes: int = 0
    unique_raw_bytes: int = 0
    chunk_stored_bytes: int = 0
    branches: list[BranchUsage] = field(default_factory=list)
    commits: list[CommitUsage] = field(default_factory=list)

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_raw_bytes if self.unique_raw_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_raw_bytes / self.chunk_stored_bytes if self.chunk_stored_bytes else 1.0


def measure(repo: Repository) -> Usage:
    """Measure the store (lists every object once; each commit and manifest is read and
    verified, the catalog only says which commits there are)."""
    repo.sync_catalog()
    listing: dict[str, ObjectInfo] = {info.key: info for info in repo.objects.list_info("")}
    usage = Usage()
    for key, info in listing.items():
        kind = key.split("/", 1)[0] if "/" in key else key
        count, size = usage.objects.get(kind, (0, 0))
        usage.objects[kind] = (count + 1, size + info.size_bytes)
        usage.physical_bytes += info.size_bytes

    rows = {row["id"]: row for row in repo.catalog.commit_rows()}
    needs: dict[str, set[str]] = {}
    raw_sizes: dict[str, int] = {}
    for cid in rows:
        if commit_key(cid) not in listing:
            continue
        commit = repo.get_commit(cid)  # verified: not the catalog's column
        keys = {commit_key(cid), manifest_key(commit.manifest)}
        for chunk_id, size in manifest_chunks(repo, commit).items():
            key = chunk_key(chunk_id)
            if key in listing:  # a demoted commit's dropped chunks are gone
                keys.add(key)
                raw_sizes[key] = size
        needs[cid] = keys
    users: dict[str, int] = {}
    for keys in needs.values():
        for key in keys:
            users[key] = users.get(key, 0) + 1
    usage.unique_raw_bytes = sum(raw_sizes.values())
    usage.chunk_stored_bytes = sum(listing[key].size_bytes for key in raw_sizes)
    for cid, keys in needs.items():
        commit = repo.get_commit(cid)
        usage.logical_bytes += commit.stats.logical_bytes
        exclusive = sum(listing[k].size_bytes for k in keys if users[k] == 1)
        usage.commits.append(CommitUsage(cid, commit.stats.logical_bytes, commit.stats.new_bytes, exclusive))
    usage.commits.sort(key=lambda c: rows[c.id]["created_at"], reverse=True)

    for name, head in sorted(repo.refs.list(RefKind.BRANCH).items()):
        history = _ancestors(repo, head, needs)
        keys = set().union(*(needs[c] for c in history)) if history else set()
        usage.branches.append(
            BranchUsage(
                name, len(history), sum(repo.get_commit(c).stats.logical_bytes for c in history),
                sum(listing[k].size_bytes for k in keys),
            )
        )  # fmt: skip
    return usage


def _ancestors(repo: Repository, head: str, present: dict[str, set[str]]) -> list[str]:
    seen: list[str] = []
    stack = [head]
    visited = set()
    while stack:
        cid = stack.pop()
        if cid in visited or cid not in present:
            continue
        visited.add(cid)
        seen.append(cid)
        stack.extend(repo.parents_of(repo.get_commit(cid)))
    return seen
