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

import argparse
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

GB = 1e9
MB = 1e6

SIZES = {
    # name: (vocab, n_positions, d_model, n_layer, n_head, batch, seq)
    "gpt2": (50257, 1024, 768, 12, 12, 1, 128),
    "tiny": (5000, 256, 256, 4, 4, 1, 64),
}

# --------------------------------------------------------------------------------------------
# Helpers usable without torch (parent process)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_with_directory(path: str) -> None:
    """fsync ``path`` and the directory that holds it, so that a new file's name is as
    durable as its bytes (what every peer's save is timed with)."""
    fsync_path(path)
    fsync_path(os.path.dirname(path))


def disk_usage(path: str) -> tuple[int, int]:
    """(allocated bytes as ``du`` counts them, apparent bytes) of a file or a directory tree."""
    if os.path.isfile(path):
        st = os.stat(path)
        return st.st_blocks * 512, st.st_size
    alloc = apparent = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            alloc += st.st_blocks * 512
            apparent += st.st_size
    return alloc, apparent


def drop_page_cache() -> bool:
    """sync + drop the page cache; False where not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 if m else -1


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# The synthetic model (child processes only)


def build_state(size: str, seed: int) -> tuple[dict, Any]:
    """A GPT-2-shaped model and an AdamW optimizer after 2 real steps; returns
    ``({"model": sd, "optimizer": osd}, model)``."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    vocab, n_pos, d, n_layer, n_head, batch, seq = SIZES[size]
    torch.manual_seed(seed)

    class Conv1D(nn.Module):  # GPT-2's layout: weight is (in, out)
        def __init__(self, nx: int, nf: int) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.empty(nx, nf).normal_(0.0, 0.02))
            self.bias = nn.Parameter(torch.zeros(nf))

        def forward(self, x):
            return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = Conv1D(d, 3 * d)
            self.c_proj = Conv1D(d, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.c_attn(x).split(d, dim=2)
            q, k, v = (z.view(b, t, n_head, d // n_head).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(b, t, d))

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = Conv1D(d, 4 * d)
            self.c_proj = Conv1D(4 * d, d)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(d)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(d)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = nn.ModuleDict(
                {
                    "wte": nn.Embedding(vocab, d),
                    "wpe": nn.Embedding(n_pos, d),
                    "h": nn.ModuleList([Block() for _ in range(n_layer)]),
                    "ln_f": nn.LayerNorm(d),
                }
            )
            nn.init.normal_(self.transformer.wte.weight, 0.0, 0.02)
            nn.init.normal_(self.transformer.wpe.weight, 0.0, 0.01)
            self.lm_head = nn.Linear(d, vocab, bias=False)
            self.lm_head.weight = self.transformer.wte.weight  # tied

        def forward(self, idx):
            pos = torch.arange(idx.size(1))
            x = self.transformer.wte(idx) + self.transformer.wpe(pos)
            for block in self.transformer.h:
                x = block(x)
            return self.lm_head(self.transformer.ln_f(x))

    model = GPT2()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    for _ in range(2):
        idx = torch.randint(0, vocab, (batch, seq + 1))
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), idx[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    return state, model


def iter_tensors(state: dict):
    """(key path, tensor) for every tensor in a ``{"model", "optimizer"}`` state, in a fixed
    order (aliases included)."""
    for name, t in state["model"].items():
        yield ("model", name), t
    for pid in sorted(state["optimizer"]["state"]):
        for k, t in state["optimizer"]["state"][pid].items():
            yield ("optimizer", "state", pid, k), t


def get_path(state: dict, path) -> Any:
    obj = state
    for k in path:
        obj = obj[k]
    return obj


def unique_storage_bytes(state: dict) -> int:
    seen: dict[int, int] = {}
    for _, t in iter_tensors(state):
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def pick_changed(state: dict) -> list[tuple]:
    """1% of the (non-alias, non-scalar) tensors by count, at least 1, evenly spaced over the
    fixed order of :func:`iter_tensors`."""
    seen: set[int] = set()
    candidates = []
    for path, t in iter_tensors(state):
        if t.dim() == 0 or not t.is_floating_point():
            continue
        if t.untyped_storage().data_ptr() in seen:
            continue  # the tied lm_head.weight alias
        seen.add(t.untyped_storage().data_ptr())
        candidates.append(path)
    k = max(1, round(0.01 * len(candidates)))
    picks = sorted({int((i + 0.5) * len(candidates) / k) for i in range(k)})
    return [candidates[i] for i in picks], len(candidates)


def flatten_for_safetensors(state: dict, **metadata: str) -> tuple[dict, dict]:
    """Flat ``{name: contiguous tensor}`` (each storage once: the tied lm_head.weight is
    dropped and recorded in metadata) and string metadata: the aliases, the optimizer's
    param_groups, and ``metadata``."""
    flat: dict = {}
    seen: dict[int, str] = {}
    aliases = {}
    for name, t in state["model"].items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            aliases[f"model.{name}"] = seen[ptr]
            continue
        seen[ptr] = f"model.{name}"
        flat[f"model.{name}"] = t.contiguous()
    for pid in sorted(state["optimizer"]["state"]):
        for k, t in state["optimizer"]["state"][pid].items():
            flat[f"optimizer.state.{pid}.{k}"] = t.contiguous()
    meta = {"aliases": json.dumps(aliases), "param_groups": json.dumps(state["optimizer"]["param_groups"]), **metadata}
    return flat, meta


def states_equal(a: dict, b: dict) -> bool:
    import torch

    ta, tb = dict(iter_tensors(a)), dict(iter_tensors(b))
    if ta.keys() != tb.keys():
        return False
    return all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in ((ta[k], tb[k]) for k in ta))


# --------------------------------------------------------------------------------------------
# Child: one operation per process


def _store_kwargs(args) -> dict:
    kw: dict[str, Any] = {}
    if args.chunk_size_mb is not None:
        kw["chunk_size_bytes"] = int(args.chunk_size_mb * (1 << 20))
    if args.compression_level is not None:
        kw["compression_level"] = None if args.compression_level == "none" else int(args.compression_level)
    if args.threads is not None:
        kw["threads"] = args.threads
    return kw


def run_child(args) -> dict:
    import psutil
    import torch

    work = args.workdir
    source = os.path.join(work, "source.pt")
    target = args.target
    result: dict[str, Any] = {"op": args.op}

    if args.op == "setup":
        t0 = time.perf_counter()
        state, model = build_state(args.size, args.seed)
        result["build_s"] = time.perf_counter() - t0
        torch.save(state, source)
        changed, n_candidates = pick_changed(state)
        result.update(
            logical_bytes=unique_storage_bytes(state),
            n_tensors=sum(1 for _ in iter_tensors(state)),
            n_params=sum(p.numel() for p in model.parameters()),
            n_candidates=n_candidates,
            changed=[list(p) for p in changed],
            changed_bytes=sum(get_path(state, p).nbytes for p in changed),
            changed_shapes=[list(get_path(state, p).shape) for p in changed],
        )
        return result

    # -- prepare (untimed) ------------------------------------------------------------------
    import ckptstore  # noqa: F401  (import cost stays out of the timer)
    import safetensors.torch as st

    state = None
    if args.op in ("torch_save", "st_save", "ckpt_commit", "ckpt_recommit_same", "ckpt_recommit_1pct"):
        state = torch.load(source, weights_only=True)
    if args.op == "ckpt_recommit_1pct":
        with open(os.path.join(work, "setup.json")) as f:
            setup = json.load(f)
        with torch.no_grad():
            for p in setup["changed"]:
                get_path(state, p).add_(1e-3)
    flat = meta = None
    if args.op == "st_save":
        flat, meta = flatten_for_safetensors(state)
    store = None
    if args.op.startswith("ckpt_"):
        t0 = time.perf_counter()
        store = ckptstore.open(target, **_store_kwargs(args))
        result["open_s"] = time.perf_counter() - t0

    def op() -> Any:
        if args.op == "torch_save":
            torch.save(state, target)
            fsync_with_directory(target)
            return None
        if args.op == "torch_load":
            return torch.load(target, weights_only=True, map_location="cpu")
        if args.op == "st_save":
            st.save_file(flat, target, metadata=meta)
            fsync_with_directory(target)
            return None
        if args.op == "st_load":
            return st.load_file(target, device="cpu")  # default backend: mmap, bytes read lazily
        if args.op == "st_load_pread":
            return st.load_file(target, device="cpu", backend="pread")  # bytes read into memory
        if args.op in ("ckpt_commit", "ckpt_recommit_same", "ckpt_recommit_1pct"):
            return store.commit(state, message=args.op)
        if args.op == "ckpt_checkout":
            return store.checkout("latest")
        raise SystemExit(f"unknown op {args.op}")

    gc.collect()
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    exact = _reset_peak_rss()
    ru_before = _ru_maxrss()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    out = op()
    seconds = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    peak = _status_kb("VmHWM") if exact else max(_ru_maxrss(), ru_before)
    result.update(
        seconds=seconds,
        rss_before=rss_before,
        peak_rss=peak,
        extra_peak_rss=peak - rss_before,
        peak_exact=exact,
        torch_threads=torch.get_num_threads(),
    )
    if args.op.startswith("ckpt_") and args.op != "ckpt_checkout":
        s = out.stats
        result["stats"] = dict(
            logical_bytes=s.logical_bytes, new_bytes=s.new_bytes, new_chunks=s.new_chunks,
            reused_chunks=s.reused_chunks, reused_bytes=s.reused_bytes, dedup_ratio=s.dedup_ratio,
        )  # fmt: skip
        result["store_threads"] = store.pipeline.threads
        result["store_config"] = dict(
            chunk_size_bytes=store.config.chunk_size_bytes, compression_level=store.config.compression_level
        )
    if args.verify and out is not None and args.op in ("torch_load", "st_load", "st_load_pread", "ckpt_checkout"):
        ref = torch.load(source, weights_only=True)
        if args.op.startswith("st_load"):
            flat_ref, _ = flatten_for_safetensors(ref)
            ok = flat_ref.keys() == out.keys() and all(torch.equal(flat_ref[k], out[k]) for k in flat_ref)
        else:
            ok = states_equal(ref, out)
            tied = out["model"]["lm_head.weight"].untyped_storage().data_ptr() == out["model"]["transformer.wte.weight"].untyped_storage().data_ptr()
            result["tied_preserved"] = tied
        result["verified"] = bool(ok)
        if not ok:
            raise SystemExit(f"{args.op}: loaded state differs from the source state")
    return result


def _ru_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --------------------------------------------------------------------------------------------
# Parent: orchestration and report


def _child(args, op: str, target: str = "", *, verify: bool = False, profile: str | None = None) -> dict:
    result_path = os.path.join(args.workdir, f".result-{op}.json")
    cmd = [
        sys.executable, os.path.abspath(__file__), "--op", op, "--workdir", args.workdir,
        "--target", target, "--result", result_path, "--size", args.size, "--seed", str(args.seed),
    ]  # fmt: skip
    for flag, value in (("--threads", args.threads), ("--chunk-size-mb", args.chunk_size_mb), ("--compression-level", args.compression_level)):
        if value is not None:
            cmd += [flag, str(value)]
    if verify:
        cmd.append("--verify")
    if profile:
        cmd += ["--profile", profile]
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child {op} failed with exit status {proc.returncode}")
    with open(result_path) as f:
        result = json.load(f)
    os.unlink(result_path)
    return result


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_info(workdir: str) -> dict:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
    }
    try:
        import psutil

        info["ram_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    try:
        out = subprocess.run(["python3", "-c", "import torch,safetensors,zstandard,xxhash;print(torch.__version__,safetensors.__version__,zstandard.__version__,xxhash.VERSION)"], capture_output=True, text=True).stdout.split()
        info.update(dict(zip(["torch", "safetensors", "zstandard", "xxhash"], out)))
    except OSError:
        pass
    try:
        df = subprocess.run(["df", "-T", workdir], capture_output=True, text=True).stdout.splitlines()[-1].split()
        info["filesystem"] = {"device": df[0], "type": df[1]}
        dev = os.path.basename(df[0])
        rot = f"/sys/block/{dev}/queue/rotational"
        if os.path.exists(rot):
            info["filesystem"]["rotational"] = open(rot).read().strip() == "1"
    except (OSError, IndexError):
        pass
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "ckptstore"], capture_output=True, text=True)
        if head.returncode == 0:
            info["ckptstore_commit"] = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
        info["cpu"] = m.group(1) if m else None
    except OSError:
        pass
    return info


def run_parent(args) -> dict:
    own_dir = args.out is None
    args.workdir = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="ckptbench-", dir="/tmp")
    os.makedirs(args.workdir, exist_ok=True)
    can_drop = drop_page_cache() if args.read_cache != "warm" else False
    caches = {"warm": ["warm"], "cold": ["cold"], "both": ["warm", "cold"]}[args.read_cache]
    if "cold" in caches and not can_drop:
        _log("cannot drop the page cache (not root?): all reads are from the page cache")
        caches = ["warm"]

    try:
        _log(f"setup: building the {args.size} state in {args.workdir}")
        setup = _child(args, "setup")
        with open(os.path.join(args.workdir, "setup.json"), "w") as f:
            json.dump(setup, f)
        _log(
            f"setup: {setup['n_params'] / 1e6:.1f}M params, {setup['logical_bytes'] / GB:.3f} GB logical, "
            f"{setup['n_tensors']} tensors, built in {setup['build_s']:.1f}s; 1% = {len(setup['changed'])} tensors, "
            f"{setup['changed_bytes'] / MB:.1f} MB"
        )
        runs: dict[str, list[dict]] = {}

        def record(name: str, res: dict, disk: tuple[int, int] | None = None) -> dict:
            if disk is not None:
                res["disk_alloc"], res["disk_apparent"] = disk
            runs.setdefault(name, []).append(res)
            _log(f"  {name}: {res['seconds']:.3f}s, extra peak RSS {res['extra_peak_rss'] / MB:.0f} MB")
            return res

        def read_op(name: str, op: str, target: str, r: int) -> None:
            for cache in caches:
                if cache == "cold":
                    drop_page_cache()
                else:
                    os.sync()
                prof = os.path.join(args.profile_dir, f"{op}-{cache}-{r}.pstats") if args.profile_dir else None
                record(f"{name} [{cache}]" if len(caches) > 1 else name, _child(args, op, target, verify=(r == 0 and cache == caches[0]), profile=prof))

        def write_op(name: str, op: str, target: str, r: int, disk_of: str) -> dict:
            os.sync()  # no dirty pages from earlier steps get flushed inside this timer
            before = disk_usage(disk_of) if os.path.exists(disk_of) else (0, 0)
            prof = os.path.join(args.profile_dir, f"{op}-{r}.pstats") if args.profile_dir else None
            res = _child(args, op, target, profile=prof)
            after = disk_usage(disk_of)
            res["disk_total_alloc"] = after[0]
            return record(name, res, (after[0] - before[0], after[1] - before[1]))

        if args.profile_dir:
            os.makedirs(args.profile_dir, exist_ok=True)
        for r in range(args.repeat):
            _log(f"repeat {r + 1}/{args.repeat}")
            rdir = os.path.join(args.workdir, f"run{r}")
            os.makedirs(rdir, exist_ok=True)
            pt = os.path.join(rdir, "state.pt")
            write_op("torch.save + fsync", "torch_save", pt, r, pt)
            read_op("torch.load", "torch_load", pt, r)
            os.unlink(pt)
            sf = os.path.join(rdir, "state.safetensors")
            write_op("safetensors save_file + fsync", "st_save", sf, r, sf)
            read_op("safetensors load_file (mmap)", "st_load", sf, r)
            read_op("safetensors load_file (pread)", "st_load_pread", sf, r)
            os.unlink(sf)
            store = os.path.join(rdir, "store")
            write_op("ckptstore first commit", "ckpt_commit", store, r, store)
            read_op("ckptstore checkout", "ckpt_checkout", store, r)
            write_op("ckptstore identical re-commit", "ckpt_recommit_same", store, r, store)
            write_op("ckptstore 1%-changed re-commit", "ckpt_recommit_1pct", store, r, store)
            shutil.rmtree(rdir)
    finally:
        if own_dir and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)

    return {"setup": setup, "runs": runs, "caches": caches, "machine": machine_info(args.workdir if os.path.exists(args.workdir) else "/tmp")}


def summarize(report: dict, args) -> str:
    setup, runs = report["setup"], report["runs"]
    logical = setup["logical_bytes"]
    med: dict[str, float] = {}
    lines = []
    lines.append(
        f"State: {args.size}, {setup['n_params'] / 1e6:.1f}M params + AdamW exp_avg/exp_avg_sq, "
        f"{setup['n_tensors']} tensors, {logical / GB:.3f} GB logical (each storage once). "
        f"1%-changed: {len(setup['changed'])} of {setup['n_candidates']} tensors, {setup['changed_bytes'] / MB:.1f} MB. "
        f"Median of {args.repeat}; GB = 1e9 B; RSS in MB = 1e6 B."
    )
    cfg = next((r[0].get("store_config") for r in runs.values() if r[0].get("store_config")), {})
    thr = next((r[0].get("store_threads") for r in runs.values() if r[0].get("store_threads")), None)
    lines.append(
        f"ckptstore: chunk {cfg.get('chunk_size_bytes', 0) / (1 << 20):g} MiB, compression_level "
        f"{cfg.get('compression_level')}, threads {thr}."
    )
    lines.append("")
    lines.append("| operation | median s | GB/s | on disk | extra peak RSS | peak RSS | all runs (s) |")
    lines.append("|---|---:|---:|---:|---:|---:|---|")
    for name, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        m = statistics.median(secs)
        med[name] = m
        extra = statistics.median(r["extra_peak_rss"] for r in rs)
        peak = statistics.median(r["peak_rss"] for r in rs)
        if "disk_alloc" in rs[0]:
            d = statistics.median(r["disk_alloc"] for r in rs)
            disk = f"{d / MB:,.1f} MB" if d < GB else f"{d / GB:.3f} GB"
            if name.startswith("ckptstore") and "first" not in name:
                disk = f"+{disk}"
        else:
            disk = "—"
        lines.append(
            f"| {name} | {m:.3f} | {'(lazy)' if '(mmap)' in name else f'{logical / GB / m:.2f}'} | {disk} | {extra / MB:,.0f} MB | {peak / MB:,.0f} MB | "
            + ", ".join(f"{s:.3f}" for s in secs)
            + " |"
        )
    for name in ("ckptstore first commit", "ckptstore identical re-commit", "ckptstore 1%-changed re-commit"):
        if name in runs:
            s = runs[name][0]["stats"]
            lines.append(
                f"\n{name}: new_chunks {s['new_chunks']}, reused_chunks {s['reused_chunks']}, "
                f"new_bytes {s['new_bytes'] / MB:,.1f} MB, dedup_ratio {s['dedup_ratio']:.3g}"
            )
    # The bar
    lines.append("\nBar:")
    verdicts = []

    def check(label: str, ok: bool, detail: str) -> None:
        verdicts.append(ok)
        lines.append(f"- {'PASS' if ok else 'FAIL'}: {label} ({detail})")

    save, commit = med.get("torch.save + fsync"), med.get("ckptstore first commit")
    check("first commit ≤ 1.5 × torch.save", commit <= 1.5 * save, f"{commit:.3f}s vs 1.5 × {save:.3f}s = {1.5 * save:.3f}s; ratio {commit / save:.2f}")
    for cache in report["caches"]:
        suffix = f" [{cache}]" if len(report["caches"]) > 1 else ""
        load, co = med.get("torch.load" + suffix), med.get("ckptstore checkout" + suffix)
        check(f"checkout ≤ 1.5 × torch.load{suffix}", co <= 1.5 * load, f"{co:.3f}s vs 1.5 × {load:.3f}s = {1.5 * load:.3f}s; ratio {co / load:.2f}")
    pct = med.get("ckptstore 1%-changed re-commit")
    check("1%-changed re-commit ≥ 5× faster than torch.save", save >= 5 * pct, f"{pct:.3f}s vs torch.save {save:.3f}s: {save / pct:.1f}× faster")
    report["bar"] = {"pass": all(verdicts), "medians_s": med}
    lines.append(f"\nOverall: {'PASS' if all(verdicts) else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="gpt2", help="gpt2 (~1.5 GB) or tiny (~50 MB)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per operation; the median is reported")
    p.add_argument("--out", help="working directory (default: a fresh one under /tmp, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the default working directory")
    p.add_argument("--threads", type=int, help="ckptstore pipeline threads (default: the store's default)")
    p.add_argument("--chunk-size-mb", type=float, help="ckptstore chunk size in MiB (default: the store's)")
    p.add_argument("--compression-level", help="zstd level for ckptstore, or 'none' (default: the store's)")
    p.add_argument("--read-cache", choices=["warm", "cold", "both"], default="both",
                   help="page cache state for the read operations: warm (just written), cold (dropped; needs root), both")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every run and the summary as JSON here")
    p.add_argument("--profile-dir", help="write a cProfile .pstats per operation here")
    # child-only
    p.add_argument("--op", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compression_level is not None and args.compression_level != "none":
        int(args.compression_level)

    if args.op:
        result = run_child(args)
        with open(args.result, "w") as f:
            json.dump(result, f)
        return 0

    t0 = time.perf_counter()
    report = run_parent(args)
    report["total_s"] = time.perf_counter() - t0
    text = summarize(report, args)
    report["args"] = {k: v for k, v in vars(args).items() if k not in ("op", "target", "result", "verify", "profile")}
    m = report["machine"]
    text += (
        f"\nMachine: {m.get('nproc')} CPUs ({m.get('cpu')}), {m.get('ram_bytes', 0) / 2**30:.0f} GiB RAM, "
        f"{(m.get('filesystem') or {}).get('type')} on {(m.get('filesystem') or {}).get('device')}, Python {m.get('python')}, torch {m.get('torch')}, safetensors {m.get('safetensors')}, "
        f"ckptstore at {m.get('ckptstore_commit', 'unknown commit')}; total {report['total_s']:.0f}s"
    )
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=lambda o: None if isinstance(o, float) and math.isinf(o) else str(o))
    return 0


if __name__ == "__main__":
    sys.exit(main())
