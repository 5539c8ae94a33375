"""A store that can only be read serves every read and refuses every write, changing nothing.

* A store with two branches and a tag is bind-mounted read-only in a private mount namespace
  (``unshare -m``; as root, permissions alone make nothing read-only) and a child process
  (this file run as a script) opens it with ``create=False`` and with the default
  ``create=True``, then reads it: ``log``, ``show`` (``get_commit``), ``checkout`` and
  ``restore`` bit-exact against the tensors committed, ``diff``, ``export`` to a writable
  directory, ``du``, ``fsck`` with and without ``read_data``, a ``gc`` dry run, and the
  command line (``ckpt log``, ``show``, ``diff``, ``branch``, ``tag``, ``du``, ``fsck``,
  ``gc --dry-run``, ``export``; ``log`` once as its own ``python -m ckptstore`` process). ``commit`` (blocking
  or not), ``branch``, ``tag``, ``delete_tag``, ``gc`` and ``ckpt tag``/``branch``/``gc``
  fail with :class:`ReadOnlyStore` naming the store. Every file of the store, hidden ones
  and the catalog included, has the same path, size, bytes and mtime afterwards. Skipped,
  with the reason, where the machine allows no mount namespace.
* The same on S3 (moto with IAM enforced, in its own process): a user allowed only
  ``s3:Get*``, ``s3:List*`` (and moto's ``s3:Head*``) opens, logs, checks out and fscks a
  store another user wrote; its commit and a new store are :class:`ReadOnlyStore`.
* A missing store is never created on a read path: every read command of ``ckpt`` fails
  with one line naming the URL, and nothing appears there. ``open`` of a new store says so,
  once, at INFO.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore import KeepLast, Policy, ReadOnlyStore
from ckptstore.cli import main as ckpt_main

COMMITS = [("main", 1), ("main", 2), ("sweep", 3)]  # (branch, step), in commit order; sweep forks at main's step 1


def _state(step: int) -> dict:
    """The state committed at ``step``: big enough for chunks (beyond the inline threshold)."""
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"weight": torch.randn(256, 160, generator=g), "bias": torch.randn(160, generator=g).to(torch.bfloat16)},
        "step": step,
    }


def _build_history(root: Path) -> dict[int, str]:
    """Commit :data:`COMMITS` into a new store at ``root``; commit id by step."""
    ids = {}
    with ckptstore.open(str(root)) as store:
        for branch, step in COMMITS:
            if branch == "sweep":
                store.branch("sweep", at=ids[1])
            ids[step] = store.commit(_state(step), branch=branch, message=f"step {step}", metadata={"step": step}).id
        store.tag("release", at=ids[2])
    return ids


def _tree_digest(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (hidden ones included): a file's size, mtime and sha256, a
    directory's mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if path.is_file() and not path.is_symlink():
                out[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                out[rel] = ("dir" if path.is_dir() else "other", st.st_mtime_ns)
    return out


def _child_env() -> dict[str, str]:
    """The environment for a child: it imports the ckptstore this test imported."""
    source = str(Path(ckptstore.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}


_MOUNT_READ_ONLY = 'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && shift 2 && exec "$@"'


@functools.cache
def _no_read_only_mount(scratch: str) -> str | None:
    """Why a read-only bind mount cannot be made here (None: it can)."""
    src, dst = Path(scratch, "src"), Path(scratch, "dst")
    src.mkdir()
    dst.mkdir()
    try:
        probe = subprocess.run(
            ["unshare", "-m", "sh", "-c", _MOUNT_READ_ONLY, "sh", str(src), str(dst), "sh", "-c", '! touch "$0/probe" 2>/dev/null', str(dst)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except FileNotFoundError:
        return "no unshare command"
    if probe.returncode != 0:
        return f"cannot bind-mount a directory read-only in a private mount namespace (unshare -m): {probe.stderr.strip() or 'the mount stayed writable'}"
    return None


def test_a_store_on_a_read_only_mount_serves_every_read_refuses_every_write_and_changes_nothing(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    reason = _no_read_only_mount(str(tmp_path_factory.mktemp("mount-probe")))
    if reason:
        pytest.skip(reason)
    source, mount_point, out = tmp_path / "source", tmp_path / "mounted", tmp_path / "out"
    mount_point.mkdir()
    out.mkdir()
    ids = _build_history(source / "store")
    before = _tree_digest(source)
    command = ["unshare", "-m", "sh", "-c", _MOUNT_READ_ONLY, "sh", str(source), str(mount_point),
               sys.executable, __file__, "read-only-mount", str(mount_point / "store"), str(out), json.dumps(ids)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=_child_env(), timeout=300)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    assert "cannot be used" not in proc.stderr, proc.stderr  # a read-only store is expected, not a catalog failure
    assert _tree_digest(source) == before  # nothing written, moved or renamed: not even the catalog


def test_s3_credentials_that_only_read_serve_every_read_and_refuse_writes(tmp_path: Path) -> None:
    import boto3
    import requests

    with _moto_with_iam() as endpoint:
        admin = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        iam = boto3.client("iam", **admin)
        options = {}
        # AWS's read-only policy (AmazonS3ReadOnlyAccess) is s3:Get* and s3:List*; moto names
        # HEAD requests s3:HeadObject and s3:HeadBucket, which AWS authorises as GetObject.
        for user, actions in (("writer", ["s3:*"]), ("reader", ["s3:Get*", "s3:List*", "s3:Head*"])):
            iam.create_user(UserName=user)
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
            iam.put_user_policy(UserName=user, PolicyName=f"{user}-s3", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            options[user] = {
                "key": key["AccessKeyId"],
                "secret": key["SecretAccessKey"],
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            }
        boto3.client("s3", **admin).create_bucket(Bucket="read-only-test")
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=30).raise_for_status()  # IAM enforced from now on
        url = "s3://read-only-test/store"

        # single_writer: the reader's open makes the conditional-write probe, refused
        with ckptstore.open(url, storage_options=options["writer"], single_writer=True) as store:
            commit = store.commit(_state(1), message="step 1")
        with ckptstore.open(url, storage_options=options["reader"], create=False) as store:
            assert [c.id for c in store.log()] == [commit.id]
            assert store.get_commit(store.resolve("latest")).message == "step 1"
            _assert_bit_exact(store.checkout("main"), _state(1))
            assert store.fsck(read_data=True).ok
            with pytest.raises(ReadOnlyStore, match="store s3://read-only-test/store is read-only") as refused:
                store.commit(_state(2), message="refused")
            assert isinstance(refused.value, PermissionError)
            with pytest.raises(ReadOnlyStore):
                store.tag("nope", at="main")
            assert [c.id for c in store.log()] == [commit.id]
        with pytest.raises(ReadOnlyStore, match="s3://read-only-test/other"):
            ckptstore.open("s3://read-only-test/other", storage_options=options["reader"])


@contextlib.contextmanager
def _moto_with_iam():
    """A moto server in a process of its own (IAM enforcement is a setting of the whole
    process, and the session's server must stay open): its endpoint URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("the moto server did not start")
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


READ_COMMANDS = [["log"], ["show", "latest"], ["diff", "main~1", "main"], ["branch"], ["tag"], ["du"], ["fsck"], ["rev-parse", "main"]]


def test_no_read_command_creates_a_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "ckpst"  # a typo of the store's name
    for argv in [*READ_COMMANDS, ["export", "latest", str(tmp_path / "export")]]:
        rc, _, err = _ckpt(capsys, "--store", str(missing), *argv)
        assert rc == 1, (argv, err)
        assert err.strip() == f"ckpt: error: no ckptstore store at {missing}", (argv, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == [], argv  # nothing made: neither the store nor the export


def test_opening_a_new_store_says_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = str(tmp_path / "new")
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        ckptstore.open(url).close()
        ckptstore.open(url).close()
        ckptstore.open(url, create=False).close()
    created = [r for r in caplog.records if r.name == "ckptstore" and "created a new store" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in created] == [(logging.INFO, f"created a new store at {url}")]


def _ckpt(capsys: pytest.CaptureFixture[str] | None, *argv: str) -> tuple[int, str, str]:
    """``ckpt ARGV`` in this process (the function the ``ckpt`` script calls): exit status,
    stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    if capsys is not None:
        capsys.readouterr()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ckpt_main(list(argv))
            rc = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if capsys is not None:  # click writes to the real streams in places
        captured = capsys.readouterr()
        return rc, out.getvalue() + captured.out, err.getvalue() + captured.err
    return rc, out.getvalue(), err.getvalue()


def _assert_bit_exact(got: object, want: object, path: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape, path
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.bfloat16 else got, want.view(torch.uint8) if want.dtype == torch.bfloat16 else want), (
            path
        )
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), path
        for key in want:
            _assert_bit_exact(got[key], want[key], f"{path}.{key}")
    else:
        assert got == want, path


# -- what runs inside the mount namespace -----------------------------------------------------------


def _read_only_mount(url: str, out: str, ids_json: str) -> None:
    from safetensors.torch import load_file

    ids = {int(step): cid for step, cid in json.loads(ids_json).items()}
    assert not os.access(url, os.W_OK)  # the mount is read-only, even to root
    with ckptstore.open(url, create=False) as store:
        assert store.catalog.in_memory
        assert [c.id for c in store.log("main")] == [ids[2], ids[1]]
        assert [c.id for c in store.log("sweep")] == [ids[3], ids[1]]
        assert store.branches() == {"main": ids[2], "sweep": ids[3]}
        assert store.tags()["release"] == ids[2]
        shown = store.get_commit(store.resolve("release"))
        assert (shown.message, shown.metadata) == ("step 2", {"step": 2})
        assert store.resolve(ids[3][:8]) == ids[3]
        for step, cid in ids.items():
            _assert_bit_exact(store.checkout(cid), _state(step))
        model = torch.nn.Module()
        model.register_parameter("weight", torch.nn.Parameter(torch.zeros(256, 160)))
        model.register_buffer("bias", torch.zeros(160, dtype=torch.bfloat16))
        store.restore("sweep", {"model": model})
        _assert_bit_exact({k: v.detach() for k, v in model.state_dict().items()}, _state(3)["model"])
        d = store.diff("main~1", "main")
        assert sorted(c.path for c in d.changed) == ["model/bias", "model/weight"] and d.values_changed and not d.added and not d.removed
        files = store.export("release", os.path.join(out, "api-export"))
        exported = {}
        for name in files:
            if name.endswith(".safetensors"):
                exported.update(load_file(os.path.join(out, "api-export", name)))
        _assert_bit_exact(exported, _state(2)["model"])
        usage = store.du()
        assert sorted(b.name for b in usage.branches) == ["main", "sweep"] and usage.chunk_stored_bytes > 0
        assert store.fsck().ok
        report = store.fsck(read_data=True)
        assert report.ok and report.chunks_read > 0, report
        plan = store.gc(Policy(keep=KeepLast(1)), dry_run=True, grace_period_s=0)
        assert not plan.executed

        def refused(call) -> ReadOnlyStore:  # noqa: ANN001
            try:
                call()
            except ReadOnlyStore as exc:
                assert str(exc).startswith(f"store {url} is read-only: could not "), exc
                assert exc.url == url and isinstance(exc, PermissionError)
                return exc
            raise AssertionError("a write to a read-only store succeeded")

        refused(lambda: store.commit(_state(4), message="refused"))
        refused(lambda: store.commit(_state(4), message="refused", blocking=False).result())
        refused(lambda: store.branch("new", at="main"))
        refused(lambda: store.tag("new", at="main"))
        refused(lambda: store.tag("release", at="sweep", force=True))
        refused(lambda: store.delete_tag("release"))
        refused(lambda: store.delete_branch("sweep", force=True))
        refused(lambda: store.gc(Policy(keep=KeepLast(1)), grace_period_s=0))
        assert store.branches() == {"main": ids[2], "sweep": ids[3]} and store.tags()["release"] == ids[2]

    with ckptstore.open(url) as store:  # create=True finds the store: nothing to create
        assert store.resolve("main") == ids[2]

    cli_export = os.path.join(out, "cli-export")
    for argv in [*READ_COMMANDS, ["fsck", "--read-data"], ["gc", "--keep-last", "1", "--dry-run"], ["export", "release", cli_export]]:
        rc, stdout, stderr = _ckpt(None, "--store", url, *argv)
        assert rc == 0 and not stderr, (argv, stdout, stderr)
    rc, stdout, _ = _ckpt(None, "--store", url, "log", "--oneline")
    assert stdout.splitlines()[0].split()[0] == ids[2][:12] and "step 2" in stdout
    assert "release" in _ckpt(None, "--store", url, "tag")[1]
    assert ids[2] in _ckpt(None, "--store", url, "show", "release", "--json")[1]
    exported = {}
    for name in os.listdir(cli_export):
        if name.endswith(".safetensors"):
            exported.update(load_file(os.path.join(cli_export, name)))
    _assert_bit_exact(exported, _state(2)["model"])
    for argv in (["tag", "cli-tag", "main"], ["branch", "cli-branch", "main"], ["gc", "--keep-last", "1", "--grace-period", "0"]):
        rc, stdout, stderr = _ckpt(None, "--store", url, *argv)
        assert rc == 1 and stderr.startswith(f"ckpt: error: store {url} is read-only: could not "), (argv, stdout, stderr)
    proc = subprocess.run([sys.executable, "-m", "ckptstore", "--store", url, "log", "--oneline"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stderr and ids[2][:12] in proc.stdout, proc


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    mode, *args = sys.argv[1:]
    {"read-only-mount": _read_only_mount}[mode](*args)
