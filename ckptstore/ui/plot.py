"""``ckpt plot``: a metric against ``metadata.step``, one curve per line of history, drawn
with matplotlib (the optional extra ``ckptstore[plot]``).

The marks are the web pages' (:mod:`ckptstore.ui.svg`): a diamond where a branch leaves its
parent, a star on ``best``, and, under a retention preview, a hollow point for each commit
the policy would delete. In an SVG, each line's points are the group ``points:LINE`` (one
``<use>`` per point, in the order of :meth:`History.points`), its curve ``curve:LINE``.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import InvalidOption, MissingExtra
from .model import History

#: Pixels per inch of the figure: the output is exactly ``size_px`` pixels.
DPI = 100
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # never a window: the output is a file
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("ckpt plot", "plot", missing="matplotlib") from None
    return plt


def plot_metric(history: History, metric: str, path: str, *, size_px: tuple[int, int] = (1000, 600)) -> str:
    """Draw ``metric`` for every line of ``history`` into ``path`` (``.png`` or ``.svg``, by
    its suffix) at exactly ``size_px`` pixels; returns ``path``. The file is written whole
    (to a temporary name, then renamed)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".png", ".svg"):
        raise InvalidOption("output", f"{path!r} must end in .png or .svg")
    if metric not in history.metric_names():
        raise InvalidOption("metric", f"no commit logged {metric!r} (logged: {', '.join(history.metric_names()) or 'none'})")
    plt = _pyplot()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "ckptstore"}):
        fig, ax = plt.subplots(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI)
        try:
            _draw(ax, history, metric)
            tmp = f"{path}.tmp-{os.getpid()}{suffix}"
            fig.savefig(tmp, dpi=DPI, format=suffix[1:])
            os.replace(tmp, path)
        finally:
            plt.close(fig)
    return path


def _draw(ax: Any, history: History, metric: str) -> None:
    forks, best = history.fork_points(), history.best
    for i, line in enumerate(history.lines):
        points = history.points(metric, line)
        if not points:
            continue
        color = PALETTE[i % len(PALETTE)]
        xs, ys = [p.step for p in points], [p.value for p in points]
        ax.plot(xs, ys, color=color, linewidth=1.5, label=line.name, gid=f"curve:{line.name}")
        hollow = [history.outcome(p.commit_id) == "delete" for p in points]
        ax.scatter(
            xs,
            ys,
            s=28,
            zorder=3,
            edgecolors=color,
            facecolors=["none" if h else color for h in hollow],
            linewidths=1.2,
            gid=f"points:{line.name}",
        )
        marks = [p for p in points if p.commit_id in forks and history.nodes[p.commit_id].line == line.name]
        if marks:
            ax.scatter(
                [p.step for p in marks],
                [p.value for p in marks],
                s=90,
                marker="D",
                facecolors="none",
                edgecolors="black",
                zorder=4,
                gid=f"forks:{line.name}",
            )
    if best is not None and best in history.nodes:
        node = history.nodes[best]
        value = node.commit.metrics.get(metric)
        if node.step is not None and isinstance(value, (int, float)):
            ax.scatter([node.step], [value], s=260, marker="*", color="gold", edgecolors="black", zorder=5, gid="best", label="best")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by step" + (" (hollow: deleted by the policy)" if history.retention else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
