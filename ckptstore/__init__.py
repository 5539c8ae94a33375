"""ckptstore: content-addressed checkpoint storage and versioning for PyTorch training.

    import ckptstore
    store = ckptstore.open("ckpts")
    c = store.commit({"model": model, "optimizer": opt, "step": 100}, metrics={"eval_loss": 1.9})
    state = store.checkout("latest")
"""

from .commit import Commit, CommitStats
from .errors import (
    AmbiguousRef,
    CkptStoreError,
    CollectorBusy,
    ComponentsUnavailable,
    IntegrityError,
    InvalidRefName,
    ObjectNotFound,
    OutOfMemory,
    PreconditionFailed,
    RefConflict,
    RefError,
    RefExists,
    StorageError,
    StoreNotFound,
    UnknownRef,
    UnsupportedFormat,
    UnsupportedValue,
)
from .fsck import FsckReport, Problem
from .gc import GcPlan
from .retention import KeepBest, KeepEveryNSteps, KeepLast, KeepNewerThan, Policy, Rule
from .store import Diff, Store, StoreConfig, TensorChange
from .usage import Usage
from .store import open_store as open

__version__ = "0.1.0"

__all__ = [
    "AmbiguousRef",
    "CkptStoreError",
    "CollectorBusy",
    "ComponentsUnavailable",
    "FsckReport",
    "GcPlan",
    "KeepBest",
    "KeepEveryNSteps",
    "KeepLast",
    "KeepNewerThan",
    "Policy",
    "Problem",
    "Rule",
    "Usage",
    "Commit",
    "CommitStats",
    "Diff",
    "IntegrityError",
    "InvalidRefName",
    "ObjectNotFound",
    "OutOfMemory",
    "PreconditionFailed",
    "RefConflict",
    "RefError",
    "RefExists",
    "StorageError",
    "Store",
    "StoreConfig",
    "StoreNotFound",
    "TensorChange",
    "UnknownRef",
    "UnsupportedFormat",
    "UnsupportedValue",
    "open",
]
