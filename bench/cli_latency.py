"""Wall time of ``ckpt`` commands that touch no tensor data, on a store with history.

Builds a local store of ``--commits`` commits (default 200) of a small training state (a
two-layer MLP's weights, its Adam moments, a step counter and metrics), with a second branch
and a tag every 50 steps, then runs each command ``--runs`` times (default 7), each in a new
process as a user would (the ``ckpt`` script beside this Python, else ``python -m
ckptstore``), and prints the median wall time per command as a markdown table, against the
bar of 0.3 s each: ``ckpt --version``, ``ckpt log -n 20``, ``ckpt branch``, ``ckpt show
main~3``. The time is start-up (interpreter, imports) plus the command itself.

    python bench/cli_latency.py                  # build a store in a temp dir, measure
    python bench/cli_latency.py --store DIR      # reuse (or first build) the store at DIR
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from harness import cli
from harness.report import table_header

BAR_S = 0.3
COMMANDS = (["--version"], ["log", "-n", "20"], ["branch"], ["show", "main~3"])


def build_store(url: str, *, commits: int) -> None:
    """``commits`` commits of a small MLP's training state: most on ``main``, a tenth on
    ``sweep`` (branched at a quarter of the way), a tag ``step-N`` every 50 steps."""
    import torch

    import ckptstore

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    side = max(commits // 10, 1)
    with ckptstore.open(url, create=True) as store:
        for step in range(commits):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            branch = "sweep" if commits // 4 <= step < commits // 4 + side else "main"
            if step == commits // 4:
                store.branch("sweep")
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
            store.commit(
                state,
                branch=branch,
                message=f"step {step}",
                metrics={"train_loss": loss.item()},
                tags=[f"step-{step}"] if step % 50 == 0 else (),
            )


def ckpt_command() -> list[str]:
    """The ``ckpt`` script installed beside this Python, else ``python -m ckptstore``."""
    script = os.path.join(os.path.dirname(sys.executable), "ckpt")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "ckptstore"]


def median_wall_s(command: list[str], *, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--store", help="store directory to use (built there if it does not exist; default: a temp dir)")
    p.add_argument("--commits", type=int, default=200, help="commits in a store built here")
    p.add_argument("--runs", type=int, default=7, help="runs per command (the median is reported)")
    args = p.parse_args()
    tmp = None if args.store else tempfile.mkdtemp(prefix="ckpt-cli-latency-")
    url = args.store or os.path.join(tmp, "store")
    try:
        if not os.path.exists(url):
            start = time.perf_counter()
            build_store(url, commits=args.commits)
            print(f"built {url}: {args.commits} commits in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        base = [*ckpt_command(), "--store", url]
        subprocess.run([*base, "fsck"], check=True, stdout=subprocess.DEVNULL)  # warm the catalog and the page cache
        rows = [(" ".join(["ckpt", *c]), median_wall_s([*base, *c], runs=args.runs)) for c in COMMANDS]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(table_header(["command", f"median of {args.runs} (s)", f"≤ {BAR_S} s"], "lrc")))
    for name, wall_s in rows:
        print(f"| `{name}` | {wall_s:.3f} | {'yes' if wall_s <= BAR_S else 'NO'} |")
    slow = [name for name, wall_s in rows if wall_s > BAR_S]
    print(f"\nbar ({BAR_S} s per command): {'met' if not slow else 'missed by ' + ', '.join(slow)}")


if __name__ == "__main__":
    main()
