"""Fork-and-kill, shared by the crash tests: a long-lived child that has imported torch and
ckptstore once forks a fresh process per job, and SIGKILLs it on request.

Protocol, one line each way: the parent writes ``go {json}``; the forker forks, the job runs
in the grandchild, and when that process has ended (exited, or killed ``kill_after_s``
seconds after the fork) the forker answers ``exit CODE SECONDS``. Anything the job printed
comes before that line.

:func:`serve` is the forker's side (``crash_child.py forker``, ``gc_child.py gc-forker``);
:class:`Forker` the test's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: How often the forker checks whether a job it must kill has ended.
POLL_S = 0.0002


def say(line: str) -> None:
    """Print one line with one write(2): a process killed mid-print (stdout is unbuffered
    under PYTHONUNBUFFERED) must not leave half a line for the forker's next one."""
    os.write(1, (line + "\n").encode())


def serve(job: Callable[[dict, float], int | None]) -> None:
    """Run ``job(go, started)`` in a forked process for every ``go`` line on stdin; its exit
    code is what it returns (``None``: 0), or 1 after an exception (traceback to stderr)."""
    say("ready")
    for line in sys.stdin:
        if not line.startswith("go "):
            break
        go = json.loads(line[3:])
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = job(go, started) or 0
            except BaseException:  # noqa: BLE001 - reported through stderr and the exit code
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = None if go.get("kill_after_s") is None else started + go["kill_after_s"]
        while True:
            done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
            if done:
                break
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)  # our own child, not yet reaped
                deadline = None
            else:
                time.sleep(POLL_S)
        say(f"exit {os.waitstatus_to_exitcode(status)} {time.monotonic() - started:.6f}")


class Forker:
    """The test's side: starts ``argv`` (a forker serving :func:`serve`) and runs jobs in it."""

    def __init__(self, argv: list[str], tmp_path: Path, *, env: dict[str, str] | None = None) -> None:
        self.stderr_path = tmp_path / "forker.stderr"
        self.stderr = open(self.stderr_path, "w")  # noqa: SIM115 - the forker's stderr, closed in close()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            env=dict(os.environ) if env is None else env, text=True,
        )  # fmt: skip
        self.ready = False

    def errors(self) -> str:
        """The end of what the forker and its jobs wrote to stderr."""
        self.stderr.flush()
        return self.stderr_path.read_text()[-4000:]

    def run(self, go: dict[str, Any]) -> tuple[int, float, list[str]]:
        """Run one job in a fresh process; return its exit code (``-SIGKILL`` if killed),
        how long it ran, and the lines it printed."""
        if not self.ready:
            assert self.proc.stdout.readline() == "ready\n", self.errors()
            self.ready = True
        self.proc.stdin.write("go " + json.dumps(go) + "\n")
        self.proc.stdin.flush()
        lines = []
        while True:
            line = self.proc.stdout.readline()
            assert line, f"the forker died: {self.errors()}"
            found = re.search(r"exit (-?[0-9]+) ([0-9.]+)\n$", line)
            if found:  # (after half a line, should a killed job ever leave one)
                if found.start():
                    lines.append(line[: found.start()])
                return int(found[1]), float(found[2]), lines
            lines.append(line.rstrip("\n"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
