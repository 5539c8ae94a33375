"""Random corruption of a store with several commits (issue 7, item 5).

A template store holds four commits on two branches and three tags: chunks shared between
commits (a frozen tensor in every commit, an identical re-commit that shares a whole
manifest), tied weights, a transposed view, a numpy array, zstd and raw chunks, inline
tensors. Each case copies the template, damages it once, opens it and checks:

* objects (chunks, manifests, commits, refs) get bit flips, truncations, deletions and
  swaps: ``fsck(read_data=True)`` reports a problem naming the damaged object, a commit that
  needs it and, for a chunk, a tensor key path that uses it; checking out an affected commit
  raises a :class:`ckptstore.CkptStoreError`; every unaffected commit checks out bit-exact;
* the catalog's SQLite file gets bit flips, truncations, garbage, a zeroed page or is
  deleted: the store still opens, every commit checks out bit-exact, ``log`` is the truth,
  ``gc`` deletes nothing that a ref reaches, fsck reports only catalog problems and
  ``fsck(repair=True)`` leaves the store healthy.

Which objects a commit needs is recorded from the reads its checkout makes on the template
(plus its commit object), not derived from the manifest, so a codec that reads other
objects (a delta base) is still judged right.

Rows of the catalog changed with SQL (a file SQLite still reads, holding wrong content) and
the config object get deterministic tests of their own.

``CKPTSTORE_SOAK=1`` runs 800 object and 200 catalog corruptions (1,000), else 40 + 12; the
figures (cases by kind, detected, time) are printed with ``-s``.
"""

from __future__ import annotations

import collections
import inspect
import os
import random
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from soak import SOAK
from states import assert_same

import ckptstore
import ckptstore.writer
from ckptstore.codec import Kind, decode_object
from ckptstore.errors import CkptStoreError
from ckptstore.layout import chunk_key as _chunk_key
from ckptstore.layout import commit_key as _commit_key
from ckptstore.layout import manifest_key as _manifest_key

OBJECT_CASES = 800 if SOAK else 40
CATALOG_CASES = 200 if SOAK else 12
SEED = int(os.environ.get("CKPTSTORE_CORRUPTION_SEED", "7005"))

OPEN_OPTIONS = {"chunk_size_bytes": 4096, "inline_threshold_bytes": 256, "threads": 2}
CATALOG = Path(".catalog") / "catalog.sqlite"
#: Delta chunks (XOR against the parent's chunk), where this version of ckptstore has them.
DELTA = {"delta": "on"} if "delta" in inspect.signature(ckptstore.Store.commit).parameters else {}
KINDS = {"chunks": Kind.CHUNK, "manifests": Kind.MANIFEST, "commits": Kind.COMMIT, "refs": Kind.REF}


# --------------------------------------------------------------------------------------------
# The template store


def _state(seed: int, frozen: torch.Tensor) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(64, 40, generator=g)  # 10 kB: three chunks, fp32 noise: stored raw
    return {
        "model": {
            "frozen": frozen,  # the same bytes in every commit: shared chunks
            "emb.weight": emb,
            "out.weight": emb,  # tied: one blob, two key paths
            "head": torch.arange(seed * 3000, seed * 3000 + 3000, dtype=torch.int64),  # zstd chunks
            "bias": torch.randn(8, generator=g),  # inline in the manifest
            "proj": torch.randn(40, 64, generator=g).t(),  # a non-contiguous view
        },
        "optimizer": {
            "state": {0: {"exp_avg": torch.randn(1500, generator=g).to(torch.bfloat16), "step": torch.tensor(float(seed))}},
            "param_groups": [{"lr": 1e-3, "params": [0]}],
        },
        "rng": np.arange(700, dtype=np.uint32) * seed,
        "step": seed,
    }


@dataclass
class Template:
    root: Path
    states: dict[str, Any]  # commit id → the state it holds
    refs: dict[str, tuple[str, str]]  # ref key → (revision name, commit id)
    deps: dict[str, frozenset[str]]  # commit id → every object its checkout reads
    users: dict[str, dict[str, set[str]]]  # object key → commit id → key paths that need it
    logs: dict[str, list[tuple]]  # branch → what log() shows
    keys: dict[str, list[str]]  # "chunks" / "manifests" / "commits" / "refs" → object keys
    usage: tuple[int, int, int]  # du(): logical, unique raw and stored chunk bytes
    raw: dict[str, bytes] = field(default_factory=dict)  # object key → its unframed bytes
    deltas: set[str] = field(default_factory=set)  # chunks stored as deltas


def _listing(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(out)


def _log_view(store: ckptstore.Store, branch: str, limit: int | None = None) -> list[tuple]:
    return [(c.id, c.parents, c.message, c.metadata, c.metrics) for c in store.log(branch, limit=limit)]


def _usage_view(store: ckptstore.Store) -> tuple[int, int, int]:
    usage = store.du()
    return usage.logical_bytes, usage.unique_raw_bytes, usage.chunk_stored_bytes


class _Clock(datetime):
    """A clock for the template's commits, so that their ids, and the catalog's bytes, are the
    same on every run (and a seeded case damages the same bytes every time)."""

    at = datetime(2024, 6, 1, tzinfo=timezone.utc)

    @classmethod
    def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
        cls.at += timedelta(seconds=1)
        return cls.at


def _build_template(root: Path) -> Template:
    with pytest.MonkeyPatch.context() as mp:
        _Clock.at = datetime(2024, 6, 1, tzinfo=timezone.utc)
        mp.setattr(ckptstore.writer, "datetime", _Clock, raising=False)
        return _build_template_now(root)


def _build_template_now(root: Path) -> Template:
    store = ckptstore.open(str(root), **OPEN_OPTIONS)
    frozen = torch.randn(3000, generator=torch.Generator().manual_seed(99))
    states = {}
    s1, s2, s3 = _state(1, frozen), _state(2, frozen), _state(3, frozen)
    c1 = store.commit(s1, message="one", metadata={"step": 1}, metrics={"eval_loss": 2.0})
    # Changed float chunks of c2 are stored as deltas against c1's, where the codec has them.
    c2 = store.commit(s2, message="two", metadata={"step": 2}, metrics={"eval_loss": 1.5}, tags=["release"], **DELTA)
    store.branch("fork", at=c1.id)
    c3 = store.commit(s3, branch="fork", message="three", metadata={"step": 3}, metrics={"eval_loss": 1.8})
    c4 = store.commit(s2, message="two again", metadata={"step": 4}, metrics={"eval_loss": 1.6})
    states = {c1.id: s1, c2.id: s2, c3.id: s3, c4.id: s2}
    assert c4.manifest == c2.manifest, "an identical re-commit shares its manifest"
    store.close()

    # What each checkout reads, recorded on a fresh open (its own catalog, rebuilt).
    store = ckptstore.open(str(root), **OPEN_OPTIONS)
    seen: set[str] = set()
    objects = store.objects
    for name in ("get", "get_range", "reader", "get_versioned"):
        original = getattr(objects, name)

        def recording(key: str, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            seen.add(key)
            return _original(key, *args, **kwargs)

        setattr(objects, name, recording)
    listing = set(_listing(root))
    deps = {}
    for cid, expected in states.items():
        seen.clear()
        assert_same(expected, store.checkout(cid))
        deps[cid] = frozenset({k for k in seen if k in listing} | {_commit_key(cid)})

    users: dict[str, dict[str, set[str]]] = collections.defaultdict(lambda: collections.defaultdict(set))
    for cid in states:
        commit = store.read_commit(cid)
        manifest = store.get_manifest(commit.manifest)
        users[_commit_key(cid)][cid] = set()
        users[_manifest_key(commit.manifest)][cid] = set()
        for entry in manifest.tensors:
            for ref in manifest.blobs[entry.blob].chunks:
                for chunk_id in (ref.id, *getattr(ref, "bases", ())):  # a delta is read through its bases
                    users[_chunk_key(chunk_id)][cid].add(entry.path)
    refs = {}
    for name, cid in store.branches().items():
        refs[f"refs/heads/{name}"] = (name, cid)
    for name, cid in store.tags().items():
        refs[f"refs/tags/{name}"] = (name, cid)
    logs = {name: _log_view(store, name) for name in store.branches()}
    usage = _usage_view(store)
    store.close()

    keys = {kind: [k for k in sorted(listing) if k.startswith(kind + "/")] for kind in KINDS}
    template = Template(root, states, refs, deps, users, logs, keys, usage)
    for kind, object_kind in KINDS.items():
        for key in keys[kind]:
            data = (root / key).read_bytes()
            try:
                template.raw[key] = bytes(decode_object(data, key=key, kind=object_kind, max_raw_size=1 << 30))
            except CkptStoreError:  # a delta chunk: it cannot be decoded without its bases
                template.deltas.add(key)
    # Every chunk a checkout reads is one the manifests name, and the other way round.
    assert {k for d in deps.values() for k in d if k.startswith("chunks/")} == set(keys["chunks"])
    assert len(keys["chunks"]) >= 20 and len(keys["manifests"]) == 3 and len(keys["commits"]) == 4
    return template


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    return _build_template(tmp_path_factory.mktemp("template") / "store")


def _copy(template: Template, dest: Path) -> Path:
    shutil.copytree(template.root, dest)
    return dest


# --------------------------------------------------------------------------------------------
# Damage


def _flip_bits(data: bytes, rng: random.Random, *, header_bias: float = 0.3, header_size: int = 24) -> bytes:
    out = bytearray(data)
    count = rng.choice([1, 1, 1, 1, 2, 3, 8])
    for i in range(count):
        if i == 0 and rng.random() < header_bias:
            pos = rng.randrange(min(header_size, len(out)))
        else:
            pos = rng.randrange(len(out))
        out[pos] ^= 1 << rng.randrange(8)
    if bytes(out) == data:  # two flips of one bit cancelled
        out[0] ^= 0x01
    return bytes(out)


def _damage_object(root: Path, template: Template, rng: random.Random) -> tuple[str, list[str]]:
    """Damage one object (two for a swap); return the kind of damage and the keys damaged."""
    damage = rng.choice(["bitflip", "truncate", "delete", "swap"])
    kind = rng.choices(["chunks", "manifests", "commits", "refs"], weights=[50, 20, 20, 10])[0]
    if kind == "refs" and damage in ("delete", "swap"):
        # Deleting a ref or swapping two is a legitimate change of history, not damage.
        damage = rng.choice(["bitflip", "truncate"])
    key = rng.choice(template.keys[kind])
    path = root / key
    data = path.read_bytes()
    if damage == "bitflip":
        path.write_bytes(_flip_bits(data, rng))
        return f"{damage} {kind}", [key]
    if damage == "truncate":
        path.write_bytes(data[: rng.randrange(len(data))])
        return f"{damage} {kind}", [key]
    if damage == "delete":
        path.unlink()
        return f"{damage} {kind}", [key]
    other_kind = rng.choice([kind, kind, "chunks", "manifests", "commits"])
    other = rng.choice([k for k in template.keys[other_kind] if k != key])
    other_data = (root / other).read_bytes()
    path.write_bytes(other_data)
    (root / other).write_bytes(data)
    return f"swap {kind}/{other_kind}", [key, other]


def _damage_catalog(root: Path, rng: random.Random) -> str:
    path = root / CATALOG
    data = path.read_bytes()
    damage = rng.choices(["bitflip", "truncate", "garbage", "zero-page", "delete"], weights=[45, 15, 15, 15, 10])[0]
    if damage == "bitflip":
        path.write_bytes(_flip_bits(data, rng, header_bias=0.1, header_size=100))
    elif damage == "truncate":
        path.write_bytes(data[: rng.randrange(len(data))])
    elif damage == "garbage":
        start = rng.randrange(len(data))
        length = rng.randint(1, 4096)
        path.write_bytes(data[:start] + rng.randbytes(length) + data[start + length :])
    elif damage == "zero-page":
        page = 4096
        start = rng.randrange(len(data) // page) * page
        path.write_bytes(data[:start] + bytes(page) + data[start + page :])
    else:
        path.unlink()
    return f"catalog-{damage}"


def _still_equivalent(root: Path, template: Template, key: str) -> bool:
    """Whether a damaged object still decodes to exactly its old content (a flip in bits a
    decoder ignores): no reader can tell, and no wrong data can come of it."""
    path = root / key
    if not path.exists() or key in template.deltas:  # a delta chunk counts as harmed
        return False
    kind = KINDS[key.split("/", 1)[0]]
    try:
        raw = decode_object(path.read_bytes(), key=key, kind=kind, max_raw_size=len(template.raw[key]))
    except CkptStoreError:
        return False
    return bytes(raw) == template.raw[key]


# --------------------------------------------------------------------------------------------
# Checks


def _same(expected: Any, got: Any) -> bool:
    try:
        assert_same(expected, got)
    except AssertionError:
        return False
    return True


def _checkout_outcome(store: ckptstore.Store, rev: str, expected: Any) -> str:
    """``exact``, ``refused`` (a typed error), or a description of what went wrong."""
    try:
        got = store.checkout(rev)
    except CkptStoreError:
        return "refused"
    except Exception as exc:  # noqa: BLE001 - any other type is the failure being looked for
        return f"untyped {type(exc).__name__}: {exc}"
    return "exact" if _same(expected, got) else "WRONG DATA"


def _problem_names_it(template: Template, problem: Any, key: str) -> str | None:
    """Why ``problem`` (whose key is ``key``) does not name the commit and tensor properly,
    or ``None`` if it does."""
    users = template.users.get(key, {})
    if problem.kind == "chunk":
        if problem.commit not in users:
            return f"names commit {problem.commit}, which does not need {key}"
        if problem.path not in users[problem.commit]:
            return f"names key path {problem.path!r}, not one of {sorted(users[problem.commit])}"
        return None
    if problem.kind == "parent":
        child = template.states.get(problem.commit)
        if child is None or not any(_commit_key(p) == key for p in _parents(template, problem.commit)):
            return f"names commit {problem.commit}, which is no child of {key}"
        return None
    if problem.kind in ("manifest", "commit"):
        if problem.commit not in users:
            return f"names commit {problem.commit}, which does not need {key}"
        return None
    if problem.kind == "ref":
        return None if key.startswith("refs/") or problem.commit in users else f"a ref problem for {key}"
    return f"problem of kind {problem.kind!r} for object {key}"


def _about(template: Template, problem: Any, key: str) -> bool:
    """Whether ``problem`` is about the object ``key``: it names it, or (for a ref whose bits
    now spell another id) it is the ref problem of that branch or tag, which names the
    missing commit the ref now points at as its object."""
    if problem.key == key:
        return True
    if key.startswith("refs/") and problem.kind == "ref":
        name = template.refs[key][0]
        noun = "branch" if key.startswith("refs/heads/") else "tag"
        return f"{noun} {name} " in problem.message or f"{noun} {name!r}" in problem.message
    return False


def _parents(template: Template, cid: str) -> tuple[str, ...]:
    for entries in template.logs.values():
        for entry in entries:
            if entry[0] == cid:
                return entry[1]
    return ()


@dataclass
class Tally:
    cases: collections.Counter = field(default_factory=collections.Counter)
    detected: collections.Counter = field(default_factory=collections.Counter)
    equivalent: collections.Counter = field(default_factory=collections.Counter)
    notes: collections.Counter = field(default_factory=collections.Counter)
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def summary(self, title: str) -> str:
        lines = [f"{title}: {sum(self.cases.values())} cases in {self.seconds:.1f} s"]
        for kind in sorted(self.cases):
            lines.append(
                f"  {kind:32s} {self.cases[kind]:4d} cases, {self.detected[kind]:4d} detected, {self.equivalent[kind]:3d} still decode to the same bytes"
            )
        for note, n in sorted(self.notes.items()):
            lines.append(f"  note: {note}: {n}")
        cases = sorted({f.split(" (", 1)[0] for f in self.failures}, key=lambda c: int(c.split()[1]))
        lines.append(f"  failures: {len(self.failures)} in {len(cases)} cases")
        kinds = collections.Counter()
        for f in self.failures:
            what = re.sub(r"[0-9a-f]{12,32}|\d+", "N", f.split("): ", 1)[1])[:110]
            kinds[what] += 1
        for what, n in kinds.most_common(12):
            lines.append(f"    {n:4d} x {what}")
        return "\n".join(lines)


def _object_case(template: Template, work: Path, index: int, tally: Tally) -> None:
    rng = random.Random(f"{SEED}-object-{index}")
    root = _copy(template, work / f"case-{index}")
    keep_catalog = rng.random() < 0.5  # else: another machine, whose catalog is built from the store
    if not keep_catalog:
        shutil.rmtree(root / CATALOG.parent)
    else:
        tally.notes["catalog kept (else rebuilt from the store, as on another machine)"] += 1
    damage, bad = _damage_object(root, template, rng)
    tally.cases[damage] += 1
    where = f"case {index} ({damage} of {', '.join(bad)}, catalog {'kept' if keep_catalog else 'rebuilt'})"
    equivalent = {k for k in bad if _still_equivalent(root, template, k)}
    harmful = [k for k in bad if k not in equivalent]
    if not harmful:
        tally.equivalent[damage] += 1
    affected = {cid for cid, deps in template.deps.items() if deps & set(harmful)}
    failures = []
    try:
        store = ckptstore.open(str(root), **OPEN_OPTIONS)
    except Exception as exc:  # noqa: BLE001
        tally.failures.append(f"{where}: the store does not open: {type(exc).__name__}: {exc}")
        return
    try:
        try:
            report = store.fsck(read_data=True)
        except Exception as exc:  # noqa: BLE001 - fsck must report damage, not raise on it
            failures.append(f"fsck raised {type(exc).__name__}: {str(exc)[:200]}")
            report = None
        if report is not None and harmful:
            named = {k: [p for p in report.problems if _about(template, p, k)] for k in harmful}
            if report.ok or not any(named.values()):
                failures.append(f"fsck did not detect it: {report.summary()}; problems {[str(p) for p in report.problems]}")
            else:
                tally.detected[damage] += 1
            for key in harmful:
                if not named[key]:
                    if key in report.orphans:  # a damaged commit hides the history below it
                        tally.notes["second object of a swap left unnamed (fsck saw it as an orphan)"] += 1
                    else:
                        failures.append(f"fsck does not name {key}: {[str(p) for p in report.problems]}")
                for problem in named[key]:
                    why = _problem_names_it(template, problem, key)
                    if why:
                        failures.append(f"fsck problem {problem}: {why}")
            for problem in report.problems:
                # Another object may be reported for what it needs: a delta chunk whose base is damaged.
                if not any(_about(template, problem, k) or k in problem.message for k in harmful) and problem.kind != "catalog":
                    failures.append(f"fsck reports an object that is intact: {problem}")
        elif report is not None and not report.ok:
            tally.detected[damage] += 1  # still reported, though no reader could tell

        for cid, expected in template.states.items():
            outcome = _checkout_outcome(store, cid, expected)
            if cid in affected:
                served_from_catalog = keep_catalog and (template.deps[cid] & set(harmful)) == {_commit_key(cid)}
                if outcome == "exact" and served_from_catalog:
                    tally.notes["damaged commit object, commit read from the catalog's copy"] += 1
                elif outcome != "refused":
                    failures.append(f"checkout of affected commit {cid[:12]}: {outcome}")
            elif outcome != "exact":
                failures.append(f"checkout of unaffected commit {cid[:12]}: {outcome}")
        for ref_key, (name, cid) in template.refs.items():
            outcome = _checkout_outcome(store, name, template.states[cid])
            if ref_key in harmful or cid in affected:
                if outcome not in ("refused", "exact") or (outcome == "exact" and ref_key in harmful):
                    failures.append(f"checkout of {name} (damaged ref or commit): {outcome}")
            elif outcome != "exact":
                failures.append(f"checkout of {name} (intact): {outcome}")
    finally:
        store.close()
    tally.failures.extend(f"{where}: {f}" for f in failures)
    shutil.rmtree(root)


def _catalog_checks(store: ckptstore.Store, template: Template) -> tuple[list[str], bool]:
    """What a store whose catalog was damaged gets wrong, and whether fsck flagged the
    catalog. Everything must come from the object store: checkouts, log, du, what gc
    deletes (nothing: every object of the template is needed)."""
    failures = []
    for cid, expected in template.states.items():
        outcome = _checkout_outcome(store, cid, expected)
        if outcome != "exact":
            failures.append(f"checkout of {cid[:12]}: {outcome}")
    for name, cid in template.refs.values():
        outcome = _checkout_outcome(store, name, template.states[cid])
        if outcome != "exact":
            failures.append(f"checkout of {name}: {outcome}")
    for branch, truth in template.logs.items():
        try:
            view = _log_view(store, branch, limit=len(truth) + 3)  # bounded: a cycle never ends
        except Exception as exc:  # noqa: BLE001
            failures.append(f"log({branch}) raised {type(exc).__name__}: {exc}")
            continue
        if view != truth:
            failures.append(f"log({branch}) is not the store's history: {[(v[0][:8], v[2]) for v in view]}")
    try:
        usage = _usage_view(store)
        if usage != template.usage:
            failures.append(f"du is {usage}, the store's is {template.usage}")
    except Exception as exc:  # noqa: BLE001
        failures.append(f"du raised {type(exc).__name__}: {exc}")
    try:
        plan = store.gc(None, grace_period_s=0)
        if plan.deleted_objects:
            failures.append(f"gc deleted {plan.deleted_objects} objects that commits need")
    except Exception as exc:  # noqa: BLE001
        failures.append(f"gc raised {type(exc).__name__}: {exc}")
    flagged = False
    try:
        report = store.fsck(read_data=True)
        others = [str(p) for p in report.problems if p.kind != "catalog"]
        if others:
            failures.append(f"fsck reports damage outside the catalog: {others[:3]}")
        flagged = not report.ok
        repaired = store.fsck(repair=True)
        if not repaired.ok:
            failures.append(f"fsck(repair=True) leaves problems: {[str(p) for p in repaired.problems][:3]}")
    except Exception as exc:  # noqa: BLE001
        failures.append(f"fsck raised {type(exc).__name__}: {exc}")
    return failures, flagged


def _open_damaged_catalog(root: Path) -> tuple[ckptstore.Store | None, str | None, bool]:
    """Open a store whose catalog was damaged: (store, why it failed to open, whether the
    catalog was found unreadable and rebuilt)."""
    try:
        store = ckptstore.open(str(root), **OPEN_OPTIONS)
    except Exception as exc:  # noqa: BLE001
        return None, f"the store does not open: {type(exc).__name__}: {exc}", False
    rebuilt = any(p.name.startswith("catalog.sqlite.corrupt-") for p in (root / CATALOG.parent).iterdir())
    return store, None, rebuilt


def _catalog_case(template: Template, work: Path, index: int, tally: Tally) -> None:
    rng = random.Random(f"{SEED}-catalog-{index}")
    root = _copy(template, work / f"catalog-{index}")
    damage = _damage_catalog(root, rng)
    tally.cases[damage] += 1
    store, error, rebuilt = _open_damaged_catalog(root)
    if store is None:
        tally.failures.append(f"case {index} ({damage}): {error}")
        return
    try:
        failures, flagged = _catalog_checks(store, template)
    finally:
        store.close()
    if rebuilt:
        tally.notes["catalog unreadable on open: moved aside and rebuilt"] += 1
    elif flagged:
        tally.notes["catalog differs from the store: fsck reports it"] += 1
    else:
        tally.notes["no effect seen (free space, or values nothing reads)"] += 1
    tally.detected[damage] += rebuilt or flagged
    tally.failures.extend(f"case {index} ({damage}): {f}" for f in failures)
    shutil.rmtree(root)


# --------------------------------------------------------------------------------------------
# Tests


def test_template_is_healthy(template: Template) -> None:
    store = ckptstore.open(str(template.root), **OPEN_OPTIONS)
    try:
        report = store.fsck(read_data=True)
        assert report.ok and not report.orphans, report.summary()
        shared = [k for k, u in template.users.items() if k.startswith("chunks/") and len(u) > 1]
        assert len(shared) >= 4, "the template shares chunks between commits"
        assert len({cid for cid in template.states if any(len(template.users[k]) > 1 for k in template.deps[cid])}) == 4
        if DELTA:
            assert template.deltas, "some chunks are stored as deltas"
            assert any(
                template.deps[c] & template.deps[p] - set(template.keys["refs"])
                for c, p in [(cid, e[1][0]) for es in template.logs.values() for e in es for cid in [e[0]] if e[1]]
            )
    finally:
        store.close()


@pytest.mark.slow
def test_random_object_corruption_is_detected_and_never_returned(template: Template, tmp_path: Path) -> None:
    tally = Tally()
    start = time.perf_counter()
    for index in range(OBJECT_CASES):
        _object_case(template, tmp_path, index, tally)
    tally.seconds = time.perf_counter() - start
    print("\n" + tally.summary("object corruption"))
    assert not tally.failures, f"{len(tally.failures)} failures, first ones:\n" + "\n".join(tally.failures[:8])
    assert sum(tally.cases.values()) == OBJECT_CASES
    harmful = sum(tally.cases.values()) - sum(tally.equivalent.values())
    assert sum(tally.detected.values()) >= harmful


@pytest.mark.slow
def test_random_catalog_corruption_is_never_trusted(template: Template, tmp_path: Path) -> None:
    tally = Tally()
    start = time.perf_counter()
    for index in range(CATALOG_CASES):
        _catalog_case(template, tmp_path, index, tally)
    tally.seconds = time.perf_counter() - start
    print("\n" + tally.summary("catalog corruption"))
    for failure in tally.failures[:12]:
        print("  " + failure[:300])
    assert not tally.failures, f"{len(tally.failures)} failures, first ones:\n" + "\n".join(tally.failures[:8])


def test_every_zeroed_catalog_page_is_caught_or_harmless(template: Template, tmp_path: Path) -> None:
    """Zero each page of the catalog in turn (deterministic, unlike random damage)."""
    pages = (template.root / CATALOG).stat().st_size // 4096
    failures = []
    for page in range(pages):
        root = _copy(template, tmp_path / f"page-{page}")
        path = root / CATALOG
        data = path.read_bytes()
        path.write_bytes(data[: page * 4096] + bytes(4096) + data[(page + 1) * 4096 :])
        store, error, _ = _open_damaged_catalog(root)
        if store is None:
            failures.append(f"page {page}: {error}")
            continue
        try:
            failures.extend(f"page {page}: {f}" for f in _catalog_checks(store, template)[0])
        finally:
            store.close()
    assert not failures, "\n".join(failures)


def _sql(db: sqlite3.Connection, template: Template, change: str) -> None:
    c1, c2, c3, _ = template.states
    if change == "commit copy replaced by another commit's":
        db.execute("UPDATE commits SET object = (SELECT object FROM commits WHERE id = ?) WHERE id = ?", [c2, c1])
    elif change == "commit copy with one byte changed":
        raw = db.execute("SELECT object FROM commits WHERE id = ?", [c1]).fetchone()[0]
        assert raw.count(b"\xa3one") == 1
        db.execute("UPDATE commits SET object = ? WHERE id = ?", [raw.replace(b"\xa3one", b"\xa3onf"), c1])
    elif change == "refs moved":
        db.execute("UPDATE refs SET [commit] = ?", [c1])
    elif change == "commit row deleted":
        db.execute("DELETE FROM commits WHERE id = ?", [c3])
    elif change == "metrics changed":
        db.execute("UPDATE metrics SET value = -1e9")
    elif change == "parent rows changed":
        db.execute("UPDATE parents SET parent = ?", [c3])
    elif change == "manifest column changed":
        db.execute("UPDATE commits SET manifest = ? WHERE id = ?", ["0" * 32, c2])
    else:
        raise AssertionError(change)


@pytest.mark.parametrize(
    "change",
    [
        "commit copy replaced by another commit's",
        "commit copy with one byte changed",
        "refs moved",
        "commit row deleted",
        "metrics changed",
        "parent rows changed",
        "manifest column changed",
    ],
)
def test_catalog_rows_with_wrong_content_are_not_trusted(template: Template, tmp_path: Path, change: str) -> None:
    """A catalog SQLite reads without complaint but whose rows are wrong (what a flipped bit
    in a data page, or a stray write, leaves)."""
    root = _copy(template, tmp_path / "store")
    db = sqlite3.connect(root / CATALOG)
    with db:
        _sql(db, template, change)
    db.close()
    store = ckptstore.open(str(root), **OPEN_OPTIONS)
    try:
        failures, _ = _catalog_checks(store, template)
    finally:
        store.close()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("shared", ["chunk", "manifest"])
def test_fsck_names_every_commit_a_damaged_object_breaks(template: Template, tmp_path: Path, shared: str) -> None:
    prefix = "chunks/" if shared == "chunk" else "manifests/"
    key = max((k for k in template.users if k.startswith(prefix)), key=lambda k: len(template.users[k]))
    assert len(template.users[key]) > 1
    root = _copy(template, tmp_path / "store")
    (root / key).write_bytes(b"\0" * 40)
    store = ckptstore.open(str(root), **OPEN_OPTIONS)
    try:
        report = store.fsck(read_data=True)
    finally:
        store.close()
    named = {(p.commit, p.path) for p in report.problems if p.key == key}
    wanted = {(cid, path) for cid, paths in template.users[key].items() for path in (paths or [None])}
    assert {c for c, _ in named} == set(template.users[key]), f"fsck names {named}, the object breaks {wanted}"
    if shared == "chunk":
        assert named == wanted


def test_fsck_checks_the_history_below_a_damaged_commit(template: Template, tmp_path: Path) -> None:
    c1, c2, c3, _ = template.states
    only_c1 = [k for k, u in template.users.items() if k.startswith("chunks/") and set(u) == {c1}]
    assert only_c1
    root = _copy(template, tmp_path / "store")
    for key in (_commit_key(c2), _commit_key(c3), only_c1[0]):  # c1 is reached only through c2 and c3
        (root / key).write_bytes(b"\0" * 40)
    store = ckptstore.open(str(root), **OPEN_OPTIONS)
    try:
        report = store.fsck(read_data=True)
        assert _checkout_outcome(store, c1, template.states[c1]) == "refused"
    finally:
        store.close()
    assert any(p.key == only_c1[0] for p in report.problems), (
        f"{only_c1[0]} is not reported; orphans: {len(report.orphans)}; problems: {[str(p) for p in report.problems]}"
    )


CONFIG_FLIPS = None if SOAK else 48  # every single-bit flip of the config object, or a sample


@pytest.mark.slow
def test_every_bit_flip_of_the_config_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ckptstore.open(str(root), chunk_size_bytes=4096, default_branch="trunk", best_metric="acc").close()
    data = (root / "config").read_bytes()
    with ckptstore.open(str(root), create=False) as store:
        original = store.config
    flips = [(pos, bit) for pos in range(len(data)) for bit in range(8)]
    if CONFIG_FLIPS is not None:
        flips = random.Random(SEED).sample(flips, CONFIG_FLIPS)
    outcomes: collections.Counter = collections.Counter()
    accepted = []
    for pos, bit in flips:
        damaged = bytearray(data)
        damaged[pos] ^= 1 << bit
        (root / "config").write_bytes(bytes(damaged))
        try:
            store = ckptstore.open(str(root), create=False)
        except CkptStoreError as exc:
            outcomes[type(exc).__name__] += 1
            continue
        except Exception as exc:  # noqa: BLE001
            outcomes[f"untyped {type(exc).__name__}"] += 1
            accepted.append(f"byte {pos} bit {bit}: untyped {type(exc).__name__}: {exc}")
            continue
        store.close()
        changed = {k: v for k, v in store.config.__dict__.items() if original.__dict__.get(k) != v}
        outcomes["accepted, settings changed" if changed else "accepted, same settings"] += 1
        accepted.append(f"byte {pos} bit {bit}: opened with {changed or 'the same settings'}")
    accepted.sort(key=lambda line: "same settings" in line)
    print(f"\nconfig flips: {dict(outcomes)}")
    assert not accepted, f"{len(accepted)} of {len(flips)} flips accepted, e.g.:\n" + "\n".join(accepted[:5])
