#!/usr/bin/env python3
"""Benchmark: a commit through a bandwidth-limited sink, ``compression="auto"`` against
``"never"`` (and ``"always"`` for reference).

The sink is the store's own backend (a local directory, or ``memory://``) behind a
:class:`WriteCap`: every object write first waits for its bytes to pass a link of
``--cap-mb-s`` MB/s (a token bucket with no burst, shared by all writer threads), as one host
gets from S3. The state is the harness's GPT-2-small model (bench/harness/state.py) with its
AdamW moments cast to bf16 (0.75 GB; ``--size tiny`` for a quick check). Each run commits the state into a fresh
store (a fresh process's pipeline: the encoder and the sink are measured from scratch) and
reports the time, the stored bytes over the raw bytes, and how many chunks were stored raw.
Modes alternate run by run so that drift on the machine hits each alike, and an untimed
commit of a few tensors in each mode comes first (the process's first commit pays about a
second of first-use costs).

    python bench/sink_limited.py                      # 200 MB/s, gpt2 bf16, 3 runs per mode
    python bench/sink_limited.py --size tiny --repeat 1   # checks the script works

Acceptance (issue 19, item 2): auto is ≥ 1.3× as fast as never and stores ≤ 0.75 of raw.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

from harness import MB, cli
from harness.report import machine_info, table_header


class WriteCap:
    """A link of ``rate_bytes_per_s``: :meth:`take` returns once ``n`` bytes would have gone
    through it after every byte taken before (a token bucket with no burst), whichever thread
    took them. ``taken_bytes`` counts what went through."""

    def __init__(self, rate_bytes_per_s: float) -> None:
        self.rate_bytes_per_s = rate_bytes_per_s
        self.taken_bytes = 0
        self._free_at = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._free_at = max(now, self._free_at) + n / self.rate_bytes_per_s
            done_at = self._free_at
            self.taken_bytes += n
        time.sleep(max(0.0, done_at - now))


def cap_writes(objects: Any, rate_bytes_per_s: float) -> WriteCap:
    """Make every write of ``objects`` (an :class:`~ckptstore.backends.ObjectStore`; its
    create-only and compare-and-swap puts) pass through one :class:`WriteCap`; return it.
    Reads are left as they are."""
    from ckptstore.backends import _parts

    cap = WriteCap(rate_bytes_per_s)
    for name in ("put_if_absent", "put_if_version"):
        put = getattr(objects, name)

        def capped(key: str, data: Any, *args: Any, _put: Any = put, **kwargs: Any) -> Any:
            cap.take(sum(len(p) for p in _parts(data)))
            return _put(key, data, *args, **kwargs)

        setattr(objects, name, capped)
    return cap


def stored_codecs(store: Any) -> Counter:
    """How many chunk objects the store holds of each codec (``RAW``, ``GROUPED``…)."""
    from ckptstore.codec import HEADER_SIZE, Kind, read_header

    out: Counter = Counter()
    for key in store.objects.list("chunks/"):
        codec, _, _ = read_header(store.objects.get_range(key, 0, HEADER_SIZE), key=key, kind=Kind.CHUNK)
        out[codec.name.lower()] += 1
    return out


def commit_once(state: dict, *, mode: str, url: str, cap_bytes_per_s: float, threads: int | None) -> dict:
    import ckptstore

    store = ckptstore.open(url, compression=mode, **({"threads": threads} if threads else {}))
    cap = cap_writes(store.objects, cap_bytes_per_s)
    t0 = time.perf_counter()
    commit = store.commit(state, message=f"compression={mode}")
    seconds = time.perf_counter() - t0
    balance = store.pipeline.balance
    out = {
        "mode": mode,
        "seconds": seconds,
        "logical_bytes": commit.stats.logical_bytes,
        "new_bytes": commit.stats.new_bytes,
        "stored_over_raw": commit.stats.new_bytes / commit.stats.logical_bytes,
        "link_bytes": cap.taken_bytes,
        "chunks": dict(stored_codecs(store)),
        "measured_sink_mb_s": (balance._sink.per_s or 0) / MB if mode == "auto" else None,
        "measured_encode_mb_s_per_core": {f"{c.name.lower()}/{g}": (r.per_s or 0) / MB for (c, g), r in balance._encode.items()} if mode == "auto" else None,
        "threads": store.pipeline.threads,
        "cores": balance.cores,
    }
    store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--cap-mb-s", type=float, default=200.0, help="write bandwidth of the sink, MB/s (default 200)")
    p.add_argument("--size", choices=["gpt2", "tiny"], default="gpt2", help="the model (bench/commit_checkout.py's sizes)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--modes", default="auto,never,always")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--backend", choices=["local", "memory"], default="local", help="what the cap sits in front of")
    p.add_argument("--threads", type=int, help="ckptstore threads (default: the store's)")
    p.add_argument("--out", help="directory for the local stores (default: a fresh one under /tmp, removed)")
    p.add_argument("--json", help="write every run here")
    args = p.parse_args(argv)

    import fsspec

    from harness.state import build_state, to_bf16

    modes = [m for m in args.modes.split(",") if m]
    workdir = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="ckptbench-sink-", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    os.environ.setdefault("CKPTSTORE_CACHE_DIR", os.path.join(workdir, "cache"))
    state, _model = build_state(args.size, 0)
    if args.dtype == "bf16":
        state = to_bf16(state)
    runs: list[dict] = []
    warm_up = dict(list(state["model"].items())[:8])  # imports and first-use costs, paid once before any timed run
    for mode in modes:
        commit_once(
            {"model": warm_up},
            mode=mode,
            url=f"memory://sink-limited-warm-up-{mode}-{os.getpid()}",
            cap_bytes_per_s=args.cap_mb_s * MB,
            threads=args.threads,
        )
    try:
        for i in range(args.repeat):
            for mode in modes if i % 2 == 0 else modes[::-1]:
                url = os.path.join(workdir, f"store-{mode}-{i}") if args.backend == "local" else f"memory://sink-limited-{mode}-{i}-{os.getpid()}"
                run = commit_once(state, mode=mode, url=url, cap_bytes_per_s=args.cap_mb_s * MB, threads=args.threads)
                runs.append(run)
                print(
                    f"run {i + 1} {mode:>6}: {run['seconds']:.3f} s, stored/raw {run['stored_over_raw']:.3f}, chunks {run['chunks']}",
                    file=sys.stderr,
                    flush=True,
                )
                if args.backend == "local":
                    shutil.rmtree(url, ignore_errors=True)
                else:  # fsspec's memory filesystem lives as long as the process
                    fsspec.filesystem("memory").rm(url.removeprefix("memory:/"), recursive=True)
    finally:
        if not args.out:
            shutil.rmtree(workdir, ignore_errors=True)

    med = {m: statistics.median(r["seconds"] for r in runs if r["mode"] == m) for m in modes}
    ratio = {m: statistics.median(r["stored_over_raw"] for r in runs if r["mode"] == m) for m in modes}
    logical = runs[0]["logical_bytes"]
    info = machine_info("/tmp")
    print(f"Command: `python bench/sink_limited.py {' '.join(sys.argv[1:] if argv is None else argv)}`; ckptstore at {info.get('ckptstore_commit')}; "
          f"{info.get('nproc')} CPUs; {args.size} {args.dtype} state {logical / 1e9:.3f} GB; sink: {args.backend} behind a {args.cap_mb_s:g} MB/s cap; "
          f"medians of {args.repeat}.\n")  # fmt: skip
    print("\n".join(table_header(["compression", "commit s", "GB/s of state", "stored / raw", "chunks stored raw"], "lrrrr")))
    for m in modes:
        raw_chunks = statistics.median(r["chunks"].get("raw", 0) / max(1, sum(r["chunks"].values())) for r in runs if r["mode"] == m)
        print(f"| {m} | {med[m]:.3f} | {logical / 1e9 / med[m]:.3f} | {ratio[m]:.3f} | {raw_chunks:.0%} |")
    verdicts = []
    if "auto" in med and "never" in med:
        speedup = med["never"] / med["auto"]
        ok = speedup >= 1.3 and ratio["auto"] <= 0.75
        verdicts.append(ok)
        print(f"\n(2) auto ≥ 1.3× as fast as never and ≤ 0.75 of raw: {'PASS' if ok else 'FAIL'} ({speedup:.2f}×, {ratio['auto']:.3f})")
    cli.write_json(args.json, {"args": vars(args), "machine": info, "runs": runs})
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
