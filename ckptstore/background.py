"""Asynchronous commits: one worker per store, in call order, never lost at exit.

``Store.commit(..., blocking=False)`` hands the write of a snapshot to a :class:`CommitQueue`
and returns a :class:`CommitFuture`. The queue runs one commit at a time, in the order they
were made (a blocking commit waits for the queue first, so a branch's commits land in call
order).

A commit still pending when the process ends is finished, not dropped: a hook that runs at
interpreter exit, before the standard thread pools stop taking work, waits for every queue.
A commit that failed and whose future nobody looked at is reported on stderr and in the
log, and the process then exits with status 1, so a job scheduler sees the loss. SIGTERM (a
preemption, ``docker stop``) would kill the process without any of this: from the first
asynchronous commit on, a SIGTERM whose handler is still the default one raises
``SystemExit(143)`` in the main thread instead, so the process exits normally and the hook
runs (a program or launcher that handles SIGTERM itself keeps its handler).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Any, TypeVar

log = logging.getLogger("ckptstore")

T = TypeVar("T")


class CommitFuture(Future[T]):
    """The outcome of an asynchronous commit. Calling :meth:`result` or :meth:`exception`
    counts as having seen it: a failure nobody saw is reported when the store closes or the
    process exits."""

    seen = False

    def result(self, timeout: float | None = None) -> T:
        self.seen = True
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.seen = True
        return super().exception(timeout)


class CommitQueue:
    """Runs a store's asynchronous commits one at a time, in order. Thread-safe."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.RLock()  #: held while a commit is queued, or a blocking one runs
        self._executor: ThreadPoolExecutor | None = None
        self._pending: CommitFuture[Any] | None = None
        self._failed: list[CommitFuture[Any]] = []

    def submit(self, fn: Callable[[], T]) -> CommitFuture[T]:
        """Queue ``fn`` after the commits queued before it. Call with :attr:`lock` held."""
        future: CommitFuture[T] = CommitFuture()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - it is the future's outcome
                log.error("asynchronous commit to %s failed: %s", self.name, exc)
                self._failed.append(future)
                future.set_exception(exc)

        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptstore-commit")
            _QUEUES.add(self)
            _handle_sigterm()
        self._pending = future
        self._executor.submit(run)
        return future

    def wait(self) -> None:
        """Wait until every queued commit has finished (succeeded or failed)."""
        pending = self._pending
        if pending is not None:
            wait_for([pending])

    def unseen_failures(self) -> list[CommitFuture[Any]]:
        """Commits that failed and whose future nobody looked at; marked seen now."""
        out = [f for f in self._failed if not f.seen]
        for f in out:
            f.seen = True
        self._failed = [f for f in self._failed if not f.seen]
        return out

    def flush(self) -> None:
        """Wait for the queued commits; raise the error of one that failed unseen."""
        self.wait()
        failures = self.unseen_failures()
        if failures:
            error = failures[0].exception()
            assert error is not None  # a failed future holds its exception
            raise error

    def close(self) -> None:
        """Wait for the queued commits and stop the worker. Idempotent."""
        self.wait()
        with self.lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            _QUEUES.discard(self)


_QUEUES: weakref.WeakSet[CommitQueue] = weakref.WeakSet()
_LOST_AT_EXIT: list[str] = []


def _forget_after_fork() -> None:  # a forked child has none of its parent's worker threads
    _QUEUES.clear()
    _LOST_AT_EXIT.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def _finish_at_exit() -> None:
    """At interpreter exit, before thread pools stop taking work: finish every queued
    commit, and report those that failed unseen."""
    for queue in list(_QUEUES):
        try:
            queue.wait()
        except BaseException as exc:  # noqa: BLE001 - an exit hook must not raise
            _LOST_AT_EXIT.append(f"{queue.name}: {exc}")
            continue
        for future in queue.unseen_failures():
            _LOST_AT_EXIT.append(f"{queue.name}: {future.exception()}")
    for line in _LOST_AT_EXIT:
        message = f"ckptstore: an asynchronous commit pending at exit failed, so its checkpoint was not stored ({line})"
        if log.hasHandlers():  # (unconfigured, logging would print it to stderr a second time)
            log.critical(message)
        print(message, file=sys.stderr, flush=True)


def _exit_status() -> None:
    """Runs among the last exit hooks: a commit lost at exit makes the exit status 1."""
    if _LOST_AT_EXIT:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(1)


# concurrent.futures stops its pools from a hook of the same kind, registered when it was
# imported (above); hooks run last-registered first, so this one runs while pools still work.
_register_before_pools_stop = getattr(threading, "_register_atexit", atexit.register)
_register_before_pools_stop(_finish_at_exit)
atexit.register(_exit_status)  # registered early, so it runs after the hooks registered later

_SIGTERM_HANDLED = False


def _handle_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit(143)`` in the main thread, if nothing else handles it,
    so queued commits are finished before the process ends. Once per process."""
    global _SIGTERM_HANDLED
    if _SIGTERM_HANDLED or threading.current_thread() is not threading.main_thread():
        return
    _SIGTERM_HANDLED = True
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the program (or a launcher: torchrun, a framework) handles it
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    except (ValueError, OSError):  # not the main interpreter, or no such signal here
        pass


def _exit_on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise SystemExit(128 + signum)
