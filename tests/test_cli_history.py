"""History after gc, gc's report of its own run, fsck's wording and a commit's byte counts, as
``ckpt`` prints them (its ``main(argv)``, in process) and as the API returns them.

- ``show`` and ``log`` mark a parent gc collected ("parent … collected by gc; history goes
  on at …") and a demoted commit ("optimizer dropped by gc"), in text and in ``--json``;
  ``REV~N`` follows the history as ``log`` shows it (nearest kept ancestor), and ``show``
  says when its walk went across a collected parent.
- A second gc reports only what it did: 0 demoted, 0 deleted.
- ``fsck`` without ``--read-data`` says "structure ok (data not read; use --read-data)".
- A commit's newly stored bytes are split into tensor data (never more than the logical
  bytes) and metadata (chunk frames, the manifest).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckptstore
from ckptstore.cli import main
from ckptstore.codec import HEADER_SIZE
from ckptstore.commit import CommitStats, decode_commit, encode_commit

LOSSES = [6.0, 1.0, 5.0, 4.0, 3.0, 2.0]  # commit 1 is the best


def ckpt(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``ckpt ARGS`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def collected(tmp_path: Path) -> tuple[str, list[str]]:
    """Six commits on main (model and optimizer), then a gc that keeps the head, the one
    before it (demoted: no optimizer) and the best (commit 1, tagged): commits 0, 2 and 3
    are collected."""
    url = str(tmp_path / "store")
    ids = []
    with ckptstore.open(url) as store:
        for i, loss in enumerate(LOSSES):
            gen = torch.Generator().manual_seed(i)
            state = {"model": {"w": torch.randn(160, 160, generator=gen)}, "optimizer": {"m": torch.randn(160, 160, generator=gen)}}
            ids.append(store.commit(state, message=f"step {i}", metrics={"eval_loss": loss}).id)
    return url, ids


def test_show_and_log_mark_collected_parents_and_demotions(collected, capsys):
    url, ids = collected
    code, out, err = ckpt(
        capsys,
        "--store",
        url,
        "gc",
        "--keep-last",
        "2",
        "--keep-best",
        "1",
        "--demote",
        "optimizer",
        "--keep-whole-last",
        "1",
        "--grace-period",
        "0s",
    )
    assert code == 0, err
    assert f"demote  {ids[4][:12]}  (without optimizer)" in out.splitlines()
    assert out.splitlines()[-1].startswith("removed 3 commits, demoted 1, kept 3; deleted ")

    code, out, err = ckpt(capsys, "--store", url, "log")
    assert code == 0, err
    blocks = {block.split()[0][:12]: block for block in out.split("commit ")[1:]}
    assert sorted(blocks) == sorted(ids[i][:12] for i in (5, 4, 1))
    assert "Note:" not in blocks[ids[5][:12]]
    assert f"Note:    parent {ids[3][:12]} collected by gc; history goes on at {ids[1][:12]}\n" in blocks[ids[4][:12]]
    assert "Note:    optimizer dropped by gc\n" in blocks[ids[4][:12]]
    assert f"Note:    parent {ids[0][:12]} collected by gc; history ends here\n" in blocks[ids[1][:12]]
    assert "dropped by gc" not in blocks[ids[1][:12]]

    code, out, err = ckpt(capsys, "--store", url, "log", "--oneline")
    lines = out.splitlines()
    assert len(lines) == 3 and lines[1].startswith(ids[4][:12])
    assert lines[1].endswith(f"[parent {ids[3][:12]} collected by gc; history goes on at {ids[1][:12]}] [optimizer dropped by gc]")
    assert "[" not in lines[0]

    code, out, err = ckpt(capsys, "--store", url, "log", "--graph")
    line = next(line for line in out.splitlines() if ids[4][:12] in line)
    assert line.endswith(f"[parent {ids[3][:12]} collected by gc; history goes on at {ids[1][:12]}] [optimizer dropped by gc]"), out

    code, out, err = ckpt(capsys, "--store", url, "log", "--json")
    docs = {d["id"]: d for d in json.loads(out)}
    assert docs[ids[4]]["collected_parents"] == [ids[3]] and docs[ids[4]]["history_parents"] == [ids[1]]
    assert docs[ids[4]]["dropped_components"] == ["optimizer"] and docs[ids[4]]["parents"] == [ids[3]]
    assert docs[ids[1]]["collected_parents"] == [ids[0]] and docs[ids[1]]["history_parents"] == []
    assert docs[ids[5]]["collected_parents"] == [] and docs[ids[5]]["dropped_components"] == [] and docs[ids[5]]["history_parents"] == [ids[4]]

    code, out, err = ckpt(capsys, "--store", url, "show", ids[4][:12])
    assert code == 0 and err == ""
    assert f"\n         parent {ids[3][:12]} collected by gc; history goes on at {ids[1][:12]}\n" in out
    assert "\n         optimizer dropped by gc\n" in out
    code, out, err = ckpt(capsys, "--store", url, "show", ids[4], "--json")
    doc = json.loads(out)
    assert doc["collected_parents"] == [ids[3]] and doc["history_parents"] == [ids[1]] and doc["dropped_components"] == ["optimizer"]
    assert doc["collected_on_walk"] == []


def test_ancestor_steps_follow_kept_history_and_show_says_so(collected, capsys):
    url, ids = collected
    code, _, err = ckpt(capsys, "--store", url, "gc", "--keep-last", "2", "--keep-best", "1", "--grace-period", "0s")
    assert code == 0, err
    # ~1 crosses nothing; ~2 goes from ids[4] across collected ids[3] to the kept ids[1].
    assert ckpt(capsys, "--store", url, "rev-parse", "main~1")[1].strip() == ids[4]
    assert ckpt(capsys, "--store", url, "rev-parse", "main~2")[1].strip() == ids[1]
    code, out, err = ckpt(capsys, "--store", url, "show", "main~1")
    assert code == 0 and err == "" and out.startswith(f"commit   {ids[4]}\n")
    code, out, err = ckpt(capsys, "--store", url, "show", "main~2")
    assert code == 0 and out.startswith(f"commit   {ids[1]}\n")
    assert err == f"note: main~2 counts the commits gc kept: its walk went across {ids[3][:12]}, collected by gc\n"
    code, out, err = ckpt(capsys, "--store", url, "show", "main~2", "--json")
    assert json.loads(out)["id"] == ids[1] and json.loads(out)["collected_on_walk"] == [ids[3]]
    code, out, err = ckpt(capsys, "--store", url, "show", "main~3")
    assert code == 1 and "unknown revision 'main~3'" in err
    with ckptstore.open(url, create=False) as store:
        assert store.resolve("main~2") == ids[1] and store.collected_on_walk("main~2") == [ids[3]]
        assert store.collected_on_walk("main~1") == [] and store.collected_on_walk("main") == []


def test_a_second_gc_reports_nothing_done(collected, capsys):
    url, ids = collected
    policy = ["--keep-last", "2", "--keep-best", "1", "--demote", "optimizer", "--keep-whole-last", "1", "--grace-period", "0s"]
    code, out, err = ckpt(capsys, "--store", url, "gc", *policy)
    assert code == 0 and "demoted 1," in out.splitlines()[-1]
    for args in (["--grace-period", "0s"], policy):  # no policy, then the same one again
        code, out, err = ckpt(capsys, "--store", url, "gc", *args)
        assert code == 0, err
        assert out.splitlines() == ["removed 0 commits, demoted 0, kept 3; deleted 0 objects (0 bytes)"]
        code, out, err = ckpt(capsys, "--store", url, "gc", *args, "--json")
        plan = json.loads(out)
        assert plan["newly_demoted"] == {} and plan["deleted_objects"] == 0 and plan["removed_commits"] == []
        assert plan["demoted_commits"] == {ids[4]: ["optimizer"]}  # what it no longer holds, as before
        code, out, err = ckpt(capsys, "--store", url, "gc", *args, "--dry-run")
        assert out.splitlines()[-1].startswith("would remove 0 commits, demote 0, keep 3; would delete nothing")
    with ckptstore.open(url, create=False) as store:
        plan = store.gc(None, grace_period_s=0)
        assert plan.newly_demoted == {} and plan.deleted_objects == 0 and "demoted 0," in plan.summary()


def test_fsck_says_what_it_checked(collected, capsys):
    url, _ = collected
    code, out, err = ckpt(capsys, "--store", url, "fsck")
    assert code == 0, out + err
    assert out.startswith("structure ok (data not read; use --read-data): checked 6 commits, 6 manifests, ")
    assert "healthy" not in out
    code, out, err = ckpt(capsys, "--store", url, "fsck", "--read-data")
    assert code == 0 and out.startswith("healthy: checked 6 commits, 6 manifests, ") and "read and re-hashed" in out
    assert json.loads(ckpt(capsys, "--store", url, "fsck", "--json")[1])["data_read"] is False
    assert json.loads(ckpt(capsys, "--store", url, "fsck", "--read-data-subset", "50%", "--json")[1])["data_read"] is True


def test_new_data_bytes_never_exceed_logical_bytes(tmp_path, capsys):
    url = str(tmp_path / "store")
    with ckptstore.open(url) as store:
        # A tiny commit: its tensors inline in the manifest, which is mostly metadata.
        tiny = store.commit({"a": torch.ones(3), "b": torch.arange(4), "lr": 0.1}, message="tiny")
        s = tiny.stats
        assert s.new_chunks == 0 and s.new_bytes > s.logical_bytes  # the whole manifest is new
        assert 0 < s.new_data_bytes <= s.logical_bytes and s.new_metadata_bytes > 0
        assert s.new_data_bytes + s.new_metadata_bytes == s.new_bytes
        # Random (incompressible) chunks: their frames are metadata, the data is at most raw.
        big = store.commit({"w": torch.randn(300_000)}, message="big", branch="big")
        s = big.stats
        assert s.new_chunks >= 1 and s.new_data_bytes <= s.logical_bytes
        assert s.new_metadata_bytes >= s.new_chunks * HEADER_SIZE
        # What is stored reads back.
        assert store.get_commit(tiny.id).stats == tiny.stats and store.read_commit(big.id).stats == big.stats

    code, out, err = ckpt(capsys, "--store", url, "show", tiny.id, "--json")
    doc = json.loads(out)
    assert (doc["new_data_bytes"], doc["new_metadata_bytes"], doc["new_bytes"]) == (
        tiny.stats.new_data_bytes,
        tiny.stats.new_metadata_bytes,
        tiny.stats.new_bytes,
    )
    code, out, err = ckpt(capsys, "--store", url, "show", tiny.id)
    size = next(line for line in out.splitlines() if line.startswith("size "))
    assert size.startswith(
        f"size     {tiny.stats.logical_bytes} B logical, {tiny.stats.new_data_bytes} B data + {tiny.stats.new_metadata_bytes} B metadata newly stored"
    )
    usage = {c["id"]: c for c in json.loads(ckpt(capsys, "--store", url, "du", "--json")[1])["commits"]}
    assert (usage[tiny.id]["new_bytes"], usage[tiny.id]["new_metadata_bytes"]) == (tiny.stats.new_bytes, tiny.stats.new_metadata_bytes)
    code, out, err = ckpt(capsys, "--store", url, "log", "-n", "1")
    assert f"Size:    {tiny.stats.logical_bytes} B logical, {tiny.stats.new_data_bytes} B data + {tiny.stats.new_metadata_bytes} B metadata new\n" in out
    code, out, err = ckpt(capsys, "--store", url, "du", "--commits")
    line = next(line for line in out.splitlines() if line.strip().startswith(tiny.id[:12]))
    assert f"{tiny.stats.logical_bytes} B logical  {tiny.stats.new_data_bytes} B data + {tiny.stats.new_metadata_bytes} B metadata added" in line, line

    path = tmp_path / "small.safetensors"
    save_file({"x": torch.ones(5), "y": torch.zeros(2, 2)}, str(path))
    code, out, err = ckpt(capsys, "--store", url, "import", str(path), "--branch", "imported", "--json")
    doc = json.loads(out)
    assert code == 0 and 0 < doc["new_data_bytes"] <= doc["logical_bytes"] and doc["new_metadata_bytes"] > 0
    code, out, err = ckpt(capsys, "--store", url, "import", str(path), "--branch", "imported2")
    assert code == 0 and out.rstrip().endswith(f": {doc['logical_bytes']} B, 0 B data + 0 B metadata newly stored")  # same manifest: nothing new


def test_a_commit_from_before_the_split_shows_one_figure():
    fields = dict(
        manifest="0" * 32, manifest_size_bytes=100, parents=(), message="old", created_at=datetime.now(timezone.utc),
        branch="main", metadata={}, metrics={},
    )  # fmt: skip
    commit_id, raw = encode_commit(**fields, stats=CommitStats(10, 500, 1, 0, 0))
    old = decode_commit(commit_id, raw, key="commits/x")
    assert old.stats.new_metadata_bytes is None and old.stats.new_data_bytes is None and old.stats.new_bytes == 500
    commit_id, raw = encode_commit(**fields, stats=CommitStats(10, 500, 1, 0, 0, new_metadata_bytes=495))
    assert decode_commit(commit_id, raw, key="commits/x").stats.new_data_bytes == 5
