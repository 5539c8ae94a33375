"""The parent's side of the one-operation-per-process protocol: a benchmark script re-invokes
itself (``python bench/NAME.py --op OP ... --result PATH``) for every measured operation, so
that the operation's peak RSS is its own; the child writes its result to ``PATH`` as JSON
(:func:`serve`), the parent reads it (:meth:`Children.run`). No torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from .files import load1

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(**extra: str) -> dict:
    """This process's environment with the repository first on ``PYTHONPATH`` (children import
    the ckptstore of this checkout), and ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def _op(argv: list[str]) -> str:
    return argv[argv.index("--op") + 1] if "--op" in argv[:-1] else " ".join(argv)


class Children:
    """Runs children of ``script`` (an absolute path) one at a time, each writing its result
    to a fresh ``.result-N.json`` under ``workdir`` (removed once read)."""

    def __init__(self, script: str, workdir: str, **env: str) -> None:
        self.script, self.workdir, self.env = script, workdir, child_env(**env)
        self.count = 0

    def _result_path(self, kind: str) -> str:
        self.count += 1
        path = os.path.join(self.workdir, f".{kind}-{self.count}.json")
        if os.path.exists(path):
            os.unlink(path)
        return path

    def run(self, argv: list[str]) -> dict:
        """Run ``script *argv --result PATH``; its result, with ``load1``: the load average
        just before it started. SystemExit (after echoing its output) if it fails."""
        result_path = self._result_path("result")
        load = load1()
        cmd = [sys.executable, self.script, *argv, "--result", result_path]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"child {_op(argv)} failed with exit status {proc.returncode}")
        with open(result_path) as f:
            result = json.load(f)
        os.unlink(result_path)
        result["load1"] = load
        return result

    def start_server(self, argv: list[str]) -> tuple[subprocess.Popen, int]:
        """Start a long-running child that writes ``{"port": N}`` to its ``--result`` once it
        listens (:func:`write_port`); (the process, N). Stop it with :func:`stop_server`."""
        result_path = self._result_path("server")
        p = subprocess.Popen([sys.executable, self.script, *argv, "--result", result_path], env=self.env)
        for _ in range(600):
            if os.path.exists(result_path):
                with open(result_path) as f:
                    return p, json.load(f)["port"]
            if p.poll() is not None:
                raise SystemExit(f"{_op(argv)} exited with status {p.returncode}")
            time.sleep(0.1)
        p.terminate()
        raise SystemExit(f"{_op(argv)} did not start")


def stop_server(p: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def write_port(path: str, port: int) -> None:
    """A server child's answer; atomic: the parent never reads a half-written file."""
    with open(path + ".tmp", "w") as f:
        json.dump({"port": port}, f)
    os.replace(path + ".tmp", path)


def serve(args: Any, run_child: Callable[[Any], dict]) -> int:
    """The child's side: run the operation ``args.op`` and write its result to ``args.result``."""
    result = run_child(args)
    with open(args.result, "w") as f:
        json.dump(result, f)
    return 0
