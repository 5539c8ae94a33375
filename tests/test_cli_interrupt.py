"""Ctrl-C during ``ckpt import``: a real ``ckpt import`` child (``python -m ckptstore``, with Ctrl-C as a
terminal gives it) gets SIGINT once it has stored some chunks. It exits with status 130 and says what it leaves behind (the
chunks it stored that no commit references, their size, and that ``ckpt gc`` reclaims them
after the grace period); a later ``gc --grace-period 0s`` reclaims exactly those and leaves a
store that fsck finds sound."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import ckptstore
from ckptstore.cli.output import human_bytes
from ckptstore.gc import DEFAULT_GRACE_PERIOD_S

REPO = Path(__file__).resolve().parent.parent


#: ``python -m ckptstore ARGS`` as a terminal starts it: Ctrl-C raises KeyboardInterrupt. A
#: process started with SIGINT ignored (a background job of a non-interactive shell, as a CI
#: script may run this suite) passes that on, and Python then leaves it ignored.
_AS_FROM_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'ckpt'; runpy.run_module('ckptstore', run_name='__main__', alter_sys=True)"
)


def _ckpt(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CKPTSTORE_URL", None)
    return subprocess.Popen([sys.executable, "-c", _AS_FROM_A_TERMINAL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def _run(*args: str) -> tuple[int, str, str]:
    child = _ckpt(*args)
    out, err = child.communicate(timeout=120)
    return child.returncode, out, err


def _chunk_files(store_dir: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(store_dir / "chunks"))


def test_ctrl_c_during_import_says_what_it_leaves_and_gc_reclaims_it(tmp_path):
    big = tmp_path / "big.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({f"t{i}": torch.randn(2_000_000, generator=gen) for i in range(12)}, str(big))  # 96 MB, incompressible
    store_dir = tmp_path / "store"
    url = str(store_dir)
    assert _run("--store", url, "init", "--chunk-size", "64KiB")[0] == 0  # about 1,500 chunks to write

    child = _ckpt("--store", url, "import", str(big))
    deadline = time.monotonic() + 60
    while _chunk_files(store_dir) < 20:
        assert child.poll() is None, f"the import ended before it was interrupted: {child.communicate()}"
        assert time.monotonic() < deadline, "the import stored no chunks in 60 s"
        time.sleep(0.005)
    child.send_signal(signal.SIGINT)
    sent = f"sent at {time.monotonic() - deadline + 60:.2f} s, {_chunk_files(store_dir)} chunks stored then"
    out, err = child.communicate(timeout=60)

    # What this process passes on to the child (a disposition or mask that ignores SIGINT would be inherited).
    passed_on = f"SIGINT here: {signal.getsignal(signal.SIGINT)}, blocked here: {signal.pthread_sigmask(signal.SIG_BLOCK, [])}"
    assert child.returncode == 130, (sent, passed_on, out, err)
    with ckptstore.open(url, create=False) as store:
        left = store.objects.list_info("chunks/") + store.objects.list_info("manifests/")
        chunks = len(store.objects.list_info("chunks/"))
        assert store.branches() == {} and store.objects.list("commits/") == []
    assert 20 <= chunks < 1400, "the interrupt came too late to test anything"
    manifests = len(left) - chunks
    expected = (
        f"interrupted: {chunks} chunks" + (f" and {manifests} manifests" if manifests else "")
        + f" ({human_bytes(sum(info.size_bytes for info in left))}) written and not referenced by any commit; "
        "`ckpt gc` reclaims them after the grace period (1h)"
    )  # fmt: skip
    assert err.splitlines()[-1] == expected, err
    assert DEFAULT_GRACE_PERIOD_S == 3600 and "Traceback" not in err

    # The grace period protects them from a plain gc; without it, gc reclaims exactly those.
    code, out, err = _run("--store", url, "gc")
    assert code == 0 and re.search(r"deleted 0 objects", out), out + err
    code, out, err = _run("--store", url, "gc", "--grace-period", "0s")
    assert code == 0, err
    assert f"deleted {len(left)} objects ({sum(info.size_bytes for info in left):,} bytes)" in out, out
    assert _chunk_files(store_dir) == 0
    code, out, err = _run("--store", url, "fsck")
    assert code == 0 and out.startswith("structure ok (data not read; use --read-data): checked 0 commits, 0 manifests, 0 chunks; 0 orphan objects"), out + err
