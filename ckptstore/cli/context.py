"""What every ``ckpt`` command shares: the store it runs against, opened once on first use."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from ..errors import InvalidOption
from ..store import Store, open_store


def storage_options() -> dict[str, Any]:
    """The storage options (credentials) in ``CKPTSTORE_STORAGE_OPTIONS``, a JSON object; ``{}`` when unset."""
    raw = os.environ.get("CKPTSTORE_STORAGE_OPTIONS")
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidOption("storage_options", f"CKPTSTORE_STORAGE_OPTIONS is not valid JSON (at position {exc.pos})") from None
    if not isinstance(options, dict):
        raise InvalidOption("storage_options", "CKPTSTORE_STORAGE_OPTIONS must be a JSON object")
    return options


class Context:
    """The ``--store`` and ``--debug`` a command runs with; the store opens on first use, once."""

    def __init__(self, url: str, debug: bool) -> None:
        self.url = url
        self.debug = debug
        self._store: Store | None = None

    def store(self, *, create: bool = False) -> Store:
        if self._store is None:
            self._store = open_store(self.url, storage_options=storage_options() or None, create=create)
        return self._store


pass_ctx = click.make_pass_decorator(Context)
