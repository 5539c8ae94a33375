"""Child processes for tests/test_commit_semantics.py.

``python tests/commit_child.py exit DIRECTORY HOW...`` imports torch and ckptstore once, then
forks one child per ``HOW`` (before any store, thread or signal handler of ckptstore exists,
so each is what a fresh script would be after its imports). Each child opens the local store
``DIRECTORY/HOW``, makes an asynchronous commit of :func:`big_state` (or, for
``checkpointer``, saves it through a :class:`~ckptstore.integrations.training.Checkpointer` with
``blocking=False``), prints ``pending`` if the commit has not finished yet, and ends as
``HOW`` says, through the interpreter's normal exit (its output goes to ``DIRECTORY/HOW.out``
and ``.err``):

``end``          the script just ends
``raise``        an uncaught exception
``exit``         ``sys.exit(0)``
``sigterm``      it sends itself SIGTERM (no handler of its own)
``fail-unseen``  the commit fails in the worker (``chunks`` is a regular file, so every
                 chunk write fails with an OS error); nobody looks at its future
``fail-seen``    the same, but the script calls ``future.exception()`` and prints it
``checkpointer`` ``Checkpointer.save(7, blocking=False)``, then the script ends

The parent prints ``{HOW: return code}`` as JSON (a negative code: killed by that signal).

``python tests/commit_child.py skewed BRANCH SKEW_S STORE [SKEW_S STORE...]`` commits
:func:`small_state` on ``BRANCH`` of each ``STORE`` while its wall clock is ``SKEW_S`` seconds
ahead (``time.time`` and ``datetime.now`` are set before ckptstore is imported; the
storage's clock is unaffected), and prints ``STORE COMMIT_ID`` for each.

Only the standard library is imported at the top (a skewed child sets its clock first), and
every state is a pure function of its arguments, so the parent recomputes what each commit
must hold.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

#: A state large enough that its asynchronous commit is still being written when the script
#: that made it ends: 4 float32 tensors of 1M elements (16 MiB), in 128 KiB chunks.
BIG_TENSORS = 4
BIG_NUMEL = 1 << 20
CHUNK_SIZE_BYTES = 128 << 10


def big_state(seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(BIG_NUMEL, generator=generator) for i in range(BIG_TENSORS)}


def small_state(seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(1000, generator=generator), "step": seed}


def fork_exit_cases(directory: str, cases: list[str]) -> str | None:
    """In the parent: fork a child per case, wait for them all, print their return codes and
    return ``None``. In a child: return its case, with stdout and stderr sent to files."""
    import torch  # noqa: F401 - imported once, for every child

    import ckptstore  # noqa: F401

    sys.stdout.flush()
    sys.stderr.flush()
    children = {}
    for how in cases:
        pid = os.fork()
        if pid == 0:
            for fd, suffix in ((1, "out"), (2, "err")):
                out = os.open(os.path.join(directory, f"{how}.{suffix}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(out, fd)
                os.close(out)
            return how
        children[pid] = how
    codes = {how: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid, how in children.items()}
    print(json.dumps(codes), flush=True)
    return None


def exit_after_async_commit(how: str, root: str) -> None:
    import torch

    import ckptstore
    from ckptstore.integrations.training import Checkpointer

    store = ckptstore.open(root, chunk_size_bytes=CHUNK_SIZE_BYTES)
    if how.startswith("fail"):
        # Every chunk lands under chunks/XX/: with a regular file there, each write fails.
        with open(os.path.join(root, "chunks"), "w") as f:
            f.write("not a directory\n")
    if how == "checkpointer":

        class Model(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                for name, tensor in big_state(1).items():
                    self.register_buffer(name.replace(".", "_"), tensor)

        future = Checkpointer(store, model=Model()).save(7, blocking=False)
    else:
        future = store.commit(big_state(1), message=how, blocking=False)
    if not future.done():
        print("pending", flush=True)
    if how == "raise":
        raise RuntimeError("the training loop crashed")
    if how == "exit":
        sys.exit(0)
    if how == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        print("SIGTERM did not end the process", flush=True)
    if how == "fail-seen":
        print(f"seen: {future.exception()!r}", flush=True)


def commit_with_skewed_clock(branch: str, stores: list[tuple[float, str]]) -> None:
    import datetime

    real_time = time.time
    skew_s = 0.0
    time.time = lambda: real_time() + skew_s

    class SkewedDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return datetime.datetime.fromtimestamp(time.time(), tz)

    datetime.datetime = SkewedDatetime  # type: ignore[misc]

    import ckptstore

    for skew_s, root in stores:
        try:
            commit = ckptstore.open(root).commit(small_state(2), branch=branch, message=f"clock {skew_s:+g} s")
        except ckptstore.CkptStoreError as exc:
            print(root, f"{type(exc).__name__}: {exc}", flush=True)
        else:
            print(root, commit.id, flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "exit":
        case = fork_exit_cases(args[0], args[1:])
        if case is not None:  # a child: run the case here, then end as a script does
            exit_after_async_commit(case, os.path.join(args[0], case))
    elif mode == "skewed":
        commit_with_skewed_clock(args[0], [(float(skew), root) for skew, root in zip(args[1::2], args[2::2])])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
