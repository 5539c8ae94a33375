"""Several processes committing to one branch: one linear history, nothing lost."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import ckptstore

WRITERS = 4
COMMITS_EACH = 10

WRITER = textwrap.dedent(
    """
    import sys, torch, ckptstore
    url, options, writer, count = sys.argv[1], eval(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    store = ckptstore.open(url, storage_options=options, chunk_size_bytes=4096, inline_threshold_bytes=256)
    for i in range(count):
        state = {"weights": torch.full((2000,), float(writer * 1000 + i)), "shared": torch.ones(3000)}
        store.commit(state, message=f"w{writer}-{i}", metadata={"writer": writer, "i": i})
    """
)


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_concurrent_writers_build_one_linear_history(backend, tmp_path, request):
    url, options = (str(tmp_path / "store"), {}) if backend == "local" else request.getfixturevalue("s3_url")
    ckptstore.open(url, storage_options=options)  # create it once, before the race
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, repr(options), str(w), str(COMMITS_EACH)],
            env={**os.environ, "CKPTSTORE_CACHE_DIR": str(tmp_path / f"cache-{w}")},
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(WRITERS)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err

    store = ckptstore.open(url, storage_options=options)
    history = store.log("main")
    assert len(history) == WRITERS * COMMITS_EACH
    assert not history[-1].parents
    for newer, older in zip(history, history[1:]):
        assert newer.parents == (older.id,)
    seen = {(c.metadata["writer"], c.metadata["i"]) for c in history}
    assert seen == {(w, i) for w in range(WRITERS) for i in range(COMMITS_EACH)}
    # Each writer's own commits keep their order.
    for w in range(WRITERS):
        order = [c.metadata["i"] for c in reversed(history) if c.metadata["writer"] == w]
        assert order == list(range(COMMITS_EACH))
    # Every commit in history is complete and checks out to what its writer committed.
    for commit in history[:: max(1, len(history) // 8)]:
        w, i = commit.metadata["writer"], commit.metadata["i"]
        assert store.checkout(commit.id)["weights"][0].item() == w * 1000 + i
    assert store.resolve("latest") == history[0].id
