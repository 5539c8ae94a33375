"""Shared fixtures: a moto S3 server on loopback, per-test buckets, and store URLs for every
backend."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

_S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server running in this process for the whole session."""
    from moto.server import ThreadedMotoServer

    for name, value in _S3_CREDENTIALS.items():
        os.environ.setdefault(name, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_url(s3_server):
    """``(url, storage_options)`` of a prefix in a fresh, uniquely named bucket."""
    import boto3

    bucket = f"ckptstore-test-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    options = {"client_kwargs": {"endpoint_url": s3_server}, "key": "testing", "secret": "testing"}
    return f"s3://{bucket}/store", options


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def store_url(request, tmp_path):
    """``(url, storage_options)`` of an empty store on each backend: local, memory and S3 (moto,
    marked ``s3``). The storage contract suite (test_objectstore.py) and the store's own
    (test_store.py) both run on it."""
    if request.param == "local":
        return str(tmp_path / "store"), {}
    if request.param == "memory":
        return f"memory://test-{uuid.uuid4().hex}", {}
    return request.getfixturevalue("s3_url")


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory, monkeypatch):
    """Keep every test out of the user's ``~/.cache``."""
    monkeypatch.setenv("CKPTSTORE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def scratch(tmp_path):
    """A directory for stores on tmpfs where there is one, else ``tmp_path``: for the crash
    tests, where a SIGKILL loses nothing that reached the page cache, so fsync buys nothing,
    and a busy disk makes every commit and collection slow."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="ckptstore-crash-", dir="/dev/shm"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path
