"""Files on disk, read with care and written whole: the ground every format stands on.

Reading: a checkpoint file is opened non-blocking and must be a regular file (or a symlink to
one), so a FIFO cannot stall an import; JSON is read strictly (UTF-8, no key twice in one
object, every string valid Unicode, not nested too deeply), and anything else is
:class:`InvalidCheckpoint` naming the file.

Writing: every file this package writes goes through :func:`write_atomically` (a temp file
created exclusively under a random name, fsync'd, renamed or linked into place, the directory
fsync'd). An export never replaces what is at its target unless forced
(:func:`check_export_target`), holds a lock beside it (:func:`export_lock`), and turns every
failure of the filesystem into :class:`StorageError` naming the path (:func:`export_errors`).
File names from a commit are checked to be relative POSIX paths that stay inside their folder
(:func:`check_file_name`) before anything is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

from .._host import fsync_directory
from ..errors import (
    CkptStoreError,
    ExportBusy,
    InvalidCheckpoint,
    InvalidFileName,
    StorageError,
    TargetExists,
    UnsupportedValue,
)

#: The component that holds a checkpoint directory's other files (``config.json``, tokenizer
#: files, ``1_Pooling/config.json``): relative POSIX path → the file's bytes as a uint8 tensor.
FILES_KEY = "files"


def open_checkpoint_file(path: str) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file or a symlink to one. Anything
    else (a FIFO, a device, a directory) is :class:`InvalidCheckpoint`: it is opened
    non-blocking and checked before a byte is read, so a FIFO cannot stall an import."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidCheckpoint(path, "is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key it has twice (``json`` keeps the last one)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _invalid_text(value: Any) -> str | None:
    """The first string in ``value`` (dict keys included) that is not valid Unicode (a lone
    surrogate, which JSON's ``\\udcff`` escapes allow), or ``None``."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def parse_json(path: str, data: bytes) -> Any:
    """``data``, the contents of the file ``path``, as JSON: UTF-8, no key twice in one
    object, every string valid Unicode. Anything else is :class:`InvalidCheckpoint` naming
    ``path`` (never a raw decode or recursion error)."""
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise InvalidCheckpoint(path, "is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidCheckpoint(path, f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidCheckpoint(path, "holds JSON nested too deeply") from None
    except _DuplicateKey as exc:
        raise InvalidCheckpoint(path, f"has the key {exc.args[0]!r} twice in one object") from None
    bad = _invalid_text(value)
    if bad is not None:
        raise InvalidCheckpoint(path, f"holds a string that is not valid Unicode: {bad!r}")
    return value


def read_json_file(path: str) -> Any:
    """The JSON document in the regular file ``path`` (see :func:`parse_json`)."""
    with open_checkpoint_file(path) as f:
        return parse_json(path, f.read())


def write_atomically(path: str, write: Callable[[BinaryIO], Any], *, replace: bool = True) -> None:
    """Write the file ``path`` whole or not at all: the one way every file this package
    writes is written (exports, and the Trainer folder
    :func:`~ckptstore.integrations.huggingface.materialize` builds). ``write`` fills a temp
    file created exclusively (``O_EXCL``, so never through a planted symlink) under a random
    name in the same directory; it is fsync'd and renamed over ``path`` (or, unless
    ``replace``, hard-linked there, which fails with :class:`TargetExists` if anything is
    there by then, leaving it as it was), and the directory fsync'd."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".export-{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise TargetExists(path, "already exists") from None
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def check_file_name(name: Any) -> str:
    """``name`` if it is a relative POSIX path that stays inside its folder: ``/``-separated
    segments, none empty, ``.`` or ``..``, and no NUL; else :class:`InvalidFileName`."""
    if not isinstance(name, str) or not name:
        raise InvalidFileName(name, "is not a relative path")
    if name.startswith("/"):
        raise InvalidFileName(name, "is an absolute path; a file name must be relative to the folder it is written into")
    if "\0" in name:
        raise InvalidFileName(name, "holds a NUL character")
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidFileName(name, f"has a segment {segment!r}; only plain names separated by '/' stay inside the folder")
    return name


def check_files(files: Mapping[Any, Any]) -> dict[str, bytes | bytearray | memoryview]:
    """``files`` (relative POSIX path → bytes, or a 1-D uint8 tensor of them) with every name
    checked (:func:`check_file_name`; a name inside another file's name is
    :class:`InvalidFileName` too) and every value as bytes (else :class:`UnsupportedValue`)."""
    import torch

    out: dict[str, bytes | bytearray | memoryview] = {}
    for name, data in files.items():
        check_file_name(name)
        if isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and data.dim() == 1:
            out[name] = data.cpu().contiguous().numpy().data
        elif isinstance(data, (bytes, bytearray)):
            out[name] = data
        else:
            raise UnsupportedValue(f"{FILES_KEY}/{name}", "is not a file's bytes (a 1-D uint8 tensor)")
    for name in out:
        segments = name.split("/")
        for i in range(1, len(segments)):
            if "/".join(segments[:i]) in out:
                raise InvalidFileName(name, f"is inside {'/'.join(segments[:i])!r}, which is a file")
    return out


def write_files(directory: str, files: Mapping[Any, Any]) -> list[str]:
    """Write ``files`` (see :func:`check_files`) into the existing folder ``directory``,
    making subfolders as needed; returns their names. Every name is checked before anything
    is written, so no name (a commit is data from outside) can write outside ``directory``;
    nor is a symlink inside it followed. Each file is written whole or not at all."""
    checked = check_files(files)
    write_checked_files(directory, checked)
    return list(checked)


def write_checked_files(directory: str, files: Mapping[str, bytes | bytearray | memoryview]) -> None:
    for name, data in files.items():
        *folders, _ = name.split("/")
        parent = directory
        for folder in folders:
            parent = os.path.join(parent, folder)
            try:
                os.mkdir(parent)
            except FileExistsError:
                if os.path.islink(parent) or not os.path.isdir(parent):
                    raise NotADirectoryError(f"cannot write {name} into {directory}: {parent} is not a folder") from None

        def write(f: BinaryIO, data: bytes | bytearray | memoryview = data) -> None:
            f.write(data)

        write_atomically(os.path.join(directory, name), write)


def check_export_target(path: str, *, directory: bool, force: bool = False) -> None:
    """Refuse an export to ``path`` (a ``directory``, or else one file) before anything is
    read or written. :class:`TargetExists` if a file (or symlink) is there, or a directory
    with entries, unless ``force``; an empty directory is exported into. :class:`StorageError`
    naming the path, forced or not, if its parent is missing or not a directory, the target
    is of the other kind (a file where a directory goes, or the reverse), which no export
    replaces, or the filesystem refuses to tell."""
    target = os.path.realpath(path) if directory else os.path.abspath(path)
    parent = os.path.dirname(target)
    with export_errors(path):
        try:
            if not stat.S_ISDIR(os.stat(parent).st_mode):
                raise NotADirectoryError
        except FileNotFoundError:
            raise StorageError(f"cannot export to {path}: its parent directory {parent} does not exist") from None
        except NotADirectoryError:
            raise StorageError(f"cannot export to {path}: {parent} is not a directory") from None
        try:
            mode = os.lstat(target).st_mode
        except FileNotFoundError:
            return
        kind = "directory" if directory else "file"
        if stat.S_ISDIR(mode) != directory:
            there = "a file" if directory else "a directory"
            raise StorageError(f"cannot export a {kind} to {path}: {there} is there, which an export never replaces with a {kind}")
        if force:
            return
        if not directory:
            raise TargetExists(path, "already exists")
        with os.scandir(target) as entries:
            if next(entries, None) is not None:
                raise TargetExists(path, "is a directory with files in it")


@contextlib.contextmanager
def export_errors(path: str) -> Iterator[None]:
    """Turn a failure of the filesystem in the block (permission denied, read-only, full) into
    :class:`StorageError` naming ``path`` and the file at fault; ours pass as they are."""
    try:
        yield
    except CkptStoreError:
        raise
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and exc.filename != path else ""
        raise StorageError(f"cannot export to {path}: {exc.strerror or exc}{where}") from exc


@contextlib.contextmanager
def export_lock(target: str) -> Iterator[None]:
    """Hold the export lock of ``target`` (an absolute path) for the block: the file
    ``.NAME.export-lock`` beside it, ``flock``-ed while held. Another export of ``target``
    meanwhile raises :class:`ExportBusy` at once. The kernel drops the flock of a holder
    that dies, so a lock file a killed exporter left is taken over at once (no pid or clock
    is consulted)."""
    parent, name = os.path.split(target)
    lock = os.path.join(parent, f".{name}.export-lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ExportBusy(target) from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed this lock file as we opened it: take a fresh one
    try:
        yield
    finally:
        try:
            os.unlink(lock)  # while still flock-ed: an exporter that opened it sees it gone
        finally:
            os.close(fd)
