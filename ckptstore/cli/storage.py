"""``ckpt init``, ``du``, ``gc``, ``repack`` and ``fsck``: creating, measuring, collecting,
re-encoding and checking the store."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import StoreNotFound
from ..gc import DEFAULT_GRACE_PERIOD_S, GcPlan
from ..pipeline import CompressionMode, DeltaMode
from ..retention import KeepBest, KeepEveryNSteps, KeepLast, KeepNewerThan, Policy, Rule
from ..store import open_store
from .context import Context, pass_ctx, storage_options
from .options import ByteSize, Duration, Fraction
from .output import echo_json, human_bytes, new_bytes_text, printable, progress_bars, short_id


@click.command()
@click.option("--chunk-size", "chunk_size_bytes", type=ByteSize(), help="Chunk size for new writes (default 16MiB).")
@click.option("--default-branch", help="Branch that commits go to by default (default main).")
@click.option("--best-metric", help="Metric that moves the best tag (default eval_loss).")
@click.option("--greater-is-better/--lower-is-better", default=None, help="Direction of --best-metric.")
@click.option(
    "--delta",
    type=click.Choice(["off", "on", "auto"]),
    help="Store changed float tensors as XOR deltas against the previous commit's (default off).",
)
@click.option("--delta-keyframe-interval", type=click.IntRange(1, 65), help="A full copy at least every N commits (default 8).")
@click.option(
    "--compression",
    type=click.Choice(["auto", "always", "never"]),
    help="When commits compress: auto (where the storage, not the CPU, bounds the commit; the default), always, or never.",
)
@pass_ctx
def init(
    ctx: Context,
    chunk_size_bytes: int | None,
    default_branch: str | None,
    best_metric: str | None,
    greater_is_better: bool | None,
    delta: DeltaMode | None,
    delta_keyframe_interval: int | None,
    compression: CompressionMode | None,
) -> None:
    """Create a store (nothing changes if one exists).

    \b
    Example:
      ckpt --store ckpts init
    """
    try:
        existing = open_store(ctx.url, storage_options=storage_options() or None, create=False)
    except StoreNotFound:
        existing = None
    if existing is not None:
        click.echo(f"store already exists at {existing.url}")
        existing.close()
        return
    store = open_store(
        ctx.url, storage_options=storage_options() or None, create=True, chunk_size_bytes=chunk_size_bytes,
        default_branch=default_branch, best_metric=best_metric, greater_is_better=greater_is_better,
        delta=delta, delta_keyframe_interval=delta_keyframe_interval, compression=compression,
    )  # fmt: skip
    click.echo(f"created store at {store.url}")


@click.command()
@click.option("--commits", "per_commit", is_flag=True, help="Also list every commit.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_ctx
def du(ctx: Context, per_commit: bool, as_json: bool) -> None:
    """Logical against physical bytes, dedup and compression ratios, per branch and commit.

    \b
    Example:
      ckpt du --commits
    """
    usage = ctx.store().du()
    if as_json:
        echo_json({
            "physical_bytes": usage.physical_bytes, "logical_bytes": usage.logical_bytes,
            "unique_raw_bytes": usage.unique_raw_bytes, "chunk_stored_bytes": usage.chunk_stored_bytes,
            "dedup_ratio": usage.dedup_ratio, "compression_ratio": usage.compression_ratio,
            "raw_chunks": usage.raw_chunks, "raw_chunk_bytes": usage.raw_chunk_bytes,
            "repack_estimate_bytes": usage.repack_estimate_bytes, "repack_saving_bytes": usage.repack_saving_bytes,
            "repack_sampled_chunks": usage.repack_sampled_chunks,
            "objects": {k: {"count": n, "bytes": b} for k, (n, b) in usage.objects.items()},
            "branches": [b.__dict__ for b in usage.branches], "commits": [c.__dict__ for c in usage.commits],
        })  # fmt: skip
        return
    click.echo(f"physical  {human_bytes(usage.physical_bytes)} in {sum(n for n, _ in usage.objects.values())} objects")
    for kind, (n, size) in sorted(usage.objects.items()):
        click.echo(f"  {kind:<10} {n:>8}  {human_bytes(size)}")
    click.echo(f"logical   {human_bytes(usage.logical_bytes)} in {len(usage.commits)} commits")
    click.echo(f"dedup     {usage.dedup_ratio:.2f}x   compression {usage.compression_ratio:.2f}x")
    if usage.raw_chunks:
        click.echo(
            f"raw       {human_bytes(usage.raw_chunk_bytes)} in {usage.raw_chunks} chunks stored raw; "
            f"ckpt repack would save about {human_bytes(usage.repack_saving_bytes)} (estimated from {usage.repack_sampled_chunks} sampled chunks)"
        )
    if usage.branches:
        click.echo("branches")
        width = max(len(printable(b.name)) for b in usage.branches)
        for b in usage.branches:
            click.echo(
                f"  {click.style(f'{printable(b.name):<{width}}', fg='green')}  {b.commits:>5} commits  {human_bytes(b.logical_bytes):>10} logical  {human_bytes(b.physical_bytes):>10} stored"
            )
    if per_commit:
        click.echo("commits")
        for c in usage.commits:
            click.echo(
                f"  {short_id(c.id)}  {human_bytes(c.logical_bytes):>10} logical  {new_bytes_text(c.new_bytes, c.new_metadata_bytes)} added  {human_bytes(c.exclusive_bytes):>10} its own"
            )


def policy_from_options(
    keep_last: int | None, keep_best: int | None, metric: str | None, greater_is_better: bool | None,
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
        "newly_demoted": {k: list(v) for k, v in plan.newly_demoted.items()},
        "shallow_commits": plan.shallow_commits,
        "objects": plan.counts(),
        "planned_bytes": plan.planned_bytes,
        "deleted_objects": plan.deleted_objects,
        "freed_bytes": plan.freed_bytes,
        "young_objects": plan.young_objects,
        "grace_period_s": plan.grace_period_s,
        "elapsed_s": plan.elapsed_s,
    }


@click.command()
@click.option("--keep-last", type=click.IntRange(min=0), help="Keep the N newest commits of each branch.")
@click.option("--keep-best", type=click.IntRange(min=0), help="Keep the N best commits of each branch by --metric.")
@click.option("--metric", default=None, help="Metric for --keep-best (default: the store's best_metric, which `best` follows).")
@click.option(
    "--greater-is-better/--lower-is-better",
    default=None,
    help="Direction of --metric (default: the store's for its best_metric, else lower for names ending in 'loss').",
)
@click.option("--keep-every-steps", type=click.IntRange(min=1), help="Keep the first commit of every window of N steps.")
@click.option("--keep-within", "keep_within_s", type=Duration(), help="Keep commits newer than this (30m, 12h, 7d).")
@click.option("--max-total-size", "max_total_bytes", type=ByteSize(), help="Then drop the oldest kept commits until a branch's commits fit (500GB).")
@click.option(
    "--demote",
    multiple=True,
    metavar="PREFIX",
    help="Drop this component (key prefix, e.g. optimizer) from kept commits not kept whole. Repeatable.",
)
@click.option("--keep-whole-last", type=click.IntRange(min=0), help="With --demote: the N newest commits keep every component.")
@click.option(
    "--branch",
    "branches",
    multiple=True,
    metavar="PATTERN",
    help="Apply the policy to these branches only (glob; others keep everything). Repeatable.",
)
@click.option(
    "--grace-period",
    "grace_period_s",
    type=Duration(),
    default=DEFAULT_GRACE_PERIOD_S,
    show_default="1h",
    help="Never delete objects younger than this.",
)
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be removed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@pass_ctx
def gc(
    ctx: Context,
    keep_last: int | None,
    keep_best: int | None,
    metric: str | None,
    greater_is_better: bool | None,
    keep_every_steps: int | None,
    keep_within_s: float | None,
    max_total_bytes: int | None,
    demote: tuple[str, ...],
    keep_whole_last: int | None,
    branches: tuple[str, ...],
    grace_period_s: float,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Apply a retention policy and delete what no kept commit needs.

    Without a policy option, every commit a branch or tag reaches is kept and only
    unreachable objects are deleted. Branch heads and tagged commits (latest, best) are
    always kept whole.

    \b
    Example:
      ckpt gc --keep-last 3 --keep-best 1 --demote optimizer --keep-whole-last 1 --dry-run
    """
    policy = policy_from_options(keep_last, keep_best, metric, greater_is_better, keep_every_steps, keep_within_s, max_total_bytes, demote, keep_whole_last)
    retention = {pattern: policy for pattern in branches} if branches and policy is not None else policy
    with progress_bars(not as_json) as progress:
        plan = ctx.store().gc(retention, dry_run=dry_run, grace_period_s=grace_period_s, progress=progress)
    if as_json:
        echo_json(_plan_json(plan))
        return
    for cid in plan.removed_commits:
        click.echo(f"remove  {cid[:12]}")
    for cid, prefixes in sorted(plan.newly_demoted.items()):
        click.echo(f"demote  {cid[:12]}  (without {', '.join(map(printable, prefixes))})")
    click.echo(plan.summary())


@click.command()
@click.argument("revs", metavar="[REV]...", nargs=-1)
@click.option("--level", "compression_level", type=click.IntRange(1, 22), help="zstd level (default: the store's, else 3).")
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be rewritten; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_ctx
def repack(ctx: Context, revs: tuple[str, ...], compression_level: int | None, dry_run: bool, as_json: bool) -> None:
    """Re-encode the chunks of REV... (default: every commit a branch or tag reaches) that are
    stored raw or as plain zstd, with byte planes and zstd, each in place under its id.

    Safe while other processes commit, check out and collect; run it again to finish after
    an interruption.

    \b
    Example:
      ckpt repack --dry-run
    """
    with progress_bars(not as_json) as progress:
        report = ctx.store().repack(list(revs) or None, compression_level=compression_level, dry_run=dry_run, progress=progress)
    if as_json:
        echo_json({**report.__dict__, "saved_bytes": report.saved_bytes})
        return
    click.echo(report.summary())


@click.command()
@click.option("--read-data", is_flag=True, help="Read every chunk and re-hash it.")
@click.option("--read-data-subset", type=Fraction(), help="Read a random fraction of the chunks (10%, 1/5, 0.1).")
@click.option("--repair", is_flag=True, help="Rebuild the catalog from the store.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_ctx
def fsck(ctx: Context, read_data: bool, read_data_subset: float | None, repair: bool, as_json: bool) -> None:
    """Check that every ref, commit, manifest and chunk is present and intact.

    Exit status 0 if the store is healthy, 1 if not. Orphan objects (left for gc) are
    reported but are not damage.

    \b
    Example:
      ckpt fsck --read-data-subset 10%
    """
    with progress_bars(not as_json) as progress:
        report = ctx.store().fsck(read_data=read_data or read_data_subset is not None, read_data_subset=read_data_subset, repair=repair, progress=progress)
    if as_json:
        echo_json({
            "ok": report.ok, "problems": [p.__dict__ for p in report.problems], "orphans": report.orphans,
            "commits": report.commits, "manifests": report.manifests, "chunks": report.chunks,
            "chunks_read": report.chunks_read, "bytes_read": report.bytes_read, "catalog_repaired": report.catalog_repaired,
            "data_read": report.data_read,
        })  # fmt: skip
    else:
        for problem in report.problems:
            click.echo(printable(problem))
        click.echo(report.summary())
    if not report.ok:
        sys.exit(1)
