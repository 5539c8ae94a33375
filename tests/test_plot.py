"""``ckpt plot``: the image has the size asked for, and the points it draws are the commits'
metrics at their steps, read back from the SVG through its axes' tick positions."""

from __future__ import annotations

import json
import re
import struct
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
from cli_run import ckpt, ok

import ckptstore
from ckptstore.errors import MissingExtra

SVG = "{http://www.w3.org/2000/svg}"
XLINK = "{http://www.w3.org/1999/xlink}"


def _state(v: float) -> dict:
    return {
        "model": {"w": torch.randn(160, 160, generator=torch.Generator().manual_seed(0)) + v, "b": torch.arange(16.0) + v},
        "optimizer": {"m": torch.ones(64) * v},
        "step": int(v),
    }


def build_run_store(url: str, storage_options: dict | None = None) -> dict[str, list[str]]:
    """A run in three branches: main (6 commits), ``sweep`` forked from ``best`` and ``alt``
    forked from ``main~4``; returns each branch's commit ids, oldest first."""
    s = ckptstore.open(url, storage_options=storage_options or None)
    ids: dict[str, list[str]] = {"main": [], "sweep": [], "alt": []}
    for i, loss in enumerate([3.0, 2.0, 1.5, 1.8, 1.7, 1.6]):
        ids["main"].append(s.commit(_state(i), message=f"main {i}", branch="main", metadata={"step": i * 10}, metrics={"eval_loss": loss, "acc": 0.1 * i}).id)
    s.branch("sweep", at="best")
    for i in range(3):
        ids["sweep"].append(
            s.commit(_state(100 + i), message=f"sweep {i}", branch="sweep", metadata={"step": 30 + 10 * i}, metrics={"eval_loss": 1.4 - 0.1 * i}).id
        )
    s.branch("alt", at="main~4")
    for i in range(2):
        ids["alt"].append(s.commit(_state(200 + i), message=f"alt {i}", branch="alt", metadata={"step": 20 + 10 * i}, metrics={"eval_loss": 2.5 - 0.2 * i}).id)
    s.close()
    return ids


@pytest.fixture(scope="module")
def run_store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("plot") / "store")
    return url, build_run_store(url)


def _axis_map(root: ET.Element, axis: str):
    """SVG coordinate → data value along ``axis``, fitted through the first and last tick."""
    ticks = []
    for group in root.iter(f"{SVG}g"):
        if re.fullmatch(f"{axis}tick_\\d+", group.get("id", "")):
            use = next(group.iter(f"{SVG}use"))
            text = "".join(next(group.iter(f"{SVG}text")).itertext()).replace("\u2212", "-")
            ticks.append((float(use.get("x" if axis == "x" else "y")), float(text)))
    (p0, v0), (p1, v1) = ticks[0], ticks[-1]
    return lambda p: v0 + (p - p0) * (v1 - v0) / (p1 - p0)


def _points(svg_path) -> dict[str, list[tuple[float, float, bool]]]:
    """Line name → its points (step, value, hollow) as drawn."""
    root = ET.parse(svg_path).getroot()
    to_x, to_y = _axis_map(root, "x"), _axis_map(root, "y")
    out = {}
    for group in root.iter(f"{SVG}g"):
        if group.get("id", "").startswith("points:"):
            out[group.get("id")[len("points:") :]] = [
                (to_x(float(u.get("x"))), to_y(float(u.get("y"))), "fill: none" in u.get("style", "")) for u in group.iter(f"{SVG}use")
            ]
    return out


def test_png_has_the_size_asked_for(run_store, tmp_path):
    url, _ = run_store
    out = tmp_path / "loss.png"
    ok(url, "plot", "eval_loss", "-o", str(out), "--size", "800x500")
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (800, 500)


def test_points_are_the_commits_metrics(run_store, tmp_path):
    url, ids = run_store
    out = tmp_path / "loss.svg"
    ok(url, "plot", "eval_loss", "-o", str(out), "--policy", "--keep-last 2 --grace-period 0")
    plan = json.loads(ok(url, "gc", "--keep-last", "2", "--grace-period", "0", "--dry-run", "--json").out)
    log = {c["id"]: c for c in json.loads(ok(url, "log", "--graph", "--json").out)}
    fork = {"main": [], "sweep": [ids["main"][2]], "alt": [ids["main"][1]]}  # best was main's third commit
    drawn = _points(out)
    assert set(drawn) == {"main", "sweep", "alt"}
    tolerance = 1e-4
    for line, points in drawn.items():
        expected = [(log[c]["step"], log[c]["metrics"]["eval_loss"], c in plan["removed_commits"]) for c in fork[line] + ids[line]]
        assert len(points) == len(expected), line
        for (x, y, hollow), (step, loss, deleted) in zip(points, expected):
            assert abs(x - step) < tolerance * 60 and abs(y - loss) < tolerance * 2, (line, x, y, step, loss)
            assert hollow == deleted
    assert any(h for points in drawn.values() for *_, h in points), "the policy deletes some commits: they are drawn hollow"


def test_only_the_revs_given(run_store, tmp_path):
    url, _ = run_store
    out = tmp_path / "two.svg"
    ok(url, "plot", "eval_loss", "main", "alt", "-o", str(out))
    drawn = _points(out)
    assert set(drawn) == {"main", "alt"}
    assert len(drawn["main"]) == 6


def test_unknown_metric_and_bad_output_are_refused(run_store, tmp_path):
    url, _ = run_store
    run = ckpt(url, "plot", "nope", "-o", str(tmp_path / "x.png"))
    assert run.rc == 1 and "nope" in run.err and "eval_loss" in run.err
    run = ckpt(url, "plot", "eval_loss", "-o", str(tmp_path / "x.jpg"))
    assert run.rc == 1 and ".png or .svg" in run.err
    run = ckpt(url, "plot", "eval_loss", "-o", str(tmp_path / "x.png"), "--policy", "--keep-lats 2")
    assert run.rc == 1 and "--keep-lats" in run.err


def test_without_matplotlib_the_error_names_the_extra(run_store, tmp_path, monkeypatch):
    url, _ = run_store
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    run = ckpt(url, "plot", "eval_loss", "-o", str(tmp_path / "x.png"))
    assert run.rc == 1 and "pip install 'ckptstore[plot]'" in run.err, str(run)
    assert not (tmp_path / "x.png").exists()
    assert issubclass(MissingExtra, ImportError)
