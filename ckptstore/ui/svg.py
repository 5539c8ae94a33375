"""The UI's drawings as inline SVG, built from :class:`~ckptstore.ui.model.History`: the
commit graph, and a metric's curves with the marks of ``ckpt plot`` (a diamond where a
branch leaves its parent, a star on ``best``, hollow where a retention would delete).

Every commit is a link (``href(commit_id)``) with an SVG ``<title>`` naming it, which the
browser shows on hover.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from html import escape

from .model import History, describe, graph_layout
from .plot import PALETTE

ROW_PX = 22
COL_PX = 16


def _color(history: History, line: str) -> str:
    names = [ln.name for ln in history.lines]
    return PALETTE[names.index(line) % len(PALETTE)] if line in names else "#888"


def _mark(x: float, y: float, *, kind: str, color: str, hollow: bool, title: str, r: float = 5) -> str:
    fill = "white" if hollow else color
    if kind == "best":
        pts = " ".join(
            f"{x + (r * 1.9 if i % 2 == 0 else r * 0.8) * math.sin(i * math.pi / 5):.1f},{y - (r * 1.9 if i % 2 == 0 else r * 0.8) * math.cos(i * math.pi / 5):.1f}"
            for i in range(10)
        )
        shape = f'<polygon class="best" points="{pts}" fill="gold" stroke="black"/>'
    elif kind == "fork":
        shape = f'<rect class="fork" x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r}" height="{2 * r}" transform="rotate(45 {x:.1f} {y:.1f})" fill="{fill}" stroke="black" stroke-width="1.5"/>'
    else:
        shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{fill}" stroke="{color}" stroke-width="1.5"/>'
    return f"<title>{escape(title)}</title>{shape}"


def _kind(history: History, cid: str, forks: set[str]) -> str:
    return "best" if cid == history.best else "fork" if cid in forks else "point"


def graph_svg(history: History, href: Callable[[str], str]) -> str:
    """The commit graph: a row per commit, newest first, a column per open line of history;
    each row names the commit, its branches and tags, step, metrics and message."""
    layout = graph_layout(history)
    forks = history.fork_points()
    width_cols = max((col for _, col in layout.values()), default=0) + 1
    text_x = width_cols * COL_PX + 12
    pos = {cid: (COL_PX * col + COL_PX / 2, ROW_PX * row + ROW_PX / 2) for cid, (row, col) in layout.items()}
    edges, marks, labels = [], [], []
    for cid, node in history.nodes.items():
        x, y = pos[cid]
        color = _color(history, node.line)
        for p in node.parents:
            px, py = pos[p]
            d = f"M{x:.1f},{y:.1f} L{x:.1f},{py - ROW_PX / 2:.1f} L{px:.1f},{py:.1f}" if px != x else f"M{x:.1f},{y:.1f} L{px:.1f},{py:.1f}"
            edges.append(f'<path d="{d}" stroke="{color}" fill="none" stroke-width="2"/>')
        dropped = f" (gc dropped {', '.join(node.dropped)})" if node.dropped else ""
        title = describe(node) + dropped
        mark = _mark(x, y, kind=_kind(history, cid, forks), color=color, hollow=history.outcome(cid) == "delete", title=title)
        marks.append(f'<a href="{escape(href(cid))}" class="commit" data-commit="{cid}">{mark}</a>')
        refs = "".join(f'<tspan class="branch" fill="#1a7f37" font-weight="bold"> {escape(b)}</tspan>' for b in node.branches)
        refs += "".join(f'<tspan class="tag" fill="#0969da"> tag: {escape(t)}</tspan>' for t in node.tags)
        step = f" step {node.step:g}" if node.step is not None else ""
        metrics = "".join(f" {escape(k)}={v:.4g}" for k, v in sorted(node.commit.metrics.items()))
        notes = f' <tspan fill="#9a6700">[demoted: without {escape(", ".join(node.dropped))}]</tspan>' if node.dropped else ""
        outcome = history.outcome(cid)
        if outcome in ("delete", "demote"):
            notes += f' <tspan fill="#cf222e">[policy: {outcome}]</tspan>'
        labels.append(
            f'<a href="{escape(href(cid))}"><text x="{text_x}" y="{y + 4:.1f}" class="label">'
            f'<tspan class="id" fill="#953800" font-family="monospace">{cid[:12]}</tspan>{refs}{step}{metrics} '
            f'<tspan fill="#57606a">{escape(node.commit.message)}</tspan>{notes}</text></a>'
        )  # fmt: skip
    height = ROW_PX * len(layout) + 4
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" id="graph" class="graph" width="1100" height="{height}" font-size="12">'
        + "".join(edges) + "".join(marks) + "".join(labels) + "</svg>"
    )  # fmt: skip


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    start = math.ceil(low / step) * step
    return [start + i * step for i in range(int((high - start) / step + 1e-9) + 1)]


def chart_svg(history: History, metric: str, href: Callable[[str], str], *, width: int = 900, height: int = 340) -> str:
    """``metric`` against step: a curve per line (from its fork point on), a point per
    commit that logged it."""
    series = [(line, history.points(metric, line)) for line in history.lines]
    series = [(line, pts) for line, pts in series if pts]
    all_pts = [p for _, pts in series for p in pts]
    if not all_pts:
        return f'<p class="empty">no commit logged {escape(metric)} at a step</p>'
    left, right, top, bottom = 64, width - 130, 16, height - 36
    x0, x1 = min(p.step for p in all_pts), max(p.step for p in all_pts)
    y0, y1 = min(p.value for p in all_pts), max(p.value for p in all_pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-9)
    y0, y1 = y0 - (y1 - y0) * 0.05, y1 + (y1 - y0) * 0.05

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (right - left)

    def sy(v: float) -> float:
        return bottom - (v - y0) / (y1 - y0) * (bottom - top)

    out = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#d0d7de"/>']
    for t in _ticks(x0, x1):
        out.append(f'<text x="{sx(t):.1f}" y="{bottom + 16}" text-anchor="middle" fill="#57606a">{t:g}</text>')
    for t in _ticks(y0, y1):
        out.append(
            f'<line x1="{left}" x2="{right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eaeef2"/><text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" fill="#57606a">{t:.4g}</text>'
        )
    out.append(f'<text x="{(left + right) / 2}" y="{height - 4}" text-anchor="middle">step</text>')
    forks = history.fork_points()
    for i, (line, pts) in enumerate(series):
        color = _color(history, line.name)
        coords = " ".join(f"{sx(p.step):.1f},{sy(p.value):.1f}" for p in pts)
        out.append(f'<polyline class="curve" data-line="{escape(line.name)}" points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{right + 10}" y="{top + 14 + 16 * i}" fill="{color}" class="legend">{escape(line.name)}</text>')
        for p in pts:
            node = history.nodes[p.commit_id]
            if node.line != line.name and line.fork == p.commit_id:
                continue  # the fork point is drawn by the line it belongs to
            mark = _mark(
                sx(p.step),
                sy(p.value),
                kind=_kind(history, p.commit_id, forks),
                color=color,
                hollow=history.outcome(p.commit_id) == "delete",
                title=describe(node, {metric: p.value}),
                r=4,
            )
            out.append(f'<a href="{escape(href(p.commit_id))}" class="point" data-commit="{p.commit_id}" data-line="{escape(line.name)}">{mark}</a>')
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-metric="{escape(metric)}" width="{width}" height="{height}" font-size="11">'
        + "".join(out)
        + "</svg>"
    )
