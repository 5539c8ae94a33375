"""Measure one operation in this process: wall time, CPU time (this process's, and every
other process's on the machine), minor page faults, and peak RSS. No torch."""

from __future__ import annotations

import gc
import os
import re
import resource
import time
from typing import Any, Self


def status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``…) in bytes; -1 if absent."""
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(m.group(1)) * 1024 if m else -1


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _proc_stat() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine: user+nice+system+irq+softirq, steal seconds)
    from the first line of /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / hz, v[7] / hz
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


class Measure:
    """``with Measure() as m: op()``: RSS before, VmHWM after (reset in between, so "extra
    peak RSS" is exactly what the operation added), wall and CPU time. ``profile``: a path to
    write a cProfile ``.pstats`` of the operation to."""

    def __init__(self, *, profile: str | None = None) -> None:
        self.profile = profile
        self.profiler: Any = None

    def __enter__(self) -> Self:
        import psutil

        gc.collect()
        self.proc = psutil.Process()
        self.rss_before = self.proc.memory_info().rss
        self.exact = reset_peak_rss()
        self.ru_before = ru_maxrss_bytes()
        c = self.proc.cpu_times()
        self.cpu0 = c.user + c.system
        self.minflt0 = _minflt()
        self.busy0, self.steal0 = _proc_stat()
        if self.profile:
            import cProfile

            self.profiler = cProfile.Profile()
            self.profiler.enable()
        self.wall0 = time.time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> bool:
        self.seconds = time.perf_counter() - self.t0
        self.wall1 = time.time()
        if self.profiler is not None:
            self.profiler.disable()
            self.profiler.dump_stats(self.profile)
        c = self.proc.cpu_times()
        self.cpu_s = c.user + c.system - self.cpu0
        self.minflt = _minflt() - self.minflt0
        busy, steal = _proc_stat()
        self.steal = steal - self.steal0
        self.others = busy - self.busy0 - self.cpu_s  # CPU used by every other process (and kernel threads)
        self.peak = self.peak_now()
        return False

    def peak_now(self) -> int | None:
        """This process's peak RSS since the reset (or since start where it was refused)."""
        return status_bytes("VmHWM") if self.exact else max(ru_maxrss_bytes(), self.ru_before)

    def result(self) -> dict:
        return {"seconds": self.seconds, "cpu_s": self.cpu_s, "minor_faults": self.minflt, "steal_s": self.steal,
                "others_cpu_s": self.others, "wall": [self.wall0, self.wall1], "rss_before": self.rss_before,
                "peak_rss": self.peak, "extra_peak_rss": self.peak - self.rss_before, "peak_exact": self.exact}  # fmt: skip
