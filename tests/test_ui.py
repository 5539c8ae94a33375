"""``ckpt ui``: a real child process serves a store (three branches, a fork from ``best``,
commits gc demoted; local and on S3) and a real headless browser renders its pages: the DOM
holds every commit ``ckpt log --graph`` prints, the SVG graph, a curve per branch and the
diff page's changed tensors. The screenshots it takes are docs/ui.md's: to regenerate them,
``CKPTSTORE_UI_SCREENSHOTS=docs/img python -m pytest tests/test_ui.py -k local``.
``ckpt ui --export`` writes the same pages as files with relative links."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Self

import pytest
from cli_run import ok
from test_plot import build_run_store

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason="no headless browser: Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)"
)
POLICY = "--keep-last 2 --grace-period 0"


def _prepare(url: str, options: dict | None = None) -> None:
    build_run_store(url, options)
    ok(url, "gc", "--keep-last", "4", "--demote", "optimizer", "--keep-whole-last", "1", "--grace-period", "0")


def _browser(tmp_path: Path, url: str, *, screenshot: Path | None = None) -> str:
    args = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    args += [f"--screenshot={screenshot}", "--window-size=1280,900"] if screenshot else ["--dump-dom"]
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class _Served:
    """``ckpt ui --port 0`` in a child process; ``base`` is the URL it printed."""

    def __init__(self, url: str) -> None:
        self.child = subprocess.Popen(
            [sys.executable, "-m", "ckptstore", "--store", url, "ui", "--port", "0", "--policy", POLICY],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.child.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert match, line + self.child.stderr.read()
        self.base = match[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.child.terminate()
        self.child.wait(timeout=30)
        self.child.stdout.close()
        self.child.stderr.close()


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file of a local store but its catalog (an index kept beside it): size, mtime."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file() and ".catalog" not in p.parts}


def _check_pages(url: str, tmp_path: Path, shots: Path | None) -> None:
    graph = ok(url, "log", "--graph").out
    ids = re.findall(r"\b[0-9a-f]{12}\b", graph)
    assert len(ids) >= 8
    diff = json.loads(ok(url, "diff", "main~1", "main", "--json").out)
    assert diff["changed"]
    with _Served(url) as served:
        assert served.base.startswith("http://127.0.0.1:")
        index = _browser(tmp_path, served.base)
        for cid in ids:
            assert cid in index, cid
        assert re.search(r'<svg[^>]* id="graph"', index)
        for branch in ("main", "sweep", "alt"):
            assert f'class="curve" data-line="{branch}"' in index, branch
        # Hovering a point names its commit: each point's SVG <title> starts with its short id.
        points = re.findall(r'class="point" data-commit="([0-9a-f]{32})" data-line="([^"]+)"><title>([^<]*)</title>', index)
        assert {line for _, line, _ in points} >= {"main", "sweep", "alt"}
        for cid, _, title in points:
            assert title.startswith(cid[:12] + " on "), (cid, title)
        assert "demoted: without optimizer" in index
        assert "policy: delete" in index  # the previewed policy's deletions are marked
        page = _browser(tmp_path, served.base + f"diff/{diff['a']}..{diff['b']}.html")
        for change in diff["changed"]:
            assert change["path"] in page
            assert f"{change['max_abs_change']:.4g}" in page and f"{change['relative_change']:.4g}" in page
        commit = urllib.request.urlopen(served.base + f"commit/{diff['b']}.html", timeout=60).read().decode()
        row = re.search(
            r"<tr><td><code>model/w</code></td><td>float32</td><td>\(160, 160\)</td>(?:<td>[^<]*</td>){3}<td>(raw|zstd|grouped|delta)</td></tr>",
            commit,
        )
        assert row, "the commit page names each tensor's dtype, shape, bytes and codec"
        storage = urllib.request.urlopen(served.base + "storage.html", timeout=60).read().decode()
        plan = json.loads(ok(url, "gc", *POLICY.split(), "--dry-run", "--json").out)
        assert f"({plan['planned_bytes']:,} bytes, by gc's own dry run)" in storage
        if shots is not None:
            shots.mkdir(parents=True, exist_ok=True)
            for name, path in [
                ("history", ""),
                ("commit", f"commit/{diff['b']}.html"),
                ("diff", f"diff/{diff['a']}..{diff['b']}.html"),
                ("storage", "storage.html"),
            ]:
                _browser(tmp_path, served.base + path, screenshot=shots / f"ui-{name}.png")
                assert (shots / f"ui-{name}.png").stat().st_size > 10_000


@needs_browser
def test_local_store_in_a_browser(tmp_path):
    url = str(tmp_path / "store")
    _prepare(url)
    before = _files(Path(url))
    shots = Path(os.environ.get("CKPTSTORE_UI_SCREENSHOTS") or tmp_path / "shots")
    _check_pages(url, tmp_path, shots)
    assert _files(Path(url)) == before, "ckpt ui wrote to the store"


@needs_browser
@pytest.mark.s3
def test_s3_store_in_a_browser(tmp_path, s3_url, monkeypatch):
    url, options = s3_url
    monkeypatch.setenv("CKPTSTORE_STORAGE_OPTIONS", json.dumps(options))
    _prepare(url, options)
    _check_pages(url, tmp_path, None)


def test_export_writes_the_pages_with_relative_links(tmp_path):
    url = str(tmp_path / "store")
    ids = build_run_store(url)
    out = tmp_path / "site"
    ok(url, "ui", "--export", str(out))
    index = (out / "index.html").read_text()
    for line in ids.values():
        for cid in line:
            assert f'href="commit/{cid}.html"' in index
            assert (out / "commit" / f"{cid}.html").exists()
    assert (out / "static" / "ui.css").exists() and (out / "static" / "ui.js").exists()
    commit = (out / "commit" / f"{ids['sweep'][0]}.html").read_text()
    assert f'href="../diff/{ids["main"][2]}..{ids["sweep"][0]}.html"' in commit  # sweep left main at best
    assert (out / "diff" / f"{ids['main'][2]}..{ids['sweep'][0]}.html").exists()
    links = re.findall(r'(?:href|src)="([^"#]+)"', index + commit)
    assert links and not [link for link in links if link.startswith(("/", "http:", "https:"))]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_gc_in_another_process_while_the_ui_serves(tmp_path):
    """The server read the history before a collection in another process removed most of it:
    the pages of what is kept still render (the head's page reads its parent's manifest, which
    is gone), and the pages of removed commits are 404, not server errors."""
    url = str(tmp_path / "store")
    ids = build_run_store(url)
    with _Served(url) as served:
        head = ids["main"][-1]
        assert _get(served.base + f"commit/{head}.html")[0] == 200
        plan = json.loads(ok(url, "gc", "--keep-last", "1", "--grace-period", "0", "--dry-run", "--json").out)
        removed = plan["removed_commits"]
        assert ids["main"][-2] in removed
        ok(url, "gc", "--keep-last", "1", "--grace-period", "0")  # in this process; the server is a child of its own
        status, page = _get(served.base + f"commit/{head}.html")
        assert status == 200 and head in page, page[:500]
        for cid in removed:
            assert _get(served.base + f"commit/{cid}.html")[0] == 404, cid
        status, index = _get(served.base)
        assert status == 200 and head[:12] in index and not [cid for cid in removed if cid[:12] in index]
