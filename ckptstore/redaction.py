"""Credentials kept out of log records, third-party ones included.

With its loggers at DEBUG, botocore logs every request's headers (the ``Authorization``
header names the access key id, ``X-Amz-Security-Token`` is the session token) and the
canonical request it signs (the token again). ckptstore never turns those loggers on, but a
program may. A store opened on S3 therefore adds one :class:`CredentialFilter` to the loggers
of botocore, aiobotocore, s3fs and fsspec: it rewrites a record whose message carries a
credential field, or a credential value the store was given, with the value replaced by
``<redacted>``. A logger runs its filters only for records it emits, so with DEBUG off this
costs nothing.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable

REDACTED = "<redacted>"

#: Credential fields in requests as botocore logs them: header dicts (``'Authorization':
#: b'AWS4-HMAC-SHA256 Credential=AKID/...'``), canonical requests
#: (``x-amz-security-token:TOKEN``) and presigned URLs (``X-Amz-Credential=AKID%2F...``).
_FIELDS = (
    re.compile(r"(Credential=)[^/,\s'\"&%]+"),
    re.compile(r"(x-amz-security-token(?:['\"]\s*:\s*b?['\"]|\s*[:=]\s*))[^'\"\s&,]+", re.IGNORECASE),
)

#: Loggers that see requests (and their parents, whose existing children are covered too).
LOGGERS = (
    "botocore", "botocore.endpoint", "botocore.auth", "botocore.httpsession", "botocore.parsers",
    "botocore.hooks", "botocore.retryhandler", "botocore.credentials",
    "aiobotocore", "aiobotocore.endpoint", "aiobotocore.httpsession", "s3fs", "fsspec",
)  # fmt: skip

#: Values shorter than this are not redacted by value (they would mangle ordinary words).
MIN_SECRET_CHARS = 8


class CredentialFilter(logging.Filter):
    """Rewrites a record's message with credential fields and known credential values
    replaced by ``<redacted>``; never drops a record. Thread-safe."""

    def __init__(self) -> None:
        super().__init__()
        self._values: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def add_values(self, values: Iterable[object]) -> None:
        """Also redact these values wherever they appear (idempotent)."""
        fresh = {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_CHARS}
        with self._lock:
            self._values = self._values | fresh

    def redact(self, text: str) -> str:
        for pattern in _FIELDS:
            text = pattern.sub(r"\1" + REDACTED, text)
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is the handler's to report
            return True
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_FILTER = CredentialFilter()


def redact_credentials_in_logs(values: Iterable[object] = ()) -> None:
    """Add the one :class:`CredentialFilter` to :data:`LOGGERS` and to every logger that
    exists below them, and have it redact ``values`` too. Idempotent."""
    _FILTER.add_values(values)
    roots = {name.split(".", 1)[0] for name in LOGGERS}
    names = set(LOGGERS) | {n for n in list(logging.Logger.manager.loggerDict) if n.split(".", 1)[0] in roots}
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
