"""What ``ckpt`` prints: only the store's own bytes in ``du``, user-supplied strings made
printable on the terminal, strict JSON, and reads that race a collector in another process.

* ``du`` counts the keys of the store layout only, not a store nested in its directory or a
  user's file beside its objects.
* Control characters, C1 controls, bidi overrides and line separators in metric names,
  metadata keys and values (``step`` included), messages, tensor key paths and demoted
  prefixes reach no terminal raw from ``log``, ``show``, ``branch``, ``tag``, ``du``, ``diff``
  and ``gc``; ``--json`` keeps the exact strings.
* ``--json`` is strict JSON: NaN and infinities are the strings ``"NaN"``, ``"Infinity"``,
  ``"-Infinity"``; metadata with int and str keys (colliding ones too) prints everywhere.
* ``du`` and ``show latest`` called again and again while another process commits and
  collects exit 0, or 1 with "collected while reading"; never a traceback, a raw error or a
  damage report. ``CKPTSTORE_SOAK=1`` makes 3,000 calls instead of 300.

Commands run in this process through ``ckptstore.cli.main`` (what the ``ckpt`` script
calls), with stdout and stderr captured as in a pipe, and the exit status from ``SystemExit``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from cli_run import Run, ok
from forker import Forker
from soak import SOAK

import ckptstore
from ckptstore.retention import KeepLast, Policy

#: Calls racing the collector, and the longest they may take together.
RACE_CALLS, RACE_MAX_S = (3000, 1800.0) if SOAK else (300, 30.0)
#: Commits that every read goes through and no collection removes, and their tensors: the
#: longer a read, the likelier a collection lands in the middle of it.
KEPT, KEPT_TENSORS = 40, 150

#: What no terminal may receive raw: C0 controls but newline, DEL, C1 controls, bidi
#: embeddings, overrides and isolates, line and paragraph separators.
FORBIDDEN = (
    {chr(c) for c in range(0x20)} - {"\n"} | {"\x7f"} | {chr(c) for c in range(0x80, 0xA0)}
    | {chr(c) for c in range(0x202A, 0x202F)} | {chr(c) for c in range(0x2066, 0x206A)} | {"\u2028", "\u2029"}
)  # fmt: skip


def _strict_json(text: str):
    def refuse(constant: str):
        raise AssertionError(f"{constant} in --json output:\n{text}")

    return json.loads(text, parse_constant=refuse)


# -- 17.9: du counts the store's own keys only ------------------------------------------------


def _layout_files(root: Path) -> dict[str, int]:
    """Key → size of every file of the store layout (docs/design.md) under ``root``."""
    out = {}
    if (root / "config").is_file():
        out["config"] = (root / "config").stat().st_size
    for top in ("chunks", "manifests", "commits", "refs", "demotions", "shallow", "locks"):
        for dirpath, dirnames, filenames in os.walk(root / top):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith("."):
                    path = Path(dirpath, name)
                    out[path.relative_to(root).as_posix()] = path.stat().st_size
    return out


def test_du_counts_only_the_stores_own_keys(tmp_path):
    root = tmp_path / "store"
    with ckptstore.open(str(root), chunk_size_bytes=4096, inline_threshold_bytes=256) as store:
        for step in range(3):
            store.commit({"w": torch.randn(4096, generator=torch.Generator().manual_seed(step))}, metadata={"step": step})
        store.gc(Policy(keep=KeepLast(2), demote=("w",)), grace_period_s=0)
        store.tag("release", at="main~1")
        before = store.du()
    own = _layout_files(root)
    assert before.physical_bytes == sum(own.values())
    kinds: dict[str, list[int]] = {}
    for key, size in own.items():
        kinds.setdefault(key.split("/", 1)[0], []).append(size)
    assert before.objects == {k: (len(v), sum(v)) for k, v in kinds.items()}
    assert {"config", "chunks", "manifests", "commits", "refs"} <= set(before.objects)

    # Another store nested in the directory, with more history than this one, and a user's
    # files beside the objects and in a folder named like a key.
    with ckptstore.open(str(root / "sub"), chunk_size_bytes=4096) as nested:
        for step in range(4):
            nested.commit({"w": torch.randn(8192, generator=torch.Generator().manual_seed(100 + step))})
    (root / "notes").mkdir()
    (root / "notes" / "x").write_bytes(b"n" * 100_000)
    (root / "README").write_bytes(b"r" * 5_000)
    (root / "backup" / "chunks" / "ab").mkdir(parents=True)
    (root / "backup" / "chunks" / "ab" / ("ab" + "0" * 30)).write_bytes(b"c" * 7_000)
    assert _layout_files(root) == own

    with ckptstore.open(str(root)) as store:
        after = store.du()
    assert (after.physical_bytes, after.objects) == (before.physical_bytes, before.objects)
    assert (after.logical_bytes, after.unique_raw_bytes, after.chunk_stored_bytes) == (
        before.logical_bytes, before.unique_raw_bytes, before.chunk_stored_bytes,
    )  # fmt: skip
    assert after.branches == before.branches and after.commits == before.commits

    usage = _strict_json(ok(root, "du", "--json").out)
    assert usage["physical_bytes"] == sum(own.values())
    assert {k: (v["count"], v["bytes"]) for k, v in usage["objects"].items()} == before.objects
    text = ok(root, "du").out
    assert f"in {len(own)} objects" in text and "sub " not in text and "notes" not in text, text


# -- 17.12: user-supplied strings are printable on the terminal ---------------------------------

#: One of each kind of character that must not reach a terminal raw, around the word FORGED,
#: which must never start a line.
HOSTILE = "a\nFORGED \x1b]0;title\x07 \x1b[2J\x1b[31m \x9b31m \x85 \u202eevil\u202c \u2066x\u2069 \u2028\x00\x7f z"


def _assert_printable(run: Run) -> None:
    text = run.out + run.err
    raw = sorted({f"U+{ord(c):04X}" for c in text if c in FORBIDDEN})
    assert not raw, f"{raw} reached the terminal:\n{run}"
    assert not any(line.lstrip(" *|~+-").startswith("FORGED") for line in text.splitlines()), f"a forged line:\n{run}"


def test_user_strings_are_printable_in_every_command(tmp_path):
    url = str(tmp_path / "store")
    with ckptstore.open(url, inline_threshold_bytes=16) as store:
        first = store.commit(
            {"model": {"w": torch.zeros(64)}, "opt" + HOSTILE: {"m": torch.ones(64)}},
            message="first " + HOSTILE, metadata={"step": HOSTILE, "note" + HOSTILE: "v" + HOSTILE},
            metrics={"loss" + HOSTILE: 0.5},
        )  # fmt: skip
        second = store.commit(
            {"model": {"w": torch.ones(64), "x" + HOSTILE: torch.ones(8)}, "opt" + HOSTILE: {"m": torch.zeros(64)}},
            message=HOSTILE, metadata={"step": 2}, metrics={"loss" + HOSTILE: 0.25},
        )  # fmt: skip
        store.branch("side", at=first.id)
        store.tag("v1", at=second.id)
        store.commit({"model": {"w": torch.full((64,), 2.0)}}, branch="side", metadata={"step": HOSTILE})

    runs = [
        ok(url, "log"), ok(url, "log", "--oneline"), ok(url, "log", "--graph"), ok(url, "log", "side"),
        ok(url, "show", first.id), ok(url, "show", second.id), ok(url, "branch"), ok(url, "tag"),
        ok(url, "du", "--commits"), ok(url, "diff", first.id, second.id), ok(url, "diff", first.id, second.id, "--no-values"),
        ok(url, "gc", "--keep-last", "9", "--demote", "opt" + HOSTILE, "--grace-period", "0", "--dry-run"),
        ok(url, "gc", "--keep-last", "9", "--demote", "opt" + HOSTILE, "--grace-period", "0"),
        ok(url, "show", first.id), ok(url, "fsck"),
    ]  # fmt: skip
    for run in runs:
        _assert_printable(run)
    log, oneline, _, side, show_first, show_second, branches, tags, du, diff, _, dry, gc, demoted, _ = runs
    # What was made printable is still all there, escaped as Python writes it.
    for run in (log, oneline, side, show_first, branches, tags):
        assert "\\nFORGED \\x1b]0;title\\x07 \\x1b[2J\\x1b[31m \\x9b31m \\x85 \\u202eevil\\u202c \\u2066x\\u2069 \\u2028\\x00\\x7f z" in run.out, str(run)
    assert "loss" + "a\\nFORGED" in show_first.out and "loss" + "a\\nFORGED" in log.out, str(log)
    assert "opta\\nFORGED" in show_first.out and "model/xa\\nFORGED" in diff.out and "model/xa\\nFORGED" in show_second.out
    assert "opta\\nFORGED" in dry.out and "opta\\nFORGED" in gc.out, str(gc)
    assert "\n         opta\\nFORGED" in demoted.out and "\\x7f z dropped by gc\n" in demoted.out, str(demoted)
    assert len(oneline.out.splitlines()) == 2 and len(branches.out.splitlines()) == 2 and len(tags.out.splitlines()) == 2

    # --json keeps the exact strings.
    commits = {c["id"]: c for c in _strict_json(ok(url, "log", "--graph", "--json").out)}
    assert commits[first.id]["message"] == "first " + HOSTILE and commits[second.id]["message"] == HOSTILE
    assert commits[first.id]["step"] == HOSTILE and commits[first.id]["metadata"]["note" + HOSTILE] == "v" + HOSTILE
    assert set(commits[second.id]["metrics"]) == {"loss" + HOSTILE}
    shown = _strict_json(ok(url, "show", first.id, "--json").out)
    assert shown["dropped_components"] == ["opt" + HOSTILE]
    assert {t["path"] for t in _strict_json(ok(url, "show", second.id, "--json").out)["tensors"]} >= {
        "model/x" + HOSTILE,
        "opt" + HOSTILE + "/m",
    }


# -- 17.17: strict JSON, and metadata with int and str keys -------------------------------------


def test_json_is_strict_and_metadata_with_int_and_str_keys_prints(tmp_path):
    url = str(tmp_path / "store")
    nan, inf = float("nan"), float("inf")
    with ckptstore.open(url) as store:
        a = store.commit(
            {"w": torch.zeros(16), "v": torch.ones(4)}, message="a",
            metadata={"step": nan, 1: "one", "b": 2, "nested": {3: [inf, -inf], "x": {4: nan}}}, metrics={"eval_loss": nan, "acc": inf, "neg": -inf},
        )  # fmt: skip
        b = store.commit(
            {"w": torch.ones(16), "v": torch.full((4,), nan)}, message="b",
            metadata={"step": 3, 1: "int one", "1": "str one", "1.0": 1.5, 10: {2: "two", "2": "zwei"}}, metrics={"eval_loss": 0.5},
        )  # fmt: skip
        store.tag("a", at=a.id)

    logged = {c["id"]: c for c in _strict_json(ok(url, "log", "--json").out)}
    assert _strict_json(ok(url, "log", "--graph", "--json").out) == list(logged.values())
    # Non-finite floats are the strings NaN, Infinity and -Infinity, wherever they are.
    assert logged[a.id]["metrics"] == {"eval_loss": "NaN", "acc": "Infinity", "neg": "-Infinity"}
    assert logged[a.id]["step"] == "NaN"
    # An int key is its decimal text ...
    assert logged[a.id]["metadata"] == {"step": "NaN", "1": "one", "b": 2, "nested": {"3": ["Infinity", "-Infinity"], "x": {"4": "NaN"}}}
    # ... unless the dict also has that text as a str key: then it is a list of [key, value]
    # pairs, an int key a JSON number, int before str.
    assert logged[b.id]["metadata"] == [[1, "int one"], ["1", "str one"], ["1.0", 1.5], [10, [[2, "two"], ["2", "zwei"]]], ["step", 3]]
    assert logged[b.id]["step"] == 3

    # A commit as branch and tag list it; log adds what gc took from its history.
    history_fields = {"collected_parents", "history_parents", "dropped_components"}
    branches = _strict_json(ok(url, "branch", "--json").out)
    assert all(set(c) - set(branches["main"]) == history_fields for c in logged.values())
    logged_commits = {cid: {k: v for k, v in c.items() if k not in history_fields} for cid, c in logged.items()}
    assert branches == {"main": logged_commits[b.id]}
    tags = _strict_json(ok(url, "tag", "--json").out)
    assert tags["a"] == logged_commits[a.id] and tags["latest"] == logged_commits[b.id] and tags["best"] == logged_commits[b.id]
    for rev, commit in ((a.id, logged[a.id]), ("latest", logged[b.id])):
        shown = _strict_json(ok(url, "show", rev, "--json").out)
        assert {k: shown[k] for k in commit} == commit

    text = ok(url, "show", b.id).out
    assert 'metadata [[1, "int one"], ["1", "str one"], ["1.0", 1.5], [10, [[2, "two"], ["2", "zwei"]]], ["step", 3]]' in text, text
    text = ok(url, "show", a.id).out
    assert "metrics  acc=inf, eval_loss=nan, neg=-inf" in text, text
    for args in (["log"], ["log", "--oneline"], ["log", "--graph"], ["branch"], ["tag"]):
        ok(url, *args)

    # diff: a NaN's change is NaN, a change from zeros infinitely relative.
    diff = _strict_json(ok(url, "diff", a.id, b.id, "--json").out)
    changed = {c["path"]: c for c in diff["changed"]}
    assert changed["v"]["max_abs_change"] == "NaN" and changed["w"]["relative_change"] == "Infinity"
    assert changed["w"]["max_abs_change"] == 1.0
    usage = _strict_json(ok(url, "du", "--json").out)
    assert {c["id"] for c in usage["commits"]} == {a.id, b.id}
    for args in (["gc", "--dry-run", "--json"], ["fsck", "--json"]):
        _strict_json(ok(url, *args).out)


# -- 17.16: du and show racing a collector in another process ------------------------------------

_CHILD = textwrap.dedent(
    r"""
    import os, sys, torch, ckptstore
    from ckptstore.retention import KeepLast

    url, stop, progress, tensors = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = ckptstore.open(url)
    i = 0
    while not os.path.exists(stop):
        g = torch.Generator().manual_seed(i)
        state = {f"layer{k}": torch.randn(8, generator=g) for k in range(tensors)}  # inline: quick to commit
        store.commit(state, metadata={"step": i}, metrics={"eval_loss": 1 / (i + 1)})
        store.gc(KeepLast(1), grace_period_s=0)
        i += 1
        with open(progress, "a") as f:  # one byte per collection
            f.write(".")
    """
)


#: Runs ``ckpt`` commands, each in a fresh process forked from one that imported ckptstore
#: once (as every ``ckpt`` call is a process of its own, with nothing cached); each answers
#: one JSON line: exit status, stdout and stderr (warnings logged included).
_READER = textwrap.dedent(
    r"""
    import contextlib, io, json, sys

    sys.path.insert(0, sys.argv[1])
    import forker
    from ckptstore.cli import main

    def job(go, started):
        out, err, rc = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(go["argv"])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        forker.say(json.dumps({"rc": rc, "out": out.getvalue(), "err": err.getvalue()}))

    forker.serve(job)
    """
)


@pytest.mark.slow
def test_du_and_show_racing_a_collector_in_another_process(tmp_path):
    url, stop, progress = str(tmp_path / "store"), tmp_path / "stop", tmp_path / "progress"
    with ckptstore.open(url) as store:  # tagged: every collection keeps them
        for k in range(KEPT):
            state = {f"layer{j}": torch.full((8,), float(k)) for j in range(KEPT_TENSORS)}
            store.tag(f"kept/{k:03d}", at=store.commit(state, branch="archive", metadata={"step": k}).id)
    progress.touch()
    collections = lambda: progress.stat().st_size  # noqa: E731
    with open(tmp_path / "child.stderr", "w") as child_err:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, url, str(stop), str(progress), str(KEPT_TENSORS)], stderr=child_err)
    reader = Forker([sys.executable, "-c", _READER, str(Path(__file__).parent)], tmp_path)
    try:
        deadline = time.monotonic() + 120
        while collections() == 0:
            assert child.poll() is None, (tmp_path / "child.stderr").read_text()
            assert time.monotonic() < deadline, "the child made no commit and collection in 120 s"
            time.sleep(0.05)
        started = collections()
        runs: list[Run] = []
        until = time.monotonic() + RACE_MAX_S
        while len(runs) < RACE_CALLS and time.monotonic() < until:
            for args in (["du"], ["show", "latest"]):
                argv = ["--store", url, *args]
                code, _, lines = reader.run({"argv": argv})
                assert code == 0 and len(lines) == 1, f"{code} {lines}\n{reader.errors()}"
                runs.append(Run(argv, **json.loads(lines[0])))
        ended = collections()
    finally:
        reader.close()
        stop.touch()
        child.wait(timeout=120)
    assert child.returncode == 0, (tmp_path / "child.stderr").read_text()
    assert ended - started >= 5, f"only {ended - started} collections ran during the reads: no race"

    collected = 0
    for run in runs:
        if run.rc == 0:
            assert run.err == "", str(run)
            assert run.out.startswith("physical " if run.argv[-1] == "du" else "commit   "), str(run)
            continue
        # The one failure allowed: a typed error, one line, saying what happened.
        assert run.rc == 1 and run.out == "", str(run)
        assert run.err.startswith("ckpt: error: collected while reading: ") and run.err.count("\n") == 1, str(run)
        collected += 1
    assert collected <= len(runs) // 20, f"{collected} of {len(runs)} calls gave up"
    with ckptstore.open(url) as store:
        assert store.fsck().ok
