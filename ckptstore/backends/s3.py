"""The S3 backend: objects in a bucket under a prefix, through s3fs, with S3's own
conditional writes (see :class:`S3ObjectStore`)."""

from __future__ import annotations

import contextlib
import email.utils
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..errors import CkptStoreError, ConditionalWritesUnsupported, ObjectNotFound, PreconditionFailed, StorageError
from ..layout import PROBE_PREFIX
from ..redaction import redact_credentials_in_logs
from . import Data, ObjectInfo, _chain, _joined, _translated
from .fsspec import _FsspecObjectStore, _modified_s

#: S3 user metadata (``x-amz-meta-ckptstore-write``) naming the conditional write that
#: stored an object, so that a resent write can tell its own first attempt from another's.
WRITE_TOKEN = "ckptstore-write"


class S3ObjectStore(_FsspecObjectStore):
    """Objects in an S3 bucket under a prefix, through s3fs.

    Create-only writes send ``If-None-Match: *``; compare-and-swap sends ``If-Match`` with the
    ETag read before. Both are answered by S3 itself, so concurrent writers on different
    machines are safe. Both carry a write token (:data:`WRITE_TOKEN`) that tells a resent
    write its own applied first attempt from another writer's object.
    """

    read_attempts = 3

    #: Requests in flight at once (the connection pool; botocore's default is 10).
    max_connections = 64
    #: Pipeline threads by default: S3 answers each request after a round trip of tens of
    #: milliseconds, so throughput comes from many requests at once, not from cores.
    requests_in_flight = 32
    #: Bounds on one attempt of a request (botocore's defaults are 60 s each): with 5
    #: attempts, a stalled endpoint fails a request in about 2 minutes rather than 10.
    #: ``storage_options={"config_kwargs": {"read_timeout": ...}}`` overrides them.
    connect_timeout_s = 5.0
    read_timeout_s = 20.0

    def __init__(self, bucket_and_prefix: str, storage_options: Mapping[str, Any], *, part_size_bytes: int = 8 << 20) -> None:
        import s3fs  # imported here so that local use never pays for botocore

        redact_credentials_in_logs(_credential_values(storage_options))

        # Retries happen once, in botocore ("standard" mode: 5xx, throttling and connection
        # errors, with backoff and jitter); s3fs's own retry loop is turned off so the two do
        # not multiply. A resent conditional write that finds its own first attempt is
        # refused (412); the write token (see put_if_absent) turns that back into success.
        config = dict(storage_options.get("config_kwargs") or {})
        config.setdefault("retries", {"mode": "standard", "total_max_attempts": 5})
        config.setdefault("max_pool_connections", self.max_connections)
        config.setdefault("connect_timeout", self.connect_timeout_s)
        config.setdefault("read_timeout", self.read_timeout_s)
        options = {"use_listings_cache": False, "skip_instance_cache": True, **storage_options, "config_kwargs": config}
        fs = s3fs.S3FileSystem(**options)
        fs.retries = 1  # this instance only (skip_instance_cache): botocore retries instead
        root = bucket_and_prefix.strip("/")
        self.part_size_bytes = part_size_bytes
        #: The S3 endpoint (``client_kwargs.endpoint_url``, else AWS's) and bucket: what a
        #: check of conditional writes holds for. Safe to show.
        self.endpoint = f"{(storage_options.get('client_kwargs') or {}).get('endpoint_url') or 'https://s3.amazonaws.com'}/{root.split('/', 1)[0]}"
        super().__init__(fs, root, f"s3://{root}")

    def check_conditional_writes(self) -> None:
        """Raise :class:`ConditionalWritesUnsupported` if the endpoint ignores
        ``If-None-Match: *`` or ``If-Match`` (older MinIO, some gateways): without them two
        writers silently overwrite each other's refs. Writes, checks and removes one probe
        object, ``locks/probe-<random>``."""
        key = PROBE_PREFIX + uuid.uuid4().hex
        try:
            self.put_if_absent(key, b"first")
            ignored = []
            if self.put_if_absent(key, b"second"):
                ignored.append("If-None-Match: *")
            _, version = self.get_versioned(key)
            try:
                self.put_if_version(
                    key,
                    b"third",
                    version='"00000000000000000000000000000000"' if version != '"00000000000000000000000000000000"' else '"1"',
                )
                ignored.append("If-Match")
            except PreconditionFailed:
                pass
        finally:
            with contextlib.suppress(CkptStoreError):
                self.delete(key)
        if ignored:
            raise ConditionalWritesUnsupported(
                f"the S3 endpoint {self.endpoint} ignores conditional writes ({' and '.join(ignored)}): "
                "concurrent writers would silently lose commits there. Use an endpoint that supports them "
                "(AWS S3, current MinIO), or, if only one process at a time ever writes to this store, "
                "open it with single_writer=True (for the ckpt command: CKPTSTORE_SINGLE_WRITER=1)",
                endpoint=self.endpoint,
            )

    def remove_abandoned_uploads(self, *, older_than_s: float, prefixes: Iterable[str]) -> int:
        """Abort multipart uploads under the store's ``prefixes`` started more than
        ``older_than_s`` ago (left by writers that died mid-upload; S3 keeps and bills their
        parts)."""
        bucket, prefix, _ = self._fs.split_path(self._root + "/")
        store_prefix = prefix.rstrip("/") + "/"
        owned = tuple(store_prefix + p for p in prefixes)
        cutoff = self.clock_s() - older_than_s
        removed = 0
        with _translated(self.url, "", "list the multipart uploads of"):
            response = self._fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=store_prefix)
            for upload in response.get("Uploads", []):
                if upload["Key"].startswith(owned) and _modified_s({"LastModified": upload["Initiated"]}) < cutoff:
                    self._fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    removed += 1
        return removed

    def get(self, key: str) -> bytes:
        """One GET (s3fs's ``cat_file`` would first HEAD the object to decide whether to
        split the read into ranges)."""
        return self._read(key, max_concurrency=1)

    def exists(self, key: str) -> bool:
        """One HEAD (s3fs's ``info`` also lists the prefix when the key is missing)."""
        try:
            self.info(key)
        except ObjectNotFound:
            return False
        return True

    def info(self, key: str) -> ObjectInfo:
        """One HEAD."""
        bucket, object_key, _ = self._fs.split_path(self._path(key))
        head = self._attempts(key, "stat", lambda: self._fs.call_s3("head_object", Bucket=bucket, Key=object_key))
        return ObjectInfo(key, int(head["ContentLength"]), _modified_s(head))

    def clock_s(self) -> float:
        """The ``Date`` of S3's answer to a HEAD of the bucket (S3 stamps ``LastModified``
        with the same clock; both to the second, so the middle of that second)."""
        bucket, _, _ = self._fs.split_path(self._root + "/")
        response = self._attempts("", "read the clock of", lambda: self._fs.call_s3("head_bucket", Bucket=bucket))
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not date:
            return time.time()
        return email.utils.parsedate_to_datetime(date).timestamp() + 0.5

    def put_if_absent(self, key: str, data: Data) -> bool:
        """Create-only: ``If-None-Match: *`` (multipart above two parts, completed the same
        way), tagged with a write token. A write that is refused or fails after a resend
        (by botocore, or by aiohttp, which silently resends a PUT whose connection dropped)
        looks at the object: carrying its own token, its first attempt was applied and only
        the answer was lost, so it returns True."""
        path = self._path(key)
        token = uuid.uuid4().hex
        try:
            with _translated(self.url, key, "write"):
                self._fs.pipe_file(path, _joined(data), mode="create", chunksize=self.part_size_bytes, Metadata={WRITE_TOKEN: token})
        except StorageError as exc:
            if self._written_by(key, token) is not None:
                return True
            if isinstance(exc, PreconditionFailed):
                return False
            raise
        return True

    def _written_by(self, key: str, token: str) -> str | None:
        """The object's ETag if the write tagged ``token`` stored it; else (or if that
        cannot be told) None."""
        bucket, object_key, _ = self._fs.split_path(self._path(key))
        try:
            with _translated(self.url, key, "stat"):
                head = self._fs.call_s3("head_object", Bucket=bucket, Key=object_key)
        except StorageError:
            return None
        return head["ETag"] if (head.get("Metadata") or {}).get(WRITE_TOKEN) == token else None

    def delete_many(self, keys: Iterable[str]) -> None:
        paths = [self._path(key) for key in keys]
        for start in range(0, len(paths), 1000):
            batch = paths[start : start + 1000]
            with contextlib.suppress(ObjectNotFound), _translated(self.url, batch[0][len(self._root) + 1 :], "delete"):
                self._fs.rm(batch)  # s3fs sends one DeleteObjects request per 1,000 keys

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        from fsspec.asyn import sync

        bucket, object_key, _ = self._fs.split_path(self._path(key))

        async def fetch() -> tuple[bytes, str]:
            response = await self._fs._call_s3("get_object", Bucket=bucket, Key=object_key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        def fetched() -> tuple[bytes, str]:
            result: tuple[bytes, str] = sync(self._fs.loop, fetch)
            return result

        return self._attempts(key, "read", fetched)

    def put_if_version(self, key: str, data: bytes, *, version: str | None) -> str:
        """``If-Match`` the ETag ``version`` (``If-None-Match: *`` for ``None``), tagged
        with a write token; returns the new ETag. A write that is refused or fails after a
        resend looks at the object: carrying its own token, its first attempt was applied
        and only the answer was lost, so it returns that ETag. Neither a spurious failure
        nor a second update."""
        path = self._path(key)
        token = uuid.uuid4().hex
        try:
            if version is None:
                with _translated(self.url, key, "update"):
                    response = self._fs.pipe_file(path, data, mode="create", Metadata={WRITE_TOKEN: token})
            else:
                with _missing_is_mismatch(key), _translated(self.url, key, "update"):
                    response = self._fs.pipe_file(path, data, IfMatch=version, Metadata={WRITE_TOKEN: token})
        except StorageError:
            etag = self._written_by(key, token)
            if etag is not None:
                return etag
            raise
        new_etag: str = response["ETag"]
        return new_etag

    def delete_if_version(self, key: str, *, version: str) -> None:
        """``DELETE`` with ``If-Match``. If botocore resent the request and it then failed
        or was refused (404: already gone), an object now absent means the first attempt
        was applied: success. (A resend by aiohttp is invisible here: its 404 is a
        :class:`PreconditionFailed`, as for any object already gone.)"""
        bucket, object_key, _ = self._fs.split_path(self._path(key))
        try:
            with _missing_is_mismatch(key), _translated(self.url, key, "delete"):
                self._fs.call_s3("delete_object", Bucket=bucket, Key=object_key, IfMatch=version)
        except StorageError as exc:
            if _was_retried(exc) and not self._exists_quietly(key):
                return
            raise

    def _exists_quietly(self, key: str) -> bool:
        """``exists``, True where it cannot tell."""
        try:
            return self.exists(key)
        except StorageError:
            return True


def _credential_values(storage_options: Mapping[str, Any]) -> list[object]:
    """The credentials an S3 store may sign with that ckptstore can see: its options and
    the ``AWS_*`` environment variables."""
    client = storage_options.get("client_kwargs") or {}
    return [
        *(storage_options.get(name) for name in ("key", "secret", "token")),
        *(client.get(name) for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")),
        *(os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")),
    ]


@contextlib.contextmanager
def _missing_is_mismatch(key: str) -> Iterator[None]:
    """S3 answers a write or delete conditional on the ETag of a missing object with 404; for
    the contract that is a version mismatch like any other."""
    try:
        yield
    except ObjectNotFound as exc:
        raise PreconditionFailed(f"object {key} does not exist", key=key) from exc


def _was_retried(exc: BaseException) -> bool:
    """Whether botocore sent the request that ``exc`` answers more than once (an earlier
    attempt may have been applied, its answer lost)."""
    for err in _chain(exc):
        response = getattr(err, "response", None)
        if isinstance(response, Mapping) and response.get("ResponseMetadata", {}).get("RetryAttempts", 0):
            return True
    return False
