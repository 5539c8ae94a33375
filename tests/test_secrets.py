"""Secrets (issue 7, item 8): credentials never show up in logs, errors, reprs or CLI output.

Sentinel credentials are put in the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``) and in ``storage_options`` (``key``,
``secret``, ``token``) of a store on S3 (moto's server on loopback, which accepts any
credentials). Then:

* through the API, with DEBUG logging on every logger (root, ckptstore, s3fs, fsspec,
  botocore, aiobotocore, urllib3) and every record captured: open, commit, checkout, log,
  branch, tag, diff, du, gc, fsck and error paths (an unknown revision, a missing bucket, an
  endpoint that refuses connections, a damaged chunk). No sentinel may appear in any log
  record (botocore's included), in any exception (message, repr, chained causes, traceback)
  or in ``repr(store)`` / ``repr(store.objects)`` / ``store.url``;
* botocore's own DEBUG records print request headers and canonical requests, so a store on
  S3 puts a redacting filter on those loggers (``ckptstore.redaction``); also checked on
  its own, and with credentials botocore found itself (a profile ckptstore never saw);
* through the CLI (a driver process calling ``ckptstore.cli.main`` per command, the way the
  ``ckpt`` script does, and one plain ``python -m ckptstore --debug`` process), with and
  without ``--debug`` and on error paths: no sentinel in stdout, stderr, tracebacks or any
  log record emitted (``--debug`` must enable the ckptstore logger only);
* credentials written into the store URL (``s3://KEY:SECRET@bucket/prefix``) are not echoed
  (the CLI's error line is that same message).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptstore
from ckptstore.errors import CkptStoreError

pytestmark = pytest.mark.s3

ENV_SENTINELS = {
    "AWS_ACCESS_KEY_ID": "AKIAENVSENTINEL7Q2X",
    "AWS_SECRET_ACCESS_KEY": "env-secret-sentinel-5c0ffee1",
    "AWS_SESSION_TOKEN": "env-token-sentinel-9d8e7f60",
}
OPTION_SENTINELS = {
    "key": "AKIAOPTSENTINEL3K8M",
    "secret": "opt-secret-sentinel-a1b2c3d4",
    "token": "opt-token-sentinel-e5f6a7b8",
}
URL_SENTINELS = {"key": "AKIAURLSENTINEL4R2D", "secret": "url-secret-sentinel-0f1e2d3c"}
SECRETS = [ENV_SENTINELS["AWS_SECRET_ACCESS_KEY"], OPTION_SENTINELS["secret"], URL_SENTINELS["secret"]]
ALL = [*ENV_SENTINELS.values(), *OPTION_SENTINELS.values(), *URL_SENTINELS.values()]
#: Loggers turned to DEBUG (with the root logger).
LOGGERS = ("ckptstore", "s3fs", "fsspec", "botocore", "aiobotocore", "urllib3", "boto3", "s3transfer")
TESTS = Path(__file__).resolve().parent


def _found(text: str, sentinels: list[str] = ALL) -> list[str]:
    """The sentinels (or a telling part of one: its first 12 characters) in ``text``."""
    return [s for s in sentinels if s in text or s[:12] in text]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is still checked
            text = f"{record.msg!r} {record.args!r}"
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))
        if record.stack_info:
            text += "\n" + record.stack_info
        self.records.append((record.name, text))


@pytest.fixture
def debug_everywhere() -> Iterator[_Capture]:
    """DEBUG on the root logger and every library logger; every record captured."""
    capture = _Capture()
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in LOGGERS}
    saved_root = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(saved_root)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture
def sentinel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV_SENTINELS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _options(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {
        **OPTION_SENTINELS,
        "client_kwargs": {"endpoint_url": endpoint},
        "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 2}, "connect_timeout": 2, "read_timeout": 10},
        **extra,
    }


def _describe(exc: BaseException) -> str:
    """Everything an exception shows: message, repr, causes, the whole traceback."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


def _overwrite(endpoint: str, url: str, key: str, data: bytes) -> None:
    """Replace an object behind the store's back (with the fixture's own credentials)."""
    import boto3

    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        aws_session_token="",
        region_name="us-east-1",
    )
    client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)


def test_api_with_debug_logging_everywhere_shows_no_sentinel(s3_server: str, s3_url: tuple, sentinel_env: None, debug_everywhere: _Capture) -> None:
    url, _ = s3_url
    options = _options(s3_server)
    shown: list[tuple[str, str]] = []  # (what, text) of every surface a user sees
    errors: list[str] = []

    def expect_error(what: str, fn: Any) -> None:
        try:
            fn()
        except CkptStoreError as exc:
            shown.append((what, _describe(exc)))
        except Exception as exc:  # noqa: BLE001
            shown.append((what, _describe(exc)))
            errors.append(f"{what}: untyped {type(exc).__name__}: {exc}")
        else:
            errors.append(f"{what}: no error")

    store = ckptstore.open(url, storage_options=options, chunk_size_bytes=4096, inline_threshold_bytes=256, threads=4)
    try:
        shown += [("repr(store)", repr(store)), ("repr(objects)", repr(store.objects)), ("url", store.url), ("config", repr(store.config))]
        g = torch.Generator().manual_seed(0)
        state = {"model": {"w": torch.randn(3000, generator=g), "b": torch.zeros(4)}, "step": 1}
        c1 = store.commit(state, message="one", metadata={"step": 1}, metrics={"eval_loss": 1.0})
        state["model"]["w"] += 1
        c2 = store.commit(state, message="two", metadata={"step": 2}, metrics={"eval_loss": 0.5}, tags=["t1"])
        shown += [("commit", repr(c1)), ("commit", repr(c2))]
        assert torch.equal(store.checkout("latest")["model"]["w"], state["model"]["w"])
        shown.append(("log", repr(store.log())))
        store.branch("side", at=c1.id)
        shown.append(("diff", repr(store.diff("main~1", "main", values=True))))
        shown.append(("du", repr(store.du())))
        shown.append(("gc dry run", store.gc(None, dry_run=True).summary()))
        shown.append(("gc", store.gc(None, grace_period_s=0).summary()))
        report = store.fsck(read_data=True)
        assert report.ok, report.summary()
        shown.append(("fsck", report.summary()))
        expect_error("unknown revision", lambda: store.checkout("no-such-branch"))
        # A damaged chunk: the errors name the object, never a credential.
        manifest = store.get_manifest(c2.manifest)
        chunk = next(c.id for b in manifest.blobs for c in b.chunks)
        _overwrite(s3_server, url, f"chunks/{chunk[:2]}/{chunk}", b"garbage")
        expect_error("checkout of a damaged chunk", lambda: store.checkout(c2.id))
        damaged = store.fsck(read_data=True)
        assert not damaged.ok
        shown.append(("fsck of a damaged store", damaged.summary() + "\n" + "\n".join(map(str, damaged.problems))))
    finally:
        store.close()
    missing = f"s3://ckptstore-missing-{uuid.uuid4().hex[:12]}/store"
    expect_error("open a missing bucket", lambda: ckptstore.open(missing, storage_options=options, create=False))
    expect_error("create in a missing bucket", lambda: ckptstore.open(missing, storage_options=options))
    expect_error("open with an endpoint that refuses connections", lambda: ckptstore.open(url, storage_options=_options("http://127.0.0.1:9")))

    assert not errors, errors
    leaks = [f"{what}: {_found(text)}" for what, text in shown if _found(text)]
    assert not leaks, "sentinels shown:\n" + "\n".join(leaks)
    records = debug_everywhere.records
    assert any(name.startswith("botocore") for name, _ in records), "botocore logged nothing: DEBUG logging is not on"
    assert any(name.startswith(("ckptstore", "s3fs")) for name, _ in records)
    leaked = [f"{name}: {_found(text)}: {text[:200]}" for name, text in records if _found(text)]
    assert not leaked, "sentinels in log records:\n" + "\n".join(leaked[:5])
    secrets = [f"{name}: {text[:200]}" for name, text in records if _found(text, SECRETS)]
    assert not secrets, "a secret key in a log record:\n" + "\n".join(secrets[:5])


def test_botocore_debug_records_carry_no_key_id_or_token(s3_server: str, s3_url: tuple, sentinel_env: None, debug_everywhere: _Capture) -> None:
    url, _ = s3_url
    with ckptstore.open(url, storage_options=_options(s3_server)) as store:
        store.commit({"w": torch.ones(10)})
        store.checkout("latest")
    leaks = sorted({(name, s) for name, text in debug_everywhere.records for s in _found(text)})
    assert not leaks, f"sentinels in botocore records: {leaks}"


def test_botocore_records_carry_no_credentials_ckptstore_was_not_given(
    s3_server: str, s3_url: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, debug_everywhere: _Capture
) -> None:
    """Credentials that botocore finds itself (a shared credentials file, a profile) are
    unknown to ckptstore by value: the credential fields of botocore's records are redacted
    by their shape."""
    key_id, secret, token = "AKIAPROFILESENTINEL7", "profile-secret-sentinel-9a8b7c6d", "profile-token-sentinel-1d2c3b4a"
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[ckpt]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\naws_session_token = {token}\n")
    for name in ENV_SENTINELS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url, _ = s3_url
    options = {"profile": "ckpt", "client_kwargs": {"endpoint_url": s3_server}}
    with ckptstore.open(url, storage_options=options) as store:
        store.commit({"w": torch.ones(10)})
        store.checkout("latest")
    records = debug_everywhere.records
    assert any(name.startswith("botocore.endpoint") for name, _ in records), "botocore logged no request"
    leaks = sorted({(name, s) for name, text in records for s in _found(text, [key_id, secret, token])})
    assert not leaks, f"credentials in log records: {leaks}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE123/20261201/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=ab12'}",
         "{'Authorization': b'AWS4-HMAC-SHA256 Credential=<redacted>/20261201/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=ab12'}"),
        ("{'X-Amz-Security-Token': b'FwoGZXIvYXdzE+/token=='}", "{'X-Amz-Security-Token': b'<redacted>'}"),
        ("{'X-Amz-Security-Token': 'FwoGZXIvYXdzE+/token=='}", "{'X-Amz-Security-Token': '<redacted>'}"),
        ("host:127.0.0.1\nx-amz-security-token:FwoGZXIvYXdzE+/token==\n", "host:127.0.0.1\nx-amz-security-token:<redacted>\n"),
        ("GET /b/k?X-Amz-Credential=AKIAEXAMPLE123%2F20261201&X-Amz-Security-Token=Fwo%2Btok&X-Amz-Signature=1",
         "GET /b/k?X-Amz-Credential=<redacted>%2F20261201&X-Amz-Security-Token=<redacted>&X-Amz-Signature=1"),
        ("Response headers: {'ETag': '\"abc\"'}", "Response headers: {'ETag': '\"abc\"'}"),
    ],
)  # fmt: skip
def test_credential_fields_are_redacted_by_shape(text: str, expected: str) -> None:
    from ckptstore.redaction import CredentialFilter

    assert CredentialFilter().redact(text) == expected
    record = logging.LogRecord("botocore.endpoint", logging.DEBUG, __file__, 1, "Making request: %s", (text,), None)
    assert CredentialFilter().filter(record) and record.getMessage() == "Making request: " + expected


# --------------------------------------------------------------------------------------------
# The command line

_DRIVER = textwrap.dedent(
    r"""
    import contextlib, io, json, logging, os, sys, time, traceback

    from ckptstore.cli import main

    class Capture(logging.Handler):
        def __init__(self):
            super().__init__(level=1)
            self.records = []

        def emit(self, record):
            try:
                text = record.getMessage()
            except Exception:
                text = repr(record.msg) + repr(record.args)
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            self.records.append([record.name, record.levelname, text])

    # Sees every record a logger lets through: what the CLI enabled, nothing more.
    capture = Capture()
    logging.getLogger().addHandler(capture)
    with open(sys.argv[1]) as f:
        steps = json.load(f)
    results = []
    for step in steps:
        saved = dict(os.environ)
        os.environ.update(step.get("env", {}))
        capture.records = []
        out, err, rc, start = io.StringIO(), io.StringIO(), 0, time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(step["argv"]))
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # --debug re-raises: print it as Python would
                traceback.print_exc()
                rc = 1
        os.environ.clear()
        os.environ.update(saved)
        results.append({"argv": step["argv"], "rc": rc, "out": out.getvalue(), "err": err.getvalue(), "records": capture.records, "s": time.perf_counter() - start})
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
    """
)


def _cli_env(url: str, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTSTORE_", "AWS_"))}
    env.update(ENV_SENTINELS)
    env["AWS_DEFAULT_REGION"] = "us-east-1"
    env["CKPTSTORE_URL"] = url
    env["CKPTSTORE_STORAGE_OPTIONS"] = json.dumps(_options(endpoint))
    env["CKPTSTORE_CACHE_DIR"] = os.environ["CKPTSTORE_CACHE_DIR"]
    package_root = str(Path(ckptstore.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run_cli(steps: list[dict], env: dict[str, str], tmp: Path) -> list[dict]:
    (tmp / "driver.py").write_text(_DRIVER)
    (tmp / "steps.json").write_text(json.dumps(steps))
    proc = subprocess.run(
        [sys.executable, str(tmp / "driver.py"), str(tmp / "steps.json"), str(tmp / "results.json")],
        env=env, cwd=tmp, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not _found(proc.stdout + proc.stderr), "sentinel in the driver's own output"
    return json.loads((tmp / "results.json").read_text())


def _step_text(result: dict) -> str:
    return result["out"] + result["err"] + "\n".join(text for _, _, text in result["records"])


def test_cli_with_and_without_debug_shows_no_sentinel(s3_server: str, s3_url: tuple, tmp_path: Path) -> None:
    url, _ = s3_url
    checkpoint = tmp_path / "weights.pt"
    torch.save({"w": torch.randn(3000), "b": torch.zeros(3)}, checkpoint)
    missing = f"s3://ckptstore-missing-{uuid.uuid4().hex[:12]}/store"
    refused = {"CKPTSTORE_STORAGE_OPTIONS": json.dumps(_options("http://127.0.0.1:9", config_kwargs={"retries": {"total_max_attempts": 1}}))}
    plain = [
        ["init"], ["import", str(checkpoint)], ["branch", "side", "latest"], ["log", "--json"], ["show", "latest"],
        ["diff", "side", "main"], ["du"], ["gc", "--grace-period", "0"], ["fsck", "--read-data", "--json"],
    ]  # fmt: skip
    failing = [
        {"argv": ["show", "no-such-rev"]},
        {"argv": ["--store", missing, "log"]},
        {"argv": ["--store", missing, "init"]},
        {"argv": ["log"], "env": refused},
        {"argv": ["log"], "env": {"CKPTSTORE_STORAGE_OPTIONS": "{not json"}},
    ]
    steps = [{"argv": argv} for argv in plain]
    steps += failing
    steps += [{"argv": ["--debug", *argv]} for argv in (["log"], ["fsck", "--read-data"])]
    steps += [{**step, "argv": ["--debug", *step["argv"]]} for step in failing]
    results = _run_cli(steps, _cli_env(url, s3_server), tmp_path)

    problems = []
    print("\n" + "\n".join(f"  {r['s']:6.2f} s  rc {r['rc']}  ckpt {' '.join(r['argv'])}" for r in results))
    for step, result in zip(steps, results):
        should_fail = any(step["argv"][-len(f["argv"]) :] == f["argv"] and step.get("env") == f.get("env") for f in failing)
        if (result["rc"] != 0) != should_fail:
            problems.append(f"{result['argv']} exited {result['rc']}: {result['err'][-500:]}")
        leaked = _found(_step_text(result))
        if leaked:
            problems.append(f"{result['argv']}: {leaked} in output or logs:\n{_step_text(result)[:1500]}")
        if "--debug" in result["argv"]:
            loud = sorted({name for name, level, _ in result["records"] if level == "DEBUG" and not name.startswith("ckptstore")})
            if loud:
                problems.append(f"{result['argv']}: --debug enabled other loggers than ckptstore: {loud}")
    assert not problems, "\n".join(problems)
    debug_errors = [r for s, r in zip(steps, results) if "--debug" in r["argv"] and r["rc"] != 0]
    assert debug_errors and all("Traceback" in r["err"] for r in debug_errors), "--debug shows tracebacks on errors"


def test_cli_debug_in_a_real_process_shows_no_sentinel(s3_server: str, s3_url: tuple, tmp_path: Path) -> None:
    """The process boundary: ``python -m ckptstore --debug`` against a missing bucket; Python
    prints the traceback itself."""
    url, _ = s3_url
    missing = f"s3://ckptstore-missing-{uuid.uuid4().hex[:12]}/store"
    argv = ["--debug", "--store", missing, "log"]
    proc = subprocess.run(
        [sys.executable, "-m", "ckptstore", *argv],
        env=_cli_env(url, s3_server),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr, proc.stderr[-2000:]
    assert not _found(proc.stdout + proc.stderr), f"{_found(proc.stdout + proc.stderr)}\n{proc.stderr[-2000:]}"


def test_credentials_in_the_store_url_are_not_echoed(s3_server: str, s3_url: tuple, sentinel_env: None) -> None:
    """(The CLI prints the same message as its error line.)"""
    url, _ = s3_url
    bucket_and_prefix = url.removeprefix("s3://")
    with_credentials = f"s3://{URL_SENTINELS['key']}:{URL_SENTINELS['secret']}@{bucket_and_prefix}"
    shown = []
    try:
        store = ckptstore.open(with_credentials, storage_options={"client_kwargs": {"endpoint_url": s3_server}})
    except Exception as exc:  # noqa: BLE001 - refusing is right; what it says is checked
        shown.append(_describe(exc))
    else:
        shown += [repr(store), repr(store.objects), store.url]
        store.close()
    leaks = [text[:600] for text in shown if _found(text)]
    assert not leaks, "credentials from the URL shown:\n" + "\n---\n".join(leaks)
