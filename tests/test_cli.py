"""The ``ckpt`` command line, driven in subprocesses against local and S3 (moto) stores.

A Python that imports torch takes a second or more to start, so most tests run a series of
steps in one subprocess: ``_DRIVER`` imports ``ckptstore.cli`` once and calls its
``main(argv)`` (the function the installed ``ckpt`` script calls) for each command, with
stdout and stderr captured per command (not a terminal, as in a pipe) and the exit status
taken from ``SystemExit``; a step may also be Python code (a training job committing through
the API, a docs/cli.md block) or a shell line. The process boundary itself (the console
script, ``python -m ckptstore``, ``--debug`` tracebacks, a bad environment) gets one process
per command.

Every command's output is checked for ANSI escapes and for the sentinel credentials given
in ``CKPTSTORE_STORAGE_OPTIONS``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import torch

import ckptstore
from ckptstore.cli import cli as cli_group

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "cli.md"

# Sentinel credentials: moto accepts any; they must never show up in any output.
SECRET_KEY = "AKIASENTINELKEY7QX2"
SECRET = "sentinel-secret-4f9c1e0b"
ANSI = "\x1b"

_DRIVER = textwrap.dedent(
    r"""
    import contextlib, io, json, runpy, subprocess, sys, time, traceback

    import torch

    from ckptstore.cli import main

    torch.set_num_threads(1)  # small tensors; threads only contend on a busy machine
    with open(sys.argv[1]) as f:
        steps = json.load(f)
    results, failed = [], False
    for step in steps:
        kind, arg = step["kind"], step["arg"]
        if failed:
            results.append({"rc": None, "out": "", "err": "not run: an earlier step failed"})
            continue
        out, err, rc, start = io.StringIO(), io.StringIO(), 0, time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if kind == "ckpt":
                    main(list(arg))
                elif kind == "python":
                    exec(compile(arg, "<python block>", "exec"), {"__name__": "__main__"})
                elif kind == "script":
                    saved, sys.argv = sys.argv, list(arg)
                    try:
                        runpy.run_path(arg[0], run_name="__main__")
                    finally:
                        sys.argv = saved
                else:
                    proc = subprocess.run(arg, shell=True, capture_output=True, text=True)
                    print(proc.stdout, end="")
                    print(proc.stderr, end="", file=sys.stderr)
                    rc = proc.returncode
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                rc = 1
        results.append({"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "s": time.perf_counter() - start})
        failed = rc != 0 and step.get("stop_on_error", False)
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
    """
)


@dataclass
class Run:
    argv: list[str]
    rc: int | None
    out: str
    err: str

    def __str__(self) -> str:
        return f"ckpt {shlex.join(map(str, self.argv))} -> {self.rc}\n--- stdout\n{self.out}--- stderr\n{self.err}"


def _check_hygiene(run: Run) -> Run:
    text = run.out + run.err
    assert ANSI not in text, f"ANSI escape in output that is not a terminal:\n{run}"
    assert SECRET not in text, f"secret printed:\n{run}"
    assert SECRET_KEY not in text, f"access key id printed:\n{run}"
    return run


def _env(url: str | None, options: dict | None = None, *, raw_options: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CKPTSTORE_URL", None)
    if url is not None:
        env["CKPTSTORE_URL"] = url
    env.pop("CKPTSTORE_STORAGE_OPTIONS", None)
    if options:
        env["CKPTSTORE_STORAGE_OPTIONS"] = json.dumps(options)
    if raw_options is not None:
        env["CKPTSTORE_STORAGE_OPTIONS"] = raw_options
    return env


def ckpt(*args: str, env: dict[str, str], cwd: Path, exe: list[str] | None = None) -> Run:
    """One ``ckpt`` command in its own process (default ``python -m ckptstore``)."""
    proc = subprocess.run(
        [*(exe or [sys.executable, "-m", "ckptstore"]), *map(str, args)],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    return _check_hygiene(Run(list(map(str, args)), proc.returncode, proc.stdout, proc.stderr))


def ckpt_batch(steps: list, *, env: dict[str, str], cwd: Path) -> list[Run]:
    """Run ``steps`` in order in one subprocess (see the module docstring). A step is an argv
    list for ``ckpt``, or ``{"kind": "python"|"script"|"sh", "arg": ..., "stop_on_error": bool}``."""
    steps = [s if isinstance(s, dict) else {"kind": "ckpt", "arg": [str(a) for a in s]} for s in steps]
    with tempfile.TemporaryDirectory(prefix="ckpt-batch-") as scratch:  # outside cwd's tree
        spec, results = Path(scratch, "steps.json"), Path(scratch, "results.json")
        spec.write_text(json.dumps(steps))
        proc = subprocess.run(
            [sys.executable, "-c", _DRIVER, str(spec), str(results)],
            env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, f"driver failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        raw = json.loads(results.read_text())
    argvs = [s["arg"] if s["kind"] == "ckpt" else [s["kind"], str(s["arg"])[:60]] for s in steps]
    return [_check_hygiene(Run(argv, r["rc"], r["out"], r["err"])) for argv, r in zip(argvs, raw)]


def _assert_ok(*runs: Run) -> None:
    for run in runs:
        assert run.rc == 0, str(run)


def _assert_error_line(run: Run, rc: int = 1) -> str:
    """An error: nothing on stdout, exactly one ``ckpt: error:`` line on stderr."""
    assert run.rc == rc, str(run)
    assert run.out == "", str(run)
    assert run.err.startswith("ckpt: error: ") and run.err.endswith("\n") and run.err.count("\n") == 1, str(run)
    return run.err[len("ckpt: error: ") : -1]


def _assert_usage_error(run: Run) -> None:
    assert run.rc == 2, str(run)
    assert run.out == "", str(run)
    assert "Usage: ckpt" in run.err and "Error: " in run.err and "Traceback" not in run.err, str(run)


def _store_files(root: Path) -> dict[str, int]:
    """Key → size of every object file of a local store (not the ``.catalog`` directory,
    not temp or lock files, which start with a dot)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                path = os.path.join(dirpath, name)
                out[os.path.relpath(path, root).replace(os.sep, "/")] = os.path.getsize(path)
    return out


def _assert_du_matches(du: dict, stored: dict[str, int]) -> None:
    """``ckpt du --json`` against the objects actually stored (key → size)."""
    assert du["physical_bytes"] == sum(stored.values())
    kinds: dict[str, list[int]] = {}
    for key, size in stored.items():
        kinds.setdefault(key.split("/", 1)[0], []).append(size)
    assert {k: (v["count"], v["bytes"]) for k, v in du["objects"].items()} == {k: (len(v), sum(v)) for k, v in kinds.items()}
    for kind in ("chunks", "manifests", "commits", "refs"):
        assert du["objects"][kind]["count"] == sum(1 for key in stored if key.startswith(kind + "/"))


def _object_keys(store: ckptstore.Store, commit_id: str) -> set[str]:
    """The object keys a commit needs, from its manifest (layout: docs/design.md)."""
    commit = store.get_commit(commit_id)
    manifest = store.get_manifest(commit.manifest)
    keys = {f"commits/{commit_id[:2]}/{commit_id}", f"manifests/{commit.manifest[:2]}/{commit.manifest}"}
    keys |= {f"chunks/{c.id[:2]}/{c.id}" for blob in manifest.blobs for c in blob.chunks}
    return keys


def _history(store: ckptstore.Store, head: str) -> list[str]:
    seen, stack = [], [head]
    while stack:
        cid = stack.pop()
        if cid not in seen:
            seen.append(cid)
            stack.extend(store.get_commit(cid).parents)
    return seen


def _tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


# -- 1. a scripted run: import, commit, branch, tag, diff, export -------------------------------

HF_TENSORS = {
    "model.embed_tokens.weight": ((512, 128), torch.float32),  # 256 KiB: a shard of its own
    "model.layers.0.self_attn.q_proj.weight": ((128, 128), torch.bfloat16),
    "model.layers.0.mlp.up_proj.weight": ((256, 128), torch.bfloat16),
    "model.layers.0.input_layernorm.weight": ((128,), torch.float32),
    "model.layers.1.self_attn.q_proj.weight": ((128, 128), torch.bfloat16),
    "model.layers.1.mlp.up_proj.weight": ((256, 128), torch.float32),
    "model.layers.1.input_layernorm.weight": ((128,), torch.float32),
    "model.norm.weight": ((128,), torch.float32),
    "lm_head.weight": ((512, 128), torch.bfloat16),
}
CHANGED = "model.layers.1.mlp.up_proj.weight"
ADDED = "model.layers.1.adapter.weight"


def _hf_directory(path: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face style directory: three safetensors shards and their index."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=g).to(dtype) for name, (shape, dtype) in HF_TENSORS.items()}
    names = list(tensors)
    path.mkdir()
    weight_map = {}
    for i, group in enumerate((names[:3], names[3:6], names[6:])):
        file = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in group}, str(path / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in group}
    total = sum(t.nbytes for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    return tensors


def _load_export(directory: Path, printed: str, *, cwd: Path, max_shard_size: int | None = None) -> dict[str, torch.Tensor]:
    """Load an exported directory shard by shard, checking the files against what ``ckpt
    export`` printed (paths relative to ``cwd``) and against the index."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = sorted(os.listdir(directory))
    assert sorted(Path(line).name for line in printed.splitlines()) == files
    assert all((cwd / line).parent == directory for line in printed.splitlines())
    if "model.safetensors" in files:  # one shard (beside it, the commit's files: config.json)
        return load_file(str(directory / "model.safetensors"))
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f for f in files if f.endswith(".safetensors")]
    assert shards == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors = load_file(str(directory / shard))
        with safe_open(str(directory / shard), framework="pt") as f:
            assert "ckptstore_commit" in f.metadata()
        assert {n for n, s in index["weight_map"].items() if s == shard} == set(tensors)
        if max_shard_size is not None and len(tensors) > 1:
            assert sum(t.nbytes for t in tensors.values()) <= max_shard_size
        assert not set(tensors) & set(out)
        out |= tensors
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in out.values())
    return out


def _s3_stored(s3_server: str, url: str) -> dict[str, int]:
    import boto3

    bucket, prefix = url[len("s3://") :].split("/", 1)
    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1 :]] = obj["Size"]
    return out


_FINETUNE = f"""
import json, os, torch, ckptstore

options = json.loads(os.environ.get("CKPTSTORE_STORAGE_OPTIONS") or "null")
with ckptstore.open(os.environ["CKPTSTORE_URL"], storage_options=options) as store:
    base = store.checkout("main")
    model = dict(base["model"])
    model[{CHANGED!r}] = model[{CHANGED!r}] + 0.25
    model[{ADDED!r}] = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    state = {{"model": model, "files": base["files"]}}  # the imported config.json goes on with the model
    print(store.commit(state, message="finetune", metadata={{"step": 10}}, metrics={{"eval_loss": 1.25}}).id)
"""


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_import_commit_branch_tag_diff_export(backend, tmp_path, request):
    pytest.importorskip("safetensors")
    if backend == "local":
        url, options = str(tmp_path / "store"), None
    else:
        url, s3_options = request.getfixturevalue("s3_url")
        options = {**s3_options, "key": SECRET_KEY, "secret": SECRET}
    env = _env(url, options)
    original = _hf_directory(tmp_path / "hf")

    out_dir, base_dir, sweep_pt = tmp_path / "release", tmp_path / "base", tmp_path / "sweep.pt"
    runs = ckpt_batch(
        [
            ["init"], ["import", tmp_path / "hf", "--tag", "imported", "-m", "import base", "--json"],
            {"kind": "python", "arg": _FINETUNE, "stop_on_error": True},  # a training job commits on top through the Python API
            ["branch", "sweep", "main~1"], ["branch"], ["tag", "release", "main"], ["tag"],
            ["diff", "imported", "release"], ["diff", "imported", "release", "--json"], ["diff", "main~1", "main", "--no-values"],
            ["export", "release", out_dir, "--max-shard-size", "200KB"], ["export", "imported", base_dir], ["export", "sweep", sweep_pt],
            ["log", "--oneline"], ["rev-parse", "release"], ["rev-parse", "sweep"], ["du", "--json"], ["fsck"],
        ],
        env=env, cwd=tmp_path,
    )  # fmt: skip
    _assert_ok(*runs)
    init, imported, finetune, *runs = runs
    assert init.out.startswith("created store at ")
    base = json.loads(imported.out)
    assert (base["branch"], base["parents"], base["message"]) == ("main", [], "import base")
    assert base["logical_bytes"] >= sum(t.nbytes for t in original.values())
    finetuned = dict(original)
    finetuned[CHANGED] = original[CHANGED] + 0.25
    finetuned[ADDED] = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with ckptstore.open(url, storage_options=options) as store:
        top = store.commit_of(finetune.out.strip())
        assert (top.parents, top.message) == ((base["id"],), "finetune")
        _tensors_equal(store.checkout(top.id)["model"], finetuned)
    branch, branches, tag, tags, diff, diff_json, diff_hash, export, export_base, export_pt, log, rp_release, rp_sweep, du, fsck = runs

    assert branch.out == f"branch sweep at {base['id'][:12]}\n"
    assert re.search(rf"^\* main +{top.id[:12]} step 10 finetune$", branches.out, re.MULTILINE), branches.out
    assert re.search(rf"^  sweep +{base['id'][:12]} import base$", branches.out, re.MULTILINE), branches.out
    assert tag.out == f"tag release at {top.id[:12]}\n"
    assert [line.split()[0] for line in tags.out.splitlines()] == ["best", "imported", "latest", "release"]
    assert log.out.splitlines() == [
        f"{top.id[:12]} (main, tag: best, tag: latest, tag: release) step 10 eval_loss=1.25 finetune",
        f"{base['id'][:12]} (sweep, tag: imported) import base",
    ]
    assert (rp_release.out, rp_sweep.out) == (f"{top.id}\n", f"{base['id']}\n")

    # diff names the changed and added tensors and counts everything.
    lines = diff.out.splitlines()
    assert len(lines) == 3, diff.out
    assert re.fullmatch(rf"\+ model/{re.escape(ADDED)}  bfloat16 \(64, 128\)  16\.38 kB", lines[0]), lines[0]
    assert re.fullmatch(rf"~ model/{re.escape(CHANGED)}  max \|Δ\| 0\.25, relative 0\.\d+  131\.07 kB", lines[1]), lines[1]
    # (The summary goes on "; non-tensor values differ": an added tensor sets values_changed.)
    assert lines[2].startswith("1 added (16.38 kB), 0 removed (0 B), 1 changed (131.07 kB), 9 unchanged"), lines[2]  # 8 tensors, config.json
    d = json.loads(diff_json.out)
    assert (d["a"], d["b"], d["unchanged"]) == (base["id"], top.id, 9)
    assert [c["path"] for c in d["added"]] == [f"model/{ADDED}"] and d["removed"] == []
    assert [c["path"] for c in d["changed"]] == [f"model/{CHANGED}"]
    assert d["changed"][0]["max_abs_change"] == pytest.approx(0.25, rel=1e-5)
    assert (d["added_bytes"], d["changed_bytes"]) == (64 * 128 * 2, 256 * 128 * 4)
    assert diff_hash.out.splitlines()[1] == f"~ model/{CHANGED}  changed  131.07 kB"

    # The exports load with safetensors (and torch) into the original tensors.
    released = _load_export(out_dir, export.out, cwd=tmp_path, max_shard_size=200_000)
    assert len(os.listdir(out_dir)) >= 4  # at least three shards and the index
    _tensors_equal(released, finetuned)
    assert not torch.equal(released[CHANGED], original[CHANGED])
    _tensors_equal({n: t for n, t in released.items() if n not in (CHANGED, ADDED)}, {n: t for n, t in original.items() if n != CHANGED})
    _tensors_equal(_load_export(base_dir, export_base.out, cwd=tmp_path), original)
    assert (out_dir / "config.json").read_bytes() == (base_dir / "config.json").read_bytes() == (tmp_path / "hf" / "config.json").read_bytes()
    assert export_pt.out == f"{sweep_pt}\n"
    _tensors_equal(torch.load(sweep_pt, weights_only=True), original)

    # du agrees with what the storage holds; fsck finds it healthy.
    usage = json.loads(du.out)
    stored = _store_files(Path(url)) if backend == "local" else _s3_stored(request.getfixturevalue("s3_server"), url)
    _assert_du_matches(usage, stored)
    assert fsck.out.startswith("structure ok (data not read; use --read-data): checked 2 commits, 2 manifests")


# -- 2. log --graph on a known topology; du against the bytes on disk, before and after gc -------


def test_log_graph_and_du_agree_with_the_store(tmp_path):
    root = tmp_path / "store"
    store = ckptstore.open(str(root), chunk_size_bytes=16 * 1024, inline_threshold_bytes=1024)
    frozen = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))  # 4 chunks, in every commit

    ids: dict[str, str] = {}

    def commit(name: str, branch: str, step: int) -> None:
        w = torch.randn(32, 256, generator=torch.Generator().manual_seed(step))
        state = {"model": {"frozen": frozen, "w": w, "b": torch.full((8,), float(step))}, "step": step}
        ids[name] = store.commit(state, branch=branch, message=name, metadata={"step": step}).id

    commit("m0", "main", 0)
    commit("m1", "main", 1)
    commit("m2", "main", 2)
    store.branch("sweep", at="main~1")
    commit("s0", "sweep", 10)
    commit("s1", "sweep", 11)
    store.tag("v1", at="sweep~1")
    commit("x0", "scratch", 20)  # a branch deleted below: garbage for gc
    commit("x1", "scratch", 21)
    commit("m3", "main", 3)
    store.delete_branch("scratch", force=True)

    # What du should say, from the manifests and the files.
    before = _store_files(root)
    needs = {cid: _object_keys(store, cid) for cid in ids.values()}
    expected_branches = {}
    for name, head in store.branches().items():
        history = _history(store, head)
        keys = set().union(*(needs[c] for c in history))
        expected_branches[name] = (
            len(history),
            sum(store.get_commit(c).stats.logical_bytes for c in history),
            sum(before[k] for k in keys),
        )
    users: dict[str, int] = {}
    for keys in needs.values():
        for key in keys:
            users[key] = users.get(key, 0) + 1
    expected_exclusive = {cid: sum(before[k] for k in keys if users[k] == 1) for cid, keys in needs.items()}
    kept = set().union(*(needs[ids[n]] for n in ("m0", "m1", "m2", "m3", "s0", "s1")))
    garbage = (needs[ids["x0"]] | needs[ids["x1"]]) - kept
    store.close()

    env = _env(str(root))
    graph, graph_json, du1, du_text, gc, du2, fsck = ckpt_batch(
        [["log", "--graph"], ["log", "--graph", "--json"], ["du", "--json"], ["du", "--commits"], ["gc", "--grace-period", "0", "--json"], ["du", "--json"], ["fsck", "--json"]],
        env=env, cwd=tmp_path,
    )  # fmt: skip
    _assert_ok(graph, graph_json, du1, du_text, gc, du2, fsck)
    after = _store_files(root)

    # The graph: every commit once, children above parents, main in the first column, the
    # fork in the second, joining main with |/ just above the commit it forked from.
    lines = graph.out.splitlines()
    short = {name: cid[:12] for name, cid in ids.items()}
    row = {}
    for name in ("m0", "m1", "m2", "m3", "s0", "s1"):
        hits = [i for i, line in enumerate(lines) if short[name] in line]
        assert len(hits) == 1, f"{name} appears {len(hits)} times:\n{graph.out}"
        row[name] = hits[0]
    assert not any(short[n] in graph.out for n in ("x0", "x1"))
    assert [row[n] for n in ("m3", "s1", "s0", "m2")] == [0, 1, 2, 3] and row["m1"] == 5 and row["m0"] == 6, graph.out
    assert lines[0] == f"* {short['m3']} (main, tag: latest) step 3 m3"
    assert lines[1] == f"| * {short['s1']} (sweep) step 11 s1"
    assert lines[2] == f"| * {short['s0']} (tag: v1) step 10 s0"
    assert lines[3] == f"* | {short['m2']} step 2 m2"
    assert lines[4] == "|/"
    assert lines[5] == f"* {short['m1']} step 1 m1"
    assert lines[6] == f"* {short['m0']} step 0 m0"
    assert len(lines) == 7
    assert [c["id"] for c in json.loads(graph_json.out)] == [ids[n] for n in ("m3", "s1", "s0", "m2", "m1", "m0")]

    # du before gc: every number agrees with the files and the manifests.
    usage = json.loads(du1.out)
    _assert_du_matches(usage, before)
    assert {b["name"]: (b["commits"], b["logical_bytes"], b["physical_bytes"]) for b in usage["branches"]} == expected_branches
    assert {c["id"]: c["exclusive_bytes"] for c in usage["commits"]} == expected_exclusive
    assert usage["logical_bytes"] == sum(c["logical_bytes"] for c in usage["commits"])
    assert usage["dedup_ratio"] > 1.5  # the frozen tensor is stored once for eight commits
    total_objects = re.match(r"physical +\S+ \S+ in (\d+) objects", du_text.out)
    assert total_objects and int(total_objects.group(1)) == len(before), du_text.out
    for cid in ids.values():
        assert re.search(rf"^  {cid[:12]} ", du_text.out, re.MULTILINE), du_text.out

    # gc deletes exactly the deleted branch's own objects; du still agrees.
    plan = json.loads(gc.out)
    assert set(before) - set(after) == garbage
    assert plan["freed_bytes"] == sum(before[k] for k in garbage) == sum(before.values()) - sum(after.values())
    usage2 = json.loads(du2.out)
    _assert_du_matches(usage2, after)
    assert {b["name"]: (b["commits"], b["logical_bytes"], b["physical_bytes"]) for b in usage2["branches"]} == expected_branches
    assert {c["id"] for c in usage2["commits"]} == {ids[n] for n in ("m0", "m1", "m2", "m3", "s0", "s1")}
    assert json.loads(fsck.out)["ok"] is True


# -- 3. path safety: hostile tensor names ---------------------------------------------------------

HOSTILE = [
    "../../evil", "/etc/passwd", "a\x00b", "..", ".", "sub/../../x", "../" * 40 + "tmp/ckpt-evil", "n" * 5000,
    "new\nline", "C:\\Windows\\evil", "~", "$HOME", "*", " ", "\x1b[2J", "model.safetensors.index.json", "",
]  # fmt: skip


def _tree(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()  # a directory's own mtime moves when entries appear in it
            out[str(path.relative_to(root))] = (st.st_mode,) if path.is_dir() else (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def test_export_never_writes_outside_its_target(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    store_root, zone = tmp_path / "store", tmp_path / "zone"
    zone.mkdir()
    tensors = {name: torch.full((4,), float(i)) for i, name in enumerate(HOSTILE)}
    tensors["../../evil"] = torch.arange(40_000, dtype=torch.float32)  # chunked, not inline
    with ckptstore.open(str(store_root)) as store:
        store.commit({"model": tensors, "step": 1}, branch="hostile", message="hostile names")
    passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() if Path("/etc/passwd").exists() else None
    outside = [Path("/tmp/ckpt-evil"), tmp_path / "evil", tmp_path / "x", zone / "x"]
    existed = {p for p in outside if p.exists()}
    tree = _tree(tmp_path)

    sharded, single, pt = ckpt_batch(
        [["export", "hostile", "target", "--max-shard-size", "1"], ["export", "hostile", "one"], ["export", "hostile", "target.pt"]],
        env=_env(str(store_root)), cwd=zone,
    )  # fmt: skip
    _assert_ok(sharded, single, pt)

    changed = {path for path, meta in _tree(tmp_path).items() if tree.get(path) != meta}
    allowed = ("zone/target", "zone/one", "zone/target.pt", "store/.catalog")
    stray = {p for p in changed if not any(p == a or p.startswith(a + os.sep) for a in allowed)}
    assert not stray, f"export wrote outside its target: {sorted(stray)}"
    assert {p for p in outside if p.exists()} == existed
    if passwd is not None:
        assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == passwd

    expected = {name.replace("/", "."): t for name, t in tensors.items()}
    exported = _load_export(zone / "target", sharded.out, cwd=zone)
    assert len([f for f in os.listdir(zone / "target") if f.endswith(".safetensors")]) == len(HOSTILE)
    _tensors_equal(exported, expected)
    assert sorted(os.listdir(zone / "one")) == ["model.safetensors"]
    _tensors_equal(load_file(str(zone / "one" / "model.safetensors")), expected)
    assert pt.out == "target.pt\n"
    _tensors_equal(torch.load(zone / "target.pt", weights_only=True), tensors)


# -- errors, usage, --debug, colour, secrets ------------------------------------------------------


_ERROR_STEPS = [
    ["rev-parse", "mian"], ["rev-parse", "main~5"], ["show", "sweeep"], ["branch", "-d", "mian"], ["tag", "latest"],
    ["tag", "-d", "nosuch"], ["branch", "sweep"], ["--store", "nowhere", "log"], ["export", "nosuch", "out"],
]  # fmt: skip
_USAGE_STEPS = [
    ["log", "--bogus"], ["diff", "main"], ["log", "-n", "0"], ["export", "main", "out", "--max-shard-size", "lots"],
    ["branch", "-d"], ["gc", "--grace-period", "soon"], ["fsck", "--read-data-subset", "150%"], ["nosuchcommand"],
]  # fmt: skip
_HELP_STEPS = [["--help"], *([name, "--help"] for name in cli_group.commands)]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """A local store (main: two commits; sweep at main~1), and the results of one batch of
    failing commands, revision look-ups, ``--version`` and every ``--help``."""
    root = tmp_path_factory.mktemp("cli")
    url = str(root / "store")
    with ckptstore.open(url) as store:
        first = store.commit({"w": torch.zeros(3)}, message="one")
        second = store.commit({"w": torch.ones(3)}, message="two")
        store.branch("sweep", at="main~1")
    env = _env(url)
    steps = [*_ERROR_STEPS, *_USAGE_STEPS, ["rev-parse", "main^"], ["rev-parse", first.id[:6]], ["--version"], *_HELP_STEPS]
    runs = ckpt_batch(steps, env=env, cwd=root)
    return {"root": root, "url": url, "env": env, "ids": (first.id, second.id), "runs": runs}


def test_errors_are_one_line_usage_errors_exit_2_and_debug_shows_the_traceback(small_store):
    root, url, env, (first, second) = small_store["root"], small_store["url"], small_store["env"], small_store["ids"]
    runs = small_store["runs"]
    errors, usage, (parent, prefix, version) = runs[:9], runs[9:17], runs[17:20]

    messages = [
        _assert_error_line(run, rc=2 if step == ["tag", "latest"] else 1) for step, run in zip(_ERROR_STEPS, errors)
    ]  # a reserved name is a usage error
    assert messages[0] == "unknown revision 'mian'; did you mean 'main'?"
    assert messages[1] == "unknown revision 'main~5'; did you mean 'main~1'?"
    assert messages[2].startswith("unknown revision 'sweeep'; did you mean 'sweep'")
    assert "did you mean 'main'" in messages[3]
    assert "latest" in messages[4] and "managed by the store" in messages[4]
    assert "nosuch" in messages[5]
    assert "sweep" in messages[6]
    assert messages[7].startswith("no ckptstore store at ")
    assert "nosuch" in messages[8] and not (root / "out").exists()
    for run in usage:
        _assert_usage_error(run)
    _assert_ok(parent, prefix, version)
    assert (parent.out, prefix.out) == (f"{first}\n", f"{first}\n")
    assert version.out == f"ckpt, version {ckptstore.__version__}\n"

    # Each in its own process: the installed console script (colour codes, which a terminal
    # would get, must not reach a pipe), --debug, and a malformed CKPTSTORE_STORAGE_OPTIONS.
    script = shutil.which("ckpt")
    exe = [script] if script and Path(script).resolve().parent == Path(sys.executable).resolve().parent else None
    graph = ckpt("log", "--graph", env=env, cwd=root, exe=exe)
    _assert_ok(graph)
    assert graph.out.splitlines() == [f"* {second[:12]} (main, tag: latest) two", f"* {first[:12]} (sweep) one"]
    debug = ckpt("--debug", "rev-parse", "mian", env=env, cwd=root)
    assert debug.rc == 1 and debug.out == ""
    assert "Traceback (most recent call last)" in debug.err and "ckptstore.errors.UnknownRef: unknown revision 'mian'" in debug.err
    bad_options = ckpt("log", env=_env(url, raw_options=f'{{"key": "{SECRET_KEY}", "secret": "{SECRET}"'), cwd=root)
    assert bad_options.rc == 1 and bad_options.out == "", bad_options  # an environment error, not usage
    assert bad_options.err.splitlines() == [bad_options.err.strip()] and "CKPTSTORE_STORAGE_OPTIONS is not valid JSON" in bad_options.err
    assert SECRET not in bad_options.err and SECRET_KEY not in bad_options.err


@pytest.mark.s3
def test_credentials_never_appear_in_output(s3_url, tmp_path):
    url, s3_options = s3_url
    options = {**s3_options, "key": SECRET_KEY, "secret": SECRET}
    env = _env(url, options)
    # (test_import_commit_branch_tag_diff_export[s3] runs every command successfully with
    # these credentials; here, failures.)
    bucket = url.split("/")[2]
    runs = ckpt_batch(
        [
            ["init"], ["rev-parse", "nosuch"], ["show", "0000"], ["export", "nosuch", "out"],
            ["--store", f"s3://{bucket}-missing/store", "log"], ["--store", f"s3://{bucket}/elsewhere", "du"],
            ["--store", tmp_path / "local", "init"],  # storage options are refused for a local store
            ["--store", "ftp://host/x", "log"], ["gc", "--keep-last", "lots"],
        ],
        env=env, cwd=tmp_path,
    )  # fmt: skip
    _assert_ok(runs[0])
    for run in runs[1:-1]:  # (each checked for the credentials by ckpt_batch)
        _assert_error_line(run)
    _assert_usage_error(runs[-1])
    # --debug: tracebacks and debug logs of the S3 client, in a real process.
    debug = ckpt("--debug", "--store", f"s3://{bucket}-missing/store", "log", env=env, cwd=tmp_path)
    assert debug.rc == 1 and "Traceback" in debug.err


# -- 4. docs/cli.md: the walk-through runs, and every command is documented --------------------


def _walkthrough_steps(text: str) -> tuple[list[dict], dict[str, str]]:
    """The walk-through's code blocks as driver steps, in order: ``bash`` lines (``ckpt``
    commands in-process, ``python FILE`` as a script, anything else in a shell), ``python``
    blocks executed, or written to the file their first line names (``# train.py: ...``)."""
    section = text.split("\n## Walk-through\n", 1)[1].split("\n## ", 1)[0]
    steps: list[dict] = []
    files: dict[str, str] = {}
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```$", section, re.DOTALL | re.MULTILINE):
        if lang == "python":
            name = re.match(r"# (\w+\.py)\b", body)
            if name:
                files[name.group(1)] = body
            else:
                steps.append({"kind": "python", "arg": body, "stop_on_error": True})
        elif lang in ("bash", "sh", "shell"):
            for line in body.splitlines():
                argv = shlex.split(line, comments=True)
                if not argv:
                    continue
                if argv[0] == "ckpt":
                    steps.append({"kind": "ckpt", "arg": argv[1:], "stop_on_error": True})
                elif argv[0] == "python" and argv[1:2] and argv[1] in files:
                    steps.append({"kind": "script", "arg": argv[1:], "stop_on_error": True})
                else:
                    steps.append({"kind": "sh", "arg": line, "stop_on_error": True})
        else:
            assert lang == "text", f"walk-through block of unknown kind {lang!r}"
    return steps, files


def test_docs_walkthrough_runs_from_an_empty_directory(tmp_path):
    pytest.importorskip("safetensors")
    steps, files = _walkthrough_steps(DOC.read_text(encoding="utf-8"))
    kinds = [s["kind"] for s in steps]
    assert kinds.count("ckpt") >= 15 and "python" in kinds and "script" in kinds
    commands = {s["arg"][0] for s in steps if s["kind"] == "ckpt"}
    assert commands >= {"init", "import", "log", "show", "branch", "tag", "diff", "du", "export", "gc", "fsck", "rev-parse"}
    work = tmp_path / "demo"
    work.mkdir()
    for name, body in files.items():  # the user saves these as files
        (work / name).write_text(body)
    env = _env(None)  # the default store, ./ckpts
    runs = ckpt_batch(steps, env=env, cwd=work)
    for run in runs:
        assert run.rc == 0, f"docs/cli.md walk-through step failed:\n{run}"
    # It ends with a forked, tagged, exported checkpoint.
    with ckptstore.open(str(work / "ckpts"), create=False) as store:
        assert {"main", "lr-sweep"} <= set(store.branches())
        assert store.resolve("lr-sweep~2") == store.resolve("main~1")  # forked at main~1
        assert store.tags()["release"] == store.tags()["best"]
        assert (work / "release-model" / "model.safetensors.index.json").exists() and (work / "release.pt").exists()


def test_every_command_is_documented_and_has_help(small_store):
    text = DOC.read_text(encoding="utf-8")
    sections = dict(re.findall(r"^### `ckpt ([\w-]+)`\n(.*?)(?=^#{2,3} |\Z)", text, re.DOTALL | re.MULTILINE))
    assert set(sections) == set(cli_group.commands), "docs/cli.md needs a '### `ckpt NAME`' section per command"
    for name, command in cli_group.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in param.opts + param.secondary_opts:
                    if opt.startswith("--"):
                        assert f"`{opt}" in sections[name], f"docs/cli.md: ckpt {name} does not document {opt}"
        assert re.search(r"^```bash\nckpt ", sections[name], re.MULTILINE), f"docs/cli.md: ckpt {name} has no example"
    for env_var in ("CKPTSTORE_URL", "CKPTSTORE_STORAGE_OPTIONS"):
        assert env_var in text
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "(docs/cli.md)" in readme

    runs = small_store["runs"][-len(_HELP_STEPS) :]  # ckpt --help, ckpt NAME --help
    _assert_ok(*runs)
    for name in cli_group.commands:
        assert f"  {name} " in runs[0].out
    for name, run in zip(cli_group.commands, runs[1:]):
        assert run.out.startswith(f"Usage: ckpt {name} "), str(run)
