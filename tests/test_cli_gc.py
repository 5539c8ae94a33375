"""``ckpt gc`` and ``ckpt fsck`` run as a separate process (``python -m ckptstore``) against
a local store made through the Python API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import ckptstore
from ckptstore.errors import ComponentsUnavailable
from ckptstore.layout import chunk_key, commit_key


def ckpt_many(*argvs: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run ``ckpt`` once per argument list, all at once (each start imports torch)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CKPTSTORE_URL", "CKPTSTORE_STORAGE_OPTIONS")}
    procs = [subprocess.Popen([sys.executable, "-m", "ckptstore", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for argv in argvs]
    out = []
    try:
        for argv, proc in zip(argvs, procs):
            stdout, stderr = proc.communicate(timeout=180)
            out.append(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return out


def ckpt(*args: str) -> subprocess.CompletedProcess[str]:
    return ckpt_many(list(args))[0]


def _files(root) -> dict[str, int]:
    """Every file of a local store (the catalog aside): relative path → size."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".catalog"]
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = os.path.getsize(path)
    return out


@pytest.fixture
def history(tmp_path):
    """``(url, commit ids oldest first)``: four commits of a model and its Adam state (the
    weight and its moments in 4 KiB chunks; biases and steps inline)."""
    url = str(tmp_path / "store")
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    opt = torch.optim.Adam(model.parameters())
    ids = []
    with ckptstore.open(url, chunk_size_bytes=4096, inline_threshold_bytes=256) as store:
        for step in range(0, 400, 100):
            model(torch.randn(4, 64)).square().mean().backward()
            opt.step()
            c = store.commit({"model": model, "optimizer": opt, "step": step}, metadata={"step": step}, metrics={"eval_loss": 3.0 - step / 1000})
            ids.append(c.id)
    return url, ids


def test_gc_dry_run_json_lists_removed_commits_and_changes_nothing(history):
    url, ids = history
    before = _files(url)
    zero, default = ckpt_many(
        ["--store", url, "gc", "--keep-last", "1", "--grace-period", "0", "--dry-run", "--json"],
        ["--store", url, "gc", "--keep-last", "1", "--dry-run", "--json"],
    )
    assert zero.returncode == 0, zero.stderr
    plan = json.loads(zero.stdout)
    assert plan["executed"] is False
    assert plan["removed_commits"] == sorted(ids[:3])
    assert plan["kept_commits"] == [ids[3]]
    assert plan["shallow_commits"] == {ids[3]: []}  # its history ends there: no kept ancestor
    assert plan["objects"]["commits"] == 3 and plan["objects"]["manifests"] == 3 and plan["objects"]["chunks"] > 0
    assert plan["planned_bytes"] > 0 and plan["deleted_objects"] == 0 and plan["freed_bytes"] == 0
    # The default grace period (1 h) keeps every commit made just now.
    assert default.returncode == 0, default.stderr
    plan = json.loads(default.stdout)
    assert plan["grace_period_s"] == 3600 and plan["removed_commits"] == [] and plan["objects"] == {}
    assert _files(url) == before
    with ckptstore.open(url, create=False) as store:
        assert [c.id for c in store.log()] == ids[::-1]


def test_gc_keep_last_removes_older_commits_then_fsck_is_clean(history):
    url, ids = history
    r = ckpt("--store", url, "gc", "--keep-last", "1", "--grace-period", "0")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sorted(lines[:3]) == sorted(f"remove  {cid[:12]}" for cid in ids[:3])
    assert lines[-1].startswith("removed 3 commits, demoted 0, kept 1; deleted ")
    with ckptstore.open(url, create=False) as store:
        assert [c.id for c in store.log()] == [ids[3]]
        assert not any(store.objects.exists(commit_key(cid)) for cid in ids[:3])
        assert store.objects.exists(f"shallow/{ids[3]}")
    r = ckpt("--store", url, "fsck")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [r.stdout.splitlines()[-1]]
    assert r.stdout.startswith("structure ok (data not read; use --read-data): checked 1 commits, 1 manifests, ") and "; 0 orphan objects" in r.stdout


def test_gc_demotes_through_the_cli(history):
    url, ids = history
    r = ckpt("--store", url, "gc", "--keep-last", "2", "--demote", "optimizer", "--keep-whole-last", "1", "--grace-period", "0")
    assert r.returncode == 0, r.stderr
    assert f"demote  {ids[2][:12]}  (without optimizer)" in r.stdout.splitlines()
    with ckptstore.open(url, create=False) as store:
        with pytest.raises(ComponentsUnavailable) as info:
            store.checkout(ids[2])
        assert info.value.dropped == ["optimizer"]
        assert sorted(store.checkout(ids[2], exclude=["optimizer"])) == ["model", "step"]
        assert sorted(store.checkout(ids[3])) == ["model", "optimizer", "step"]
        assert store.fsck(read_data=True).ok


def test_fsck_reports_a_truncated_chunk_and_exits_1(history):
    url, ids = history
    with ckptstore.open(url, create=False) as store:
        manifest = store.get_manifest(store.get_commit(ids[3]).manifest)
        chunk_id = next(c.id for b in manifest.blobs for c in b.chunks if c.size == 4096)
    key = chunk_key(chunk_id)
    path = os.path.join(url, *key.split("/"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    r = ckpt("--store", url, "fsck")
    assert r.returncode == 1, r.stdout + r.stderr
    problems = [line for line in r.stdout.splitlines() if line.startswith("chunk: ")]
    assert len(problems) == 1 and key in problems[0]
    assert r.stdout.splitlines()[-1].startswith("1 problem(s): ")


def test_fsck_read_data_subset(history):
    url, _ = history
    r = ckpt("--store", url, "fsck", "--read-data-subset", "1/2", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True and report["problems"] == []
    assert report["chunks"] > 0 and report["chunks_read"] == max(1, round(report["chunks"] / 2))
    assert report["bytes_read"] > 0


#: Invocations that need no store, run together once (see ``stateless``).
STATELESS = {
    "gc help": ["gc", "--help"],
    "fsck help": ["fsck", "--help"],
    "bad duration": ["--store", "{tmp}/store", "gc", "--grace-period", "5x"],
    "bad fraction": ["--store", "{tmp}/store", "fsck", "--read-data-subset", "150%"],
    "unknown store": ["--store", "{tmp}/nowhere", "fsck"],
}


@pytest.fixture(scope="module")
def stateless(tmp_path_factory):
    """Name → ``(result, tmp)`` for every invocation in ``STATELESS``."""
    tmp = str(tmp_path_factory.mktemp("stateless"))
    argvs = [[a.format(tmp=tmp) for a in argv] for argv in STATELESS.values()]
    return {name: (r, tmp) for name, r in zip(STATELESS, ckpt_many(*argvs))}


@pytest.mark.parametrize(("name", "option"), [("bad duration", "--grace-period"), ("bad fraction", "--read-data-subset")])
def test_bad_duration_or_fraction_is_a_usage_error(stateless, name, option):
    r, tmp = stateless[name]
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"Invalid value for '{option}'" in r.stderr and "Usage: ckpt" in r.stderr
    assert not os.path.exists(os.path.join(tmp, "store"))  # rejected before the store is opened


def test_fsck_of_an_unknown_store_is_one_error_line(stateless):
    r, _ = stateless["unknown store"]
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: error:"), r.stderr
    assert "no ckptstore store at" in lines[0]


@pytest.mark.parametrize(("command", "expected"), [("gc", "--keep-last"), ("fsck", "--read-data-subset")])
def test_help(stateless, command, expected):
    r, _ = stateless[f"{command} help"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Usage: ckpt {command} [OPTIONS]")
    assert expected in r.stdout and "--json" in r.stdout
