"""The one exception tree of ckptstore.

Every error the package raises on purpose is a :class:`CkptStoreError`. Each class also
derives from the builtin exception a caller would naturally catch, so ``except KeyError``,
``except TypeError`` or ``except OSError`` keep working.

A message that tells the reader to use an option names it the way the reader calls ckptstore:
``force=True`` from Python, ``--force`` from ``ckpt``. Such an error keeps the option as a
:class:`Said` among its message's :attr:`~CkptStoreError.parts`; ``str()`` spells it for
Python, :meth:`~CkptStoreError.cli_message` for the command line::

    CkptStoreError
    ├── RefError
    │   ├── UnknownRef ................ LookupError   a name, id or prefix that resolves to nothing
    │   │   └── WrongRefKind .......... LookupError   a tag named where a branch was asked for, or the reverse
    │   ├── AmbiguousRef .............. LookupError   an id prefix matching several commits
    │   ├── InvalidRefName ............ ValueError    a branch/tag name or revision that is malformed (says which rule)
    │   ├── RefExists ................. FileExistsError  creating a branch/tag that already exists
    │   ├── ProtectedBranch ........... deleting the default branch, or the only ref to some commits, unforced
    │   └── RefConflict ............... a compare-and-swap on a ref lost a race
    ├── UnsupportedValue .............. TypeError     a value that cannot be stored (names its key path)
    ├── ComponentsUnavailable ......... KeyError      components a commit lacks, or that GC dropped (demotion)
    ├── CollectorBusy ................. another garbage collector holds the store's lease
    ├── PolicyMatchesNothing .......... ValueError    a retention rule that matches no commit at all
    ├── WriterExpired ................. TimeoutError  a commit's writer marker lapsed before it published
    ├── ClockSkew ..................... this machine's clock is far from the storage's
    ├── SourceChanged ................. RuntimeError  a tensor's bytes changed while a commit read them
    ├── CollectedWhileReading ......... LookupError   a collector kept removing what a reader was reading
    ├── OutOfMemory ................... MemoryError   a checkout's buffers could not be allocated
    ├── IntegrityError ................ ValueError    stored bytes that fail verification, or are missing
    ├── UnsupportedFormat ............. ValueError    an object or store of an unknown format version
    ├── InvalidCheckpoint ............. ValueError    a checkpoint file to import that is malformed (names the file)
    ├── InvalidFileName ............... ValueError    a stored file's name that could write outside an export's folder
    ├── NotExportable ................. ValueError    a commit that cannot be exported as named whole tensors (says why)
    ├── InvalidOption ................. ValueError    an option that is not one of its allowed values (names it)
    │   └── InvalidOptionType ......... TypeError     an option given a value of a type it does not take
    ├── ExportBusy .................... another export is writing to the same path
    ├── TargetExists .................. FileExistsError  an export's target holds a file, or a non-empty folder (names it)
    ├── MissingExtra .................. ImportError   a command whose optional extra is not installed (names it)
    ├── StoreNotFound ................. FileNotFoundError  opening a store that does not exist
    ├── CheckpointNotFound ............ FileNotFoundError  a checkpoint to import that is not there (names the path)
    └── StorageError .................. OSError       the backend failed (the cause is chained)
        ├── ObjectNotFound ............ FileNotFoundError
        ├── PreconditionFailed ........ a create-only or versioned write found another value
        ├── ConditionalWritesUnsupported  an S3 endpoint that ignores If-None-Match / If-Match
        └── ReadOnlyStore ............. PermissionError  a write to a store that can only be read
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self


@dataclass(frozen=True)
class Said:
    """A piece of a message that Python callers and the command line spell differently: an
    option (:func:`option`), or the call or command that does something."""

    python: str
    cli: str


def option(name: str, value: Any = True, *, flag: str | None = None) -> Said:
    """Option ``name`` set to ``value``: ``force=True`` for Python, ``--force`` (or ``flag``)
    for the command line; a list value is the flag repeated (``--exclude optimizer``)."""
    flag = flag or "--" + name.replace("_", "-")
    values = value if isinstance(value, (list, tuple)) else [value]
    cli = flag if value is True else " ".join(f"{flag} {shlex.quote(str(v))}" for v in values)
    return Said(f"{name}={list(value) if isinstance(value, tuple) else value!r}", cli)


def python_text(parts: Sequence[str | Said]) -> str:
    """A message's ``parts`` as Python callers read it."""
    return "".join(p if isinstance(p, str) else p.python for p in parts)


class CkptStoreError(Exception):
    """Base class of every error ckptstore raises on purpose.

    Every one pickles and unpickles as itself, attributes included (without calling its
    ``__init__`` again), so it crosses process boundaries whole: ``multiprocessing``, or
    ``torch.distributed`` handing one rank's error to the others."""

    #: The message in pieces, some spelled differently for the command line (:class:`Said`);
    #: empty where ``str()`` reads the same to both.
    parts: tuple[str | Said, ...] = ()

    @classmethod
    def saying(cls, *parts: str | Said) -> Self:
        """This error (of a class whose only argument is its message) with message ``parts``."""
        error = cls(python_text(parts))
        error.parts = parts
        return error

    def cli_message(self) -> str:
        """The message as ``ckpt`` says it: options as flags (``--force``), commands as commands."""
        return "".join(p if isinstance(p, str) else p.cli for p in self.parts) if self.parts else str(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (type(self), self.args, self.__dict__))


def _rebuild_error(cls: type[CkptStoreError], args: tuple[Any, ...], state: dict[str, Any]) -> CkptStoreError:
    try:
        error = cls.__new__(cls, *args)
    except TypeError:  # MemoryError's __new__ refuses subclasses (OutOfMemory)
        error = BaseException.__new__(cls, *args)
    super(CkptStoreError, error).__init__(*args)  # the builtin's own (OSError's sets errno from args)
    error.__dict__.update(state)
    return error


class RefError(CkptStoreError):
    """A problem with a ref (branch, tag) or a revision."""


class UnknownRef(RefError, LookupError):
    """A revision that names no branch, tag or commit."""

    def __init__(self, ref: str, *, suggestions: list[str] | None = None) -> None:
        self.ref = ref
        self.suggestions = list(suggestions or [])
        msg = f"unknown revision {ref!r}"
        if self.suggestions:
            msg += "; did you mean " + ", ".join(repr(s) for s in self.suggestions) + "?"
        super().__init__(msg)

    def __str__(self) -> str:  # LookupError would otherwise repr() the message
        return str(self.args[0])


class AmbiguousRef(RefError, LookupError):
    """An id prefix that matches more than one commit."""

    def __init__(self, ref: str, candidates: list[str]) -> None:
        self.ref = ref
        self.candidates = list(candidates)
        shown = ", ".join(c[:12] if len(c) == 32 else c for c in self.candidates[:5])
        more = "" if len(self.candidates) <= 5 else f" and {len(self.candidates) - 5} more"
        super().__init__(f"ambiguous revision {ref!r}: matches {shown}{more}")

    def __str__(self) -> str:
        return str(self.args[0])


class WrongRefKind(UnknownRef):
    """A name given as one kind of ref (``asked``: ``"branch"``) that is a ref of the other
    kind (``found``: ``"tag"``); ``hint`` says what to do with it instead."""

    def __init__(self, ref: str, *, asked: str, found: str, hint: Sequence[str | Said] = ()) -> None:
        self.ref = ref
        self.suggestions: list[str] = []
        self.asked = asked
        self.found = found
        self.parts = (f"no {asked} {ref!r}: {ref!r} is a {found}", *(("; ", *hint) if hint else ()))
        RefError.__init__(self, python_text(self.parts))


class InvalidRefName(RefError, ValueError):
    """A branch or tag name, or a revision expression, that is not well formed, or a name
    that is reserved. ``name`` names it and ``rule`` says what it breaks, where known."""

    def __init__(self, message: str, *, name: str | None = None, rule: str | None = None) -> None:
        self.name = name
        self.rule = rule
        super().__init__(message)


class RefExists(RefError, FileExistsError):
    """A branch or tag that was to be created already exists."""


class ProtectedBranch(RefError):
    """Deleting branch ``name`` (at ``commit_id``) was refused: it is the store's default
    branch, or no other branch or tag (``latest`` and ``best``, which the store moves itself,
    do not count) reaches its head, so garbage collection would take the ``lost_commits``
    commits only it reaches. Nothing was deleted; deleting with force does it anyway."""

    def __init__(self, name: str, commit_id: str, *, default: bool, lost_commits: int, force: Said) -> None:
        self.name = name
        self.commit_id = commit_id
        self.default = default
        self.lost_commits = lost_commits
        why = []
        if default:
            why.append("it is the default branch (commits that name no branch go to it)")
        if lost_commits:
            noun = "commit" if lost_commits == 1 else "commits"
            why.append(f"it is the only ref to {lost_commits} {noun}, which gc would then delete")
        self.parts = (f"not deleting branch {name!r} (at {commit_id[:12]}): {'; '.join(why)}; delete it anyway with ", force)
        super().__init__(python_text(self.parts))


class RefConflict(RefError):
    """A ref changed between reading and updating it (compare-and-swap lost a race).

    Nothing was overwritten: the ref still points at ``actual``.
    """

    def __init__(self, ref: str, *, expected: str | None, actual: str | None) -> None:
        self.ref = ref
        self.expected = expected
        self.actual = actual
        super().__init__(f"ref {ref!r} changed concurrently: expected {expected or '(absent)'}, found {actual or '(absent)'}")


class UnsupportedValue(CkptStoreError, TypeError):
    """A value in a state that ckptstore cannot store without pickle."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path or '<root>'}: {message}")


class ComponentsUnavailable(CkptStoreError, KeyError):
    """Asked-for components that a commit does not have: never stored (``missing``), or
    dropped by garbage collection when the commit was demoted (``dropped``)."""

    def __init__(self, commit_id: str, *, missing: list[str] = (), dropped: list[str] = (), available: list[str] = ()) -> None:  # type: ignore[assignment]
        self.commit_id = commit_id
        self.missing = list(missing)
        self.dropped = list(dropped)
        self.available = list(available)
        parts: list[str | Said] = []
        if self.dropped:
            names = ", ".join(map(repr, self.dropped))
            parts += [
                f"commit {commit_id[:12]} was demoted by garbage collection and no longer holds {names}; check out the rest with ",
                option("exclude", self.dropped),
            ]
        if self.missing:
            has = ", ".join(map(repr, self.available)) or "nothing"
            parts += ["; "] if parts else []
            parts += [f"commit {commit_id[:12]} has no component {', '.join(map(repr, self.missing))}; it has {has}"]
        self.parts = tuple(parts)
        super().__init__(python_text(self.parts))

    def __str__(self) -> str:
        return str(self.args[0])


class CollectorBusy(CkptStoreError):
    """Another garbage collector holds the store's lease (it expires if its holder dies)."""


class PolicyMatchesNothing(CkptStoreError, ValueError):
    """A retention rule matched no commit on any branch it governs (``KeepBest`` of a metric
    no commit has, ``KeepEveryNSteps`` where no commit has a step): most likely a typo, and
    collecting would delete what it was meant to keep. Nothing was deleted."""


class WriterExpired(CkptStoreError, TimeoutError):
    """A commit's writer marker was not renewed in time (the process paused, or the store
    could not be reached), so a garbage collector may have judged the writer dead and
    deleted what it reused. Nothing was published; committing again is safe."""


class SourceChanged(CkptStoreError, RuntimeError):
    """The bytes of a tensor being committed changed while the commit read them (another
    thread wrote it during a blocking commit; a memory-mapped file being imported changed
    underneath). Nothing was published, and nothing stored holds bytes other than its id
    says. ``path`` names the tensor (or the blob's first one)."""

    def __init__(self, path: str) -> None:
        self.path = path
        advice = Said(
            "commit with blocking=False to snapshot the state first, or do not write to it while committing",
            "do not change the files while ckpt reads them",
        )
        self.parts = (f"{path or '<root>'}: its bytes changed while the commit read them; nothing was published (", advice, ")")
        super().__init__(python_text(self.parts))


class ClockSkew(CkptStoreError):
    """This machine's wall clock is further from the storage's clock than leases allow;
    commit times and retention by age would be wrong. Synchronise the clock (NTP)."""


class OutOfMemory(CkptStoreError, MemoryError):
    """Memory for the tensors of a checkout could not be allocated: the checkpoint is too
    large for this machine (check out part of it: ``include=``), or its manifest claims
    sizes its chunks do not have. ``key`` names the manifest, ``path`` the tensor."""

    def __init__(self, size_bytes: int, *, key: str, path: str | None) -> None:
        self.size_bytes = size_bytes
        self.key = key
        self.path = path
        where = f"key path {path} of {key}" if path else key
        super().__init__(f"could not allocate {size_bytes} bytes for {where}")


class IntegrityError(CkptStoreError, ValueError):
    """Stored data failed verification (wrong hash, size or structure) or is missing.

    ``key`` names the object in the store; ``path`` the key path of the value that needed
    it, when known.
    """

    def __init__(self, message: str, *, key: str | None = None, path: str | None = None) -> None:
        self.key = key
        self.path = path
        self.reason = message
        where = []
        if key:
            where.append(f"object {key}")
        if path:
            where.append(f"key path {path}")
        super().__init__(message + (f" ({', '.join(where)})" if where else ""))


class UnsupportedFormat(CkptStoreError, ValueError):
    """An object, manifest or store written in a format this version cannot read."""


class StoreNotFound(CkptStoreError, FileNotFoundError):
    """No store exists at the URL (and it was opened with ``create=False``)."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class StorageError(CkptStoreError, OSError):
    """The storage backend failed; the backend's exception is chained as ``__cause__``."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        self.key = key
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object does not exist in the store."""


class PreconditionFailed(StorageError):
    """A create-only write found the object present, or a versioned write found another
    version. Nothing was written."""


class ConditionalWritesUnsupported(StorageError):
    """The S3 endpoint ignored a conditional write (``If-None-Match: *`` or ``If-Match``):
    with it, concurrent writers would silently lose commits. ``endpoint`` names it. Open the
    store with ``single_writer=True`` only if one process at a time writes to it."""

    def __init__(self, message: str, *, endpoint: str) -> None:
        self.endpoint = endpoint
        super().__init__(message)


class ReadOnlyStore(StorageError, PermissionError):
    """A write to a store that can only be read: a read-only mount, a directory this user
    may not write, S3 credentials that allow only reads. ``url`` names the store, ``action``
    and ``key`` what was refused (the storage's own error is chained). Raised before the
    store changed: reads of it work as ever."""

    def __init__(self, url: str, *, action: str, key: str | None = None, reason: str = "") -> None:
        self.url = url
        self.action = action
        what = f"{action} object {key}" if key else action
        super().__init__(f"store {url} is read-only: could not {what}" + (f" ({reason})" if reason else ""), key=key)


class CollectedWhileReading(CkptStoreError, LookupError):
    """A garbage collector in another process kept removing what a read needed (the read
    was started over from the refs each time): nothing is damaged; run it again. ``key``
    names the last object found gone."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        self.key = key
        super().__init__(message)

    def __str__(self) -> str:  # LookupError would otherwise repr() the message
        return str(self.args[0])


class InvalidCheckpoint(CkptStoreError, ValueError):
    """A checkpoint file or directory to import is malformed (a damaged safetensors header,
    an index that disagrees with its shards, a FIFO where a file should be). ``path`` names
    the file. Nothing was written to the store."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class InvalidFileName(CkptStoreError, ValueError):
    """A name in a commit's ``files`` that cannot be written inside the export's folder: not
    a relative POSIX path (absolute, with an empty, ``.`` or ``..`` segment, a NUL), or a name
    inside another file's name. ``name`` names it. Nothing was written."""

    def __init__(self, name: object, message: str) -> None:
        self.name = name
        super().__init__(f"file {name!r}: {message}")


class NotExportable(CkptStoreError, ValueError):
    """A commit, or the part of it selected, that cannot be exported as whole tensors under
    their names, and why: a ``torch.distributed.checkpoint`` save whose stored chunks do not
    cover a tensor, that lacks the planner data naming its tensors, or whose selection holds
    values that are not tensors. ``commit_id`` names the commit, ``path`` the key path at
    fault where there is one. Nothing was written."""

    def __init__(self, commit_id: str, message: str | Sequence[str | Said], *, path: str | None = None) -> None:
        self.commit_id = commit_id
        self.path = path
        self.parts = (f"commit {commit_id[:12]} cannot be exported: ", *([message] if isinstance(message, str) else message))
        super().__init__(python_text(self.parts))


class InvalidOption(CkptStoreError, ValueError):
    """An option given a value it does not take (a delta mode other than ``off``, ``on``,
    ``auto``); ``name`` names the option. Refused before anything is written."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(f"{name}: {message}")


class InvalidOptionType(InvalidOption, TypeError):
    """An option given a value of a type it does not take (a retention that is neither a
    ``Policy`` nor a ``Rule``, a training component without ``state_dict()``); ``name``
    names it. Refused before anything is written."""


class CheckpointNotFound(CkptStoreError, FileNotFoundError):
    """A checkpoint to import that is not there: no such file or folder, or a folder that
    holds no checkpoint files (no ``checkpoint-N`` folder, for a run). ``path`` names it.
    Nothing was written to the store."""

    def __init__(self, message: str, *, path: str) -> None:
        self.path = path
        super().__init__(message)

    def __str__(self) -> str:  # FileNotFoundError would otherwise show only the first of several args
        return str(self.args[0])


class ExportBusy(CkptStoreError):
    """Another export (in this or another process) is writing to the same path; ``path``
    names it. Nothing was written. Its lock is released when its holder ends, killed or not."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"another export is writing to {path}")


class TargetExists(CkptStoreError, FileExistsError):
    """An export's target ``path`` already holds a file, or a folder with entries in it, and
    the export was not forced to replace it. ``what`` says what is there. Nothing was
    written, and what is there is unchanged."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what
        self.parts = (f"{path} {what}; nothing was written (", option("force"), " replaces it)")
        super().__init__(python_text(self.parts))

    def __str__(self) -> str:  # FileExistsError would otherwise show only the first of several args
        return str(self.args[0])


class MissingExtra(CkptStoreError, ImportError):
    """A feature whose optional dependencies are not installed: ``extra`` names the extra
    that installs them (``pip install 'ckptstore[plot]'``). Nothing was done."""

    def __init__(self, feature: str, extra: str, *, missing: str) -> None:
        self.feature = feature
        self.extra = extra
        super().__init__(f"{feature} needs {missing}, which is not installed: pip install 'ckptstore[{extra}]'")
