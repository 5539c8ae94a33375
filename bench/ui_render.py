"""Time to render each page of ``ckpt ui`` on a store of many commits (the bar: 2 s a page).

Builds a local store of ``--commits`` commits (default 2,000) of a small state (a frozen
100 KiB weight stored in chunks, small tensors that change, inline; a step and ``eval_loss``) on ``--branches`` branches (default 5: main,
and sweeps forked from ``best`` and from earlier commits), a tag every 100 commits, then
reads the history once (as ``ckpt ui`` does at start) and renders each page ``--runs`` times
(default 3), each time on a fresh site (the first view, which lists the store and runs ``du``
for the storage page) and then again: the history page (graph and curves), the storage page (with a retention
preview by gc's dry run), a commit page and a diff page. Prints the median per page as a
markdown table against the bar.

    python bench/ui_render.py                  # build a store in a temp dir, measure
    python bench/ui_render.py --store DIR      # reuse (or first build) the store at DIR
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

BAR_S = 2.0


def build_store(url: str, *, commits: int, branches: int) -> None:
    """``commits`` commits spread over ``branches`` branches: main gets half, each other
    branch forks from ``best`` or from a commit part-way along main."""
    import torch

    import ckptstore

    store = ckptstore.open(url)
    gen = torch.Generator().manual_seed(0)
    state = {"model": {"w": torch.randn(160, 160, generator=gen), "b": torch.zeros(64)}, "optimizer": {"m": torch.zeros(64, 64)}}
    per_branch = commits // 2, (commits - commits // 2) // max(branches - 1, 1)
    step = 0

    def commit_on(branch: str, n: int, start_step: int, loss0: float) -> None:
        for i in range(n):
            state["model"]["b"] += 0.01
            state["optimizer"]["m"][i % 64] += 1.0
            loss = loss0 * (0.999**i) + 0.05 * ((i * 7919) % 13) / 13
            tags = [f"step-{start_step + i}"] if (start_step + i) % 100 == 0 and branch == "main" else []
            store.commit(
                state,
                branch=branch,
                message=f"{branch} step {start_step + i}",
                metadata={"step": start_step + i},
                metrics={"eval_loss": loss},
                tags=tags,
            )

    commit_on("main", per_branch[0], step, 3.0)
    for b in range(1, branches):
        name = f"sweep-{b}"
        at = "best" if b % 2 else f"main~{per_branch[0] // (b + 1)}"
        fork = store.commit_of(at)
        store.branch(name, at=fork.id)
        commit_on(name, per_branch[1], int(fork.metadata["step"]) + 1, fork.metrics["eval_loss"])
    store.close()


def measure(url: str, *, runs: int) -> list[tuple[str, float]]:
    import ckptstore
    from ckptstore.retention import KeepLast, Policy
    from ckptstore.ui.model import load_history, preview_retention
    from ckptstore.ui.pages import Site

    store = ckptstore.open(url, create=False, single_writer=True)
    t0 = time.perf_counter()
    history = load_history(store)
    preview_retention(store, history, Policy(keep=KeepLast(50)), grace_period_s=0)
    timings = [("read the history and preview retention (once, at start)", time.perf_counter() - t0)]
    head = store.resolve("main")
    pages = [
        ("history (graph + curves)", "index.html"),
        ("storage", "storage.html"),
        ("commit", f"commit/{head}.html"),
        ("diff", f"diff/{store.resolve('main~1')}..{head}.html"),
    ]
    for name, path in pages:
        first, again = [], []
        for _ in range(runs):
            site = Site(store, history)  # a fresh server's first view: it lists the store, runs du
            for samples in (first, again):
                t = time.perf_counter()
                html = site.page(path)
                samples.append(time.perf_counter() - t)
                assert html is not None, path
        timings.append((f"{name} ({len(html) // 1024} KiB), first view", statistics.median(first)))
        timings.append((f"{name}, viewed again", statistics.median(again)))
    store.close()
    return timings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", help="Store directory to reuse (built there first if missing).")
    p.add_argument("--commits", type=int, default=2000)
    p.add_argument("--branches", type=int, default=5)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    tmp = None if args.store else tempfile.mkdtemp(prefix="ckptstore-ui-bench-")
    url = args.store or os.path.join(tmp, "store")
    try:
        if not os.path.exists(os.path.join(url, "config")):
            t = time.perf_counter()
            build_store(url, commits=args.commits, branches=args.branches)
            print(f"built {args.commits} commits on {args.branches} branches in {time.perf_counter() - t:.0f} s")
        print(f"| page | median of {args.runs} | under {BAR_S:g} s |\n|---|---|---|")
        for name, seconds in measure(url, runs=args.runs):
            print(f"| {name} | {seconds:.2f} s | {'yes' if seconds < BAR_S else 'NO'} |")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
