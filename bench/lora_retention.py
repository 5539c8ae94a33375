#!/usr/bin/env python3
"""Benchmark: a LoRA run in a ckptstore store, against safetensors files, before and after a
keep-last-3 + best-1 retention GC.

A frozen base (GPT-2-small shapes, synthetic weights, lm_head tied to wte) carries LoRA
adapters on the q and v slices of every layer's fused ``c_attn`` (as loralib's GPT-2
``MergedLinear``). Only the adapters train: between commits, AdamW takes a few real steps on a
low-rank regression (the adapters' ``x @ A.T @ B.T`` against a fixed random target of twice
the adapter's rank), so the adapters and their Adam moments change at every commit and the
base never does. Each commit is what a user would write::

    store.commit({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step},
                 metadata={"step": step}, metrics={"eval_loss": ...})

``eval_loss`` is measured on a small fresh batch, so it falls and then wanders: the best
commit need not be the last. Each checkpoint is also written as a safetensors file (model +
optimizer tensors, flattened), fsync'd, measured, and deleted.

Reported: the store's bytes after N commits against the sum of the N safetensors files and
against the bar ``base + N × (adapter + its optimizer state)``; then
``store.gc(Policy(keep=KeepLast(3) | KeepBest(1)), grace_period_s=0)``: bytes after, GC time,
objects deleted, against the safetensors files of the same kept checkpoints.

    python bench/lora_retention.py                       # GPT-2 small fp32 base, rank 8, 30 commits
    python bench/lora_retention.py --size tiny           # quick check
    python bench/lora_retention.py --base-dtype bf16 --rank 16 --json out.json

See bench/HISTORY.md ("LoRA run and retention") for the figures on the reference machine.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from harness import MB, cli
from harness.files import fsync_with_directory
from harness.report import machine_info, machine_line
from harness.state import SIZES, flatten_for_safetensors, unique_storage_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZE_CHOICES = ("gpt2", "gpt2-medium", "tiny")

# --------------------------------------------------------------------------------------------
# The model: a frozen GPT-2-shaped base with LoRA on the q and v slices of c_attn


class Conv1D(nn.Module):
    """GPT-2's layout: weight is (in, out)."""

    def __init__(self, nx: int, nf: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf, dtype=dtype).normal_(0.0, 0.02), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(nf, dtype=dtype), requires_grad=False)


class LoRAConv1D(Conv1D):
    """The fused qkv projection with trainable rank-r adapters on its q and v slices (the base
    weight stays frozen); delta_q = scaling · B_q A_q, likewise for v."""

    def __init__(self, d: int, rank: int, alpha: float, dtype: torch.dtype) -> None:
        super().__init__(d, 3 * d, dtype)
        self.scaling = alpha / rank
        for p in ("q", "v"):
            a = nn.Parameter(torch.empty(rank, d))  # adapters stay fp32 (peft's default)
            nn.init.kaiming_uniform_(a, a=5**0.5)
            setattr(self, f"lora_A_{p}", a)
            setattr(self, f"lora_B_{p}", nn.Parameter(torch.zeros(d, rank)))


class Block(nn.Module):
    def __init__(self, d: int, rank: int, alpha: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, dtype=dtype)
        self.attn = nn.Module()
        self.attn.c_attn = LoRAConv1D(d, rank, alpha, dtype)
        self.attn.c_proj = Conv1D(d, d, dtype)
        self.ln_2 = nn.LayerNorm(d, dtype=dtype)
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(d, 4 * d, dtype)
        self.mlp.c_proj = Conv1D(4 * d, d, dtype)


class GPT2LoRA(nn.Module):
    def __init__(self, size: str, rank: int, alpha: float, dtype: torch.dtype) -> None:
        super().__init__()
        vocab, n_pos, d, n_layer = SIZES[size][:4]
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, d, dtype=dtype),
                "wpe": nn.Embedding(n_pos, d, dtype=dtype),
                "h": nn.ModuleList([Block(d, rank, alpha, dtype) for _ in range(n_layer)]),
                "ln_f": nn.LayerNorm(d, dtype=dtype),
            }
        )
        with torch.no_grad():
            self.transformer.wte.weight.normal_(0.0, 0.02)
            self.transformer.wpe.weight.normal_(0.0, 0.01)
            # Like a pretrained model: no zero biases or all-ones layernorms. These small
            # tensors are stored inline in every manifest, so their entropy matters.
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.02)
                elif ".ln_" in name and name.endswith("weight"):
                    p.normal_(1.0, 0.05)
        self.lm_head = nn.Linear(d, vocab, bias=False, dtype=dtype)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        for name, p in self.named_parameters():
            p.requires_grad_(".lora_" in name)

    def adapters(self) -> list[tuple[LoRAConv1D, str]]:
        return [(block.attn.c_attn, p) for block in self.transformer.h for p in ("q", "v")]


class LoRATask:
    """Each adapted projection regresses ``x @ U_i @ V_i`` (a fixed random map of twice the
    adapter's rank with decaying singular values, so the adapter cannot reach zero loss) through
    ``scaling · x @ A.T @ B.T``. The loss is the MSE relative to the target's power, averaged
    over the projections, so it starts at about 1."""

    def __init__(self, model: GPT2LoRA, *, seed: int, target_rank: int) -> None:
        self.model = model
        self.slots = model.adapters()
        self.d = self.slots[0][0].weight.shape[0]
        n = len(self.slots)
        g = torch.Generator().manual_seed(seed + 1)
        self.u = torch.randn(n, self.d, target_rank, generator=g) / target_rank**0.5 * torch.linspace(1.0, 0.1, target_rank)
        self.v = torch.randn(n, target_rank, self.d, generator=g) / self.d**0.5
        self.train_gen = torch.Generator().manual_seed(seed + 2)
        self.eval_gen = torch.Generator().manual_seed(seed + 3)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.stack([getattr(m, f"lora_A_{p}") for m, p in self.slots])
        b = torch.stack([getattr(m, f"lora_B_{p}") for m, p in self.slots])
        xb = x.expand(len(self.slots), *x.shape)
        pred = torch.bmm(torch.bmm(xb, a.transpose(1, 2)), b.transpose(1, 2)) * self.slots[0][0].scaling
        target = torch.bmm(torch.bmm(xb, self.u), self.v)
        return (((pred - target) ** 2).mean(dim=(1, 2)) / (target**2).mean(dim=(1, 2))).mean()

    def train(self, opt: torch.optim.Optimizer, steps: int, batch: int) -> float:
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            loss = self.loss(torch.randn(batch, self.d, generator=self.train_gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss.item()

    @torch.no_grad()
    def evaluate(self, batch: int) -> float:
        return float(self.loss(torch.randn(batch, self.d, generator=self.eval_gen)))


# Sizes and files


def tree_bytes(root: str, *, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, int]]:
    """Per top-level entry under ``root``: files, apparent bytes (st_size) and allocated bytes
    (st_blocks · 512, what ``du`` counts). ``exclude``: top-level names to skip."""
    out: dict[str, dict[str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        top = rel.split(os.sep, 1)[0]
        if dirpath == root:
            dirnames[:] = [n for n in dirnames if n not in exclude]
        for name in filenames:
            if dirpath == root and name in exclude:
                continue
            st = os.lstat(os.path.join(dirpath, name))
            row = out.setdefault(name if dirpath == root else top, {"files": 0, "apparent": 0, "allocated": 0})
            row["files"] += 1
            row["apparent"] += st.st_size
            row["allocated"] += st.st_blocks * 512
    return out


def total(rows: dict[str, dict[str, int]], field: str) -> int:
    return sum(r[field] for r in rows.values())


def snapshot_trainable(model: GPT2LoRA, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """A copy of what changes between commits (adapters and their optimizer state)."""
    out = {f"model/{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for pid, st in opt.state_dict()["state"].items():
        for k, t in st.items():
            out[f"optimizer/state/{pid}/{k}"] = t.clone()
    return out


# --------------------------------------------------------------------------------------------
# The run


class LoRARun:
    """The LoRA run in ``workdir``: the model, its optimizer and task, the store, and every
    commit's figures (``commits``) and trainable tensors (``snapshots``, to check checkouts)."""

    def __init__(self, args, workdir: str) -> None:
        import ckptstore

        self.args = args
        self.store_dir = os.path.join(workdir, "store")
        self.st_dir = os.path.join(workdir, "safetensors")
        if os.path.exists(self.store_dir) or os.path.exists(self.st_dir):
            raise SystemExit(f"{workdir} already holds a store/ or safetensors/ from an earlier run; give a fresh --dir")
        os.makedirs(self.st_dir)
        t0 = time.perf_counter()
        self.model = GPT2LoRA(args.size, args.rank, args.alpha, DTYPES[args.base_dtype])
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
        self.task = LoRATask(self.model, seed=args.seed, target_rank=2 * args.rank)
        base = [p for p in self.model.parameters() if not p.requires_grad]  # parameters() yields the tied weight once
        self.info: dict[str, Any] = {
            "build_s": time.perf_counter() - t0,
            "base_params": sum(p.numel() for p in base),
            "base_bytes": unique_storage_bytes(base),
            "adapter_params": sum(p.numel() for p in trainable),
            "adapter_bytes": unique_storage_bytes(trainable),
            "adapter_tensors": len(trainable),
        }
        cli.log(
            f"model: base {self.info['base_params'] / 1e6:.1f}M params {args.base_dtype} = {self.info['base_bytes'] / MB:,.1f} MB; "
            f"adapters {self.info['adapter_params']:,} params in {len(trainable)} tensors = {self.info['adapter_bytes'] / MB:.3f} MB; "
            f"built in {self.info['build_s']:.1f}s; work dir {workdir}"
        )
        self.store = ckptstore.open(self.store_dir, **({"threads": args.threads} if args.threads else {}))
        # Tensors at or under the inline threshold are stored in the manifest, so every commit
        # carries these small frozen base tensors (biases, layernorms) again.
        small = [p for p in base if p.nbytes <= self.store.config.inline_threshold_bytes]
        self.info["base_inline_tensors"] = len(small)
        self.info["base_inline_bytes"] = unique_storage_bytes(small)
        self.commits: list[dict[str, Any]] = []
        self.snapshots: dict[str, dict[str, torch.Tensor]] = {}
        self.step = 0

    def _save_safetensors(self, state: dict) -> tuple[float, os.stat_result]:
        """Write ``state`` as one safetensors file, durably; (seconds, its stat)."""
        import safetensors.torch as st

        flat, meta = flatten_for_safetensors(state, step=str(state["step"]))
        path = os.path.join(self.st_dir, f"step-{self.step:06d}.safetensors")
        os.sync()
        t_s = time.perf_counter()
        st.save_file(flat, path, metadata=meta)
        fsync_with_directory(path)
        st_s = time.perf_counter() - t_s
        sst = os.stat(path)
        if not self.args.keep_safetensors:
            os.unlink(path)
        return st_s, sst

    def commit_next(self, i: int) -> None:
        """Train ``--steps-per-commit`` steps, then commit, and save the same state as safetensors."""
        args = self.args
        t_train = time.perf_counter()
        train_loss = self.task.train(self.opt, args.steps_per_commit, args.batch)
        self.step += args.steps_per_commit
        eval_loss = self.task.evaluate(args.eval_batch)
        train_s = time.perf_counter() - t_train
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step}
        if i == 0:
            opt_tensors = [t for s in state["optimizer"]["state"].values() for t in s.values()]
            self.info["optimizer_bytes"] = unique_storage_bytes(opt_tensors)
            self.info["optimizer_tensors"] = len(opt_tensors)
            self.info["model_bytes"] = unique_storage_bytes(state["model"].values())
        os.sync()  # nothing dirty from earlier steps is flushed inside the timer
        t_c = time.perf_counter()
        commit = self.store.commit(state, message=f"step {self.step}", metadata={"step": self.step}, metrics={"eval_loss": eval_loss})
        commit_s = time.perf_counter() - t_c
        self.snapshots[commit.id] = snapshot_trainable(self.model, self.opt)
        st_s, sst = self._save_safetensors(state)
        s = commit.stats
        self.commits.append(
            {
                "index": i, "id": commit.id, "step": self.step, "train_loss": train_loss, "eval_loss": eval_loss,
                "train_s": train_s, "commit_s": commit_s, "safetensors_s": st_s,
                "safetensors_apparent": sst.st_size, "safetensors_allocated": sst.st_blocks * 512,
                "new_bytes": s.new_bytes, "new_chunks": s.new_chunks, "reused_chunks": s.reused_chunks,
                "logical_bytes": s.logical_bytes,
            }
        )  # fmt: skip
        cli.log(
            f"commit {i + 1:>2}/{args.commits} step {self.step:>4}: eval_loss {eval_loss:.4f}, commit {commit_s:.3f}s "
            f"(+{s.new_bytes / MB:,.2f} MB, {s.new_chunks} new / {s.reused_chunks} reused chunks), "
            f"safetensors {st_s:.2f}s ({sst.st_size / MB:,.1f} MB)"
        )

    def sizes(self, kept: list[int]) -> dict[str, Any]:
        """The store's bytes (catalog apart), the safetensors files of the ``kept`` commits, and
        the bar for them."""
        os.sync()
        store = tree_bytes(self.store_dir, exclude=(".catalog",))
        catalog = tree_bytes(os.path.join(self.store_dir, ".catalog"))
        adapter_with_opt = self.info["adapter_bytes"] + self.info["optimizer_bytes"]
        return {
            "store": store,
            "store_apparent": total(store, "apparent"),
            "store_allocated": total(store, "allocated"),
            "catalog_apparent": total(catalog, "apparent"),
            "catalog_allocated": total(catalog, "allocated"),
            "safetensors_apparent": sum(self.commits[i]["safetensors_apparent"] for i in kept),
            "safetensors_allocated": sum(self.commits[i]["safetensors_allocated"] for i in kept),
            "bar_bytes": self.info["base_bytes"] + len(kept) * adapter_with_opt,
        }

    def collect(self) -> tuple[Any, dict[str, Any]]:
        """keep-last-3 + best-1 GC, timed; (the plan, its figures)."""
        from ckptstore.retention import KeepBest, KeepLast, Policy

        policy = Policy(keep=KeepLast(3) | KeepBest(1))
        os.sync()
        t_g = time.perf_counter()
        plan = self.store.gc(policy, grace_period_s=0)
        gc_s = time.perf_counter() - t_g
        ids = [c["id"] for c in self.commits]
        n, best_index = len(ids), ids.index(self.store.tags()["best"])
        kept_idx = sorted(ids.index(c) for c in plan.kept_commits)
        figures = {
            "wall_s": gc_s, "elapsed_s": plan.elapsed_s, "summary": plan.summary(), "kept_indices": kept_idx,
            "expected_kept_indices": sorted(set(range(n - 3, n)) | {best_index}), "removed_commits": len(plan.removed_commits),
            "deleted_objects": plan.deleted_objects, "deleted_by_kind": plan.counts(), "freed_bytes": plan.freed_bytes,
            "shallow_commits": len(plan.shallow_commits), "young_objects": plan.young_objects, "spared_objects": plan.spared_objects,
        }  # fmt: skip
        cli.log(f"gc: {plan.summary()} in {gc_s:.3f}s; kept commits {[i + 1 for i in kept_idx]} (best is #{best_index + 1})")
        return plan, figures

    def _checkout_exact(self, i: int, base_ref: dict) -> bool:
        cid = self.commits[i]["id"]
        out = self.store.checkout(cid)
        ok = out["step"] == self.commits[i]["step"]
        for key, ref in self.snapshots[cid].items():
            obj: Any = out
            for part in key.split("/"):
                obj = obj[int(part)] if isinstance(obj, dict) and part.isdigit() and int(part) in obj else obj[part]
            ok = ok and torch.equal(obj, ref)
        ok = ok and all(torch.equal(out["model"][name], t) for name, t in base_ref.items())
        return ok and (out["model"]["lm_head.weight"].untyped_storage().data_ptr() == out["model"]["transformer.wte.weight"].untyped_storage().data_ptr())

    def checks(self, plan: Any, gc_figures: dict) -> dict[str, Any]:
        """Untimed: the kept set, bit-exact checkouts of the kept commits, removed commits gone, fsck."""
        import ckptstore

        kept_idx = gc_figures["kept_indices"]
        checks: dict[str, Any] = {"kept_as_policy_says": kept_idx == gc_figures["expected_kept_indices"]}
        base_ref = {n_: p.detach() for n_, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        exact = [self._checkout_exact(i, base_ref) for i in kept_idx]  # every kept commit checked out
        checks["kept_checkouts_bit_exact"] = all(exact)
        gone = 0
        for cid in (c["id"] for c in self.commits):
            if cid in plan.removed_commits:
                try:
                    self.store.resolve(cid)
                except ckptstore.UnknownRef:
                    gone += 1
        checks["removed_unresolvable"] = gone == len(plan.removed_commits)
        checks["fsck_ok"] = bool(self.store.fsck().ok)
        checks["log_len"] = len(self.store.log())
        return checks


def run(args) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    load_start = os.getloadavg()
    with cli.workdir(args.dir, prefix="ckptbench-lora-", keep=args.keep) as workdir:
        report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}, "workdir": workdir}
        report["machine"] = machine_info(workdir)  # before the run: the ckptstore commit it imported
        lora = LoRARun(args, workdir)
        for i in range(args.commits):
            lora.commit_next(i)
        report["model"] = lora.info
        n = len(lora.commits)
        ids = [c["id"] for c in lora.commits]
        report["before_gc"] = lora.sizes(list(range(n)))
        report["before_gc"]["adapter_with_optimizer_bytes"] = lora.info["adapter_bytes"] + lora.info["optimizer_bytes"]
        report["before_gc"]["best_index"] = ids.index(lora.store.tags()["best"])
        plan, report["gc"] = lora.collect()
        report["after_gc"] = lora.sizes(report["gc"]["kept_indices"])
        report["checks"] = lora.checks(plan, report["gc"])
        lora.store.close()
        report["catalog_after_close"] = total(tree_bytes(os.path.join(lora.store_dir, ".catalog")), "apparent")
        report["commits"] = lora.commits
    report["machine"]["loadavg_1m"] = [load_start[0], os.getloadavg()[0]]  # other work on the machine skews the times
    return report


# --------------------------------------------------------------------------------------------
# Report


def fmt_bytes(n: float) -> str:
    return f"{n / MB:,.2f} MB" if n < 10 * MB else f"{n / MB:,.1f} MB"


def summarize(report: dict[str, Any]) -> str:
    a = report["args"]
    m = report["model"]
    b, g, af = report["before_gc"], report["gc"], report["after_gc"]
    commits = report["commits"]
    n = len(commits)
    k = len(g["kept_indices"])
    recommit = [c["commit_s"] for c in commits[1:]]
    per_manifest = statistics.median(c["new_bytes"] for c in commits[1:]) if n > 1 else float("nan")
    lines = [
        (
            f"Run: {a['size']} base in {a['base_dtype']}, {m['base_params'] / 1e6:.1f}M params = {fmt_bytes(m['base_bytes'])} "
            f"(tied lm_head counted once); LoRA rank {a['rank']} on q and v of every layer: {m['adapter_tensors']} tensors, "
            f"{m['adapter_params']:,} params fp32 = {fmt_bytes(m['adapter_bytes'])}; AdamW state {fmt_bytes(m['optimizer_bytes'])} "
            f"({m['optimizer_tensors']} tensors). {n} commits, {a['steps_per_commit']} AdamW steps each. MB = 1e6 B."
        ),
        (
            f"Each later commit writes no chunk, only a manifest of {fmt_bytes(per_manifest)} (median `CommitStats.new_bytes`) and a "
            f"commit object of about {report['before_gc']['store']['commits']['apparent'] // n} B, against "
            f"{fmt_bytes(m['adapter_bytes'] + m['optimizer_bytes'])} of adapter + optimizer state. The manifest also carries "
            f"the {m['base_inline_tensors']} base tensors ≤ the inline threshold (biases, layernorms: "
            f"{fmt_bytes(m['base_inline_bytes'])}) again each time."
        ),
        f"eval_loss: {commits[0]['eval_loss']:.4f} at commit 1 → {commits[-1]['eval_loss']:.4f} at commit {n}; "
        f"best {commits[b['best_index']]['eval_loss']:.4f} at commit {b['best_index'] + 1}"
        + (" (among the last 3)" if b["best_index"] >= n - 3 else " (not among the last 3)")
        + ".",
        "",
        "| | store (apparent) | store (allocated) | catalog (open, with WAL) | safetensors files | bar: base + N × (adapter + optimizer) | store / bar | store / safetensors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, d, count in ((f"before GC ({n} commits)", b, n), (f"after GC ({k} kept)", af, k)):
        lines.append(
            f"| {label} | {fmt_bytes(d['store_apparent'])} | {fmt_bytes(d['store_allocated'])} | {fmt_bytes(d['catalog_apparent'])} | "
            f"{fmt_bytes(d['safetensors_apparent'])} ({count} files) | {fmt_bytes(d['bar_bytes'])} | "
            f"{d['store_apparent'] / d['bar_bytes']:.3f} | {d['store_apparent'] / d['safetensors_apparent']:.4f} |"
        )
    lines += [
        "",
        "| timing | seconds |",
        "|---|---:|",
        f"| {n} commits, total | {sum(c['commit_s'] for c in commits):.2f} |",
        f"| first commit (writes the base) | {commits[0]['commit_s']:.3f} |",
        f"| later commits, median (min–max) | {statistics.median(recommit):.3f} ({min(recommit):.3f}–{max(recommit):.3f}) |"
        if recommit
        else "| later commits | — |",
        f"| {n} safetensors save_file + fsync, total | {sum(c['safetensors_s'] for c in commits):.2f} |",
        f"| GC, wall (plan + execute) | {g['wall_s']:.3f} |",
        f"| GC, execute only (`GcPlan.elapsed_s`) | {g['elapsed_s']:.3f} |",
        "",
        (
            f"GC: {g['summary']}. Deleted by kind: {', '.join(f'{v} {kk}' for kk, v in g['deleted_by_kind'].items())}. "
            f"Kept commits {[i + 1 for i in g['kept_indices']]}."
        ),
        "",
        "Store by prefix before → after GC (apparent bytes, files):",
    ]
    for prefix in sorted(set(b["store"]) | set(af["store"])):
        x, y = b["store"].get(prefix, {"apparent": 0, "files": 0}), af["store"].get(prefix, {"apparent": 0, "files": 0})
        lines.append(f"- `{prefix}`: {x['apparent']:,} B in {x['files']} → {y['apparent']:,} B in {y['files']}")
    lines.append(f"\nThe catalog (`.catalog/`, not counted above) is {fmt_bytes(report['catalog_after_close'])} once the store is closed.")
    return "\n".join(lines + _verdict(report))


def _verdict(report: dict[str, Any]) -> list[str]:
    """The checks, the bar (also recorded in ``report["bar"]``) and the machine."""
    b, n, lines = report["before_gc"], len(report["commits"]), []
    c = report["checks"]
    lines.append(
        "\nChecks: kept set as the policy says: {}; kept commits check out bit-exact (adapters, optimizer, base, tie): {}; "
        "removed commits no longer resolve: {}; fsck ok: {}; log length after GC: {}.".format(
            c["kept_as_policy_says"], c["kept_checkouts_bit_exact"], c["removed_unresolvable"], c["fsck_ok"], c["log_len"]
        )
    )
    ratio = b["store_apparent"] / b["bar_bytes"]
    ok = ratio <= 1.1
    report["bar"] = {"ratio": ratio, "limit": 1.1, "pass": ok}
    lines.append(
        f"\nBar: {'PASS' if ok else 'FAIL'}: store before GC ≤ 1.1 × (base + {n} × adapter-with-optimizer). "
        f"{b['store_apparent']:,} B against a limit of {int(1.1 * b['bar_bytes']):,} B; ratio {ratio:.3f} "
        f"(allocated bytes: {b['store_allocated'] / b['bar_bytes']:.3f})."
    )
    mi = report["machine"]
    lines.append(
        f"\nMachine: {machine_line(mi)}, ckptstore at {mi.get('ckptstore_commit', 'unknown commit')}; "
        f"load average (1 min) {mi['loadavg_1m'][0]:.1f} at the start, {mi['loadavg_1m'][1]:.1f} at the end; total {report['total_s']:.0f}s"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--size", choices=SIZE_CHOICES, default="gpt2", help="base shapes: gpt2 (124M params), gpt2-medium (355M), tiny")
    p.add_argument("--base-dtype", choices=list(DTYPES), default="fp32", help="dtype of the frozen base (adapters are fp32)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha / rank)")
    p.add_argument("--commits", type=int, default=30)
    p.add_argument("--steps-per-commit", type=int, default=10, help="AdamW steps between commits")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=64, help="training batch (rows of x)")
    p.add_argument("--eval-batch", type=int, default=8, help="eval batch; small, so eval_loss is noisy")
    p.add_argument("--threads", type=int, help="ckptstore pipeline threads (default: the store's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", help="working directory (default: a fresh /tmp/ckptbench-lora-*, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the default working directory")
    p.add_argument("--keep-safetensors", action="store_true", help="keep the safetensors files (default: each is deleted once measured)")
    p.add_argument("--json", help="also write every figure as JSON here")
    args = p.parse_args(argv)
    if args.commits < 1 or args.rank < 1:
        p.error("--commits and --rank must be positive")

    t0 = time.perf_counter()
    report = run(args)
    report["total_s"] = time.perf_counter() - t0
    text = summarize(report)
    print(text)
    cli.write_json(args.json, report)
    return 0 if report["bar"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
