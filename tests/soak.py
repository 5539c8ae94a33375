"""The one soak switch of the reliability tests. By default they run at small counts that fit
the default run; ``CKPTSTORE_SOAK=1`` runs them at soak counts (about an hour on two cores;
see README.md). The tests whose size depends on it carry the ``slow`` marker, so
``CKPTSTORE_SOAK=1 python -m pytest -m slow`` runs every soak."""

from __future__ import annotations

import os
from typing import TypeVar

T = TypeVar("T")

SOAK = os.environ.get("CKPTSTORE_SOAK") == "1"


def scaled(default: T, soak: T) -> T:
    """``soak`` under ``CKPTSTORE_SOAK=1``, else ``default``."""
    return soak if SOAK else default
