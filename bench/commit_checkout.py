#!/usr/bin/env python3
"""Benchmark: ckptstore commit/checkout against torch.save/torch.load and safetensors.

One synthetic GPT-2-small-shaped fp32 model (a real ``torch.nn.Module``, lm_head tied to
wte) plus an AdamW optimizer that has taken 2 real steps (so ``exp_avg``/``exp_avg_sq``
exist), about 1.5 GB in all. Every measured operation runs in its own fresh subprocess
(this script re-invoked with ``--op NAME``) so that its peak RSS is its own; the child
prepares its input (loads the shared source state from a plain ``torch.save`` file) before
the timer starts, then resets the kernel's RSS high-water mark (``/proc/self/clear_refs``)
so that "extra peak RSS" is exactly what the operation added.

    python bench/commit_checkout.py                 # GPT-2 small, 3 repeats
    python bench/commit_checkout.py --size tiny     # ~50 MB, quick check
    python bench/commit_checkout.py --json out.json --compression-level none --threads 2

See bench/README.md for the current figures, and bench/HISTORY.md for what is measured and earlier runs.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from typing import Any

from harness import GB, MB, cli
from harness.child import Children, serve
from harness.files import disk_usage, drop_page_cache
from harness.report import machine_info, machine_line, table_header

SIZE_CHOICES = ("gpt2", "tiny")

# --------------------------------------------------------------------------------------------
# Child: one operation per process


def change(t: Any) -> None:
    """How the 1%-changed re-commit changes a tensor: 1e-3 added to every element."""
    t.add_(1e-3)


def run_child(args) -> dict:
    import torch

    from harness.ops import run_op, store_options
    from harness.state import build_state, describe

    source = os.path.join(args.workdir, "source.pt")
    if args.op == "setup":
        t0 = time.perf_counter()
        state, model = build_state(args.size, args.seed)
        build_s = time.perf_counter() - t0
        torch.save(state, source)
        return {"op": "setup", "build_s": build_s, "n_params": sum(p.numel() for p in model.parameters()), **describe(state)}
    changed = []
    if args.op == "ckpt_recommit_1pct":
        with open(os.path.join(args.workdir, "setup.json")) as f:
            changed = json.load(f)["changed"]
    return run_op(args.op, source=source, target=args.target, options=store_options(args), verify=args.verify,
                  profile=args.profile, changed=changed, change=change)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Parent: orchestration and report


class Run:
    """The parent's side of one benchmark run: every operation in its own child, recorded by
    name; reads in each page-cache state of ``caches``."""

    def __init__(self, args, caches: list[str]) -> None:
        self.args, self.caches = args, caches
        self.children = Children(os.path.abspath(__file__), args.workdir)
        self.runs: dict[str, list[dict]] = {}

    def child(self, op: str, target: str = "", *, verify: bool = False, profile: str | None = None) -> dict:
        a = self.args
        argv = ["--op", op, "--workdir", a.workdir, "--target", target, "--size", a.size, "--seed", str(a.seed), *cli.store_argv(a)]
        return self.children.run(argv + (["--verify"] if verify else []) + (["--profile", profile] if profile else []))

    def record(self, name: str, res: dict) -> dict:
        self.runs.setdefault(name, []).append(res)
        cli.log(f"  {name}: {res['seconds']:.3f}s, extra peak RSS {res['extra_peak_rss'] / MB:.0f} MB")
        return res

    def _profile(self, name: str) -> str | None:
        return os.path.join(self.args.profile_dir, f"{name}.pstats") if self.args.profile_dir else None

    def read(self, name: str, op: str, target: str, r: int) -> None:
        for cache in self.caches:
            if cache == "cold":
                drop_page_cache()
            else:
                os.sync()
            res = self.child(op, target, verify=(r == 0 and cache == self.caches[0]), profile=self._profile(f"{op}-{cache}-{r}"))
            self.record(f"{name} [{cache}]" if len(self.caches) > 1 else name, res)

    def write(self, name: str, op: str, target: str, r: int) -> dict:
        os.sync()  # no dirty pages from earlier steps get flushed inside this timer
        before = disk_usage(target) if os.path.exists(target) else (0, 0)
        res = self.child(op, target, profile=self._profile(f"{op}-{r}"))
        after = disk_usage(target)
        res["disk_total_alloc"] = after[0]
        res["disk_alloc"], res["disk_apparent"] = after[0] - before[0], after[1] - before[1]
        return self.record(name, res)

    def repeat(self, r: int) -> None:
        rdir = os.path.join(self.args.workdir, f"run{r}")
        os.makedirs(rdir, exist_ok=True)
        pt = os.path.join(rdir, "state.pt")
        self.write("torch.save + fsync", "torch_save", pt, r)
        self.read("torch.load", "torch_load", pt, r)
        os.unlink(pt)
        sf = os.path.join(rdir, "state.safetensors")
        self.write("safetensors save_file + fsync", "st_save", sf, r)
        self.read("safetensors load_file (mmap)", "st_load", sf, r)
        self.read("safetensors load_file (pread)", "st_load_pread", sf, r)
        os.unlink(sf)
        store = os.path.join(rdir, "store")
        self.write("ckptstore first commit", "ckpt_commit", store, r)
        self.read("ckptstore checkout", "ckpt_checkout", store, r)
        self.write("ckptstore identical re-commit", "ckpt_recommit_same", store, r)
        self.write("ckptstore 1%-changed re-commit", "ckpt_recommit_1pct", store, r)
        shutil.rmtree(rdir)


def run_parent(args) -> dict:
    with cli.workdir(args.out, prefix="ckptbench-", keep=args.keep) as args.workdir:
        can_drop = drop_page_cache() if args.read_cache != "warm" else False
        caches = {"warm": ["warm"], "cold": ["cold"], "both": ["warm", "cold"]}[args.read_cache]
        if "cold" in caches and not can_drop:
            cli.log("cannot drop the page cache (not root?): all reads are from the page cache")
            caches = ["warm"]
        run = Run(args, caches)
        cli.log(f"setup: building the {args.size} state in {args.workdir}")
        setup = run.child("setup")
        with open(os.path.join(args.workdir, "setup.json"), "w") as f:
            json.dump(setup, f)
        cli.log(
            f"setup: {setup['n_params'] / 1e6:.1f}M params, {setup['logical_bytes'] / GB:.3f} GB logical, "
            f"{setup['n_tensors']} tensors, built in {setup['build_s']:.1f}s; 1% = {len(setup['changed'])} tensors, "
            f"{setup['changed_bytes'] / MB:.1f} MB"
        )
        if args.profile_dir:
            os.makedirs(args.profile_dir, exist_ok=True)
        for r in range(args.repeat):
            cli.log(f"repeat {r + 1}/{args.repeat}")
            run.repeat(r)
        machine = machine_info(args.workdir)
    return {"setup": setup, "runs": run.runs, "caches": caches, "machine": machine}


def _table(runs: dict, logical: int) -> list[str]:
    lines = table_header(["operation", "median s", "GB/s", "on disk", "extra peak RSS", "peak RSS", "all runs (s)"], "lrrrrrl")
    for name, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        m = statistics.median(secs)
        extra = statistics.median(r["extra_peak_rss"] for r in rs)
        peak = statistics.median(r["peak_rss"] for r in rs)
        disk = "—"
        if "disk_alloc" in rs[0]:
            d = statistics.median(r["disk_alloc"] for r in rs)
            disk = f"{d / MB:,.1f} MB" if d < GB else f"{d / GB:.3f} GB"
            if name.startswith("ckptstore") and "first" not in name:
                disk = f"+{disk}"
        speed = "(lazy)" if "(mmap)" in name else f"{logical / GB / m:.2f}"
        lines.append(f"| {name} | {m:.3f} | {speed} | {disk} | {extra / MB:,.0f} MB | {peak / MB:,.0f} MB | " + ", ".join(f"{s:.3f}" for s in secs) + " |")
    return lines


def _bars(report: dict, med: dict[str, float]) -> list[str]:
    lines = ["\nBar:"]
    verdicts = []

    def check(label: str, ok: bool, detail: str) -> None:
        verdicts.append(ok)
        lines.append(f"- {'PASS' if ok else 'FAIL'}: {label} ({detail})")

    save, commit = med.get("torch.save + fsync"), med.get("ckptstore first commit")
    check(
        "first commit ≤ 1.5 × torch.save",
        commit <= 1.5 * save,
        f"{commit:.3f}s vs 1.5 × {save:.3f}s = {1.5 * save:.3f}s; ratio {commit / save:.2f}",
    )
    for cache in report["caches"]:
        suffix = f" [{cache}]" if len(report["caches"]) > 1 else ""
        load, co = med.get("torch.load" + suffix), med.get("ckptstore checkout" + suffix)
        check(
            f"checkout ≤ 1.5 × torch.load{suffix}",
            co <= 1.5 * load,
            f"{co:.3f}s vs 1.5 × {load:.3f}s = {1.5 * load:.3f}s; ratio {co / load:.2f}",
        )
    pct = med.get("ckptstore 1%-changed re-commit")
    check(
        "1%-changed re-commit ≥ 5× faster than torch.save",
        save >= 5 * pct,
        f"{pct:.3f}s vs torch.save {save:.3f}s: {save / pct:.1f}× faster",
    )
    report["bar"] = {"pass": all(verdicts), "medians_s": med}
    lines.append(f"\nOverall: {'PASS' if all(verdicts) else 'FAIL'}")
    return lines


def summarize(report: dict, args) -> str:
    setup, runs = report["setup"], report["runs"]
    logical = setup["logical_bytes"]
    lines = [
        (
            f"State: {args.size}, {setup['n_params'] / 1e6:.1f}M params + AdamW exp_avg/exp_avg_sq, "
            f"{setup['n_tensors']} tensors, {logical / GB:.3f} GB logical (each storage once). "
            f"1%-changed: {len(setup['changed'])} of {setup['n_candidates']} tensors, {setup['changed_bytes'] / MB:.1f} MB. "
            f"Median of {args.repeat}; GB = 1e9 B; RSS in MB = 1e6 B."
        )
    ]
    cfg = next((r[0].get("store_config") for r in runs.values() if r[0].get("store_config")), {})
    thr = next((r[0].get("store_threads") for r in runs.values() if r[0].get("store_threads")), None)
    lines.append(f"ckptstore: chunk {cfg.get('chunk_size_bytes', 0) / (1 << 20):g} MiB, compression_level {cfg.get('compression_level')}, threads {thr}.")
    lines.append("")
    lines += _table(runs, logical)
    for name in ("ckptstore first commit", "ckptstore identical re-commit", "ckptstore 1%-changed re-commit"):
        if name in runs:
            s = runs[name][0]["stats"]
            lines.append(
                f"\n{name}: new_chunks {s['new_chunks']}, reused_chunks {s['reused_chunks']}, "
                f"new_bytes {s['new_bytes'] / MB:,.1f} MB, dedup_ratio {s['dedup_ratio']:.3g}"
            )
    lines += _bars(report, {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()})
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    p = cli.parser(__doc__)
    p.add_argument("--size", choices=SIZE_CHOICES, default="gpt2", help="gpt2 (~1.5 GB) or tiny (~50 MB)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per operation; the median is reported")
    p.add_argument("--out", help="working directory (default: a fresh one under /tmp, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the default working directory")
    cli.add_store_options(p)
    p.add_argument("--read-cache", choices=["warm", "cold", "both"], default="both",
                   help="page cache state for the read operations: warm (just written), cold (dropped; needs root), both")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every run and the summary as JSON here")
    p.add_argument("--profile-dir", help="write a cProfile .pstats per operation here")
    cli.add_child_options(p)
    args = p.parse_args(argv)
    cli.check_store_options(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.op:
        return serve(args, run_child)
    t0 = time.perf_counter()
    report = run_parent(args)
    report["total_s"] = time.perf_counter() - t0
    text = summarize(report, args)
    report["args"] = cli.public_args(args)
    m = report["machine"]
    text += f"\nMachine: {machine_line(m)}, ckptstore at {m.get('ckptstore_commit', 'unknown commit')}; total {report['total_s']:.0f}s"
    print(text)
    cli.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
