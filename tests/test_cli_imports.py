"""``ckpt`` commands that touch no tensor data start without torch or numpy.

torch takes a second or more to import, numpy a tenth of one; ``log``, ``branch`` or ``show``
read only refs, commits and manifests, so they must not pay for either. Each command runs in
a fresh interpreter that calls ``ckptstore.cli.main`` (what the ``ckpt`` script calls) and
then reports which of the two modules it imported. A command that does handle tensors
(``export``) is run the same way, to show it still works (and that the check sees torch when
it is there).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckptstore
from ckptstore.retention import KeepLast

HEAVY = ("torch", "numpy")

_RUN = textwrap.dedent(
    f"""
    import json, sys
    from ckptstore.cli import main

    try:
        main(sys.argv[2:])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    with open(sys.argv[1], "w") as f:
        json.dump({{"code": code, "imported": [m for m in {HEAVY!r} if m in sys.modules]}}, f)
    """
)


def run_ckpt(tmp_path: Path, *args: str) -> tuple[int, list[str], str]:
    """Run ``ckpt ARGS`` in a fresh interpreter: (exit status, heavy modules imported, output)."""
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-c", _RUN, str(report), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and report.exists(), proc.stderr
    result = json.loads(report.read_text())
    return result["code"], result["imported"], proc.stdout + proc.stderr


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    model = {"w": torch.randn(64, 32, generator=g), "b": torch.zeros(64, dtype=torch.bfloat16), "steps": torch.tensor(step)}
    return {"model": model, "optimizer": {"m": torch.randn(64, 32, generator=g)}, "step": step}


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store with history on two branches, tags, and a collection behind it: 6 commits on
    main, 2 on ``feature``, ``v1`` and ``doomed-tag`` tags, a ``doomed`` branch; then a gc
    that keeps each branch's 3 newest (main's first two commits are collected)."""
    url = str(tmp_path_factory.mktemp("cli-imports") / "store")
    with ckptstore.open(url, create=True) as store:
        for step in range(6):
            store.commit(_state(step), message=f"step {step}", metrics={"eval_loss": 2.0 - step / 10})
            if step == 2:
                store.branch("feature")
                for extra in (100, 101):
                    store.commit(_state(extra), branch="feature", message=f"feature {extra}")
        store.tag("v1", at="main~1")
        store.tag("doomed-tag", at="main~2")
        store.branch("doomed", at="main~1")
        plan = store.gc(KeepLast(3), grace_period_s=0)
        assert plan.removed_commits, "the fixture's gc should collect something"
    return url


NO_TENSOR_COMMANDS = [
    ["--version"],
    ["--help"],
    ["log", "--help"],
    ["log"],
    ["log", "-n", "2"],
    ["log", "--oneline"],
    ["log", "--graph"],
    ["log", "--json"],
    ["log", "feature"],
    ["show"],
    ["show", "main~1"],
    ["show", "--json", "v1"],
    ["branch"],
    ["branch", "--json"],
    ["branch", "fresh", "main~1"],
    ["branch", "-d", "doomed"],
    ["tag"],
    ["tag", "fresh-tag", "main"],
    ["tag", "-d", "doomed-tag"],
    ["rev-parse", "main~2"],
    ["du"],
    ["du", "--commits", "--json"],
    ["gc", "--dry-run", "--keep-last", "1"],
    ["gc", "--dry-run", "--json"],
    ["fsck"],
    ["fsck", "--json"],
]


@pytest.mark.parametrize("args", NO_TENSOR_COMMANDS, ids=" ".join)
def test_command_imports_neither_torch_nor_numpy(store_url: str, tmp_path: Path, args: list[str]) -> None:
    code, imported, output = run_ckpt(tmp_path, "--store", store_url, *args)
    assert code == 0, output
    assert imported == [], f"ckpt {' '.join(args)} imported {imported}"


def test_init_imports_neither(tmp_path: Path) -> None:
    url = str(tmp_path / "new-store")
    code, imported, output = run_ckpt(tmp_path, "--store", url, "init", "--delta", "auto")
    assert code == 0, output
    assert imported == []
    assert ckptstore.open(url).config.delta == "auto"


def test_importing_the_package_loads_neither() -> None:
    code = f"import sys, ckptstore; ckptstore.open; ckptstore.Store; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip() == "[]"


def test_export_still_reads_tensors(store_url: str, tmp_path: Path) -> None:
    target = tmp_path / "out"
    code, imported, output = run_ckpt(tmp_path, "--store", store_url, "export", "main", str(target))
    assert code == 0, output
    assert "torch" in imported  # the check sees torch where a command needs it
    with ckptstore.open(store_url) as store:
        model = store.checkout("main")["model"]
    exported = load_file(str(target / "model.safetensors"))
    assert exported.keys() == model.keys()
    for name, tensor in model.items():
        assert torch.equal(exported[name], tensor), name


def test_dtype_info_agrees_with_torch() -> None:
    """The dtype facts a manifest is read with (no torch needed) are torch's own."""
    from ckptstore.codec import DTYPE_INFO, torch_dtypes

    assert set(torch_dtypes()) == set(DTYPE_INFO)
    for name, info in DTYPE_INFO.items():
        dtype = getattr(torch, name)
        assert (info.itemsize, info.is_floating_point, info.is_complex) == (dtype.itemsize, dtype.is_floating_point, dtype.is_complex), name
