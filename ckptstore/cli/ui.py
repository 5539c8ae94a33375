"""``ckpt plot`` and ``ckpt ui``: the commands that draw a store (:mod:`ckptstore.ui`).

Both only read the store: it is opened with ``create=False`` and ``single_writer=True`` (no
probe object written to check an S3 endpoint), and the retention preview is gc's dry run.
matplotlib is imported only when ``ckpt plot`` runs, so ``ckpt --version`` stays fast.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

import click

from ..errors import InvalidOption
from ..store import Store, open_store
from .context import storage_options
from .storage import policy_from_options

if TYPE_CHECKING:
    from ..ui.model import History


def open_read_only(ctx: click.Context) -> Store:
    """The store ``ckpt --store`` names, opened to be read: never created, no probe written."""
    return open_store(ctx.find_root().obj.url, storage_options=storage_options() or None, create=False, single_writer=True)


def retention_from_gc_options(ctx: click.Context, text: str) -> tuple[Any, float]:
    """``(retention, grace_period_s)`` from ``text``, options of ``ckpt gc`` (parsed by gc's
    own command, so they are spelled and checked as there)."""
    root = ctx.find_root()
    gc_command = root.command.get_command(root, "gc")  # type: ignore[attr-defined]
    try:
        params = gc_command.make_context("gc", shlex.split(text), parent=root, resilient_parsing=False).params
    except click.UsageError as exc:
        raise InvalidOption("policy", f"{text!r}: {exc.format_message()}") from None
    for flag in ("dry_run", "as_json"):
        if params.get(flag):
            raise InvalidOption("policy", f"{text!r}: only the options of a policy (a preview is always a dry run)")
    keys = (
        "keep_last",
        "keep_best",
        "metric",
        "greater_is_better",
        "keep_every_steps",
        "keep_within_s",
        "max_total_bytes",
        "demote",
        "keep_whole_last",
    )
    policy = policy_from_options(*(params[k] for k in keys))
    retention = {pattern: policy for pattern in params["branches"]} if params["branches"] and policy is not None else policy
    return retention, params["grace_period_s"]


def _history(ctx: click.Context, store: Store, revs: tuple[str, ...], policy: str | None) -> History:
    from ..ui.model import load_history, preview_retention

    history = load_history(store, lines=revs or None)
    if policy is not None:
        retention, grace_period_s = retention_from_gc_options(ctx, policy)
        preview_retention(store, history, retention, grace_period_s=grace_period_s)
    return history


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not WIDTHxHEIGHT in pixels (1000x600)") from None
    if not (50 <= width <= 10000 and 50 <= height <= 10000):
        raise click.BadParameter(f"{text!r}: each side must be 50 to 10000 pixels")
    return width, height


@click.command()
@click.argument("metric")
@click.argument("revs", metavar="[REV]...", nargs=-1)
@click.option("-o", "--output", default=None, help="PNG or SVG file to write (default: METRIC.png).")
@click.option("--size", "size_px", default="1000x600", show_default=True, help="Image size in pixels, WIDTHxHEIGHT.")
@click.option(
    "--policy",
    default=None,
    metavar="'GC OPTIONS'",
    help="Show hollow the commits this retention would delete: options of ckpt gc, quoted ('--keep-last 3 --keep-best 1').",
)
@click.pass_context
def plot(ctx: click.Context, metric: str, revs: tuple[str, ...], output: str | None, size_px: str, policy: str | None) -> None:
    """Plot METRIC against metadata.step for every branch (or the REVs given).

    A diamond marks where a branch leaves its parent, a star marks best. Needs matplotlib:
    pip install 'ckptstore[plot]'.

    \b
    Examples:
      ckpt plot eval_loss -o loss.png
      ckpt plot eval_loss main lr-sweep --policy '--keep-last 2 --keep-best 1' -o loss.svg
    """
    from ..ui.plot import plot_metric

    size = _size(size_px)
    with open_read_only(ctx) as store:
        history = _history(ctx, store, revs, policy)
        path = plot_metric(history, metric, output or f"{metric}.png", size_px=size)
    click.echo(path)


@click.command()
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="Port to serve on (0: any free port; the URL is printed).",
)
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1; anything but loopback must be asked for here).")
@click.option(
    "--policy",
    default=None,
    metavar="'GC OPTIONS'",
    help="Retention to preview on the storage page and curves: options of ckpt gc, quoted.",
)
@click.option("--export", "export_dir", default=None, metavar="DIR", help="Write the pages to DIR as static files instead of serving them.")
@click.pass_context
def ui(ctx: click.Context, port: int, host: str | None, policy: str | None, export_dir: str | None) -> None:
    """Browse the store in a web browser: the commit graph, metric curves, commits, diffs
    and storage. Read-only; serves on 127.0.0.1 unless --host says otherwise.

    \b
    Examples:
      ckpt ui
      ckpt ui --policy '--keep-last 3 --demote optimizer' --port 9000
      ckpt ui --export report/
    """
    from ..ui.server import export_site, serve

    with open_read_only(ctx) as store:
        history = _history(ctx, store, (), policy)
        if export_dir is not None:
            count = export_site(store, history, export_dir)
            click.echo(f"wrote {count} pages to {export_dir}")
            return
        serve(store, history, host=host, port=port, announce=click.echo, reload=lambda: _history(ctx, store, (), policy))
