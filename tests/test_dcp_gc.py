"""A garbage collection in the gap between a DCP save's ``write_data`` and its ``finish``
(issue "Never lose a checkpoint", defect 5).

``dcp.save`` writes every rank's chunks in ``write_data`` and publishes the commit in the
coordinator's ``finish``. Chunks the save found already stored (an old commit's, which no
kept commit needs) are protected only by the writer markers, not by the grace period: if
the markers were released before ``finish``, a collector running in between deletes them and
the commit ``finish`` then publishes can never be read.

Here ``finish`` first starts ``ckpt gc --keep-last 1 --grace-period 0s`` in another process
and watches it: it must start executing (its records are written), then wait for the
markers, deleting nothing the save reused. Then the commit is published, the collector
finishes, and the commit loads bit-exact through ``dcp.load`` and ``checkout``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckptstore
from ckptstore.integrations.distributed import StoreReader, StoreWriter
from ckptstore.layout import chunk_key, shallow_key

REPO = Path(__file__).resolve().parents[1]
#: How long the collector is watched once it has started executing: it must still be running
#: (waiting for the save's markers) at the end.
WAIT_OBSERVED_S = 3.0

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # DCP in one process


def model_state(seed: int) -> dict[str, torch.Tensor]:
    """Multi-chunk tensors and a few small ones (one inline)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(96, 64, generator=g),
        "layer.weight": torch.randn(64, 64, generator=g),
        "layer.bias": torch.randn(64, generator=g),
        "head.weight": torch.randn(10, 64, generator=g).to(torch.bfloat16),
        "scale": torch.randn(4, generator=g),
    }


class CollectInTheGap(StoreWriter):
    """A ``StoreWriter`` whose ``finish`` runs a collector in another process before it
    publishes, and records what it saw of it."""

    def __init__(self, store: ckptstore.Store, *, head: str, reused: set[str], **commit_options: Any) -> None:
        super().__init__(store, **commit_options)
        self.head = head  # the branch head when the collector plans: its parent goes
        self.reused = reused  # chunks of the old commit that the save finds stored
        self.collector: subprocess.Popen | None = None
        self.seen: dict[str, Any] = {}

    def finish(self, metadata: Any, results: Any) -> None:
        self.collector = subprocess.Popen(
            [sys.executable, "-m", "ckptstore", "--store", self.store.url, "gc", "--keep-last", "1", "--grace-period", "0s", "--json"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        self.seen = self._watch()
        super().finish(metadata, results)

    def _watch(self) -> dict[str, Any]:
        """Wait until the collector has finished, or has started executing (it writes its
        shallow records first) and is still running ``WAIT_OBSERVED_S`` later."""
        objects = self.store.objects
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.collector.poll() is not None:
                break
            if objects.exists(shallow_key(self.head)):
                time.sleep(WAIT_OBSERVED_S)
                if self.collector.poll() is not None:
                    break
                return {
                    "collector": "waiting",
                    "lease_held": objects.exists("locks/gc"),
                    "reused_missing": sorted(c for c in self.reused if not objects.exists(chunk_key(c))),
                }
            time.sleep(0.05)
        else:
            raise AssertionError("the collector neither finished nor started executing in 120 s")
        return {
            "collector": "finished",
            "reused_missing": sorted(c for c in self.reused if not objects.exists(chunk_key(c))),
        }


def test_a_collector_in_the_dcp_finish_gap_deletes_nothing_the_save_reused(tmp_path):
    url = str(tmp_path / "store")
    store = ckptstore.open(url, chunk_size_bytes=4096, inline_threshold_bytes=128)
    weights = model_state(1)
    old = store.commit({"model": weights, "step": 1}, message="old")  # the chunks the save reuses
    head = store.commit({"model": model_state(2), "step": 2}, message="newer").id  # old is now not kept
    reused = store.manifest_of(old).chunk_ids()
    assert len(reused) >= 6
    time.sleep(0.05)  # everything is older than the zero grace period

    writer = CollectInTheGap(store, head=head, reused=reused, message="dcp save")
    state = {"model": {k: v.clone() for k, v in weights.items()}, "step": 3}
    dcp.save(state, storage_writer=writer)
    out, err = writer.collector.communicate(timeout=300)
    assert writer.collector.returncode == 0, err[-3000:]
    plan = json.loads(out)
    assert old.id in plan["removed_commits"] and plan["deleted_objects"] > 0, plan

    saved = writer.commit
    assert saved is not None and store.branches()["main"] == saved.id
    assert reused <= store.manifest_of(saved).chunk_ids()  # the save reused every chunk of the old commit
    assert saved.stats.reused_bytes > 0

    # The commit reads back, through DCP and as a plain checkout.
    loaded = {"model": {k: torch.zeros_like(v) for k, v in weights.items()}, "step": 0}
    dcp.load(loaded, storage_reader=StoreReader(ckptstore.open(url, create=False), saved.id))
    assert loaded["step"] == 3
    for k, v in weights.items():
        assert loaded["model"][k].dtype == v.dtype and torch.equal(loaded["model"][k], v), k
    tree = ckptstore.open(url, create=False).checkout(saved.id)
    items = {key.split("|", 1)[0]: value for key, value in tree[0].items() if isinstance(value, torch.Tensor)}
    assert sorted(items) == sorted(f"model.{k}" for k in weights)
    for k, v in weights.items():
        got = items[f"model.{k}"]
        assert got.dtype == v.dtype and torch.equal(got.view(torch.uint8), v.view(torch.uint8)), k
    report = ckptstore.open(url, create=False).fsck(read_data=True)
    assert report.ok, report.problems

    # The collector ran in the gap: it planned, started executing, and waited for the save's
    # markers with nothing the save reused deleted; the commit was published meanwhile.
    assert writer.seen == {"collector": "waiting", "lease_held": True, "reused_missing": []}
