"""Key paths: a tensor held at several key paths, and key paths that never collide.

- One tensor reachable by two key paths (``{"ema": sd, "model": sd}``, one parameter in two
  components): checkout by either path, restore, export and GC demotion of the other
  component all keep it (issue "Never lose a checkpoint", defect 7).
- ``{"a/b": t}`` and ``{"a": {"b": t}}``, keys ``1`` and ``"1"``: diff, include/exclude and
  errors name each unambiguously (issue "Every byte as named", item 5).
- The same values in another layout (a view of a larger storage, a transposed copy, one
  object at two paths) are not a change in ``diff`` (item 17).
- A Hypothesis property over random states (keys with ``/``, ``~``, empty strings, int and
  str keys of one text, aliased tensors, several dtypes): commit → checkout is bit-exact and
  keeps aliases; ``diff`` of a state with itself is empty, and after changing one tensor in
  place names exactly the key paths it is held at (acceptance 3). ``CKPTSTORE_SOAK=1`` runs
  1,000 examples instead of 40.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections import OrderedDict
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from soak import SOAK
from torch import nn

import ckptstore
from ckptstore.errors import ComponentsUnavailable, UnsupportedValue
from ckptstore.retention import KeepLast, Policy
from ckptstore.tree import join_key as _join

CHUNK = 4096
INLINE = 128  # small tensors take the chunked path too


def open_store(name: str, **kwargs: Any) -> ckptstore.Store:
    kwargs = {"chunk_size_bytes": CHUNK, "inline_threshold_bytes": INLINE, **kwargs}
    return ckptstore.open(f"memory://{name}-{uuid.uuid4().hex}", **kwargs)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_exact(expected: dict[str, torch.Tensor], got: Any, what: str) -> None:
    """``got`` is a dict with exactly ``expected``'s keys, each tensor equal bit for bit."""
    assert isinstance(got, dict), f"{what}: {type(got).__name__}, not a dict"
    assert list(got) == list(expected), f"{what}: keys {list(got)}, expected {list(expected)}"
    for key, want in expected.items():
        have = got[key]
        assert isinstance(have, torch.Tensor), f"{what}/{key}: {have!r} instead of a tensor"
        assert (have.dtype, have.shape) == (want.dtype, want.shape), f"{what}/{key}: {have.dtype}{tuple(have.shape)}"
        assert torch.equal(bits(have), bits(want)), f"{what}/{key}: bytes differ"


def make_model(seed: int) -> nn.Module:
    """Multi-chunk weights, chunked biases and an inline one."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.LayerNorm(48), nn.Linear(48, 8))


def snapshot(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


# -- issue 16, defect 7: one tensor reachable by two key paths ---------------------------------


def test_one_state_dict_under_two_components_checks_out_by_either():
    store = open_store("ema-model")
    model = make_model(1)
    sd = model.state_dict()
    expected = snapshot(sd)
    commit = store.commit({"ema": sd, "model": sd, "step": 3})

    whole = store.checkout(commit.id)
    assert_bit_exact(expected, whole["model"], "model")
    assert all(whole["ema"][k] is whole["model"][k] for k in sd)  # one object at both paths, as committed
    for selection in ({"include": ["model"]}, {"exclude": ["ema"]}, {"include": ["model/*"]}):
        out = store.checkout(commit.id, **selection)
        assert list(out) == (["model", "step"] if "exclude" in selection else ["model"])
        assert_bit_exact(expected, out["model"], f"checkout({selection})")
    assert_bit_exact(expected, store.checkout(commit.id, include=["ema"])["ema"], "include=['ema']")

    fresh = make_model(2)
    assert not torch.equal(fresh[0].weight, model[0].weight)
    state = store.restore(commit.id, {"model": fresh})
    assert state["step"] == 3
    assert_bit_exact(expected, fresh.state_dict(), "restored model")


def test_one_parameter_in_two_components_checks_out_restores_and_stays_one_object():
    """Tied weights across components: one ``nn.Parameter`` object in the encoder's and the
    decoder's dicts (the decoder's path comes second)."""
    store = open_store("tied")
    encoder, decoder = nn.Embedding(48, 32), nn.Linear(32, 48)
    tied = encoder.weight  # (48, 32), a Parameter, also the decoder's weight
    state = {"encoder": {"weight": tied}, "decoder": {"weight": tied, "bias": decoder.bias}}
    commit = store.commit(state)
    expected = {"weight": tied.detach().clone(), "bias": decoder.bias.detach().clone()}

    whole = store.checkout(commit.id)
    assert whole["encoder"]["weight"] is whole["decoder"]["weight"]
    assert type(whole["decoder"]["weight"]) is nn.Parameter
    for selection in ({"include": ["decoder"]}, {"exclude": ["encoder"]}, {"include": ["decoder/weight", "decoder/bias"]}):
        out = store.checkout(commit.id, **selection)
        assert list(out) == ["decoder"], selection
        assert_bit_exact(expected, out["decoder"], f"checkout({selection})")
        assert type(out["decoder"]["weight"]) is nn.Parameter

    fresh = nn.Linear(32, 48)
    store.restore(commit.id, {"decoder": fresh})
    assert_bit_exact(expected, fresh.state_dict(), "restored decoder")


def test_demoting_the_other_component_keeps_what_the_kept_path_needs(tmp_path):
    """GC demotes ``ema`` on kept commits that are not kept whole; ``model`` holds the same
    tensors, so their data stays, the demoted commits check out without ``ema``, and asking
    for ``ema`` names it as dropped."""
    store = open_store("demote-alias")
    model = make_model(3)
    commits, expected = [], []
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25 * (step + 1))  # every commit's tensors differ: nothing kept shares them
        sd = model.state_dict()
        commits.append(store.commit({"ema": sd, "model": sd, "step": step}).id)
        expected.append(snapshot(sd))
    time.sleep(0.05)  # every object is older than the zero grace period

    plan = store.gc(Policy(keep=KeepLast(3), demote=("ema",), keep_whole=KeepLast(1)), grace_period_s=0)
    assert plan.removed_commits == sorted(commits[:2])
    demoted = commits[2:4]
    assert sorted(plan.demoted_commits) == sorted(demoted)
    assert all(plan.demoted_commits[c] == ("ema",) for c in demoted)
    assert plan.deleted_objects > 0

    for cid, want in zip(commits[2:4], expected[2:4]):
        for selection in ({"exclude": ["ema"]}, {"include": ["model"]}):
            out = store.checkout(cid, **selection)
            assert_bit_exact(want, out["model"], f"demoted {cid[:8]} checkout({selection})")
        with pytest.raises(ComponentsUnavailable) as caught:
            store.checkout(cid)
        assert caught.value.dropped == ["ema"]
        with pytest.raises(ComponentsUnavailable) as caught:
            store.checkout(cid, include=["ema"])
        assert caught.value.dropped == ["ema"]
        fresh = make_model(9)
        store.restore(cid, {"model": fresh})
        assert_bit_exact(want, fresh.state_dict(), f"restored from demoted {cid[:8]}")
        files = store.export(cid, str(tmp_path / cid))
        assert files == ["model.safetensors"]
        assert_bit_exact(want, safetensors.torch.load_file(str(tmp_path / cid / "model.safetensors")), "export of demoted commit")
    assert_bit_exact(expected[4], store.checkout(commits[4])["ema"], "head, kept whole")
    report = store.fsck(read_data=True)
    assert report.ok, report.problems


def test_export_writes_every_tensor_of_the_model_component(tmp_path):
    store = open_store("export-alias")
    sd = make_model(4).state_dict()
    commit = store.commit({"ema": sd, "model": sd})
    assert store.export(commit.id, str(tmp_path / "out")) == ["model.safetensors"]
    exported = safetensors.torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert_bit_exact(dict(sorted(snapshot(sd).items())), dict(sorted(exported.items())), "export")
    # ...and as shards: every tensor once, in exactly one shard.
    files = store.export(commit.id, str(tmp_path / "sharded"), max_shard_size_bytes=8192)
    assert "model.safetensors.index.json" in files and len(files) > 2
    loaded: dict[str, torch.Tensor] = {}
    for name in files:
        if name.endswith(".safetensors"):
            part = safetensors.torch.load_file(str(tmp_path / "sharded" / name))
            assert not loaded.keys() & part.keys()
            loaded.update(part)
    assert_bit_exact(dict(sorted(snapshot(sd).items())), dict(sorted(loaded.items())), "sharded export")


# -- issue 17, item 5: key paths that cannot collide -------------------------------------------


@pytest.mark.parametrize(
    ("make_state", "second", "first"),
    [
        (lambda t1, t2: {"a/b": t1, "a": {"b": t2}}, "a/b", "a~1b"),
        (lambda t1, t2: {1: t1, "1": t2}, '~"1"', "1"),
        (lambda t1, t2: {"x": [t1], "x~1": {"0": t2}}, 'x~01/~"0"', "x/0"),
        (lambda t1, t2: {"": t1, "~": {"": t2}}, '~0/~""', '~""'),
    ],
    ids=["slash-in-key", "int-and-str-key", "tilde-and-index", "empty-keys"],
)
def test_diff_names_exactly_the_changed_key_path(make_state, second, first):
    """Two tensors whose keys read alike when joined naively: a change to either is reported
    at its own path and only there."""
    store = open_store("diff-collide")
    t1, t2 = torch.randn(300), torch.randn(300)
    c0 = store.commit(make_state(t1, t2))
    with torch.no_grad():
        t2.add_(1)
    c1 = store.commit(make_state(t1, t2))
    with torch.no_grad():
        t1.add_(1)
    c2 = store.commit(make_state(t1, t2))
    for a, b, path in ((c0, c1, second), (c1, c2, first)):
        d = store.diff(a.id, b.id)
        assert [c.path for c in d.changed] == [path]
        assert (d.added, d.removed, d.unchanged, d.values_changed) == ([], [], 1, False)
    d = store.diff(c0.id, c0.id)
    assert (d.changed, d.added, d.removed, d.unchanged) == ([], [], [], 2)


def test_include_and_exclude_select_exactly_one_of_two_alike_keys():
    store = open_store("select-collide")
    t1, t2, t3, t4 = (torch.randn(200) for _ in range(4))
    slash = store.commit({"a/b": t1, "a": {"b": t2}}).id
    assert_bit_exact({"a/b": t1}, store.checkout(slash, include=["a~1b"]), "include=['a~1b']")
    only_nested = store.checkout(slash, include=["a/b"])
    assert list(only_nested) == ["a"]
    assert_bit_exact({"b": t2}, only_nested["a"], "include=['a/b']")
    assert_bit_exact({"a/b": t1}, store.checkout(slash, exclude=["a"]), "exclude=['a']")
    assert list(store.checkout(slash, exclude=["a~1b"])) == ["a"]

    number = store.commit({1: t3, "1": t4}).id
    assert_bit_exact({1: t3}, store.checkout(number, include=["1"]), "include=['1']")
    assert_bit_exact({"1": t4}, store.checkout(number, include=['~"1"']), "include=['~\"1\"']")
    assert_bit_exact({"1": t4}, store.checkout(number, exclude=["1"]), "exclude=['1']")
    with pytest.raises(ComponentsUnavailable):
        store.checkout(number, include=["2"])


def test_unsupported_value_names_its_key_path_unambiguously():
    """Each error names a path no other value of a state could have (the second of each pair
    read like the first when joined naively), and nothing is stored."""
    store = open_store("unsupported")
    before = store.commit({"t": torch.ones(3)})
    cases = [
        ({"a": {"b": object()}}, "a/b"),
        ({"a/b": object()}, "a~1b"),
        ({1: object()}, "1"),
        ({"1": object()}, '~"1"'),
        ({"w": [None, {"~": object()}]}, "w/1/~0"),
        ({"": object()}, '~""'),
    ]
    for state, path in cases:
        with pytest.raises(UnsupportedValue) as caught:
            store.commit(state)
        assert (caught.value.path, str(caught.value).split(": ", 1)[0]) == (path, path)
    assert store.branches() == {"main": before.id}


# -- issue 17, item 17: the same values in another layout are not a change ---------------------


def test_diff_ignores_layout_and_reports_real_changes():
    store = open_store("layout")
    g = torch.Generator().manual_seed(5)
    big = torch.randn(10, 64, generator=g)
    t = torch.randn(24, 40, generator=g)

    def unchanged(a: dict, b: dict) -> None:
        d = store.diff(store.commit(a).id, store.commit(b).id)
        assert (d.changed, d.added, d.removed, d.values_changed) == ([], [], [], False), d
        assert d.unchanged == len(a)

    # A view of a larger storage (stored as a window of big's blob) and the same values copied.
    unchanged({"big": big, "w": big[2:6]}, {"big": big.clone(), "w": big[2:6].clone()})
    unchanged({"big": big.clone(), "w": big[2:6].clone()}, {"big": big, "w": big[2:6]})
    # A transposed view with the same shape and values: t's storage holds t.T row-major.
    tt = t.t().contiguous()
    unchanged({"w": t, "wt": tt.clone()}, {"wt": tt, "w": tt.t()})
    # A strided view (every other column) against its copy.
    unchanged({"big": big, "s": big[:, ::2]}, {"big": big.clone(), "s": big[:, ::2].contiguous()})
    # One object at two paths, and two copies.
    unchanged({"a": t, "b": t}, {"a": t.clone(), "b": t.clone()})
    unchanged({"a": t.clone(), "b": t.clone()}, {"a": t, "b": t})

    # A real change inside a view is reported, at the view's path too.
    base = big.clone()
    before = store.commit({"big": base, "w": base[2:6]}).id
    changed = big.clone()
    changed[3, 7] += 1  # inside rows 2..5
    d = store.diff(before, store.commit({"big": changed.clone(), "w": changed[2:6].clone()}).id)
    assert sorted(c.path for c in d.changed) == ["big", "w"]
    d = store.diff(before, store.commit({"big": changed, "w": changed[2:6]}).id)
    assert sorted(c.path for c in d.changed) == ["big", "w"]
    # A changed transposed view, against a plain copy of the old values.
    moved = tt.clone()
    moved[0, 1] = moved[0, 1] + 1
    d = store.diff(store.commit({"w": t}).id, store.commit({"wt": moved, "w": moved.t()}).id)
    assert [c.path for c in d.changed] == ["w"] and [c.path for c in d.added] == ["wt"]


def test_diff_of_a_view_whose_storage_changed_only_outside_it():
    store = open_store("view-outside")
    big = torch.randn(10, 64)
    before = store.commit({"big": big, "w": big[2:6]}).id
    big[8, 0] += 1  # outside rows 2..5
    d = store.diff(before, store.commit({"big": big, "w": big[2:6]}).id)
    assert [c.path for c in d.changed] == ["big"]


# -- issue 17, acceptance 3: the property ------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]
#: Keys that a naive join confuses: "/" and "~" inside keys, empty strings, the escapes
#: themselves, str keys that read as numbers, and int keys of the same text.
STR_KEYS = ["a", "b", "a/b", "/", "~", "~0", "~1", "a~1b", "", "1", "0", "-1", "01", '~"1"', '"', "x.y"]
INT_KEYS = [0, 1, -1, 2]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(), (0,), (1,), (3,), (40,), (300,), (7, 9), (33, 41), (2, 3, 5)]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    elif dtype is torch.bool:
        t = torch.randint(0, 2, shape, generator=g).bool()
    else:
        t = torch.randint(0, 200, shape, generator=g).to(dtype)
    return nn.Parameter(t, requires_grad=False) if draw(st.integers(0, 9)) == 0 and dtype.is_floating_point else t


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=5),
)


def states(pool: list[torch.Tensor]) -> st.SearchStrategy[dict]:
    """Nested dicts (str, int and mixed keys, OrderedDicts), lists and tuples whose leaves are
    scalars or tensors of ``pool`` (one pool tensor drawn twice is one object at two paths)."""
    keys = st.one_of(st.sampled_from(STR_KEYS), st.sampled_from(INT_KEYS))
    leaves = st.one_of(st.sampled_from(pool), st.sampled_from(pool), SCALARS)
    nested = st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(keys, children, max_size=4),
            st.dictionaries(st.sampled_from(STR_KEYS), children, max_size=3).map(OrderedDict),
        ),
        max_leaves=12,
    )
    return st.dictionaries(keys, nested, min_size=1, max_size=5)


def tensor_positions(state: Any) -> tuple[dict[int, list[str]], list[str]]:
    """Where each tensor object is held (id → key paths, written as ckptstore writes them),
    and the key path of every value and container (to check that no two read alike)."""
    held: dict[int, list[str]] = {}
    every: list[str] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, torch.Tensor):
            held.setdefault(id(value), []).append(path)
            return
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
        for k, v in items:
            child = _join(path, k)
            every.append(child)
            walk(v, child)

    walk(state, "")
    return held, every


def assert_same_state(a: Any, b: Any, path: str = "") -> None:
    """Same structure and types (dict key order and key types included), tensors equal bit
    for bit with the same dtype, shape, kind and requires_grad, floats equal bit for bit."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} became {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad), path
        assert torch.equal(bits(a), bits(b)), f"{path}: bytes differ"
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], f"{path}: keys {list(a)} became {list(b)}"
        for k in a:
            assert_same_state(a[k], b[k], _join(path, k))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, _join(path, i))
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{path}: {a!r} became {b!r}"
    else:
        assert a == b, f"{path}: {a!r} became {b!r}"


def tensors_by_path(state: Any) -> dict[str, torch.Tensor]:
    held, _ = tensor_positions(state)
    objects = {id(t): t for t in _walk_tensors(state)}
    return {p: objects[i] for i, paths in held.items() for p in paths}


def _walk_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return [t for v in items for t in _walk_tensors(v)]


def change_in_place(t: torch.Tensor) -> None:
    """Change one element of ``t`` (so every alias of it changes) to another value."""
    with torch.no_grad():
        index = (0,) * t.dim()
        old = t[index].item()
        if t.dtype is torch.bool:
            t[index] = not old
        else:
            t[index] = 7 if old != 7 else 3


@pytest.mark.slow
@settings(max_examples=1000 if SOAK else 40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_commit_checkout_and_diff_over_random_states(data):
    pool = data.draw(st.lists(tensors(), min_size=1, max_size=5), label="pool")
    state = data.draw(states(pool), label="state")
    held, every = tensor_positions(state)
    assert len(every) == len(set(every)), f"two values at one key path: {sorted(every)}"

    # Tiny chunks: blobs of several chunks, inline blobs, and blobs of exactly one chunk.
    store = open_store("property", chunk_size_bytes=256, inline_threshold_bytes=32)
    first = store.commit(state)
    out = store.checkout(first.id)
    assert_same_state(state, out)
    got = tensors_by_path(out)
    for paths in held.values():  # each object is one object in the checkout, and only there
        assert all(got[p] is got[paths[0]] for p in paths), paths
    ids = {id(got[paths[0]]) for paths in held.values()}
    assert len(ids) == len(held)

    again = store.commit(state)
    d = store.diff(first.id, again.id)
    assert (d.added, d.removed, d.changed, d.values_changed) == ([], [], [], False)
    assert d.unchanged == sum(len(paths) for paths in held.values())

    changeable = [t for t in _walk_tensors(state) if t.numel()]
    if not changeable:
        return
    target = data.draw(st.sampled_from(changeable), label="changed tensor")
    change_in_place(target)
    after = store.commit(state)
    d = store.diff(again.id, after.id)
    assert sorted(c.path for c in d.changed) == sorted(held[id(target)])
    assert (d.added, d.removed, d.values_changed) == ([], [], False)
    assert d.unchanged == sum(len(paths) for i, paths in held.items() if i != id(target))
    assert_same_state(state, store.checkout(after.id))
