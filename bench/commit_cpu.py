"""The CPU cost of a commit, without the disk: a first commit and identical re-commits of a
float32 state to a store on tmpfs (``/dev/shm``), in one process, medians of several runs.

    python bench/commit_cpu.py [--size-gb 1.5] [--repeat 7]

Where the disk dominates (``bench/commit_checkout.py``), a change to the pipeline's hashing or
copying hides in the disk's noise; here it shows. Each run prints the ckptstore it imported.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import torch

import ckptstore
from harness import cli


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--size-gb", type=float, default=1.5, help="state size in GB (90 tensors of float32)")
    p.add_argument("--repeat", type=int, default=7, help="identical re-commits timed; the median is reported")
    p.add_argument("--firsts", type=int, default=3, help="first commits (each into a new store) timed")
    args = p.parse_args()
    numel = int(args.size_gb * 1e9 / 4 / 90)
    torch.manual_seed(0)
    state = {"model": {f"w{i}": torch.randn(numel) for i in range(90)}}
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    firsts, recommits = [], []
    for n in range(args.firsts):
        root = tempfile.mkdtemp(dir=directory)
        try:
            store = ckptstore.open(os.path.join(root, "store"))
            started = time.perf_counter()
            store.commit(state)
            firsts.append(time.perf_counter() - started)
            for _ in range(args.repeat if n == 0 else 0):
                started = time.perf_counter()
                store.commit(state)
                recommits.append(time.perf_counter() - started)
            store.close()
        finally:
            shutil.rmtree(root)
    gb = sum(t.numel() * 4 for t in state["model"].values()) / 1e9
    print(f"ckptstore from {os.path.dirname(ckptstore.__file__)}; {gb:.2f} GB of float32 on {directory or 'the temp dir'}")
    print(f"first commit: median {statistics.median(firsts):.3f} s (runs {', '.join(f'{x:.3f}' for x in firsts)})")
    print(f"identical re-commit: median {statistics.median(recommits):.3f} s (runs {', '.join(f'{x:.3f}' for x in recommits)})")


if __name__ == "__main__":
    main()
