"""ckptstore: content-addressed checkpoint storage and versioning for PyTorch training.

import ckptstore
store = ckptstore.open("ckpts")
c = store.commit({"model": model, "optimizer": opt, "step": 100}, metrics={"eval_loss": 1.9})
state = store.checkout("latest")
"""

from .commit import Commit, CommitStats
from .config import StoreConfig
from .diff import Diff, TensorChange
from .errors import (
    AmbiguousRef,
    CheckpointNotFound,
    CkptStoreError,
    ClockSkew,
    CollectedWhileReading,
    CollectorBusy,
    ComponentsUnavailable,
    ConditionalWritesUnsupported,
    ExportBusy,
    IntegrityError,
    InvalidCheckpoint,
    InvalidFileName,
    InvalidOption,
    InvalidOptionType,
    InvalidRefName,
    NotExportable,
    ObjectNotFound,
    OutOfMemory,
    PolicyMatchesNothing,
    PreconditionFailed,
    ProtectedBranch,
    ReadOnlyStore,
    RefConflict,
    RefError,
    RefExists,
    SourceChanged,
    StorageError,
    StoreNotFound,
    TargetExists,
    UnknownRef,
    UnsupportedFormat,
    UnsupportedValue,
    WriterExpired,
    WrongRefKind,
)
from .fsck import FsckReport, Problem
from .gc import GcPlan
from .repack import RepackReport
from .retention import KeepBest, KeepEveryNSteps, KeepLast, KeepNewerThan, Policy, Rule
from .store import Store
from .store import open_store as open
from .usage import Usage

__version__ = "0.1.0"

__all__ = [
    "AmbiguousRef",
    "CheckpointNotFound",
    "CkptStoreError",
    "ClockSkew",
    "CollectedWhileReading",
    "CollectorBusy",
    "Commit",
    "CommitStats",
    "ComponentsUnavailable",
    "ConditionalWritesUnsupported",
    "Diff",
    "ExportBusy",
    "FsckReport",
    "GcPlan",
    "IntegrityError",
    "InvalidCheckpoint",
    "InvalidFileName",
    "InvalidOption",
    "InvalidOptionType",
    "InvalidRefName",
    "KeepBest",
    "KeepEveryNSteps",
    "KeepLast",
    "KeepNewerThan",
    "NotExportable",
    "ObjectNotFound",
    "OutOfMemory",
    "Policy",
    "PolicyMatchesNothing",
    "PreconditionFailed",
    "Problem",
    "ProtectedBranch",
    "ReadOnlyStore",
    "RepackReport",
    "RefConflict",
    "RefError",
    "RefExists",
    "Rule",
    "SourceChanged",
    "StorageError",
    "Store",
    "StoreConfig",
    "StoreNotFound",
    "TargetExists",
    "TensorChange",
    "UnknownRef",
    "UnsupportedFormat",
    "UnsupportedValue",
    "Usage",
    "WriterExpired",
    "WrongRefKind",
    "open",
]
