"""Files on disk and in the page cache: durable writes, disk usage, evicting and counting
cached pages, and the machine's load average. No torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_with_directory(path: str) -> None:
    """fsync ``path`` and the directory that holds it, so that a new file's name is as
    durable as its bytes (what every peer's save is timed with)."""
    fsync_path(path)
    fsync_path(os.path.dirname(path))


def disk_usage(path: str) -> tuple[int, int]:
    """(allocated bytes as ``du`` counts them, apparent bytes) of a file or a directory tree;
    a file with several names is counted once."""
    if os.path.isfile(path):
        st = os.stat(path)
        return st.st_blocks * 512, st.st_size
    alloc = apparent = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            alloc += st.st_blocks * 512
            apparent += st.st_size
    return alloc, apparent


def drop_page_cache() -> bool:
    """sync + drop the whole machine's page cache; False where not permitted (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def iter_files(path: str) -> Iterator[str]:
    """``path`` itself if it is a file, else every file under it."""
    if os.path.isfile(path):
        yield path
        return
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            yield os.path.join(dirpath, name)


def evict(path: str) -> None:
    """Drop every file under ``path`` from the page cache (clean pages only, hence the
    sync first). Unlike ``echo 3 > drop_caches`` it touches nothing else on the machine."""
    os.sync()
    for file in iter_files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(path: str) -> int | None:
    """Bytes of the files under ``path`` in the page cache (util-linux ``fincore``); None
    where fincore is missing or fails."""
    files = list(iter_files(path))
    if not files or shutil.which("fincore") is None:
        return None
    total = 0
    for start in range(0, len(files), 200):
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", *files[start : start + 200]],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            return None
        total += sum(int(x) for x in out.stdout.split())
    return total


def load1() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, max_wait_s: float) -> float:
    """Wait (at most ``max_wait_s``) until the 1-minute load average is ≤ ``max_load``;
    return the load average then."""
    t0 = time.time()
    while load1() > max_load and time.time() - t0 < max_wait_s:
        time.sleep(5)
    return load1()
