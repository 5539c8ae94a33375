"""The report: the machine a run measured on, and markdown tables. No torch."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from . import GB, MB
from .child import REPO

_VERSIONS = "import torch, safetensors, zstandard, xxhash; print(torch.__version__, safetensors.__version__, zstandard.__version__, xxhash.VERSION)"


def machine_info(workdir: str) -> dict:
    """Python, CPUs, RAM, library versions (asked of a child, so that this process need not
    import torch), the filesystem under ``workdir``, and the ckptstore commit (HEAD, ``+dirty``
    where ckptstore/ has uncommitted changes)."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "nproc": os.cpu_count()}
    try:
        import psutil

        info["ram_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    out = subprocess.run([sys.executable, "-c", _VERSIONS], capture_output=True, text=True, check=False).stdout.split()
    info.update(dict(zip(["torch", "safetensors", "zstandard", "xxhash"], out)))
    try:
        df = subprocess.run(["df", "-T", workdir], capture_output=True, text=True, check=False).stdout.splitlines()[-1].split()
        info["filesystem"] = {"device": df[0], "type": df[1]}
        rot = f"/sys/block/{os.path.basename(df[0])}/queue/rotational"
        if os.path.exists(rot):
            with open(rot) as f:
                info["filesystem"]["rotational"] = f.read().strip() == "1"
    except (OSError, IndexError):
        pass
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "ckptstore"], capture_output=True, text=True, check=False)
        if head.returncode == 0:
            info["ckptstore_commit"] = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
        info["cpu"] = m.group(1) if m else None
    except OSError:
        pass
    return info


def machine_line(m: dict) -> str:
    """``N CPUs (model), R GiB RAM, FS on DEVICE, Python X, torch Y, safetensors Z``."""
    fs = m.get("filesystem") or {}
    return (f"{m.get('nproc')} CPUs ({m.get('cpu')}), {m.get('ram_bytes', 0) / 2**30:.0f} GiB RAM, {fs.get('type')} on {fs.get('device')}, "
            f"Python {m.get('python')}, torch {m.get('torch')}, safetensors {m.get('safetensors')}")  # fmt: skip


def table_header(columns: Sequence[str], align: str) -> list[str]:
    """A markdown table's two header lines; ``align`` has a letter per column: ``l``eft,
    ``r``ight, ``c``entre."""
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    return ["| " + " | ".join(columns) + " |", "|" + "|".join(rule[a] for a in align) + "|"]


def table_row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def fmt_size(n: float) -> str:
    """``1.234 GB`` from 1 GB up, else ``12.3 MB`` (GB = 1e9 B, MB = 1e6 B)."""
    return f"{n / GB:.3f} GB" if n >= GB else f"{n / MB:,.1f} MB"
