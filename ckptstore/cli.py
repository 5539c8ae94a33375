"""``ckpt``: the command line (also ``python -m ckptstore``).

Every command takes ``--store URL`` (or ``CKPTSTORE_URL``; default ``./ckpts``). Errors are
one line on stderr and exit status 1; usage errors exit 2; ``--debug`` shows the traceback.
Progress bars appear on a terminal only. Storage options (credentials) come from
``CKPTSTORE_STORAGE_OPTIONS`` (JSON) and are never printed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from . import __version__
from .errors import CkptStoreError, UnknownRef
from .gc import DEFAULT_GRACE_PERIOD_S, GcPlan
from .retention import KeepBest, KeepEveryNSteps, KeepLast, KeepNewerThan, Policy, Rule
from .store import Store, open_store

_DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


class Duration(click.ParamType):
    """``90``, ``90s``, ``30m``, ``1h``, ``7d``, ``2w`` → seconds."""

    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value).lower())
        if m is None:
            self.fail(f"{value!r} is not a duration such as 90s, 30m, 1h or 7d", param, ctx)
        return float(m.group(1)) * _DURATION_UNITS_S.get(m.group(2) or "s", 1)


class ByteSize(click.ParamType):
    """``500MB``, ``1.5GiB``, ``2000000`` → bytes."""

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(value).lower())
        if m is None or m.group(2) not in _SIZE_UNITS:
            self.fail(f"{value!r} is not a size such as 500MB or 1.5GiB", param, ctx)
        return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


class Fraction(click.ParamType):
    """``10%``, ``1/5`` or ``0.1`` → a fraction in (0, 1]."""

    name = "fraction"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        text = str(value).strip()
        try:
            if text.endswith("%"):
                out = float(text[:-1]) / 100
            elif "/" in text:
                num, den = text.split("/", 1)
                out = float(num) / float(den)
            else:
                out = float(text)
        except (ValueError, ZeroDivisionError):
            out = -1.0
        if not 0 < out <= 1:
            self.fail(f"{value!r} is not a fraction such as 10%, 1/5 or 0.1", param, ctx)
        return out


def _storage_options() -> dict[str, Any]:
    raw = os.environ.get("CKPTSTORE_STORAGE_OPTIONS")
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise click.UsageError(f"CKPTSTORE_STORAGE_OPTIONS is not valid JSON (at position {exc.pos})") from None
    if not isinstance(options, dict):
        raise click.UsageError("CKPTSTORE_STORAGE_OPTIONS must be a JSON object")
    return options


class _Context:
    def __init__(self, url: str, debug: bool) -> None:
        self.url = url
        self.debug = debug
        self._store: Store | None = None

    def store(self, *, create: bool = False) -> Store:
        if self._store is None:
            self._store = open_store(self.url, storage_options=_storage_options() or None, create=create)
        return self._store


pass_ctx = click.make_pass_decorator(_Context)


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A ``progress(phase, done, total)`` callback that draws a bar per phase on a
    terminal; ``None`` when stderr is not one."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    bars: dict[str, Any] = {}
    shown: dict[str, int] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in bars:
            for bar in bars.values():
                bar.render_finish()
            bars[phase] = click.progressbar(length=total, label=phase, file=sys.stderr)
            bars[phase].__enter__()
            shown[phase] = 0
        bars[phase].update(done - shown[phase])
        shown[phase] = done

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.__exit__(None, None, None)


def _echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--store", "url", envvar="CKPTSTORE_URL", default="ckpts", show_default=True, help="Store URL: a directory, s3://BUCKET/PREFIX or memory://NAME (env CKPTSTORE_URL).")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.version_option(__version__, prog_name="ckpt")
@click.pass_context
def cli(ctx: click.Context, url: str, debug: bool) -> None:
    """Content-addressed checkpoint storage: history, branches, tags, retention and checks."""
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = _Context(url, debug)


def _policy(
    keep_last: int | None, keep_best: int | None, metric: str, greater_is_better: bool | None,
    keep_every_steps: int | None, keep_within_s: float | None, max_total_bytes: int | None,
    demote: tuple[str, ...], keep_whole_last: int | None,
) -> Policy | None:  # fmt: skip
    rules: list[Rule] = []
    if keep_last is not None:
        rules.append(KeepLast(keep_last))
    if keep_best is not None:
        rules.append(KeepBest(keep_best, metric=metric, greater_is_better=greater_is_better))
    if keep_every_steps is not None:
        rules.append(KeepEveryNSteps(keep_every_steps))
    if keep_within_s is not None:
        rules.append(KeepNewerThan(keep_within_s))
    if not rules and max_total_bytes is None and not demote:
        return None
    keep: Rule | None = None
    for rule in rules:
        keep = rule if keep is None else keep | rule
    return Policy(keep=keep, demote=demote, keep_whole=None if keep_whole_last is None else KeepLast(keep_whole_last), max_total_bytes=max_total_bytes)


def _plan_json(plan: GcPlan) -> dict[str, Any]:
    return {
        "executed": plan.executed,
        "kept_commits": plan.kept_commits,
        "removed_commits": plan.removed_commits,
        "demoted_commits": {k: list(v) for k, v in plan.demoted_commits.items()},
        "shallow_commits": plan.shallow_commits,
        "objects": plan.counts(),
        "planned_bytes": plan.planned_bytes,
        "deleted_objects": plan.deleted_objects,
        "freed_bytes": plan.freed_bytes,
        "young_objects": plan.young_objects,
        "grace_period_s": plan.grace_period_s,
        "elapsed_s": plan.elapsed_s,
    }


@cli.command()
@click.option("--keep-last", type=click.IntRange(min=0), help="Keep the N newest commits of each branch.")
@click.option("--keep-best", type=click.IntRange(min=0), help="Keep the N best commits of each branch by --metric.")
@click.option("--metric", default="eval_loss", show_default=True, help="Metric for --keep-best.")
@click.option("--greater-is-better/--lower-is-better", default=None, help="Direction of --metric (default: lower for names ending in 'loss').")
@click.option("--keep-every-steps", type=click.IntRange(min=1), help="Keep the first commit of every window of N steps.")
@click.option("--keep-within", "keep_within_s", type=Duration(), help="Keep commits newer than this (30m, 12h, 7d).")
@click.option("--max-total-size", "max_total_bytes", type=ByteSize(), help="Then drop the oldest kept commits until a branch's commits fit (500GB).")
@click.option("--demote", multiple=True, metavar="PREFIX", help="Drop this component (key prefix, e.g. optimizer) from kept commits not kept whole. Repeatable.")
@click.option("--keep-whole-last", type=click.IntRange(min=0), help="With --demote: the N newest commits keep every component.")
@click.option("--branch", "branches", multiple=True, metavar="PATTERN", help="Apply the policy to these branches only (glob; others keep everything). Repeatable.")
@click.option("--grace-period", "grace_period_s", type=Duration(), default=DEFAULT_GRACE_PERIOD_S, show_default="1h", help="Never delete objects younger than this.")
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be removed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@pass_ctx
def gc(ctx: _Context, keep_last, keep_best, metric, greater_is_better, keep_every_steps, keep_within_s, max_total_bytes, demote, keep_whole_last, branches, grace_period_s, dry_run, as_json) -> None:  # type: ignore[no-untyped-def]
    """Apply a retention policy and delete what no kept commit needs.

    Without a policy option, every commit a branch or tag reaches is kept and only
    unreachable objects are deleted. Branch heads and tagged commits (latest, best) are
    always kept whole.

    \b
    Example:
      ckpt gc --keep-last 3 --keep-best 1 --demote optimizer --keep-whole-last 1 --dry-run
    """
    policy = _policy(keep_last, keep_best, metric, greater_is_better, keep_every_steps, keep_within_s, max_total_bytes, demote, keep_whole_last)
    retention = {pattern: policy for pattern in branches} if branches and policy is not None else policy
    with _progress(not as_json) as progress:
        plan = ctx.store().gc(retention, dry_run=dry_run, grace_period_s=grace_period_s, progress=progress)
    if as_json:
        _echo_json(_plan_json(plan))
        return
    for cid in plan.removed_commits:
        click.echo(f"remove  {cid[:12]}")
    for cid, prefixes in sorted(plan.demoted_commits.items()):
        click.echo(f"demote  {cid[:12]}  (without {', '.join(prefixes)})")
    click.echo(plan.summary())


@cli.command()
@click.option("--read-data", is_flag=True, help="Read every chunk and re-hash it.")
@click.option("--read-data-subset", type=Fraction(), help="Read a random fraction of the chunks (10%, 1/5, 0.1).")
@click.option("--repair", is_flag=True, help="Rebuild the catalog from the store.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_ctx
def fsck(ctx: _Context, read_data: bool, read_data_subset: float | None, repair: bool, as_json: bool) -> None:
    """Check that every ref, commit, manifest and chunk is present and intact.

    Exit status 0 if the store is healthy, 1 if not. Orphan objects (left for gc) are
    reported but are not damage.

    \b
    Example:
      ckpt fsck --read-data-subset 10%
    """
    with _progress(not as_json) as progress:
        report = ctx.store().fsck(read_data=read_data or read_data_subset is not None, read_data_subset=read_data_subset, repair=repair, progress=progress)
    if as_json:
        _echo_json({
            "ok": report.ok, "problems": [p.__dict__ for p in report.problems], "orphans": report.orphans,
            "commits": report.commits, "manifests": report.manifests, "chunks": report.chunks,
            "chunks_read": report.chunks_read, "bytes_read": report.bytes_read, "catalog_repaired": report.catalog_repaired,
        })  # fmt: skip
    else:
        for problem in report.problems:
            click.echo(str(problem))
        click.echo(report.summary())
    if not report.ok:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning ckptstore errors into one line and exit status 1."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="ckpt", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (CkptStoreError, OSError, ValueError) as exc:
        if debug:
            raise
        message = str(exc) if not isinstance(exc, UnknownRef) else exc.args[0]
        click.echo(f"ckpt: error: {message}", err=True)
        sys.exit(1)
