"""Exporting a Hugging Face style directory whole: built beside the target, then swapped in.

Writing never replaces what is at the target unless forced (an existing directory with
entries is :class:`TargetExists`). It takes a lock beside the target (:class:`ExportBusy` for
a second export to it at the same time; a killed exporter's lock is taken over), writes every
file with :func:`~.files.write_atomically` into a new folder beside the target, and swaps that
folder in (:func:`write_directory`); an export killed between the two renames of the swap is
put back by the next. File names are ours (``model.safetensors``,
``model-00001-of-00003.safetensors``) or those of a commit's ``files``, each checked to be a
relative POSIX path without ``..`` before anything is written; tensor names only ever go
inside the files, so no name can make an export write outside its directory.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .._host import fsync_directory
from .files import (
    check_export_target,
    check_files,
    export_errors,
    export_lock,
    write_checked_files,
)
from .safetensors import ExportedTensor, write_shards

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ckptstore.shards")


def write_directory(
    directory: str,
    shards: list[list[ExportedTensor]],
    read_shard: Callable[[list[ExportedTensor]], Mapping[str, torch.Tensor]],
    *,
    files: Mapping[Any, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    force: bool = False,
) -> list[str]:
    """Write ``shards`` as the Hugging Face style directory ``directory``:
    ``model.safetensors`` (one shard) or numbered shards plus
    ``model.safetensors.index.json``; ``read_shard`` returns one shard's tensors by name.
    ``files`` (relative POSIX path → bytes: ``config.json``, tokenizer files,
    ``1_Pooling/config.json``) are written beside them, in the same swap; their names are
    checked before anything is written (:class:`InvalidFileName`), and one that is an
    export's own file name is left out, with a warning. Returns the names written.

    Atomic: the files are written into a new folder beside ``directory``, which then takes
    its place, so ``directory`` holds one export whole, never a mix of two; an export that
    fails or is killed leaves it as it was (a kill in the instant between the two renames of
    the swap leaves it missing, and the next export puts it back). An export owns only its
    own file names (``model.safetensors``, the index, ``model-NNNNN-of-NNNNN.safetensors``)
    and those of ``files``: every other entry of ``directory`` (a README, subfolders) is
    kept, hard-linked into the new folder before the swap; one added during the export is left in
    a ``.NAME.export-old-*`` folder beside it, with a warning. A ``directory`` that is a
    symlink exports into the folder it points to. A second export to ``directory`` while one
    runs raises :class:`ExportBusy`. A ``directory`` with entries is :class:`TargetExists`
    unless ``force`` (then the swap replaces the export's files and keeps the others), and
    its parent must exist (:func:`check_export_target`)."""
    check_export_target(directory, directory=True, force=force)
    target = os.path.realpath(directory)
    parent, name = os.path.split(target)
    extra = check_files(files or {})
    for file in [f for f in extra if is_export_file(f.split("/", 1)[0])]:
        log.warning("not writing file %r into %s: the export writes a file of that name", file, directory)
        del extra[file]
    with export_errors(directory), export_lock(target):
        _recover_interrupted(target)
        check_export_target(directory, directory=True, force=force)  # again, with what an interrupted export had moved aside put back
        staging = os.path.join(parent, f".{name}.export-new-{uuid.uuid4().hex}")
        os.mkdir(staging, 0o777)
        try:
            names = write_shards(staging, shards, read_shard, metadata, progress)
            write_checked_files(staging, extra)
            names += list(extra)
            if os.path.isdir(target):
                shutil.copymode(target, staging)
                _link_entries(target, staging, top=True)
            fsync_directory(staging)
            _swap_in(staging, target, remove_old=lambda old: _remove_replaced(old, target, owned=frozenset(extra)))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # our files, and links to files still in target
            raise
    return names


_EXPORT_FILE = re.compile(r"model\.safetensors|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors|\.export-[0-9a-f]{32}\.tmp")


def is_export_file(name: str) -> bool:
    """Whether ``name`` is a file name an export writes into a directory (and so replaces),
    or the temp file of one that was killed."""
    return _EXPORT_FILE.fullmatch(name) is not None


def _link_entries(source: str, destination: str, *, top: bool) -> None:
    """Hard-link every entry of ``source`` into ``destination`` (symlinks as themselves,
    subfolders as folders of the same mode, filled alike), except, at the top, an export's
    own files, and anything the export wrote in its place."""
    with os.scandir(source) as entries:
        for entry in entries:
            into = os.path.join(destination, entry.name)
            exists = os.path.lexists(into)
            if entry.is_dir(follow_symlinks=False):
                if not exists:
                    os.mkdir(into)
                    shutil.copymode(entry.path, into)
                elif os.path.islink(into) or not os.path.isdir(into):
                    continue  # a file the export wrote
                _link_entries(entry.path, into, top=False)
                fsync_directory(into)
            elif not (exists or (top and is_export_file(entry.name))):
                os.link(entry.path, into, follow_symlinks=False)


def replace_directory(staging: str, target: str) -> None:
    """Put the complete folder ``staging`` (written with :func:`write_atomically`) at
    ``target`` in one rename, durably: ``staging`` is fsync'd, swapped in
    (:func:`_swap_in`), and the folder it replaced, if any, removed whole. A kill leaves
    ``target`` as it was, or, in the instant between the swap's two renames, beside it as
    ``.NAME.export-old-*``."""
    with export_errors(target):
        fsync_directory(staging)
        _swap_in(staging, target, remove_old=lambda old: shutil.rmtree(old, ignore_errors=True))


def _swap_in(staging: str, target: str, *, remove_old: Callable[[str], None]) -> None:
    """Put the folder ``staging`` at ``target``: renamed there, or, if ``target`` exists,
    renamed there after ``target`` is renamed aside, which ``remove_old`` then clears away
    (given its path), the parent fsync'd in between."""
    parent, name = os.path.split(target)
    if not os.path.isdir(target):
        os.rename(staging, target)
        fsync_directory(parent)
        return
    old = os.path.join(parent, f".{name}.export-old-{uuid.uuid4().hex}")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    fsync_directory(parent)
    remove_old(old)


def _recover_interrupted(target: str) -> None:
    """Clean up after an export of ``target`` that was killed (called under its lock): put
    the old folder back if it was killed between the two renames of a swap, remove its
    half-written folders, and finish emptying an old folder a swap left."""
    parent, name = os.path.split(target)
    ours = re.compile(rf"\.{re.escape(name)}\.export-(new|old)-[0-9a-f]{{32}}")
    found: dict[str, list[str]] = {"new": [], "old": []}
    for entry in sorted(os.listdir(parent)):
        match = ours.fullmatch(entry)
        if match:
            found[match[1]].append(os.path.join(parent, entry))
    if found["new"] and found["old"] and not os.path.lexists(target):
        os.rename(found["old"].pop(), target)
        log.warning("%s: put back the folder an interrupted export had moved aside", target)
    for staging in found["new"]:
        shutil.rmtree(staging, ignore_errors=True)  # our files, and links to files kept elsewhere
    if os.path.isdir(target):
        for old in found["old"]:
            _remove_replaced(old, target)


def _remove_replaced(old: str, new: str, *, owned: frozenset[str] = frozenset()) -> None:
    """Empty and remove the folder ``old`` that ``new`` replaced: unlink the export's own
    files, those it wrote in their place (``owned``), and every entry that is the very file
    ``new`` holds at the same place; keep (with a warning) anything else, something added to
    ``old`` while the export ran."""
    try:
        if _remove_entries(old, new, owned, prefix=""):
            return
        log.warning("%s: entries added while it was exported were kept in %s", new, old)
    except OSError as exc:
        log.warning("%s: could not remove the folder it replaced, %s: %s", new, old, exc)


def _remove_entries(old: str, new: str, owned: frozenset[str], *, prefix: str) -> bool:
    kept = False
    with os.scandir(old) as entries:
        for entry in entries:
            twin = os.path.join(new, entry.name)
            is_dir = entry.is_dir(follow_symlinks=False)
            if is_dir and os.path.isdir(twin) and not os.path.islink(twin):
                kept |= not _remove_entries(entry.path, twin, owned, prefix=f"{prefix}{entry.name}/")
            elif not is_dir and ((not prefix and is_export_file(entry.name)) or prefix + entry.name in owned or _same_file(entry, twin)):
                os.unlink(entry.path)
            else:
                kept = True
    if not kept:
        os.rmdir(old)
    return not kept


def _same_file(entry: os.DirEntry[str], path: str) -> bool:
    try:
        return os.path.samestat(entry.stat(follow_symlinks=False), os.lstat(path))
    except FileNotFoundError:
        return False
