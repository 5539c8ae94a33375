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
operation, as bench/commit_checkout.py does (both through bench/harness/); the S3 part is
bench/io_s3.py.

    python bench/io.py                    # everything but --memory (about 11 minutes here)
    python bench/io.py --memory           # the 6 GiB peak-RSS check
    python bench/io.py --quick            # small states, 1 repeat: checks the script works

See bench/README.md for the current figures, and bench/HISTORY.md for what is measured and earlier runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from typing import Any

import io_s3

from harness import GB, MB, MiB, cli
from harness.child import Children, serve
from harness.files import disk_usage, evict, resident_bytes, wait_for_quiet
from harness.report import fmt_size, machine_info, machine_line, table_header

DTYPES = ("fp32", "bf16")
#: safetensors' default load (mmap) with every page then touched: the issue's cold-read peer.
ST_TOUCHED = "safetensors load_file (mmap, every page touched)"
PEERS_SAVE = ("torch.save + fsync", "safetensors save_file + fsync", "DCP save (2 threads, sync_files)")

#: How a tensor is "changed": scaled by 1.01. That moves every non-zero value in fp32 and in
#: bf16 (whose spacing is at most 0.78%) and keeps the bytes as incompressible as before.
#: (bench/commit_checkout.py adds 1e-3 instead, which turns ``exp_avg_sq``, ~1e-8, into a
#: near-constant that zstd squeezes: fewer bytes written, but compression time spent.)
CHANGE_FACTOR = 1.01


def change(t) -> None:
    t.mul_(CHANGE_FACTOR)


# --------------------------------------------------------------------------------------------
# Child: one operation per process


def run_child(args) -> dict:
    if args.op == "moto_server":
        io_s3.run_moto(args)
    if args.op == "latency_proxy":
        io_s3.run_proxy(args)
    import safetensors.torch  # noqa: F401
    import torch
    import torch.distributed.checkpoint  # every child imports these, as before, so that peak RSS compares alike

    from harness.ops import run_op, store_options
    from harness.state import build_state, describe, to_bf16

    if args.op == "setup":
        t0 = time.perf_counter()
        state, model = build_state(args.size, args.seed)
        result: dict[str, Any] = {
            "op": "setup",
            "build_s": time.perf_counter() - t0,
            "n_params": sum(p.numel() for p in model.parameters()),
        }
        for dtype, st in (("fp32", state), ("bf16", to_bf16(state))):
            torch.save(st, os.path.join(args.workdir, f"source-{dtype}.pt"))
            result[dtype] = describe(st)
        return result
    if args.op.startswith("s3_"):
        return io_s3.run_s3_child(args)
    if args.op.startswith("mem_"):
        return run_memory_child(args)
    source = os.path.join(args.workdir, f"source-{args.dtype}.pt")
    if args.op == "async":
        return run_async_child(args, source)
    changed = []
    if args.op == "ckpt_recommit_1pct":
        with open(os.path.join(args.workdir, "setup.json")) as f:
            changed = json.load(f)[args.dtype]["changed"]
    return run_op(args.op, source=source, target=args.target, options=store_options(args), verify=args.verify,
                  changed=changed, change=change, count_raw_chunks=True)  # fmt: skip


def run_async_child(args, source: str) -> dict:
    """A blocking first commit, a blocking commit of an all-new state, then ``--async-commits``
    asynchronous commits of all-new states. Each commit's data is fully new (every tensor
    changed before it), so each writes the whole state."""
    import torch

    import ckptstore
    from harness.measure import Measure, status_bytes
    from harness.ops import commit_stats, store_options
    from harness.state import perturb_all

    state = torch.load(source, weights_only=True)
    store = ckptstore.open(args.target, **store_options(args))
    out: dict[str, Any] = {"op": "async", "store_threads": store.pipeline.threads}
    for key, message in (("blocking_first", "blocking first"), ("blocking_changed", "blocking, all tensors changed")):
        if key == "blocking_changed":
            perturb_all(state, change)
        os.sync()
        with Measure() as m:
            c = store.commit(state, message=message)
        out[key] = {**m.result(), "stats": commit_stats(c)}
    out["async"] = []
    ref_src = torch.ones(256 * MiB, dtype=torch.uint8)
    ref_dst = torch.zeros(256 * MiB, dtype=torch.uint8)
    ref_dst.copy_(ref_src)  # paged in
    for i in range(args.async_commits):
        perturb_all(state, change)
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
        entry["stats"] = commit_stats(c)
        entry["peak_rss_through_result"] = status_bytes("VmHWM") if m.exact else None
        out["async"].append(entry)
    store.close()
    return out


def run_memory_child(args) -> dict:
    """``mem_commit``: build the big state (so the baseline includes it), then commit it.
    ``mem_checkout``: check it out into a process that holds nothing else."""
    import gc

    import psutil
    import torch

    import ckptstore
    from harness.measure import Measure
    from harness.ops import commit_stats, store_options
    from harness.state import synthetic_state

    proc = psutil.Process()
    gc.collect()
    rss_interp = proc.memory_info().rss  # interpreter + torch + ckptstore, no state
    state = synthetic_state(args.mem_bytes, args.mem_tensor_bytes, seed=2000) if args.op == "mem_commit" else None
    state_bytes = sum(t.nbytes for t in state.values()) if state is not None else None
    store = ckptstore.open(args.target, max_inflight_bytes=args.mem_budget_bytes, **store_options(args))
    with Measure() as m:
        out = store.commit(state, message="memory") if state is not None else store.checkout("latest")
    result: dict[str, Any] = {"op": args.op, **m.result(), "rss_interp": rss_interp, "store_threads": store.pipeline.threads,
                              "budget": args.mem_budget_bytes}  # fmt: skip
    if state is not None:
        result["stats"] = commit_stats(out)
        result["state_bytes"] = state_bytes
    else:
        result["state_bytes"] = sum(t.nbytes for t in out.values())
        # spot-check 3 tensors against their generators (a full copy would double the memory)
        names = sorted(out)
        ok = True
        for name in {names[0], names[len(names) // 2], names[-1]}:
            g = torch.Generator().manual_seed(2000 + int(name[1:]))
            ok &= torch.equal(out[name], torch.randn(args.mem_tensor_bytes // 4, generator=g))
        result["verified_sample"] = bool(ok)
    store.close()
    return result


# --------------------------------------------------------------------------------------------
# Parent


class Parent:
    """Runs io.py's children: ``child(op, target, dtype=, threads=, verify=, extra=)``."""

    def __init__(self, args) -> None:
        self.args = args
        self.children = Children(
            os.path.abspath(__file__),
            args.workdir,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )

    def child(
        self,
        op: str,
        target: str = "",
        *,
        dtype: str = "fp32",
        threads: int | None = None,
        verify: bool = False,
        extra: list[str] | None = None,
    ) -> dict:
        a = self.args
        argv = [
            "--op",
            op,
            "--workdir",
            a.workdir,
            "--target",
            target,
            "--size",
            a.size,
            "--seed",
            str(a.seed),
            "--dtype",
            dtype,
            *cli.store_argv(a, threads),
        ]
        return self.children.run(argv + (["--verify"] if verify else []) + (extra or []))


class Table:
    """The peers and ckptstore on the fp32 and bf16 states: ``runs[dtype][name]``."""

    def __init__(self, parent: Parent) -> None:
        self.parent, self.args = parent, parent.args
        self.runs: dict[str, dict[str, list[dict]]] = {d: {} for d in self.args.dtypes}

    def record(self, dtype: str, name: str, res: dict) -> dict:
        self.runs[dtype].setdefault(name, []).append(res)
        cli.log(f"  {dtype} {name}: {res['seconds']:.3f}s, extra peak RSS {res['extra_peak_rss'] / MB:,.0f} MB", load=True)
        return res

    def write(self, dtype: str, name: str, op: str, target: str) -> dict:
        os.sync()  # no dirty pages from earlier steps are flushed inside this timer
        before = disk_usage(target) if os.path.exists(target) else (0, 0)
        res = self.parent.child(op, target, dtype=dtype)
        after = disk_usage(target)
        res["disk_alloc"], res["disk_apparent"] = after[0] - before[0], after[1] - before[1]
        return self.record(dtype, name, res)

    def read(self, dtype: str, name: str, op: str, target: str, r: int) -> None:
        for cache in ("warm", "cold"):
            if cache == "cold":
                evict(target)
            else:
                os.sync()
            resident = resident_bytes(target)
            res = self.parent.child(op, target, dtype=dtype, verify=(r == 0 and cache == "warm"))
            res["resident_before"] = resident
            self.record(dtype, f"{name} [{cache}]", res)

    def repeat(self, dtype: str, r: int) -> None:
        rdir = os.path.join(self.args.workdir, f"table-{dtype}-{r}")
        os.makedirs(rdir)
        pt = os.path.join(rdir, "state.pt")
        self.write(dtype, "torch.save + fsync", "torch_save", pt)
        self.read(dtype, "torch.load", "torch_load", pt, r)
        os.unlink(pt)
        sf = os.path.join(rdir, "state.safetensors")
        self.write(dtype, "safetensors save_file + fsync", "st_save", sf)
        self.read(dtype, "safetensors load_file (pread)", "st_load_pread", sf, r)
        self.read(dtype, ST_TOUCHED, "st_load_touched", sf, r)
        os.unlink(sf)
        dd = os.path.join(rdir, "dcp")
        self.write(dtype, "DCP save (2 threads, sync_files)", "dcp_save", dd)
        self.read(dtype, "DCP load (preallocated)", "dcp_load", dd, r)
        shutil.rmtree(dd)
        store = os.path.join(rdir, "store")
        self.write(dtype, "ckptstore first commit", "ckpt_commit", store)
        self.read(dtype, "ckptstore checkout", "ckpt_checkout", store, r)
        self.write(dtype, "ckptstore 1%-changed re-commit", "ckpt_recommit_1pct", store)
        self.write(dtype, "ckptstore repack (both commits)", "ckpt_repack", store)
        self.read(dtype, "ckptstore checkout, repacked", "ckpt_checkout_first", store, r)
        shutil.rmtree(rdir)


def run_table(args, report: dict, parent: Parent) -> None:
    """The peers and ckptstore on the fp32 and bf16 states, ``--repeat`` interleaved runs."""
    table = Table(parent)
    for r in range(args.repeat):
        load = wait_for_quiet(args.max_load, args.max_wait_s)
        cli.log(f"table: repeat {r + 1}/{args.repeat} (load {load:.2f})", load=True)
        for dtype in args.dtypes:
            table.repeat(dtype, r)
    report["table"] = table.runs


def run_threads(args, report: dict, parent: Parent) -> None:
    out: dict[str, list[dict]] = {}
    for r in range(args.extra_repeat):
        wait_for_quiet(args.max_load, args.max_wait_s)
        for n in args.thread_counts:
            store = os.path.join(args.workdir, f"threads-{n}-{r}")
            os.sync()
            res = parent.child("ckpt_commit", store, threads=n)
            res["disk_alloc"] = disk_usage(store)[0]
            out.setdefault(f"{n}/commit", []).append(res)
            os.sync()
            out.setdefault(f"{n}/checkout warm", []).append(parent.child("ckpt_checkout", store, threads=n))
            evict(store)
            out.setdefault(f"{n}/checkout cold", []).append(parent.child("ckpt_checkout", store, threads=n))
            cli.log(f"threads {n}: commit {out[f'{n}/commit'][-1]['seconds']:.3f}s, checkout warm {out[f'{n}/checkout warm'][-1]['seconds']:.3f}s, "
                    f"cold {out[f'{n}/checkout cold'][-1]['seconds']:.3f}s", load=True)  # fmt: skip
            shutil.rmtree(store)
    report["threads"] = out


def run_async(args, report: dict, parent: Parent) -> None:
    out = []
    for r in range(args.extra_repeat):
        wait_for_quiet(args.max_load, args.max_wait_s)
        store = os.path.join(args.workdir, f"async-{r}")
        res = parent.child("async", store, extra=["--async-commits", str(args.async_commits)])
        cli.log(
            f"async: blocking {res['blocking_changed']['seconds']:.3f}s; async returns " + ", ".join(f"{a['seconds']:.3f}s" for a in res["async"]),
            load=True,
        )
        out.append(res)
        shutil.rmtree(store)
    report["async"] = out


def run_s3(args, report: dict, parent: Parent) -> None:
    io_s3.run_s3(args, report, parent.child, parent.children)


def run_memory(args, report: dict, parent: Parent) -> None:
    out = []
    for r in range(args.extra_repeat):
        wait_for_quiet(args.max_load, args.max_wait_s)
        store = os.path.join(args.workdir, f"memory-{r}")
        extra = [
            "--mem-bytes",
            str(args.mem_bytes),
            "--mem-tensor-bytes",
            str(args.mem_tensor_bytes),
            "--mem-budget-bytes",
            str(args.mem_budget_bytes),
        ]
        os.sync()
        c = parent.child("mem_commit", store, extra=extra)
        cli.log(f"memory: commit {c['seconds']:.1f}s, extra peak RSS {c['extra_peak_rss'] / MiB:,.0f} MiB", load=True)
        evict(store)  # cold: the store's files out of the page cache
        co = parent.child("mem_checkout", store, extra=extra)
        cli.log(f"memory: checkout {co['seconds']:.1f}s, extra peak RSS {co['extra_peak_rss'] / MiB:,.0f} MiB", load=True)
        out.append({"commit": c, "checkout": co})
        shutil.rmtree(store)
    report["memory"] = out


PARTS = {"table": run_table, "threads": run_threads, "async": run_async, "s3": run_s3, "memory": run_memory}


# --------------------------------------------------------------------------------------------
# Report


def _med(rs: list[dict], key: str = "seconds") -> float:
    return statistics.median(r[key] for r in rs)


class Bars:
    """The verdicts of one report: :meth:`check` records one and returns its line."""

    def __init__(self) -> None:
        self.verdicts: list[bool] = []

    def check(self, label: str, ok: bool, detail: str) -> str:
        self.verdicts.append(ok)
        return f"- **{'PASS' if ok else 'FAIL'}** {label}: {detail}"


def _dtype_table(report: dict, args, dtype: str) -> list[str]:
    runs, s = report["table"][dtype], report["setup"][dtype]
    logical = s["logical_bytes"]
    lines = [f"\n### {dtype} state: {fmt_size(logical)}, {s['n_tensors']} tensors; median of {args.repeat}\n"]
    lines += table_header(
        ["operation", "median s", "GB/s", "CPU s", "others' CPU s", "on disk", "extra peak RSS", "peak RSS", "load avg", "all runs (s)"],
        "lrrrrrrrrl",
    )
    for name, rs in runs.items():
        m = _med(rs)
        disk = "—"
        if "disk_alloc" in rs[0]:
            disk = ("+" if "re-commit" in name else "") + fmt_size(_med(rs, "disk_alloc"))
        loads = [r["load1"] for r in rs]
        lines.append(f"| {name} | {m:.3f} | {logical / GB / m:.2f} | {_med(rs, 'cpu_s'):.2f} | {_med(rs, 'others_cpu_s'):.2f} | {disk} | {_med(rs, 'extra_peak_rss') / MB:,.0f} MB | {_med(rs, 'peak_rss') / MB:,.0f} MB | "
                     f"{min(loads):.2f}–{max(loads):.2f} | " + ", ".join(f"{r['seconds']:.3f}" for r in rs) + " |")  # fmt: skip
    first_run = runs["ckptstore first commit"][0]
    first, pct = first_run["stats"], runs["ckptstore 1%-changed re-commit"]
    lines.append(
        f"\nckptstore ({first_run['store_threads']} threads, chunk {first_run['store_config']['chunk_size_bytes'] / MiB:g} MiB, compression "
        f"{first_run['store_config'].get('compression', 'always')!r}): first commit new_bytes {fmt_size(first['new_bytes'])} "
        f"in {first['new_chunks']} chunks ({first_run.get('stored_raw_chunks', '?')} stored raw; "
        f"stored/raw {first['new_bytes'] / first['logical_bytes']:.3f}); 1% re-commit: {len(s['changed'])} of {s['n_candidates']} tensors changed, "
        f"{fmt_size(s['changed_bytes'])}, new_bytes {fmt_size(statistics.median(r['stats']['new_bytes'] for r in pct))} "
        f"({statistics.median(r['stats']['new_chunks'] for r in pct):g} new chunks)."
    )
    cold_res = [r.get("resident_before") for n, rs in runs.items() if "[cold]" in n for r in rs]
    if any(x is not None for x in cold_res):
        lines.append(
            f"Cold reads: at most {max(x for x in cold_res if x is not None) / MB:.1f} MB of the files were in the page cache before the read (fincore)."
        )
    return lines


def _fastest_save(runs: dict) -> tuple[str, float]:
    peers = {n: _med(runs[n]) for n in PEERS_SAVE}
    fastest = min(peers, key=peers.get)
    return fastest, peers[fastest]


def _table_bars(report: dict, args, bars: Bars) -> list[str]:
    """Issue 3's bars (2, 3) and issue 19's (1, 4), in the order (1), (2), (4), (3)."""
    table, lines = report["table"], []
    for dtype in args.dtypes:
        fastest, peer = _fastest_save(table[dtype])
        commit = _med(table[dtype]["ckptstore first commit"])
        lines.append(
            bars.check(
                f"(1) {dtype} durable first commit ≤ fastest durable peer",
                commit <= peer,
                f"{commit:.3f} s vs {fastest} {peer:.3f} s (ratio {commit / peer:.2f})",
            )
        )
    for dtype in args.dtypes:
        for cache, need in (("warm", 0.9), ("cold", 1.0)):
            load, co = _med(table[dtype][f"torch.load [{cache}]"]), _med(table[dtype][f"ckptstore checkout [{cache}]"])
            lines.append(bars.check(f"(2) {dtype} checkout {cache} ≥ {need:g}× torch.load speed", load / co >= need,
                                    f"checkout {co:.3f} s vs torch.load {load:.3f} s: {load / co:.2f}× torch.load's speed"))  # fmt: skip
    for dtype in args.dtypes:
        runs = table[dtype]
        st, co = _med(runs[f"{ST_TOUCHED} [cold]"]), _med(runs["ckptstore checkout [cold]"])
        lines.append(
            bars.check(
                f"(4) {dtype} checkout cold ≥ 0.9× safetensors load_file (mmap, every page touched), cold",
                st / co >= 0.9,
                f"checkout {co:.3f} s vs {st:.3f} s: {st / co:.2f}× its speed",
            )
        )
        need = 1.5 if dtype == "fp32" else 1.0
        load, co = _med(runs["torch.load [warm]"]), _med(runs["ckptstore checkout [warm]"])
        lines.append(
            bars.check(
                f"(4) {dtype} checkout warm ≥ {need:g}× torch.load speed",
                load / co >= need,
                f"checkout {co:.3f} s vs torch.load {load:.3f} s: {load / co:.2f}×",
            )
        )
        if "ckptstore checkout, repacked [cold]" in runs:  # reported beside the bars, not a bar
            cold, warm = _med(runs["ckptstore checkout, repacked [cold]"]), _med(runs["ckptstore checkout, repacked [warm]"])
            stored = runs["ckptstore repack (both commits)"][0]["repack"]
            lines.append(f"(4) {dtype} repacked commit ({stored['rewritten_chunks']} of {stored['chunks']} chunks re-encoded, {stored['stored_bytes_before']:,} -> {stored['stored_bytes_after']:,} bytes): "
                         f"cold checkout {cold:.3f} s ({st / cold:.2f}× safetensors touched), warm {warm:.3f} s ({load / warm:.2f}× torch.load)")  # fmt: skip
    for dtype in args.dtypes:
        fastest, peer = _fastest_save(table[dtype])
        pct_runs = table[dtype]["ckptstore 1%-changed re-commit"]
        pct, new_bytes = _med(pct_runs), statistics.median(r["stats"]["new_bytes"] for r in pct_runs)
        changed = report["setup"][dtype]["changed_bytes"]
        lines.append(
            bars.check(
                f"(3) {dtype} 1%-changed re-commit ≥ 10× faster than the fastest peer's save",
                peer >= 10 * pct,
                f"{pct:.3f} s vs {fastest} {peer:.3f} s: {peer / pct:.1f}× faster",
            )
        )
        lines.append(bars.check(f"(3) {dtype} 1%-changed re-commit writes ≤ 1.1× the changed bytes", new_bytes <= 1.1 * changed,
                                f"new_bytes {new_bytes:,.0f} B vs changed {changed:,} B: {new_bytes / changed:.3f}×"))  # fmt: skip
    return lines


def _threads_section(report: dict, args) -> list[str]:
    t, logical = report["threads"], report["setup"]["fp32"]["logical_bytes"]
    lines = [f"\n### Thread scaling (fp32, {fmt_size(logical)}; {args.extra_repeat} run(s), median)\n"]
    lines += table_header(
        [
            "threads",
            "commit s",
            "commit GB/s",
            "commit extra peak RSS",
            "checkout warm s",
            "GB/s",
            "checkout cold s",
            "GB/s",
            "checkout extra peak RSS",
            "load avg",
        ],
        "rrrrrrrrrr",
    )
    for n in args.thread_counts:
        c, w, k = t[f"{n}/commit"], t[f"{n}/checkout warm"], t[f"{n}/checkout cold"]
        lines.append(f"| {n} | {_med(c):.3f} | {logical / GB / _med(c):.2f} | {_med(c, 'extra_peak_rss') / MB:,.0f} MB | {_med(w):.3f} | {logical / GB / _med(w):.2f} | "
                     f"{_med(k):.3f} | {logical / GB / _med(k):.2f} | {_med(w, 'extra_peak_rss') / MB:,.0f} MB | {min(r['load1'] for r in c + w + k):.2f}–{max(r['load1'] for r in c + w + k):.2f} |")  # fmt: skip
    return lines


def _async_section(report: dict, args, bars: Bars) -> tuple[list[str], list[str]]:
    a = report["async"]
    lines = [f"\n### Async commit (fp32; every tensor changed before each commit; {args.extra_repeat} run(s))\n"]
    lines += table_header(
        [
            "commit",
            "returns after (s)",
            "finished after (s)",
            "CPU s (blocking part)",
            "others' CPU s",
            "memcpy GB/s just before",
            "extra peak RSS",
            "new bytes",
        ],
        "lrrrrrrr",
    )
    for res in a:
        for label, e in (
            ("blocking, first (empty store)", res["blocking_first"]),
            ("blocking, all tensors changed", res["blocking_changed"]),
        ):
            lines.append(
                f"| {label} | {e['seconds']:.3f} | {e['seconds']:.3f} | {e['cpu_s']:.2f} | {e['others_cpu_s']:.2f} | — | {e['extra_peak_rss'] / MB:,.0f} MB | {fmt_size(e['stats']['new_bytes'])} |"
            )
        for i, e in enumerate(res["async"]):
            label = "async #1 (allocates the staging buffers)" if i == 0 else f"async #{i + 1} (reuses them)"
            lines.append(
                f"| {label} | {e['seconds']:.3f} | {e['total_s']:.3f} | {e['cpu_s']:.2f} | {e['others_cpu_s']:.2f} | {e['memcpy_gbps_before']:.1f} | {e['extra_peak_rss'] / MB:,.0f} MB | {fmt_size(e['stats']['new_bytes'])} |"
            )
    blocking = statistics.median(r["blocking_changed"]["seconds"] for r in a)
    first = statistics.median(r["async"][0]["seconds"] for r in a)
    steady = statistics.median(e["seconds"] for r in a for e in r["async"][1:]) if len(a[0]["async"]) > 1 else float("nan")
    more = [(f"- (4) async commit, first: blocks {first:.3f} s = {100 * first / blocking:.1f}% of a blocking commit ({blocking:.3f} s) — "
             f"{'within' if first <= 0.1 * blocking else 'over'} 10% (informational; the bar is the steady state)")]  # fmt: skip
    more.append(
        bars.check(
            "(4) async commit, steady state: blocking part ≤ 10% of a blocking commit",
            steady <= 0.1 * blocking,
            f"{steady:.3f} s = {100 * steady / blocking:.1f}% of {blocking:.3f} s",
        )
    )
    return lines, more


def _memory_section(report: dict, args, bars: Bars) -> tuple[list[str], list[str]]:
    lines = [f"\n### Peak RSS, {args.mem_bytes / 2**30:g} GiB fp32 state, max_inflight_bytes {args.mem_budget_bytes / MiB:g} MiB\n"]
    lines += table_header(["operation", "s", "GB/s", "RSS before (MiB)", "peak RSS (MiB)", "growth (MiB)", "limit on growth (MiB)"], "lrrrrrr")
    more = []
    for res in report["memory"]:
        c, co = res["commit"], res["checkout"]
        state = c["state_bytes"]
        lim_c = c["budget"] + 256 * MiB
        lim_co = state + c["budget"] + 256 * MiB
        lines.append(
            f"| commit (state already in RSS) | {c['seconds']:.1f} | {state / GB / c['seconds']:.2f} | {c['rss_before'] / MiB:,.0f} | {c['peak_rss'] / MiB:,.0f} | {c['extra_peak_rss'] / MiB:,.0f} | {lim_c / MiB:,.0f} |"
        )
        lines.append(
            f"| checkout, cold (into an empty process) | {co['seconds']:.1f} | {state / GB / co['seconds']:.2f} | {co['rss_before'] / MiB:,.0f} | {co['peak_rss'] / MiB:,.0f} | {co['extra_peak_rss'] / MiB:,.0f} | {lim_co / MiB:,.0f} |"
        )
        more.append(bars.check("(5) commit: peak RSS ≤ state + budget + 256 MiB", c["peak_rss"] - c["rss_interp"] <= state + lim_c,
                               f"peak − interpreter = {(c['peak_rss'] - c['rss_interp']) / MiB:,.0f} MiB ≤ {(state + lim_c) / MiB:,.0f} MiB; growth over the state {c['extra_peak_rss'] / MiB:,.0f} MiB"))  # fmt: skip
        more.append(bars.check("(5) checkout: peak RSS ≤ state + budget + 256 MiB", co["extra_peak_rss"] <= lim_co,
                               f"growth {co['extra_peak_rss'] / MiB:,.0f} MiB ≤ {lim_co / MiB:,.0f} MiB (state {state / MiB:,.0f} MiB); sample verified: {co['verified_sample']}"))  # fmt: skip
    return lines, more


def summarize(report: dict, args) -> str:
    bars = Bars()
    head: list[str] = []
    if "table" in report:
        for dtype in args.dtypes:
            head += _dtype_table(report, args, dtype)
        head += ["\n### Bars\n", *_table_bars(report, args, bars)]
    extra: list[str] = []
    more: list[str] = []
    if "threads" in report:
        extra += _threads_section(report, args)
    for part, section in (("async", _async_section), ("s3", io_s3.s3_section), ("memory", _memory_section)):
        if part in report:
            lines, verdicts = section(report, args, bars)
            extra += lines
            more += verdicts
    text = "\n".join(head + extra + (["\n### More bars\n"] + more if more else []))
    report["verdicts_all_pass"] = all(bars.verdicts)
    return text + f"\n\nOverall: {'PASS' if all(bars.verdicts) else 'FAIL'} ({sum(bars.verdicts)}/{len(bars.verdicts)} checks)"


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    p = cli.parser(__doc__)
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
    cli.add_store_options(p, compression=True, threads_help="ckptstore threads for the table and async (default: the store's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every run and the machine description here")
    cli.add_child_options(p, "--endpoint", "--trace")
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    for flag in ("--s3-bytes", "--s3-tensor-bytes", "--s3-chunk-bytes", "--mem-bytes", "--mem-tensor-bytes", "--mem-budget-bytes"):
        p.add_argument(flag, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cli.check_store_options(p, args)
    if args.op:
        return args
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
    return args


def run_parts(args, parts: list[str]) -> dict:
    report: dict[str, Any] = {"load_start": os.getloadavg(), "machine": machine_info("/tmp")}  # the commit measured: HEAD at the start
    t0 = time.perf_counter()
    with cli.workdir(args.out, prefix="ckptbench-io-", keep=args.keep) as args.workdir:
        os.environ["CKPTSTORE_CACHE_DIR"] = os.path.join(args.workdir, "cache")  # S3 catalogs
        parent = Parent(args)
        report["load_start_wait"] = wait_for_quiet(args.max_load, args.max_wait_s)
        if any(x in parts for x in ("table", "threads", "async")):
            cli.log(f"setup: building the {args.size} state in {args.workdir}", load=True)
            report["setup"] = parent.child("setup")
            with open(os.path.join(args.workdir, "setup.json"), "w") as f:
                json.dump(report["setup"], f)
            cli.log(
                f"setup: built in {report['setup']['build_s']:.1f}s; fp32 {report['setup']['fp32']['logical_bytes'] / GB:.3f} GB, bf16 {report['setup']['bf16']['logical_bytes'] / GB:.3f} GB",
                load=True,
            )
        for part, fn in PARTS.items():
            if part in parts:
                cli.log(f"part: {part}", load=True)
                fn(args, report, parent)
    report["total_s"] = time.perf_counter() - t0
    report["load_end"] = os.getloadavg()
    head_end = machine_info("/tmp").get("ckptstore_commit")
    if head_end != report["machine"].get("ckptstore_commit"):
        report["machine"]["ckptstore_commit_at_end"] = head_end
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.op:
        return serve(args, run_child)
    report = run_parts(args, ["memory"] if args.memory else [x for x in args.parts.split(",") if x])
    report["args"] = cli.public_args(args)
    cli.write_json(args.json, report)  # the raw runs first, so that they survive a failure in the summary
    text = summarize(report, args)
    m = report["machine"]
    loads = {when: "/".join(f"{x:.2f}" for x in report[f"load_{when}"]) for when in ("start", "end")}
    print(f"Command: `{cli.command_line('io.py', argv).strip()}`; ckptstore at {m.get('ckptstore_commit', 'unknown commit')}"
          + (f" (HEAD was {m['ckptstore_commit_at_end']} at the end)" if m.get("ckptstore_commit_at_end") else "")
          + f"; {machine_line(m)}; load average (1/5/15 min) at start {loads['start']}, at end {loads['end']}; total {report['total_s']:.0f} s.\n" + text)  # fmt: skip
    cli.write_json(args.json, report)
    return 0 if report["verdicts_all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
