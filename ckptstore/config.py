"""The store's config: the settings written once when a store is created (the ``config``
object, checksummed), and the checks that open a store with them.

Creating the config is idempotent: of two processes creating a store at once, one writes it
(``put_if_absent``) and both read the same one back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from .backends import ObjectStore
from .codec import MAX_DELTA_CHAIN, Kind, decode_object, encode_object_bytes
from .errors import IntegrityError, InvalidOption, InvalidRefName, ObjectNotFound, ReadOnlyStore, StoreNotFound, UnsupportedFormat
from .ids import HASH_ALGORITHM, check_hash_algorithm, content_id
from .layout import CONFIG_KEY
from .pipeline import COMPRESSION_MODES, DELTA_MODES, check_compression_mode, check_delta_mode
from .refs import RefKind, check_ref_name

log = logging.getLogger("ckptstore")

#: Version 2 added GC's records (``locks/``, ``demotions/``, ``shallow/``); version 3 a
#: checksum in the config. Stores of versions 1 and 2 (made before) are read the same way.
STORE_FORMAT_VERSION = 3
READABLE_STORE_FORMATS = (1, 2, 3)
#: The first store format whose config carries a checksum.
CHECKSUMMED_CONFIG_FORMAT = 3


@dataclass(frozen=True)
class StoreConfig:
    """Settings written once when a store is created (the ``config`` object)."""

    format: int = STORE_FORMAT_VERSION
    hash: str = HASH_ALGORITHM
    chunk_size_bytes: int = 16 << 20
    inline_threshold_bytes: int = 64 << 10
    compression_level: int | None = 3
    #: When a commit encodes its chunks: "auto" (where the sample says it pays and the sink,
    #: not the CPU, bounds the commit), "always" (where the sample says it pays) or "never".
    compression: str = "auto"
    #: Store changed float chunks as deltas against the parent commit's: "off", "on" or
    #: "auto" (where the delta is at most 0.4 of the chunk stored whole, as for bf16 weights;
    #: not for fp32 weights, whose deltas are about half); a keyframe at least every
    #: ``delta_keyframe_interval`` commits bounds a checkout to that many objects per chunk.
    delta: str = "off"
    delta_keyframe_interval: int = 8
    default_branch: str = "main"
    best_metric: str = "eval_loss"
    greater_is_better: bool | None = None

    def to_bytes(self) -> bytes:
        """The config document: its fields, then (format 3 on) ``checksum``, the content id
        of the fields encoded alone, so that any change to a stored config is detected."""
        fields = dict(self.__dict__)
        doc: bytes  # msgpack is untyped
        if self.format < CHECKSUMMED_CONFIG_FORMAT:
            doc = msgpack.packb(fields, use_bin_type=True)
        else:
            doc = msgpack.packb({**fields, "checksum": content_id(msgpack.packb(fields, use_bin_type=True))}, use_bin_type=True)
        return doc

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> StoreConfig:
        try:
            doc = msgpack.unpackb(data, raw=False)
            version = doc["format"]
            checksum = doc.pop("checksum", None)
            if type(version) is int and version >= CHECKSUMMED_CONFIG_FORMAT:
                expected = content_id(msgpack.packb(doc, use_bin_type=True))
        except Exception as exc:
            raise IntegrityError(f"malformed store config: {exc}", key=CONFIG_KEY) from exc
        if type(version) is not int or version not in READABLE_STORE_FORMATS:
            raise UnsupportedFormat(
                f"store has format version {version!r}; this version of ckptstore reads versions {', '.join(map(str, READABLE_STORE_FORMATS))}"
            )
        if version >= CHECKSUMMED_CONFIG_FORMAT and checksum != expected:
            raise IntegrityError("store config does not match its checksum (damaged or edited)", key=CONFIG_KEY)
        if version < CHECKSUMMED_CONFIG_FORMAT and checksum is not None:
            raise IntegrityError(f"malformed store config: a checksum in a format-{version} config", key=CONFIG_KEY)
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        config = cls(**known)
        if not isinstance(config.hash, str):
            raise IntegrityError(f"malformed store config: hash {config.hash!r}", key=CONFIG_KEY)
        check_hash_algorithm(config.hash)
        for name, valid in _CONFIG_FIELDS.items():
            value = getattr(config, name)
            if not valid(value):
                raise IntegrityError(f"malformed store config: {name} = {value!r}", key=CONFIG_KEY)
        return config


def _is_int(value: Any, low: int, high: int = 2**62) -> bool:
    return type(value) is int and low <= value <= high


def _is_branch_name(value: Any) -> bool:
    try:
        check_ref_name(value, kind=RefKind.BRANCH)
    except InvalidRefName:
        return False
    return True


#: What each config field may hold (a damaged or forged config is refused, not half-used).
_CONFIG_FIELDS: dict[str, Callable[[Any], bool]] = {
    "chunk_size_bytes": lambda v: _is_int(v, 1),
    "inline_threshold_bytes": lambda v: _is_int(v, 0),
    "compression_level": lambda v: v is None or _is_int(v, -(1 << 17), 22),
    "compression": lambda v: v in COMPRESSION_MODES,
    "delta": lambda v: v in DELTA_MODES,
    "delta_keyframe_interval": lambda v: _is_int(v, 1, MAX_DELTA_CHAIN + 1),
    "default_branch": _is_branch_name,
    "best_metric": lambda v: isinstance(v, str) and bool(v),
    "greater_is_better": lambda v: v is None or type(v) is bool,
}


def default_cache_dir() -> str:
    """Where a store's catalog (for a remote store) and remembered checks live by default:
    ``$CKPTSTORE_CACHE_DIR``, else ``~/.cache/ckptstore``."""
    return os.environ.get("CKPTSTORE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ckptstore")


def checked_overrides(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings given to :func:`ckptstore.open` (``None``: not given; for
    ``compression_level``, ``...``: not given, as ``None`` means no compression), checked,
    so that a bad option raises :class:`InvalidOption` before anything is created."""
    overrides = {k: v for k, v in settings.items() if v is not (... if k == "compression_level" else None)}
    if "chunk_size_bytes" in overrides and overrides["chunk_size_bytes"] < 1:
        raise InvalidOption("chunk_size_bytes", f"must be positive, not {overrides['chunk_size_bytes']!r}")
    check_delta_mode(overrides.get("delta"))
    check_compression_mode(overrides.get("compression"))
    delta_keyframe_interval = overrides.get("delta_keyframe_interval")
    if delta_keyframe_interval is not None and not 1 <= delta_keyframe_interval <= MAX_DELTA_CHAIN + 1:
        raise InvalidOption("delta_keyframe_interval", f"must be between 1 and {MAX_DELTA_CHAIN + 1}, not {delta_keyframe_interval!r}")
    if "default_branch" in overrides:
        check_ref_name(overrides["default_branch"], kind=RefKind.BRANCH)
    return overrides


def session_config(objects: ObjectStore, overrides: Mapping[str, Any], *, create: bool, single_writer: bool | None, cache_dir: str | None) -> StoreConfig:
    """The config of the store ``objects`` holds (created from ``overrides`` if missing and
    ``create``), with ``overrides`` applied for this session. Unless ``single_writer``
    (default: ``$CKPTSTORE_SINGLE_WRITER``), first checks that the backend honours
    conditional writes."""
    if single_writer is None:
        single_writer = os.environ.get("CKPTSTORE_SINGLE_WRITER", "").lower() in ("1", "true", "yes")
    if not single_writer:
        _check_conditional_writes(objects, cache_dir or default_cache_dir())
    config = _load_or_create_config(objects, dict(overrides), create=create)
    return StoreConfig(**{**config.__dict__, **overrides})


def catalog_location(objects: ObjectStore, *, cache_dir: str | None) -> tuple[str | None, bool]:
    """Where the catalog of the store ``objects`` holds lives (``None``: in memory), and
    whether it is only read: inside a local store (read-only where the store is), else
    under ``cache_dir`` (default :func:`default_cache_dir`), one per store URL."""
    if objects.is_ephemeral:
        return None, False
    if objects.local_root is not None:
        return os.path.join(objects.local_root, ".catalog", "catalog.sqlite"), not objects.writable()  # a read-only mount: its catalog is only read
    digest = hashlib.sha256(objects.url.encode()).hexdigest()[:24]
    return os.path.join(cache_dir or default_cache_dir(), digest, "catalog.sqlite"), False


#: How long a passed check of an endpoint's conditional writes is trusted.
CONDITIONAL_WRITES_CHECK_TTL_S = 86400.0
_CONDITIONAL_WRITES_OK: set[str] = set()


def _check_conditional_writes(objects: ObjectStore, cache_dir: str) -> None:
    """Check, once per endpoint (remembered in this process and, for a day, in
    ``cache_dir``), that the store's backend honours conditional writes."""
    check = getattr(objects, "check_conditional_writes", None)
    endpoint = getattr(objects, "endpoint", None)
    if check is None or endpoint is None or endpoint in _CONDITIONAL_WRITES_OK:
        return
    stamp = os.path.join(cache_dir, "endpoints", hashlib.sha256(endpoint.encode()).hexdigest()[:24])
    try:
        if time.time() - os.path.getmtime(stamp) < CONDITIONAL_WRITES_CHECK_TTL_S:
            _CONDITIONAL_WRITES_OK.add(endpoint)
            return
    except OSError:
        pass
    try:
        check()
    except ReadOnlyStore as exc:  # credentials that may only read: no writer to guard (the probe changed nothing)
        log.debug("not checking the conditional writes of %s: %s", endpoint, exc)
        return
    _CONDITIONAL_WRITES_OK.add(endpoint)
    try:
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        with open(stamp, "w", encoding="utf-8") as f:
            f.write(f"{endpoint}: conditional writes honoured\n")
    except OSError as exc:  # a cache: the check is simply made again next time
        log.debug("could not remember the conditional-write check of %s: %s", endpoint, exc)


def _load_or_create_config(objects: ObjectStore, settings: dict[str, Any], *, create: bool) -> StoreConfig:
    for _ in range(2):
        try:
            data = objects.get(CONFIG_KEY)
        except ObjectNotFound:
            if not create:
                raise StoreNotFound(f"no ckptstore store at {objects.url}") from None
            fresh = StoreConfig(**settings)
            if objects.put_if_absent(CONFIG_KEY, encode_object_bytes(Kind.CONFIG, fresh.to_bytes(), compression_level=None)):
                log.info("created a new store at %s", objects.url)  # never silently: a typo'd URL starts afresh
            objects.reserve_space()  # so that gc can run on a disk that fills up
            continue
        return StoreConfig.from_bytes(decode_object(data, key=CONFIG_KEY, kind=Kind.CONFIG, max_raw_size=1 << 20))
    raise IntegrityError("store config could not be read after creating it", key=CONFIG_KEY)
