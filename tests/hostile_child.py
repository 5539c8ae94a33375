"""Child process for ``test_hostile_input.py``: runs hostile-input cases one at a time and
measures each.

``python tests/hostile_child.py OUT.json [CASE ...]`` runs the named cases (default: all) and
writes, per case: the exception raised (its type, whether it is a ``CkptStoreError``, its
message), the wall time of the operation, the resident memory before it and the peak during
it, and the CPU time of the whole process during it. Each case has a setup (not measured:
building inputs, copying a store) and an operation (measured). The peak is the kernel's high-water mark (``VmHWM``), reset before each operation
through ``/proc/self/clear_refs``; where that is not possible it falls back to ``ru_maxrss``,
which is only an upper bound on growth once an earlier case peaked higher (reported as
``peak_exact: false``). The address space is capped (``RLIMIT_AS``) so that a runaway case
fails here instead of taking the machine's memory.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgpack
import torch

import ckptstore
from ckptstore.codec import HEADER, MAGIC, Kind, decode_object, encode_object_bytes
from ckptstore.commit import decode_commit
from ckptstore.errors import CkptStoreError
from ckptstore.ids import content_id
from ckptstore.manifest import Manifest
from ckptstore.store import StoreConfig
from ckptstore.tree import unpack_value

GiB = 1 << 30
MiB = 1 << 20
CHUNK = 4096


# --------------------------------------------------------------------------------------------
# Memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def _peak_bytes(exact: bool) -> int:
    kib = _status_kib("VmHWM") if exact else None
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cap_address_space(extra: int) -> None:
    vm = _status_kib("VmSize")
    if vm is None:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm * 1024 + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


# --------------------------------------------------------------------------------------------
# Hostile bytes


def frame(kind: Kind, raw_size: int, body: bytes, *, codec: int = 1, version: int = 1) -> bytes:
    """An object frame with whatever header fields the case wants."""
    return HEADER.pack(MAGIC, version, kind, codec, 0, raw_size, len(body)) + body


def zstd_bomb(total: int, *, content_size: int | None = None) -> bytes:
    """A zstd frame that inflates to ``total`` zero bytes from 4 bytes per 128 KiB (RLE
    blocks), declaring ``content_size`` (or no size at all). 64 GiB is a 2 MiB frame."""
    header = b"\x28\xb5\x2f\xfd"
    header += bytes([0x00, 0x38]) if content_size is None else bytes([0xC0, 0x38]) + struct.pack("<Q", content_size)
    block = 128 << 10
    full, rest = divmod(total, block)
    sizes = [block] * full + ([rest] if rest else [])
    if not sizes:
        return header + struct.pack("<I", 1)[:3]  # an empty last raw block
    one = lambda size, last: struct.pack("<I", (size << 3) | (1 << 1) | int(last))[:3] + b"\0"
    return header + one(block, False) * (len(sizes) - 1) + one(sizes[-1], True)


def nested_arrays(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


def nested_ext(depth: int) -> bytes:
    data = msgpack.packb(0)
    for _ in range(depth):
        data = msgpack.packb(msgpack.ExtType(2, data))
    return data


# --------------------------------------------------------------------------------------------
# A real store to damage


class Base:
    """A small local store with two commits; ``copy()`` gives a fresh store directory."""

    def __init__(self, work: str) -> None:
        self.work = work
        self.root = os.path.join(work, "base")
        store = ckptstore.open(self.root, chunk_size_bytes=CHUNK, inline_threshold_bytes=64, threads=2)
        g = torch.Generator().manual_seed(0)
        self.state1 = {"w": torch.randn(4096, generator=g), "b": torch.arange(2048, dtype=torch.int64), "step": 1}
        self.state2 = {"w": torch.randn(4096, generator=g), "b": torch.arange(2048, dtype=torch.int64), "step": 2}
        self.c1 = store.commit(self.state1, message="one")
        self.c2 = store.commit(self.state2, message="two")
        manifest = store.get_manifest(self.c2.manifest)
        self.chunk_ids = sorted({c.id for b in manifest.blobs for c in b.chunks})
        self.manifest_raw = manifest.to_bytes()
        self.commit_raw = store.catalog.commit_object(self.c2.id)
        store.close()
        self._n = 0

    def copy(self, *, keep_catalog: bool = False) -> str:
        self._n += 1
        root = os.path.join(self.work, f"case-{self._n}")
        shutil.copytree(self.root, root, ignore=None if keep_catalog else shutil.ignore_patterns(".catalog"))
        return root

    def write(self, root: str, key: str, data: bytes) -> None:
        path = os.path.join(root, *key.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def publish(self, root: str, *, manifest_doc: dict | None = None, commit_doc: dict | None = None) -> str:
        """Store a manifest and/or commit built from documents (ids that match their bytes, so
        they pass the hash check and reach the decoder) and move ``main`` to the commit."""
        doc = commit_doc if commit_doc is not None else msgpack.unpackb(self.commit_raw, raw=False)
        if manifest_doc is not None:
            raw = msgpack.packb(manifest_doc, use_bin_type=True)
            mid = content_id(raw)
            self.write(root, f"manifests/{mid[:2]}/{mid}", encode_object_bytes(Kind.MANIFEST, raw, compression_level=None))
            doc = {**doc, "manifest": mid, "manifest_size": len(raw)}
        raw = msgpack.packb(doc, use_bin_type=True)
        cid = content_id(raw)
        self.write(root, f"commits/{cid[:2]}/{cid}", encode_object_bytes(Kind.COMMIT, raw, compression_level=None))
        self.write(root, "refs/heads/main", encode_object_bytes(Kind.REF, cid.encode(), compression_level=None))
        return cid

    def manifest_doc(self) -> dict:
        return msgpack.unpackb(self.manifest_raw, raw=False)


def _open(root: str) -> ckptstore.Store:
    return ckptstore.open(root, threads=2)


def _checkout(root: str, rev: str = "main") -> Callable[[], Any]:
    def op() -> Any:
        with _open(root) as store:
            return store.checkout(rev)

    return op


# --------------------------------------------------------------------------------------------
# Cases: name → setup(base) returning (operation, expected size in bytes); the error class
# the case expects; whether it runs in a process of its own (it may not end by itself).

Case = Callable[[Base], tuple[Callable[[], Any], int]]
CASES: dict[str, Case] = {}
EXPECT: dict[str, str] = {}
ISOLATED: set[str] = set()


def case(name: str, *, expect: str = "CkptStoreError", isolated: bool = False) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = fn
        EXPECT[name] = expect
        if isolated:
            ISOLATED.add(name)
        return fn

    return register


# Decoders called directly.


@case("decode_object: header declares 64 GiB")
def _(base: Base):
    data = frame(Kind.CHUNK, 64 * GiB, zstd_bomb(CHUNK, content_size=CHUNK))
    return (lambda: decode_object(data, key="chunks/x", kind=Kind.CHUNK, max_raw_size=CHUNK)), CHUNK


@case("decode_object: zstd frame declares 64 GiB")
def _(base: Base):
    data = frame(Kind.CHUNK, CHUNK, zstd_bomb(4 * CHUNK, content_size=64 * GiB))
    return (lambda: decode_object(data, key="chunks/x", kind=Kind.CHUNK, max_raw_size=CHUNK)), CHUNK


@case("decode_object: 64 GiB zstd bomb, no content size")
def _(base: Base):
    data = frame(Kind.CHUNK, CHUNK, zstd_bomb(64 * GiB))
    return (lambda: decode_object(data, key="chunks/x", kind=Kind.CHUNK, max_raw_size=CHUNK)), CHUNK


@case("decode_object: 64 GiB zstd bomb as a manifest (header and frame both 64 GiB)")
def _(base: Base):
    data = frame(Kind.MANIFEST, 64 * GiB, zstd_bomb(64 * GiB, content_size=64 * GiB))
    return (lambda: decode_object(data, key="manifests/x", kind=Kind.MANIFEST, max_raw_size=1 << 32)), len(base.manifest_raw)


@case("decode_object: truncated header")
def _(base: Base):
    data = frame(Kind.CHUNK, CHUNK, b"x" * CHUNK, codec=0)[:13]
    return (lambda: decode_object(data, key="chunks/x", kind=Kind.CHUNK, max_raw_size=CHUNK)), CHUNK


@case("decode_object: truncated zstd body")
def _(base: Base):
    body = zstd_bomb(CHUNK, content_size=CHUNK)
    data = frame(Kind.CHUNK, CHUNK, body)[:-3]
    return (lambda: decode_object(data, key="chunks/x", kind=Kind.CHUNK, max_raw_size=CHUNK)), CHUNK


@case("decode_object: garbage")
def _(base: Base):
    data = os.urandom(1 * MiB)
    return (lambda: decode_object(data, key="chunks/x", kind=Kind.CHUNK, max_raw_size=CHUNK)), CHUNK


@case("decode_object: garbage zstd body behind a good header")
def _(base: Base):
    data = frame(Kind.CHUNK, CHUNK, b"\x28\xb5\x2f\xfd" + os.urandom(CHUNK))
    return (lambda: decode_object(data, key="chunks/x", kind=Kind.CHUNK, max_raw_size=CHUNK)), CHUNK


@case("decode_object: unknown object format version", expect="UnsupportedFormat")
def _(base: Base):
    data = frame(Kind.CHUNK, 3, b"abc", codec=0, version=200)
    return (lambda: decode_object(data, key="chunks/x", kind=Kind.CHUNK, max_raw_size=CHUNK)), CHUNK


@case("Manifest.from_bytes: array of 2**32-1 items declared in 5 bytes")
def _(base: Base):
    data = b"\xdd\xff\xff\xff\xff"
    return (lambda: Manifest.from_bytes(data, key="m")), 0


@case("Manifest.from_bytes: map of 2**32-1 entries declared")
def _(base: Base):
    data = b"\xdf\xff\xff\xff\xff" + b"\xc0" * 64
    return (lambda: Manifest.from_bytes(data, key="m")), 0


@case("unpack_value: str of 4 GiB declared")
def _(base: Base):
    data = b"\xdb\xff\xff\xff\xff" + b"x" * 100
    return (lambda: unpack_value(data, key="m")), 0


@case("decode_commit: bin of 4 GiB declared")
def _(base: Base):
    data = b"\xc6\xff\xff\xff\xff" + b"x" * 100
    return (lambda: decode_commit("0" * 32, data, key="c")), 0


@case("Manifest.from_bytes: arrays nested 1,000,000 deep")
def _(base: Base):
    data = nested_arrays(1_000_000)
    return (lambda: Manifest.from_bytes(data, key="m")), len(data)


@case("unpack_value: arrays nested 1,000,000 deep")
def _(base: Base):
    data = nested_arrays(1_000_000)
    return (lambda: unpack_value(data, key="m")), len(data)


@case("decode_commit: arrays nested 1,000,000 deep")
def _(base: Base):
    data = nested_arrays(1_000_000)
    return (lambda: decode_commit("0" * 32, data, key="c")), len(data)


@case("unpack_value: extensions nested 5,000 deep")
def _(base: Base):
    data = nested_ext(5000)
    return (lambda: unpack_value(data, key="m")), len(data)


@case("decode_commit: metadata nested 100,000 deep")
def _(base: Base):
    doc = msgpack.unpackb(base.commit_raw, raw=False)
    doc["metadata"] = nested_arrays(100_000)
    data = msgpack.packb(doc, use_bin_type=True)
    return (lambda: decode_commit("0" * 32, data, key="c")), len(data)


@case("Manifest.from_bytes: 16 MiB of floats")
def _(base: Base):
    data = msgpack.packb([float(i) for i in range(16 * MiB // 9)], use_bin_type=True)
    return (lambda: Manifest.from_bytes(data, key="m")), len(data)


@case("Manifest.from_bytes: 4 MiB of tensor entries, the last one malformed")
def _(base: Base):
    doc = base.manifest_doc()
    entry = ["p" * 8, "float32", [1], None, 0, 0, 0, False]
    doc["tensors"] = [entry] * (4 * MiB // 24) + [["p", "float33", [1], None, 0, 0, 0, False]]
    data = msgpack.packb(doc, use_bin_type=True)
    return (lambda: Manifest.from_bytes(data, key="m")), len(data)


@case("Manifest.from_bytes: unknown manifest format version", expect="UnsupportedFormat")
def _(base: Base):
    data = msgpack.packb({**base.manifest_doc(), "format": 999}, use_bin_type=True)
    return (lambda: Manifest.from_bytes(data, key="m")), len(data)


@case("decode_commit: unknown commit format version", expect="UnsupportedFormat")
def _(base: Base):
    data = msgpack.packb({**msgpack.unpackb(base.commit_raw, raw=False), "format": 999}, use_bin_type=True)
    return (lambda: decode_commit("0" * 32, data, key="c")), len(data)


@case("StoreConfig.from_bytes: unknown store format version", expect="UnsupportedFormat")
def _(base: Base):
    data = msgpack.packb({**StoreConfig().__dict__, "format": 99}, use_bin_type=True)
    return (lambda: StoreConfig.from_bytes(data)), len(data)


@case("Manifest.from_bytes: shape x itemsize larger than the blob")
def _(base: Base):
    doc = {
        "format": 1,
        "tree": msgpack.packb({}),
        "tensors": [["x", "float32", [10**9], None, 0, 0, 0, False]],
        "blobs": [[8, [], b"\0" * 8]],
    }
    data = msgpack.packb(doc, use_bin_type=True)
    return (lambda: Manifest.from_bytes(data, key="m")), len(data)


@case("Manifest.from_bytes: shape x stride past the blob")
def _(base: Base):
    doc = {
        "format": 1,
        "tree": msgpack.packb({}),
        "tensors": [["x", "float32", [2, 2], [2**40, 1], 0, 0, 0, False]],
        "blobs": [[16, [], b"\0" * 16]],
    }
    data = msgpack.packb(doc, use_bin_type=True)
    return (lambda: Manifest.from_bytes(data, key="m")), len(data)


# Through a real store: the hostile object sits on disk, the operation is what a user runs.


def _chunk_key(base: Base) -> str:
    cid = base.chunk_ids[0]
    return f"chunks/{cid[:2]}/{cid}"


@case("store: a chunk whose header declares 64 GiB (checkout)")
def _(base: Base):
    root = base.copy()
    base.write(root, _chunk_key(base), frame(Kind.CHUNK, 64 * GiB, zstd_bomb(CHUNK, content_size=CHUNK)))
    return _checkout(root), 2 * 16384 + 16384


@case("store: a 64 GiB zstd bomb as a chunk, no content size (checkout)")
def _(base: Base):
    root = base.copy()
    base.write(root, _chunk_key(base), frame(Kind.CHUNK, CHUNK, zstd_bomb(64 * GiB)))
    return _checkout(root), 3 * 16384


@case("store: a 64 GiB zstd bomb as a chunk, no content size (fsck --read-data)")
def _(base: Base):
    root = base.copy()
    base.write(root, _chunk_key(base), frame(Kind.CHUNK, CHUNK, zstd_bomb(64 * GiB)))

    def op() -> None:
        with _open(root) as store:
            report = store.fsck(read_data=True)
        if report.ok:
            raise AssertionError("fsck found nothing")
        raise ckptstore.IntegrityError(str(report.problems[0]))  # what the report says

    return op, 3 * 16384


@case("store: a chunk whose header declares a 64 TiB body (checkout)")
def _(base: Base):
    root = base.copy(keep_catalog=True)
    path = os.path.join(root, *_chunk_key(base).split("/"))
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[16:24] = struct.pack("<Q", 64 << 40)  # body size
    base.write(root, _chunk_key(base), bytes(data))
    return _checkout(root), 3 * 16384


@case("store: a chunk whose header declares a 64 TiB body (fsck --read-data)")
def _(base: Base):
    root = base.copy(keep_catalog=True)
    path = os.path.join(root, *_chunk_key(base).split("/"))
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[16:24] = struct.pack("<Q", 64 << 40)
    base.write(root, _chunk_key(base), bytes(data))

    def op() -> None:
        with _open(root) as store:
            report = store.fsck(read_data=True)
        if report.ok:
            raise AssertionError("fsck found nothing")
        raise ckptstore.IntegrityError(str(report.problems[0]))

    return op, 3 * 16384


@case("store: requires_grad on an int64 tensor, id matching (checkout)")
def _(base: Base):
    root = base.copy()
    doc = base.manifest_doc()
    doc["tensors"] = [[*t[:7], t[1].startswith("int")] for t in doc["tensors"]]
    assert any(t[7] for t in doc["tensors"])
    base.publish(root, manifest_doc=doc)
    return _checkout(root), 3 * 16384


@case("store: a 1 GiB zstd bomb as a manifest (checkout)")
def _(base: Base):
    root = base.copy(keep_catalog=True)
    mid = base.c2.manifest
    base.write(root, f"manifests/{mid[:2]}/{mid}", frame(Kind.MANIFEST, GiB, zstd_bomb(GiB, content_size=GiB)))
    return _checkout(root), len(base.manifest_raw)


@case("store: a 64 MiB zstd bomb as a commit object (open and checkout)")
def _(base: Base):
    root = base.copy()
    cid = base.c2.id
    base.write(root, f"commits/{cid[:2]}/{cid}", frame(Kind.COMMIT, 64 * MiB, zstd_bomb(64 * MiB, content_size=64 * MiB)))
    return _checkout(root, cid), len(base.commit_raw)


@case("store: a ref whose header declares 64 GiB (checkout)")
def _(base: Base):
    root = base.copy(keep_catalog=True)
    base.write(root, "refs/heads/main", frame(Kind.REF, 64 * GiB, zstd_bomb(4096, content_size=4096)))
    return _checkout(root), 0


@case("store: a config whose header declares 64 GiB (open)")
def _(base: Base):
    root = base.copy()
    base.write(root, "config", frame(Kind.CONFIG, 64 * GiB, zstd_bomb(64 * GiB, content_size=64 * GiB)))
    return (lambda: _open(root)), 0


@case("store: a 1 MiB zstd bomb as the config (open)")
def _(base: Base):
    root = base.copy()
    base.write(root, "config", frame(Kind.CONFIG, MiB, zstd_bomb(MiB, content_size=MiB)))
    return (lambda: _open(root)), MiB


@case("store: config of an unknown object format version (open)", expect="UnsupportedFormat")
def _(base: Base):
    root = base.copy()
    raw = StoreConfig().to_bytes()
    base.write(root, "config", frame(Kind.CONFIG, len(raw), raw, codec=0, version=200))
    return (lambda: _open(root)), 0


@case("store: config of an unknown store format version (open)", expect="UnsupportedFormat")
def _(base: Base):
    root = base.copy()
    raw = msgpack.packb({**StoreConfig().__dict__, "format": 99}, use_bin_type=True)
    base.write(root, "config", frame(Kind.CONFIG, len(raw), raw, codec=0))
    return (lambda: _open(root)), 0


@case("store: manifest of an unknown format version, id matching (checkout)", expect="UnsupportedFormat")
def _(base: Base):
    root = base.copy()
    base.publish(root, manifest_doc={**base.manifest_doc(), "format": 999})
    return _checkout(root), len(base.manifest_raw)


@case("store: commit of an unknown format version, id matching (checkout)", expect="UnsupportedFormat")
def _(base: Base):
    root = base.copy()
    base.publish(root, commit_doc={**msgpack.unpackb(base.commit_raw, raw=False), "format": 999})
    return _checkout(root), len(base.commit_raw)


@case("store: chunk of an unknown object format version (checkout)", expect="UnsupportedFormat")
def _(base: Base):
    root = base.copy(keep_catalog=True)
    base.write(root, _chunk_key(base), frame(Kind.CHUNK, CHUNK, b"\0" * CHUNK, codec=0, version=200))
    return _checkout(root), 3 * 16384


@case("store: shape x itemsize larger than the bytes, id matching (checkout)")
def _(base: Base):
    root = base.copy()
    doc = base.manifest_doc()
    doc["tensors"] = [[t[0], t[1], [t[2][0] * 1000], *t[3:]] for t in doc["tensors"]]
    base.publish(root, manifest_doc=doc)
    return _checkout(root), 3 * 16384


@case("store: a manifest claiming a 1 TiB blob, id matching (checkout)")
def _(base: Base):
    root = base.copy()
    doc = base.manifest_doc()
    size = 1 << 40
    chunk = doc["blobs"][0][1][0][0]
    doc["blobs"] = [[size, [[chunk, size]], None]]
    doc["tensors"] = [["w", "float32", [size // 4], None, 0, 0, 0, False]]
    doc["tree"] = msgpack.packb({"w": msgpack.ExtType(1, msgpack.packb(0))})
    base.publish(root, manifest_doc=doc)
    return _checkout(root), 3 * 16384


@case("store: a tree nested 1,000,000 deep, id matching (checkout)")
def _(base: Base):
    root = base.copy()
    base.publish(root, manifest_doc={**base.manifest_doc(), "tree": nested_arrays(1_000_000)})
    return _checkout(root), 1_000_000


@case("store: a shallow record grafting a commit onto its own descendant (log)", isolated=True)
def _(base: Base):
    root = base.copy(keep_catalog=True)
    record = msgpack.packb({"parents": [base.c2.id], "at_s": time.time()}, use_bin_type=True)
    base.write(root, f"shallow/{base.c1.id}", encode_object_bytes(Kind.RECORD, record, compression_level=None))

    def op() -> Any:
        with _open(root) as store:
            return [c.id for c in store.log("main")]

    return op, 0


# --------------------------------------------------------------------------------------------


def run(names: list[str]) -> list[dict[str, Any]]:
    _cap_address_space(int(float(os.environ.get("CKPTSTORE_HOSTILE_CAP_GIB", "8")) * GiB))
    work = tempfile.mkdtemp(prefix="ckptstore-hostile-")
    results = []
    try:
        base = Base(work)
        for name in names:
            op, expected = CASES[name](base)
            gc.collect()
            exact = _reset_peak()
            before = _rss_bytes()
            if os.environ.get("CKPTSTORE_HOSTILE_MARK"):  # the parent times the case from here
                open(os.environ["CKPTSTORE_HOSTILE_MARK"], "w").close()
            start = time.perf_counter()
            cpu_start = time.process_time()
            error: BaseException | None = None
            try:
                op()
            except BaseException as exc:  # noqa: BLE001 - every outcome is reported
                error = exc
            seconds = time.perf_counter() - start
            cpu_seconds = time.process_time() - cpu_start
            peak = _peak_bytes(exact)
            del op
            results.append({
                "case": name,
                "expect": EXPECT[name],
                "error": None if error is None else type(error).__name__,
                "typed": isinstance(error, CkptStoreError),
                "message": None if error is None else str(error)[:400],
                "traceback": None if error is None or isinstance(error, CkptStoreError) else "".join(traceback.format_exception(error))[-2000:],
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "rss_before": before,
                "peak_growth": max(0, peak - before),
                "peak_exact": exact,
                "expected_bytes": expected,
            })  # fmt: skip
            error = None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_path, names = sys.argv[1], sys.argv[2:] or [n for n in CASES if n not in ISOLATED]
    with open(out_path, "w") as f:
        json.dump(run(names), f, indent=1)
