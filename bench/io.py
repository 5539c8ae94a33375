#!/usr/bin/env python3
"""Benchmark: ckptstore I/O against torch.save, safetensors and torch.distributed.checkpoint.

One run, on the same states:

- **table**: durable writes and full reads of a GPT-2-small fp32 state with AdamW moments
  (1.49 GB) and the same state cast to bf16 (0.75 GB): ``torch.save``+fsync / ``torch.load``,
  safetensors ``save_file``+fsync / ``load_file`` (pread; and mmap with every page then
  touched, the peer of acceptance item 4 of issue 19), DCP ``save`` (FileSystemWriter,
  2 threads, ``sync_files``) / ``load`` into a preallocated state dict, ckptstore first
  commit / checkout / re-commit after 1% of the tensors changed. Reads warm and cold
  (``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file read).
- **threads**: ckptstore commit and checkout of the fp32 state with threads 1, 2, 4, 8.
- **async**: the blocking part of ``store.commit(state, blocking=False)``, first and steady
  state, against a blocking commit of the same amount of new data.
- **s3**: commit and checkout of 256 MiB in 4 MiB chunks on moto's S3 server, threads 1 vs
  16, directly and through a proxy that delays every HTTP request by 20 ms.
- ``--memory`` (a separate mode): peak RSS of committing and checking out a 6 GiB fp32
  state with ``max_inflight_bytes=512 MiB``.

Every measured operation runs in its own subprocess (this script re-invoked with ``--op``)
that prepares its input, resets the kernel's RSS high-water mark and then times the one
operation, as bench/commit_checkout.py does.

    python bench/io.py                    # everything but --memory (about 11 minutes here)
    python bench/io.py --memory           # the 6 GiB peak-RSS check
    python bench/io.py --quick            # small states, 1 repeat: checks the script works

See bench/README.md for the current figures, and bench/HISTORY.md for what is measured and earlier runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from commit_checkout import (
    _reset_peak_rss,
    _ru_maxrss,
    _status_kb,
    build_state,
    disk_usage,
    flatten_for_safetensors,
    fsync_with_directory,
    get_path,
    iter_tensors,
    machine_info,
    pick_changed,
    states_equal,
    unique_storage_bytes,
)

GB = 1e9
MB = 1e6
MiB = 1 << 20

DTYPES = ("fp32", "bf16")
#: safetensors' default load (mmap) with every page then touched: the issue's cold-read peer.
ST_TOUCHED = "safetensors load_file (mmap, every page touched)"
PEERS_SAVE = ("torch.save + fsync", "safetensors save_file + fsync", "DCP save (2 threads, sync_files)")


# --------------------------------------------------------------------------------------------
# Page cache, load average


def iter_files(path: str):
    if os.path.isfile(path):
        yield path
        return
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            yield os.path.join(dirpath, name)


def evict(path: str) -> None:
    """Drop every file under ``path`` from the page cache (clean pages only, hence the
    sync first). Unlike ``echo 3 > drop_caches`` it touches nothing else on the machine."""
    os.sync()
    for file in iter_files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(path: str) -> int | None:
    """Bytes of the files under ``path`` in the page cache (util-linux ``fincore``)."""
    files = list(iter_files(path))
    if not files or shutil.which("fincore") is None:
        return None
    total = 0
    for start in range(0, len(files), 200):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files[start : start + 200]], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            return None
        total += sum(int(x) for x in out.stdout.split())
    return total


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, max_wait_s: float) -> float:
    """Wait (at most ``max_wait_s``) until the 1-minute load average is ≤ ``max_load``."""
    t0 = time.time()
    while load1() > max_load and time.time() - t0 < max_wait_s:
        time.sleep(5)
    return load1()


# --------------------------------------------------------------------------------------------
# States (child processes)


def to_bf16(state: dict) -> dict:
    """The same state with every floating tensor of rank ≥ 1 cast to bf16 (model and Adam
    moments; the 0-d ``step`` counters stay fp32); the lm_head/wte tie is kept."""
    import torch

    memo: dict[int, Any] = {}

    def cast(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() == 0:
            return t
        if id(t) not in memo:
            memo[id(t)] = t.to(torch.bfloat16)
        return memo[id(t)]

    model = {k: cast(v) for k, v in state["model"].items()}
    ptrs = {}
    for k, v in state["model"].items():  # ties by storage, not only by object identity
        p = v.untyped_storage().data_ptr()
        if p in ptrs:
            model[k] = model[ptrs[p]]
        else:
            ptrs[p] = k
    opt = {"state": {pid: {k: cast(v) for k, v in s.items()} for pid, s in state["optimizer"]["state"].items()},
           "param_groups": state["optimizer"]["param_groups"]}  # fmt: skip
    return {"model": model, "optimizer": opt}


def empty_like_state(state: dict) -> dict:
    """A state of the same structure with uninitialised tensors (ties kept), for DCP load."""
    import torch

    memo: dict[int, Any] = {}

    def alloc(t):
        p = t.untyped_storage().data_ptr()
        if p not in memo:
            memo[p] = torch.empty_like(t)
        return memo[p]

    return {
        "model": {k: alloc(v) for k, v in state["model"].items()},
        "optimizer": {
            "state": {pid: {k: alloc(v) for k, v in s.items()} for pid, s in state["optimizer"]["state"].items()},
            "param_groups": state["optimizer"]["param_groups"],
        },
    }


#: How a tensor is "changed": scaled by 1.01. That moves every non-zero value in fp32 and in
#: bf16 (whose spacing is at most 0.78%) and keeps the bytes as incompressible as before.
#: (bench/commit_checkout.py adds 1e-3 instead, which turns ``exp_avg_sq``, ~1e-8, into a
#: near-constant that zstd squeezes: fewer bytes written, but compression time spent.)
CHANGE_FACTOR = 1.01


def change(t) -> None:
    t.mul_(CHANGE_FACTOR)


def perturb_all(state: dict) -> None:
    """Change every tensor (each storage once), so a commit has to write all of it again."""
    import torch

    seen: set[int] = set()
    with torch.no_grad():
        for _, t in iter_tensors(state):
            p = t.untyped_storage().data_ptr()
            if p in seen:
                continue
            seen.add(p)
            change(t)


def synthetic_state(total_bytes: int, tensor_bytes: int, seed: int) -> dict:
    """``{"t000": ..., ...}``: fp32 N(0, 1) tensors of ``tensor_bytes`` each (random, so
    incompressible); tensor i comes from its own generator seeded ``seed + i``."""
    import torch

    n = max(1, total_bytes // tensor_bytes)
    out = {}
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        out[f"t{i:03d}"] = torch.randn(tensor_bytes // 4, generator=g)
    return out


# --------------------------------------------------------------------------------------------
# Child: one operation per process


def _store_kwargs(args, threads: int | None = None) -> dict:
    kw: dict[str, Any] = {}
    if args.chunk_size_mb is not None:
        kw["chunk_size_bytes"] = int(args.chunk_size_mb * MiB)
    if args.compression_level is not None:
        kw["compression_level"] = None if args.compression_level == "none" else int(args.compression_level)
    if args.compression is not None:
        kw["compression"] = args.compression
    t = threads if threads is not None else args.threads
    if t is not None:
        kw["threads"] = t
    return kw


def _commit_stats(c) -> dict:
    s = c.stats
    return {"logical_bytes": s.logical_bytes, "new_bytes": s.new_bytes, "new_chunks": s.new_chunks,
            "reused_chunks": s.reused_chunks, "reused_bytes": s.reused_bytes}  # fmt: skip


def _minflt() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _proc_stat() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine: user+nice+system+irq+softirq, steal seconds)
    from the first line of /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / hz, v[7] / hz
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


class Measure:
    """RSS before, VmHWM after (reset in between), wall time."""

    def __enter__(self):
        import psutil

        gc.collect()
        self.proc = psutil.Process()
        self.rss_before = self.proc.memory_info().rss
        self.exact = _reset_peak_rss()
        self.ru_before = _ru_maxrss()
        c = self.proc.cpu_times()
        self.cpu0 = c.user + c.system
        self.minflt0 = _minflt()
        self.busy0, self.steal0 = _proc_stat()
        self.wall0 = time.time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.wall1 = time.time()
        c = self.proc.cpu_times()
        self.cpu_s = c.user + c.system - self.cpu0
        self.minflt = _minflt() - self.minflt0
        busy, steal = _proc_stat()
        self.steal = steal - self.steal0
        self.others = busy - self.busy0 - self.cpu_s  # CPU used by every other process (and kernel threads)
        self.peak = _status_kb("VmHWM") if self.exact else max(_ru_maxrss(), self.ru_before)
        return False

    def result(self) -> dict:
        return {"seconds": self.seconds, "cpu_s": self.cpu_s, "minor_faults": self.minflt, "steal_s": self.steal,
                "others_cpu_s": self.others, "wall": [self.wall0, self.wall1], "rss_before": self.rss_before,
                "peak_rss": self.peak, "extra_peak_rss": self.peak - self.rss_before, "peak_exact": self.exact}  # fmt: skip


def touch_every_page(flat: dict) -> dict:
    """Read one byte of every page of every tensor (of a state loaded with mmap, so that all
    of it is read from the file, as a checkout reads it all)."""
    import torch

    page = os.sysconf("SC_PAGE_SIZE")
    touched = 0
    for t in flat.values():
        if t.numel():
            b = t.reshape(-1).view(torch.uint8)
            touched += int(b[::page].sum()) + int(b[-1])
    return flat


def run_child(args) -> dict:
    import torch

    work = args.workdir
    target = args.target
    result: dict[str, Any] = {"op": args.op}

    if args.op == "setup":
        t0 = time.perf_counter()
        state, model = build_state(args.size, args.seed)
        result["build_s"] = time.perf_counter() - t0
        result["n_params"] = sum(p.numel() for p in model.parameters())
        for dtype, st in (("fp32", state), ("bf16", to_bf16(state))):
            torch.save(st, os.path.join(work, f"source-{dtype}.pt"))
            changed, n_candidates = pick_changed(st)
            result[dtype] = {
                "logical_bytes": unique_storage_bytes(st),
                "n_tensors": sum(1 for _ in iter_tensors(st)),
                "n_candidates": n_candidates,
                "changed": [list(p) for p in changed],
                "changed_bytes": sum(get_path(st, p).nbytes for p in changed),
            }
        return result

    if args.op in ("moto_server", "latency_proxy"):
        return run_server(args)

    import safetensors.torch as sft
    import torch.distributed.checkpoint as dcp

    import ckptstore
    from ckptstore.codec import HEADER_SIZE, Codec

    source = os.path.join(work, f"source-{args.dtype}.pt")
    if args.op.startswith("s3_"):
        return run_s3_child(args, ckptstore)
    if args.op.startswith("mem_"):
        return run_memory_child(args, ckptstore)
    if args.op == "async":
        return run_async_child(args, ckptstore, source)

    # -- prepare (untimed) ------------------------------------------------------------------
    state = flat = meta = store = dcp_target = None
    if args.op in ("torch_save", "st_save", "dcp_save", "ckpt_commit", "ckpt_recommit_1pct"):
        state = torch.load(source, weights_only=True)
    if args.op == "ckpt_recommit_1pct":
        with open(os.path.join(work, "setup.json")) as f:
            changed = json.load(f)[args.dtype]["changed"]
        with torch.no_grad():
            for p in changed:
                change(get_path(state, p))
    if args.op == "st_save":
        flat, meta = flatten_for_safetensors(state)
    if args.op == "dcp_load":
        dcp_target = empty_like_state(torch.load(source, weights_only=True, mmap=True))
    if args.op.startswith("ckpt_"):
        store = ckptstore.open(target, **_store_kwargs(args))

    def op() -> Any:
        if args.op == "torch_save":
            torch.save(state, target)
            fsync_with_directory(target)
            return None
        if args.op == "torch_load":
            return torch.load(target, weights_only=True, map_location="cpu")
        if args.op == "st_save":
            sft.save_file(flat, target, metadata=meta)
            fsync_with_directory(target)
            return None
        if args.op == "st_load":
            return sft.load_file(target, device="cpu", backend="pread")  # every byte read, as torch.load
        if args.op == "st_load_touched":
            return touch_every_page(sft.load_file(target, device="cpu"))  # mmap, every page faulted in
        if args.op == "dcp_save":
            dcp.save(state, storage_writer=dcp.FileSystemWriter(target, thread_count=2, sync_files=True))
            fsync_with_directory(target)  # DCP fsyncs its files but not the directory after the rename
            return None
        if args.op == "dcp_load":
            dcp.load(dcp_target, storage_reader=dcp.FileSystemReader(target))
            return dcp_target
        if args.op in ("ckpt_commit", "ckpt_recommit_1pct"):
            return store.commit(state, message=args.op)
        if args.op == "ckpt_checkout":
            return store.checkout("latest")
        if args.op == "ckpt_checkout_first":  # the first commit (the source state), after the 1% re-commit
            return store.checkout("main~1")
        if args.op == "ckpt_repack":
            return store.repack()
        raise SystemExit(f"unknown op {args.op}")

    import warnings

    warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # DCP without a process group
    with Measure() as m:
        out = op()
    result.update(m.result())
    if args.op == "ckpt_repack":
        result["repack"] = {"rewritten_chunks": out.rewritten_chunks, "chunks": out.chunks, "stored_bytes_before": out.stored_bytes_before, "stored_bytes_after": out.stored_bytes_after}
    if args.op in ("ckpt_commit", "ckpt_recommit_1pct"):
        result["stats"] = _commit_stats(out)
        result["store_threads"] = store.pipeline.threads
        result["store_config"] = {"chunk_size_bytes": store.config.chunk_size_bytes, "compression_level": store.config.compression_level, "compression": store.config.compression}
        result["stored_raw_chunks"] = sum(1 for key in store.objects.list("chunks/") if store.objects.get_range(key, 0, HEADER_SIZE)[6] == Codec.RAW)
    if args.verify and args.op in ("torch_load", "st_load", "st_load_touched", "dcp_load", "ckpt_checkout", "ckpt_checkout_first"):
        ref = torch.load(source, weights_only=True)
        if args.op.startswith("st_load"):
            flat_ref, _ = flatten_for_safetensors(ref)
            ok = flat_ref.keys() == out.keys() and all(torch.equal(flat_ref[k], out[k]) for k in flat_ref)
        else:
            ok = states_equal(ref, out)
            result["tied_preserved"] = out["model"]["lm_head.weight"].untyped_storage().data_ptr() == out["model"]["transformer.wte.weight"].untyped_storage().data_ptr()
        result["verified"] = bool(ok)
        if not ok:
            raise SystemExit(f"{args.op}: loaded state differs from the source state")
    return result


def run_async_child(args, ckptstore, source: str) -> dict:
    """A blocking first commit, a blocking commit of an all-new state, then ``--async-commits``
    asynchronous commits of all-new states. Each commit's data is fully new (every tensor
    changed before it), so each writes the whole state."""
    import torch

    state = torch.load(source, weights_only=True)
    store = ckptstore.open(args.target, **_store_kwargs(args))
    out: dict[str, Any] = {"op": "async", "store_threads": store.pipeline.threads}
    os.sync()
    with Measure() as m:
        c = store.commit(state, message="blocking first")
    out["blocking_first"] = {**m.result(), "stats": _commit_stats(c)}
    perturb_all(state)
    os.sync()
    with Measure() as m:
        c = store.commit(state, message="blocking, all tensors changed")
    out["blocking_changed"] = {**m.result(), "stats": _commit_stats(c)}
    out["async"] = []
    ref_src = torch.ones(256 * MiB, dtype=torch.uint8)
    ref_dst = torch.zeros(256 * MiB, dtype=torch.uint8)
    ref_dst.copy_(ref_src)  # paged in
    for i in range(args.async_commits):
        perturb_all(state)
        os.sync()
        t0 = time.perf_counter()
        ref_dst.copy_(ref_src)  # this machine's memcpy speed right now (noisy on a shared VM)
        memcpy_gbps = ref_src.nbytes / (time.perf_counter() - t0) / GB
        with Measure() as m:
            future = store.commit(state, message=f"async {i}", blocking=False)
        entry = m.result()  # the blocking part: until commit() returns
        entry["memcpy_gbps_before"] = memcpy_gbps
        t0 = time.perf_counter()
        c = future.result()
        entry["background_s"] = time.perf_counter() - t0
        entry["total_s"] = entry["seconds"] + entry["background_s"]
        entry["stats"] = _commit_stats(c)
        entry["peak_rss_through_result"] = _status_kb("VmHWM") if m.exact else None
        out["async"].append(entry)
    store.close()
    return out


def run_s3_child(args, ckptstore) -> dict:
    """Commit (``s3_commit``) or check out (``s3_checkout``) the synthetic S3 state."""
    import torch

    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": args.endpoint, "region_name": "us-east-1"}}
    state = synthetic_state(args.s3_bytes, args.s3_tensor_bytes, seed=1000) if args.op == "s3_commit" else None
    store = ckptstore.open(args.target, storage_options=opts, chunk_size_bytes=args.s3_chunk_bytes, threads=args.threads)
    with Measure() as m:
        out = store.commit(state, message="s3") if state is not None else store.checkout("latest")
    result: dict[str, Any] = {"op": args.op, **m.result(), "store_threads": store.pipeline.threads}
    if state is not None:
        result["stats"] = _commit_stats(out)
    elif args.verify:
        ref = synthetic_state(args.s3_bytes, args.s3_tensor_bytes, seed=1000)
        result["verified"] = ref.keys() == out.keys() and all(torch.equal(ref[k], out[k]) for k in ref)
        if not result["verified"]:
            raise SystemExit("s3_checkout: state differs")
    store.close()
    return result


def run_memory_child(args, ckptstore) -> dict:
    """``mem_commit``: build the big state (so the baseline includes it), then commit it.
    ``mem_checkout``: check it out into a process that holds nothing else."""
    import psutil
    import torch

    proc = psutil.Process()
    gc.collect()
    rss_interp = proc.memory_info().rss  # interpreter + torch + ckptstore, no state
    state = synthetic_state(args.mem_bytes, args.mem_tensor_bytes, seed=2000) if args.op == "mem_commit" else None
    state_bytes = sum(t.nbytes for t in state.values()) if state is not None else None
    store = ckptstore.open(args.target, max_inflight_bytes=args.mem_budget_bytes, **_store_kwargs(args))
    with Measure() as m:
        out = store.commit(state, message="memory") if state is not None else store.checkout("latest")
    result: dict[str, Any] = {"op": args.op, **m.result(), "rss_interp": rss_interp, "store_threads": store.pipeline.threads,
                              "budget": args.mem_budget_bytes}  # fmt: skip
    if state is not None:
        result["stats"] = _commit_stats(out)
        result["state_bytes"] = state_bytes
    else:
        result["state_bytes"] = sum(t.nbytes for t in out.values())
        # spot-check 3 tensors against their generators (a full copy would double the memory)
        names = sorted(out)
        picks = {names[0], names[len(names) // 2], names[-1]}
        ok = True
        for name in picks:
            i = int(name[1:])
            g = torch.Generator().manual_seed(2000 + i)
            ok &= torch.equal(out[name], torch.randn(args.mem_tensor_bytes // 4, generator=g))
        result["verified_sample"] = bool(ok)
    store.close()
    return result


# --------------------------------------------------------------------------------------------
# Moto server and the latency proxy (long-running children)


def _write_port(path: str, port: int) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump({"port": port}, f)
    os.replace(path + ".tmp", path)  # the parent never reads a half-written file


def run_server(args) -> dict:
    """Start moto's S3 server or the latency proxy, write ``{"port": N}`` to ``--result``,
    and serve until killed."""
    if args.op == "moto_server":
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        _write_port(args.result, server.get_host_and_port()[1])
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        server.stop()
        raise SystemExit(0)

    import asyncio

    upstream_port = int(args.endpoint.rsplit(":", 1)[1])
    delay = args.latency_ms / 1000
    methods = (b"GET ", b"PUT ", b"HEAD ", b"POST ", b"DELETE ", b"OPTIONS ", b"PATCH ")
    trace = open(args.trace, "a", buffering=1) if args.trace else None  # noqa: SIM115  one line per request, open until killed

    async def handle(client_r, client_w):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            client_w.close()
            return
        # A new request starts with the first client bytes after a response began (or on a
        # fresh connection). Keep-alive clients send requests one at a time, so this finds
        # every request boundary; a body sent after "100 Continue" is not a new request.
        state = {"new": True}

        async def client_to_server():
            try:
                while data := await client_r.read(1 << 16):
                    if state["new"]:
                        state["new"] = False
                        if data.startswith(methods):
                            if trace is not None:
                                method, target = data.split(b" ", 2)[:2]
                                kind = "LIST" if method == b"GET" and b"list-type=" in target else method.decode()
                                trace.write(f"{time.time():.6f} {kind}\n")
                            await asyncio.sleep(delay)
                    up_w.write(data)
                    await up_w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                up_w.close()

        async def server_to_client():
            try:
                while data := await up_r.read(1 << 16):
                    state["new"] = True
                    client_w.write(data)
                    await client_w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                client_w.close()

        await asyncio.gather(client_to_server(), server_to_client())

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        _write_port(args.result, server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set_result, None)
        async with server:
            await stop

    asyncio.run(main())
    raise SystemExit(0)


# --------------------------------------------------------------------------------------------
# Parent


def _child_cmd(args, op: str, target: str, result_path: str, *, dtype: str = "fp32", threads: int | None = None, verify: bool = False, extra: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--op", op, "--workdir", args.workdir, "--target", target,
           "--result", result_path, "--size", args.size, "--seed", str(args.seed), "--dtype", dtype]  # fmt: skip
    t = threads if threads is not None else args.threads
    for flag, value in (("--threads", t), ("--chunk-size-mb", args.chunk_size_mb), ("--compression-level", args.compression_level), ("--compression", args.compression)):
        if value is not None:
            cmd += [flag, str(value)]
    if verify:
        cmd.append("--verify")
    return cmd + (extra or [])


def _env() -> dict:
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    return env


_counter = [0]


def child(args, op: str, target: str = "", **kw) -> dict:
    _counter[0] += 1
    result_path = os.path.join(args.workdir, f".result-{_counter[0]}.json")
    load = load1()
    proc = subprocess.run(_child_cmd(args, op, target, result_path, **kw), env=_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child {op} failed with exit status {proc.returncode}")
    with open(result_path) as f:
        result = json.load(f)
    os.unlink(result_path)
    result["load1"] = load
    return result


def start_server(args, op: str, extra: list[str] | None = None) -> tuple[subprocess.Popen, int]:
    _counter[0] += 1
    result_path = os.path.join(args.workdir, f".server-{_counter[0]}.json")
    if os.path.exists(result_path):
        os.unlink(result_path)
    p = subprocess.Popen(_child_cmd(args, op, "", result_path, extra=extra), env=_env())
    for _ in range(600):
        if os.path.exists(result_path):
            with open(result_path) as f:
                return p, json.load(f)["port"]
        if p.poll() is not None:
            raise SystemExit(f"{op} exited with status {p.returncode}")
        time.sleep(0.1)
    p.terminate()
    raise SystemExit(f"{op} did not start")


def stop_server(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load1():.2f}] {msg}", file=sys.stderr, flush=True)


def run_table(args, report: dict) -> None:
    """The peers and ckptstore on the fp32 and bf16 states, ``--repeat`` interleaved runs."""
    runs: dict[str, dict[str, list[dict]]] = {d: {} for d in args.dtypes}

    def record(dtype: str, name: str, res: dict) -> dict:
        runs[dtype].setdefault(name, []).append(res)
        _log(f"  {dtype} {name}: {res['seconds']:.3f}s, extra peak RSS {res['extra_peak_rss'] / MB:,.0f} MB")
        return res

    def write(dtype: str, name: str, op: str, target: str) -> dict:
        os.sync()  # no dirty pages from earlier steps are flushed inside this timer
        before = disk_usage(target) if os.path.exists(target) else (0, 0)
        res = child(args, op, target, dtype=dtype)
        after = disk_usage(target)
        res["disk_alloc"], res["disk_apparent"] = after[0] - before[0], after[1] - before[1]
        return record(dtype, name, res)

    def read(dtype: str, name: str, op: str, target: str, r: int) -> None:
        for cache in ("warm", "cold"):
            if cache == "cold":
                evict(target)
                resident = resident_bytes(target)
            else:
                os.sync()
                resident = resident_bytes(target)
            res = child(args, op, target, dtype=dtype, verify=(r == 0 and cache == "warm"))
            res["resident_before"] = resident
            record(dtype, f"{name} [{cache}]", res)

    for r in range(args.repeat):
        load = wait_for_quiet(args.max_load, args.max_wait_s)
        _log(f"table: repeat {r + 1}/{args.repeat} (load {load:.2f})")
        for dtype in args.dtypes:
            rdir = os.path.join(args.workdir, f"table-{dtype}-{r}")
            os.makedirs(rdir)
            pt = os.path.join(rdir, "state.pt")
            write(dtype, "torch.save + fsync", "torch_save", pt)
            read(dtype, "torch.load", "torch_load", pt, r)
            os.unlink(pt)
            sf = os.path.join(rdir, "state.safetensors")
            write(dtype, "safetensors save_file + fsync", "st_save", sf)
            read(dtype, "safetensors load_file (pread)", "st_load", sf, r)
            read(dtype, ST_TOUCHED, "st_load_touched", sf, r)
            os.unlink(sf)
            dd = os.path.join(rdir, "dcp")
            write(dtype, "DCP save (2 threads, sync_files)", "dcp_save", dd)
            read(dtype, "DCP load (preallocated)", "dcp_load", dd, r)
            shutil.rmtree(dd)
            store = os.path.join(rdir, "store")
            write(dtype, "ckptstore first commit", "ckpt_commit", store)
            read(dtype, "ckptstore checkout", "ckpt_checkout", store, r)
            write(dtype, "ckptstore 1%-changed re-commit", "ckpt_recommit_1pct", store)
            write(dtype, "ckptstore repack (both commits)", "ckpt_repack", store)
            read(dtype, "ckptstore checkout, repacked", "ckpt_checkout_first", store, r)
            shutil.rmtree(rdir)
    report["table"] = runs


def run_threads(args, report: dict) -> None:
    out: dict[str, list[dict]] = {}
    for r in range(args.extra_repeat):
        wait_for_quiet(args.max_load, args.max_wait_s)
        for n in args.thread_counts:
            store = os.path.join(args.workdir, f"threads-{n}-{r}")
            os.sync()
            res = child(args, "ckpt_commit", store, threads=n)
            res["disk_alloc"] = disk_usage(store)[0]
            out.setdefault(f"{n}/commit", []).append(res)
            os.sync()
            out.setdefault(f"{n}/checkout warm", []).append(child(args, "ckpt_checkout", store, threads=n))
            evict(store)
            out.setdefault(f"{n}/checkout cold", []).append(child(args, "ckpt_checkout", store, threads=n))
            _log(f"threads {n}: commit {out[f'{n}/commit'][-1]['seconds']:.3f}s, checkout warm {out[f'{n}/checkout warm'][-1]['seconds']:.3f}s, "
                 f"cold {out[f'{n}/checkout cold'][-1]['seconds']:.3f}s")  # fmt: skip
            shutil.rmtree(store)
    report["threads"] = out


def run_async(args, report: dict) -> None:
    out = []
    for r in range(args.extra_repeat):
        wait_for_quiet(args.max_load, args.max_wait_s)
        store = os.path.join(args.workdir, f"async-{r}")
        res = child(args, "async", store, extra=["--async-commits", str(args.async_commits)])
        _log(f"async: blocking {res['blocking_changed']['seconds']:.3f}s; async returns "
             + ", ".join(f"{a['seconds']:.3f}s" for a in res["async"]))  # fmt: skip
        out.append(res)
        shutil.rmtree(store)
    report["async"] = out


def run_s3(args, report: dict) -> None:
    import boto3
    import psutil

    moto, moto_port = start_server(args, "moto_server")
    proxies = []
    trace = os.path.join(args.workdir, "proxy-trace.txt")
    open(trace, "w").close()

    def cpu(p) -> float:
        c = psutil.Process(p.pid).cpu_times()
        return c.user + c.system

    def requests_since(offset: int, wall: list[float]) -> tuple[dict, dict]:
        """Requests by kind sent by the child: (inside the timed operation, all)."""
        with open(trace) as f:
            f.seek(offset)
            lines = f.read().splitlines()
        timed: dict[str, int] = {}
        total: dict[str, int] = {}
        for line in lines:
            stamp, kind = line.split()
            total[kind] = total.get(kind, 0) + 1
            if wall[0] <= float(stamp) <= wall[1]:
                timed[kind] = timed.get(kind, 0) + 1
        return timed, total

    out: dict[str, list[dict]] = {}
    try:
        endpoint = f"http://127.0.0.1:{moto_port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
        endpoints = {0: endpoint}
        if args.latency_ms:
            proxy, proxy_port = start_server(args, "latency_proxy", extra=["--endpoint", endpoint, "--latency-ms", str(args.latency_ms), "--trace", trace])
            proxies.append(proxy)
            endpoints[args.latency_ms] = f"http://127.0.0.1:{proxy_port}"
        extra = ["--s3-bytes", str(args.s3_bytes), "--s3-tensor-bytes", str(args.s3_tensor_bytes), "--s3-chunk-bytes", str(args.s3_chunk_bytes)]
        k = 0
        for r in range(args.extra_repeat):
            wait_for_quiet(args.max_load, args.max_wait_s)
            for latency, ep in endpoints.items():
                for n in args.s3_threads:
                    k += 1
                    bucket = f"bench-{k}"
                    client.create_bucket(Bucket=bucket)
                    url = f"s3://{bucket}/store"
                    key = f"{latency:g}ms/{n}"
                    for opname, verify in (("commit", False), ("checkout", r == 0)):
                        offset = os.path.getsize(trace)
                        cpu0 = (cpu(moto), sum(cpu(p) for p in proxies))
                        res = child(args, f"s3_{opname}", url, threads=n, verify=verify, extra=extra + ["--endpoint", ep])
                        res["server_cpu_s"] = cpu(moto) - cpu0[0]
                        res["proxy_cpu_s"] = sum(cpu(p) for p in proxies) - cpu0[1]
                        if latency:
                            res["requests"], res["requests_incl_open"] = requests_since(offset, res["wall"])
                        out.setdefault(f"{key}/{opname}", []).append(res)
                    res, res2 = out[f"{key}/commit"][-1], out[f"{key}/checkout"][-1]
                    _log(f"s3 {latency:g} ms, threads {n}: commit {res['seconds']:.3f}s, checkout {res2['seconds']:.3f}s")
                    # free moto's memory
                    objs = client.list_objects_v2(Bucket=bucket).get("Contents", [])
                    while objs:
                        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": o["Key"]} for o in objs]})
                        objs = client.list_objects_v2(Bucket=bucket).get("Contents", [])
                    client.delete_bucket(Bucket=bucket)
    finally:
        for p in proxies:
            stop_server(p)
        stop_server(moto)
    report["s3"] = out


def run_memory(args, report: dict) -> None:
    out = []
    for r in range(args.extra_repeat):
        wait_for_quiet(args.max_load, args.max_wait_s)
        store = os.path.join(args.workdir, f"memory-{r}")
        extra = ["--mem-bytes", str(args.mem_bytes), "--mem-tensor-bytes", str(args.mem_tensor_bytes), "--mem-budget-bytes", str(args.mem_budget_bytes)]
        os.sync()
        c = child(args, "mem_commit", store, extra=extra)
        _log(f"memory: commit {c['seconds']:.1f}s, extra peak RSS {c['extra_peak_rss'] / MiB:,.0f} MiB")
        evict(store)  # cold: the store's files out of the page cache
        co = child(args, "mem_checkout", store, extra=extra)
        _log(f"memory: checkout {co['seconds']:.1f}s, extra peak RSS {co['extra_peak_rss'] / MiB:,.0f} MiB")
        out.append({"commit": c, "checkout": co})
        shutil.rmtree(store)
    report["memory"] = out


# --------------------------------------------------------------------------------------------
# Report


def _med(rs: list[dict], key: str = "seconds") -> float:
    return statistics.median(r[key] for r in rs)


def _gb(n: float) -> str:
    return f"{n / GB:.3f} GB" if n >= GB else f"{n / MB:,.1f} MB"


def summarize(report: dict, args) -> str:
    L: list[str] = []
    verdicts: list[bool] = []

    def check(label: str, ok: bool, detail: str) -> None:
        verdicts.append(ok)
        L.append(f"- **{'PASS' if ok else 'FAIL'}** {label}: {detail}")

    setup = report.get("setup")
    bars: list[str] = []
    if "table" in report:
        for dtype in args.dtypes:
            runs = report["table"][dtype]
            s = setup[dtype]
            logical = s["logical_bytes"]
            L.append(f"\n### {dtype} state: {_gb(logical)}, {s['n_tensors']} tensors; median of {args.repeat}\n")
            L.append("| operation | median s | GB/s | CPU s | others' CPU s | on disk | extra peak RSS | peak RSS | load avg | all runs (s) |")
            L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
            for name, rs in runs.items():
                m = _med(rs)
                disk = "—"
                if "disk_alloc" in rs[0]:
                    disk = ("+" if "re-commit" in name else "") + _gb(_med(rs, "disk_alloc"))
                loads = [r["load1"] for r in rs]
                L.append(f"| {name} | {m:.3f} | {logical / GB / m:.2f} | {_med(rs, 'cpu_s'):.2f} | {_med(rs, 'others_cpu_s'):.2f} | {disk} | {_med(rs, 'extra_peak_rss') / MB:,.0f} MB | {_med(rs, 'peak_rss') / MB:,.0f} MB | "
                         f"{min(loads):.2f}–{max(loads):.2f} | " + ", ".join(f"{r['seconds']:.3f}" for r in rs) + " |")  # fmt: skip
            first = runs["ckptstore first commit"][0]["stats"]
            pct = runs["ckptstore 1%-changed re-commit"]
            L.append(
                f"\nckptstore ({runs['ckptstore first commit'][0]['store_threads']} threads, chunk "
                f"{runs['ckptstore first commit'][0]['store_config']['chunk_size_bytes'] / MiB:g} MiB, compression "
                f"{runs['ckptstore first commit'][0]['store_config'].get('compression', 'always')!r}): first commit new_bytes {_gb(first['new_bytes'])} "
                f"in {first['new_chunks']} chunks ({runs['ckptstore first commit'][0].get('stored_raw_chunks', '?')} stored raw; "
                f"stored/raw {first['new_bytes'] / first['logical_bytes']:.3f}); 1% re-commit: {len(s['changed'])} of {s['n_candidates']} tensors changed, "
                f"{_gb(s['changed_bytes'])}, new_bytes {_gb(statistics.median(r['stats']['new_bytes'] for r in pct))} "
                f"({statistics.median(r['stats']['new_chunks'] for r in pct):g} new chunks)."
            )
            cold_res = [r.get("resident_before") for n, rs in runs.items() if "[cold]" in n for r in rs]
            if any(x is not None for x in cold_res):
                L.append(f"Cold reads: at most {max(x for x in cold_res if x is not None) / MB:.1f} MB of the files were in the page cache before the read (fincore).")
        # bars 1-3
        L.append("\n### Bars\n")
        for dtype in args.dtypes:
            runs = report["table"][dtype]
            peers = {n: _med(runs[n]) for n in PEERS_SAVE}
            fastest = min(peers, key=peers.get)
            commit = _med(runs["ckptstore first commit"])
            check(f"(1) {dtype} durable first commit ≤ fastest durable peer", commit <= peers[fastest],
                  f"{commit:.3f} s vs {fastest} {peers[fastest]:.3f} s (ratio {commit / peers[fastest]:.2f})")  # fmt: skip
        for dtype in args.dtypes:
            runs = report["table"][dtype]
            for cache, need in (("warm", 0.9), ("cold", 1.0)):
                load, co = _med(runs[f"torch.load [{cache}]"]), _med(runs[f"ckptstore checkout [{cache}]"])
                speed = load / co
                check(f"(2) {dtype} checkout {cache} ≥ {need:g}× torch.load speed", speed >= need,
                      f"checkout {co:.3f} s vs torch.load {load:.3f} s: {speed:.2f}× torch.load's speed")  # fmt: skip
        for dtype in args.dtypes:
            runs = report["table"][dtype]
            st, co = _med(runs[f"{ST_TOUCHED} [cold]"]), _med(runs["ckptstore checkout [cold]"])
            check(f"(4) {dtype} checkout cold ≥ 0.9× safetensors load_file (mmap, every page touched), cold", st / co >= 0.9,
                  f"checkout {co:.3f} s vs {st:.3f} s: {st / co:.2f}× its speed")  # fmt: skip
            need = 1.5 if dtype == "fp32" else 1.0
            load, co = _med(runs["torch.load [warm]"]), _med(runs["ckptstore checkout [warm]"])
            check(f"(4) {dtype} checkout warm ≥ {need:g}× torch.load speed", load / co >= need,
                  f"checkout {co:.3f} s vs torch.load {load:.3f} s: {load / co:.2f}×")  # fmt: skip
            if "ckptstore checkout, repacked [cold]" in runs:  # reported beside the bars, not a bar
                cold, warm = _med(runs["ckptstore checkout, repacked [cold]"]), _med(runs["ckptstore checkout, repacked [warm]"])
                stored = runs["ckptstore repack (both commits)"][0]["repack"]
                L.append(f"(4) {dtype} repacked commit ({stored['rewritten_chunks']} of {stored['chunks']} chunks re-encoded, {stored['stored_bytes_before']:,} -> {stored['stored_bytes_after']:,} bytes): "
                         f"cold checkout {cold:.3f} s ({st / cold:.2f}× safetensors touched), warm {warm:.3f} s ({load / warm:.2f}× torch.load)")  # fmt: skip
        for dtype in args.dtypes:
            runs = report["table"][dtype]
            peers = {n: _med(runs[n]) for n in PEERS_SAVE}
            fastest = min(peers, key=peers.get)
            pct = _med(runs["ckptstore 1%-changed re-commit"])
            new_bytes = statistics.median(r["stats"]["new_bytes"] for r in runs["ckptstore 1%-changed re-commit"])
            changed = setup[dtype]["changed_bytes"]
            check(f"(3) {dtype} 1%-changed re-commit ≥ 10× faster than the fastest peer's save", peers[fastest] >= 10 * pct,
                  f"{pct:.3f} s vs {fastest} {peers[fastest]:.3f} s: {peers[fastest] / pct:.1f}× faster")  # fmt: skip
            check(f"(3) {dtype} 1%-changed re-commit writes ≤ 1.1× the changed bytes", new_bytes <= 1.1 * changed,
                  f"new_bytes {new_bytes:,.0f} B vs changed {changed:,} B: {new_bytes / changed:.3f}×")  # fmt: skip
        bars = L[:]
        L.clear()
    else:
        bars = []

    extra: list[str] = []
    if "threads" in report:
        t = report["threads"]
        logical = setup["fp32"]["logical_bytes"]
        extra.append(f"\n### Thread scaling (fp32, {_gb(logical)}; {args.extra_repeat} run(s), median)\n")
        extra.append("| threads | commit s | commit GB/s | commit extra peak RSS | checkout warm s | GB/s | checkout cold s | GB/s | checkout extra peak RSS | load avg |")
        extra.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in args.thread_counts:
            c, w, k = t[f"{n}/commit"], t[f"{n}/checkout warm"], t[f"{n}/checkout cold"]
            extra.append(f"| {n} | {_med(c):.3f} | {logical / GB / _med(c):.2f} | {_med(c, 'extra_peak_rss') / MB:,.0f} MB | {_med(w):.3f} | {logical / GB / _med(w):.2f} | "
                         f"{_med(k):.3f} | {logical / GB / _med(k):.2f} | {_med(w, 'extra_peak_rss') / MB:,.0f} MB | {min(r['load1'] for r in c + w + k):.2f}–{max(r['load1'] for r in c + w + k):.2f} |")  # fmt: skip
    if "async" in report:
        a = report["async"]
        extra.append(f"\n### Async commit (fp32; every tensor changed before each commit; {args.extra_repeat} run(s))\n")
        extra.append("| commit | returns after (s) | finished after (s) | CPU s (blocking part) | others' CPU s | memcpy GB/s just before | extra peak RSS | new bytes |")
        extra.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for res in a:
            for label, e in (("blocking, first (empty store)", res["blocking_first"]), ("blocking, all tensors changed", res["blocking_changed"])):
                extra.append(f"| {label} | {e['seconds']:.3f} | {e['seconds']:.3f} | {e['cpu_s']:.2f} | {e['others_cpu_s']:.2f} | — | {e['extra_peak_rss'] / MB:,.0f} MB | {_gb(e['stats']['new_bytes'])} |")
            for i, e in enumerate(res["async"]):
                label = "async #1 (allocates the staging buffers)" if i == 0 else f"async #{i + 1} (reuses them)"
                extra.append(f"| {label} | {e['seconds']:.3f} | {e['total_s']:.3f} | {e['cpu_s']:.2f} | {e['others_cpu_s']:.2f} | {e['memcpy_gbps_before']:.1f} | {e['extra_peak_rss'] / MB:,.0f} MB | {_gb(e['stats']['new_bytes'])} |")
        blocking = statistics.median(r["blocking_changed"]["seconds"] for r in a)
        first = statistics.median(r["async"][0]["seconds"] for r in a)
        steady = statistics.median(e["seconds"] for r in a for e in r["async"][1:]) if len(a[0]["async"]) > 1 else float("nan")
        L.append(f"- (4) async commit, first: blocks {first:.3f} s = {100 * first / blocking:.1f}% of a blocking commit ({blocking:.3f} s) — "
                 f"{'within' if first <= 0.1 * blocking else 'over'} 10% (informational; the bar is the steady state)")  # fmt: skip
        check("(4) async commit, steady state: blocking part ≤ 10% of a blocking commit", steady <= 0.1 * blocking,
              f"{steady:.3f} s = {100 * steady / blocking:.1f}% of {blocking:.3f} s")  # fmt: skip
    if "s3" in report:
        s = report["s3"]
        nbytes = args.s3_bytes
        extra.append(f"\n### S3 on moto ({nbytes / MiB:.0f} MiB, {args.s3_chunk_bytes / MiB:g} MiB chunks; {args.extra_repeat} run(s), median)\n")
        extra.append("| per-request latency | threads | commit s | commit MB/s | checkout s | checkout MB/s | commit CPU s: client / moto | checkout CPU s: client / moto | commit extra peak RSS | checkout extra peak RSS |")
        extra.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        lats = sorted({float(k.split("ms")[0]) for k in s})
        for lat in lats:
            for n in args.s3_threads:
                c, k = s[f"{lat:g}ms/{n}/commit"], s[f"{lat:g}ms/{n}/checkout"]
                extra.append(f"| {lat:g} ms | {n} | {_med(c):.3f} | {nbytes / MB / _med(c):.1f} | {_med(k):.3f} | {nbytes / MB / _med(k):.1f} | "
                             f"{_med(c, 'cpu_s'):.2f} / {_med(c, 'server_cpu_s'):.2f} | {_med(k, 'cpu_s'):.2f} / {_med(k, 'server_cpu_s'):.2f} | "
                             f"{_med(c, 'extra_peak_rss') / MB:,.0f} MB | {_med(k, 'extra_peak_rss') / MB:,.0f} MB |")  # fmt: skip
        reqs = [(k, v[0]["requests"]) for k, v in s.items() if v[0].get("requests")]
        if reqs:
            extra.append("\nHTTP requests in the timed operation, seen by the proxy (first run): " + "; ".join(
                f"{k.split('/', 1)[1].replace('/', ' threads, ')}: " + ", ".join(f"{m} {c}" for m, c in sorted(v.items())) for k, v in reqs))  # fmt: skip
        lo, hi = min(args.s3_threads), max(args.s3_threads)
        for lat in lats:
            for opname in ("commit", "checkout"):
                sp = _med(s[f"{lat:g}ms/{lo}/{opname}"]) / _med(s[f"{lat:g}ms/{hi}/{opname}"])
                if lat:
                    check(f"(6) S3 {opname}, {lat:g} ms latency: threads {hi} ≥ 5× threads {lo}", sp >= 5, f"{sp:.2f}×")
                else:
                    L.append(f"- (6) S3 {opname}, no added latency: threads {hi} is {sp:.2f}× threads {lo} (informational)")
    if "memory" in report:
        mem = report["memory"]
        extra.append(f"\n### Peak RSS, {args.mem_bytes / 2**30:g} GiB fp32 state, max_inflight_bytes {args.mem_budget_bytes / MiB:g} MiB\n")
        extra.append("| operation | s | GB/s | RSS before (MiB) | peak RSS (MiB) | growth (MiB) | limit on growth (MiB) |")
        extra.append("|---|---:|---:|---:|---:|---:|---:|")
        for res in mem:
            c, co = res["commit"], res["checkout"]
            state = c["state_bytes"]
            lim_c = c["budget"] + 256 * MiB
            lim_co = state + c["budget"] + 256 * MiB
            extra.append(f"| commit (state already in RSS) | {c['seconds']:.1f} | {state / GB / c['seconds']:.2f} | {c['rss_before'] / MiB:,.0f} | {c['peak_rss'] / MiB:,.0f} | {c['extra_peak_rss'] / MiB:,.0f} | {lim_c / MiB:,.0f} |")
            extra.append(f"| checkout, cold (into an empty process) | {co['seconds']:.1f} | {state / GB / co['seconds']:.2f} | {co['rss_before'] / MiB:,.0f} | {co['peak_rss'] / MiB:,.0f} | {co['extra_peak_rss'] / MiB:,.0f} | {lim_co / MiB:,.0f} |")
            check("(5) commit: peak RSS ≤ state + budget + 256 MiB", c["peak_rss"] - c["rss_interp"] <= state + lim_c,
                  f"peak − interpreter = {(c['peak_rss'] - c['rss_interp']) / MiB:,.0f} MiB ≤ {(state + lim_c) / MiB:,.0f} MiB; growth over the state {c['extra_peak_rss'] / MiB:,.0f} MiB")  # fmt: skip
            check("(5) checkout: peak RSS ≤ state + budget + 256 MiB", co["extra_peak_rss"] <= lim_co,
                  f"growth {co['extra_peak_rss'] / MiB:,.0f} MiB ≤ {lim_co / MiB:,.0f} MiB (state {state / MiB:,.0f} MiB); sample verified: {co['verified_sample']}")  # fmt: skip
    text = "\n".join(bars + extra + (["\n### More bars\n"] + L if L else []))
    report["verdicts_all_pass"] = all(verdicts)
    return text + f"\n\nOverall: {'PASS' if all(verdicts) else 'FAIL'} ({sum(verdicts)}/{len(verdicts)} checks)"


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small states and 1 repeat, to check that the script works")
    p.add_argument("--memory", action="store_true", help="only the 6 GiB peak-RSS check")
    p.add_argument("--parts", default="table,threads,async,s3", help="comma-separated parts of the default mode to run")
    p.add_argument("--size", choices=["gpt2", "tiny"], default=None, help="state for the table (default gpt2; tiny with --quick)")
    p.add_argument("--repeat", type=int, default=None, help="runs of the table (default 3; 1 with --quick)")
    p.add_argument("--extra-repeat", type=int, default=1, help="runs of the thread, async, S3 and memory parts")
    p.add_argument("--dtypes", default="fp32,bf16", help="states for the table")
    p.add_argument("--thread-counts", default="1,2,4,8")
    p.add_argument("--async-commits", type=int, default=3)
    p.add_argument("--s3-mib", type=float, default=None, help="S3 state size (default 256; 32 with --quick)")
    p.add_argument("--s3-threads", default="1,16")
    p.add_argument("--latency-ms", type=float, default=20.0, help="per-request delay of the proxy (0: no proxy run)")
    p.add_argument("--mem-gib", type=float, default=None, help="--memory state size (default 6; 0.5 with --quick)")
    p.add_argument("--max-load", type=float, default=1.5, help="wait (up to --max-wait-s) for this 1-minute load average before each part")
    p.add_argument("--max-wait-s", type=float, default=120)
    p.add_argument("--out", help="working directory (default: a fresh one under /tmp, removed at the end)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--threads", type=int, help="ckptstore threads for the table and async (default: the store's default)")
    p.add_argument("--chunk-size-mb", type=float)
    p.add_argument("--compression-level")
    p.add_argument("--compression", choices=["auto", "always", "never"], help="ckptstore's compression mode (default: the store's default, auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every run and the machine description here")
    # child-only
    for flag in ("--op", "--workdir", "--target", "--result", "--endpoint", "--trace"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--s3-bytes", "--s3-tensor-bytes", "--s3-chunk-bytes", "--mem-bytes", "--mem-tensor-bytes", "--mem-budget-bytes"):
        p.add_argument(flag, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.op:
        result = run_child(args)
        with open(args.result, "w") as f:
            json.dump(result, f)
        return 0

    args.size = args.size or ("tiny" if args.quick else "gpt2")
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.thread_counts = [int(x) for x in args.thread_counts.split(",")]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if not set(args.dtypes) <= set(DTYPES):
        p.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    args.s3_threads = [int(x) for x in args.s3_threads.split(",")]
    args.s3_bytes = int((args.s3_mib or (32 if args.quick else 256)) * MiB)
    args.s3_tensor_bytes = 16 * MiB
    args.s3_chunk_bytes = 4 * MiB
    args.mem_bytes = int((args.mem_gib or (0.5 if args.quick else 6)) * 2**30)
    args.mem_tensor_bytes = 128 * MiB
    args.mem_budget_bytes = 512 * MiB
    parts = ["memory"] if args.memory else [x for x in args.parts.split(",") if x]

    own_dir = args.out is None
    args.workdir = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="ckptbench-io-", dir="/tmp")
    os.makedirs(args.workdir, exist_ok=True)
    os.environ["CKPTSTORE_CACHE_DIR"] = os.path.join(args.workdir, "cache")  # S3 catalogs
    report: dict[str, Any] = {"load_start": os.getloadavg(), "machine": machine_info("/tmp")}  # the commit measured: HEAD at the start
    t0 = time.perf_counter()
    try:
        report["load_start_wait"] = wait_for_quiet(args.max_load, args.max_wait_s)
        if any(x in parts for x in ("table", "threads", "async")):
            _log(f"setup: building the {args.size} state in {args.workdir}")
            report["setup"] = child(args, "setup")
            with open(os.path.join(args.workdir, "setup.json"), "w") as f:
                json.dump(report["setup"], f)
            _log(f"setup: built in {report['setup']['build_s']:.1f}s; fp32 {report['setup']['fp32']['logical_bytes'] / GB:.3f} GB, bf16 {report['setup']['bf16']['logical_bytes'] / GB:.3f} GB")
        for part, fn in (("table", run_table), ("threads", run_threads), ("async", run_async), ("s3", run_s3), ("memory", run_memory)):
            if part in parts:
                _log(f"part: {part}")
                fn(args, report)
    finally:
        if own_dir and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    report["total_s"] = time.perf_counter() - t0
    report["load_end"] = os.getloadavg()
    head_end = machine_info("/tmp").get("ckptstore_commit")
    if head_end != report["machine"].get("ckptstore_commit"):
        report["machine"]["ckptstore_commit_at_end"] = head_end
    if args.json:  # the raw runs first, so that they survive a failure in the summary
        report["args"] = {k: v for k, v in vars(args).items() if k not in ("op", "target", "result", "verify")}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    text = summarize(report, args)
    m = report["machine"]
    cmd = "python bench/io.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (
        f"Command: `{cmd.strip()}`; ckptstore at {m.get('ckptstore_commit', 'unknown commit')}"
        + (f" (HEAD was {m['ckptstore_commit_at_end']} at the end)" if m.get("ckptstore_commit_at_end") else "") + "; "
        f"{m.get('nproc')} CPUs ({m.get('cpu')}), {m.get('ram_bytes', 0) / 2**30:.0f} GiB RAM, {(m.get('filesystem') or {}).get('type')} on "
        f"{(m.get('filesystem') or {}).get('device')}, Python {m.get('python')}, torch {m.get('torch')}, safetensors {m.get('safetensors')}; "
        f"load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in report['load_start'])}, at end {'/'.join(f'{x:.2f}' for x in report['load_end'])}; "
        f"total {report['total_s']:.0f} s.\n" + text
    )
    print(text)
    if args.json:
        report["args"] = {k: v for k, v in vars(args).items() if k not in ("op", "target", "result", "verify")}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if report["verdicts_all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
