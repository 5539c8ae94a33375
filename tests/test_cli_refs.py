"""Refs as git has them: name rules, protected deletion, and messages in the CLI's own words.

Branch and tag names follow ``git check-ref-format`` (in a portable alphabet), and ``HEAD``,
``refs/...`` and, for branches, ``latest``/``best`` are reserved: the API raises
:class:`InvalidRefName` naming the name and the rule, ``ckpt`` exits 2. Deleting the default
branch, or the only ref to some commits, needs ``force``/``-D``; every deletion reports the
id it removed. Every message ``ckpt`` prints names options as ``--force``, never
``force=True``. The CLI runs in this process (``ckptstore.cli.main``), as ``ckpt`` would.
"""

from __future__ import annotations

import re

import pytest
import torch

import ckptstore
from ckptstore.cli import main as ckpt_main
from ckptstore.errors import InvalidRefName, ProtectedBranch, RefExists, UnknownRef, WrongRefKind

# Each breaks one rule (git's, the portable alphabet's, or a reserved name) for both kinds.
BAD_NAMES = [
    "", "a..b", "..", "a b", "tab\there", "new\nline", "nul\x00", "del\x7f", "a~1", "a^", "a:b", "a?", "a*", "a[b",
    "a\\b", "a@{1}", "@", "-dash", ".hidden", "a/.hidden", "trailing.", "a.lock", "a.lock/b", "a/b.lock", "a/", "/a",
    "a//b", "é", "a+b", "x" * 201, "0123456789abcdef0123456789abcdef", "HEAD", "refs/heads/x", "refs/tags/v1", "refs",
]  # fmt: skip
RESERVED_BRANCHES = ["latest", "best"]
GOOD_NAMES = ["v1.0", "sweep/lr-1e-4", "a.b/c_d", "x" * 200, "head", "HEADS", "refsx", "0123abcd", "a./b"]
PYTHON_WORDING = re.compile(r"\w+=(True|False|\[|None|'|\")|\b[a-z]+_[a-z_]+\(")


def run(url: str, *args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """``ckpt --store URL ARGS...``: exit status, stdout, stderr."""
    capsys.readouterr()
    try:
        ckpt_main(["--store", url, *args])
        rc = 0
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def store_url(tmp_path):
    """main: three commits; ``side`` one commit past main~1 (its own); ``old`` at main~2;
    tag ``rel`` at main~1."""
    url = str(tmp_path / "store")
    with ckptstore.open(url) as store:
        for i in range(3):
            store.commit({"w": torch.full((4,), float(i))}, message=f"main {i}")
        store.branch("side", at="main~1")
        store.commit({"w": torch.full((4,), 9.0)}, branch="side", message="side only")
        store.branch("old", at="main~2")
        store.tag("rel", at="main~1")
    return url


def refs_of(url: str) -> tuple[dict[str, str], dict[str, str]]:
    with ckptstore.open(url) as store:
        return store.branches(), store.tags()


@pytest.mark.parametrize("name", BAD_NAMES + RESERVED_BRANCHES)
def test_bad_or_reserved_branch_names_are_refused_with_the_rule_and_exit_2(store_url, name, capsys):
    before = refs_of(store_url)
    with ckptstore.open(store_url) as store:
        commit = lambda: store.commit({"w": torch.zeros(1)}, branch=name)  # noqa: E731 ("": the default branch)
        for make in (lambda: store.branch(name, at="main"), *[commit] * bool(name)):
            with pytest.raises(InvalidRefName) as info:
                make()
            assert isinstance(info.value, ValueError) and info.value.name == name and info.value.rule
            assert repr(name) in str(info.value) and info.value.rule in str(info.value)
    if "\x00" not in name:  # a NUL cannot be a command-line argument
        rc, out, err = run(store_url, "branch", "--", name, "main", capsys=capsys)
        assert (rc, out) == (2, "") and err.startswith("ckpt: error: ") and err.count("\n") == 1, err
    assert refs_of(store_url) == before


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_tag_names_are_refused_with_the_rule_and_exit_2(store_url, name, capsys):
    before = refs_of(store_url)
    with ckptstore.open(store_url) as store:
        for make in (lambda: store.tag(name, at="main"), lambda: store.commit({"w": torch.zeros(1)}, tags=[name])):
            with pytest.raises(InvalidRefName) as info:
                make()
            assert info.value.name == name and info.value.rule in str(info.value)
    if "\x00" not in name:
        rc, out, err = run(store_url, "tag", "--", name, "main", capsys=capsys)
        assert (rc, out) == (2, "") and err.startswith("ckpt: error: "), err
    assert refs_of(store_url) == before


@pytest.mark.parametrize(("name", "rule"), [
    ("a..b", "'..'"), ("a b", "space"), ("a~1", "'~'"), ("a@{1}", "'@{'"), ("-x", "starts with '-'"), ("a/.x", "starts with '.'"),
    ("a.lock/b", "'.lock'"), ("a//b", "'//'"), ("x.", "ends with '.'"), ("HEAD", "reserved"), ("refs/heads/x", "'refs/'"),
    ("latest", "the store moves itself"),
])  # fmt: skip
def test_the_error_says_which_rule(store_url, name, rule):
    with ckptstore.open(store_url) as store, pytest.raises(InvalidRefName, match=re.escape(rule)):
        store.branch(name, at="main")


def test_store_tags_cannot_be_set_or_deleted_by_hand(store_url, capsys):
    for args in (["tag", "latest", "main~2"], ["tag", "best", "main"], ["tag", "-d", "latest"], ["tag", "-f", "latest", "main~1"]):
        rc, out, err = run(store_url, *args, capsys=capsys)
        assert (rc, out) == (2, "") and "managed by the store" in err, (args, err)
    with ckptstore.open(store_url) as store:
        assert store.tags()["latest"] == store.resolve("side")


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_work_for_branches_and_tags(store_url, name, capsys):
    rc, out, err = run(store_url, "branch", name, "main", capsys=capsys)
    assert rc == 0, err
    with ckptstore.open(store_url) as store:
        assert store.branches()[name] == store.resolve("main")
        assert store.delete_branch(name) == store.resolve("main")
        assert store.tag(name, at="main~1").id == store.resolve("main~1")


def test_refs_made_before_the_reserved_names_can_still_be_read_renamed_and_deleted(store_url, capsys):
    """A store written before ``HEAD`` was reserved may hold a branch named so: it lists,
    resolves, renames and deletes; only new refs of that name are refused."""
    with ckptstore.open(store_url) as store:
        main = store.resolve("main")
        store.refs.set_ref_if_equals(ckptstore.store.RefKind.BRANCH, "HEAD", main, expected=None)
        store.refs.set_ref_if_equals(ckptstore.store.RefKind.TAG, "refs/x", main, expected=None)
        assert store.branches()["HEAD"] == main and store.resolve("HEAD") == main
    rc, out, err = run(store_url, "branch", capsys=capsys)
    assert rc == 0 and "HEAD" in out, err
    rc, out, err = run(store_url, "tag", "-d", "refs/x", capsys=capsys)
    assert (rc, out) == (0, f"Deleted tag refs/x (was {main[:12]}).\n"), err
    rc, out, err = run(store_url, "branch", "-m", "HEAD", "head-1", capsys=capsys)
    assert rc == 0, err
    assert refs_of(store_url)[0]["head-1"] == main and "HEAD" not in refs_of(store_url)[0]


def test_deleting_the_default_branch_needs_force(store_url, capsys):
    branches, tags = refs_of(store_url)
    head = branches["main"]
    for args in (["branch", "-d", "main"], ["branch", "--delete", "main"]):
        rc, out, err = run(store_url, *args, capsys=capsys)
        assert (rc, out) == (1, ""), err
        assert "'main'" in err and head[:12] in err and "default branch" in err and "-D" in err, err
    with ckptstore.open(store_url) as store, pytest.raises(ProtectedBranch) as info:
        store.delete_branch("main")
    assert info.value.default and info.value.commit_id == head and "force=True" in str(info.value)
    assert refs_of(store_url) == (branches, tags)  # unchanged

    rc, out, err = run(store_url, "branch", "-D", "main", capsys=capsys)
    assert (rc, out) == (0, f"Deleted branch main (was {head[:12]}).\n"), err
    assert "main" not in refs_of(store_url)[0]


def test_deleting_the_only_ref_to_commits_needs_force_and_says_how_many(store_url, capsys):
    branches, tags = refs_of(store_url)
    rc, out, err = run(store_url, "branch", "-d", "side", capsys=capsys)
    assert (rc, out) == (1, "") and "only ref to 1 commit," in err and branches["side"][:12] in err and "-D" in err, err
    # latest points at side's head, but the store moves latest itself: it keeps nothing.
    assert tags["latest"] == branches["side"]
    with ckptstore.open(store_url) as store:
        with pytest.raises(ProtectedBranch) as info:
            store.delete_branch("side")
        assert (info.value.lost_commits, info.value.default) == (1, False)
        assert refs_of(store_url) == (branches, tags)
        store.tag("keep", at="side")  # a tag of the user's own does keep it
        assert store.delete_branch("side") == branches["side"]
        store.branch("side", at="keep")
        store.delete_tag("keep")
    rc, out, err = run(store_url, "branch", "-d", "--force", "side", capsys=capsys)
    assert (rc, out) == (0, f"Deleted branch side (was {branches['side'][:12]}).\n"), err


def test_deleting_a_branch_whose_commits_others_reach_needs_no_force(store_url, capsys):
    branches, _ = refs_of(store_url)
    rc, out, err = run(store_url, "branch", "-d", "old", capsys=capsys)
    assert (rc, out, err) == (0, f"Deleted branch old (was {branches['old'][:12]}).\n", "")
    with ckptstore.open(store_url) as store:
        store.branch("copy", at="side")  # the same head as another branch
        assert store.delete_branch("copy") == branches["side"]


def test_tag_deletion_reports_the_id(store_url, capsys):
    _, tags = refs_of(store_url)
    rc, out, err = run(store_url, "tag", "-d", "rel", capsys=capsys)
    assert (rc, out) == (0, f"Deleted tag rel (was {tags['rel'][:12]}).\n"), err
    with ckptstore.open(store_url) as store:
        store.tag("rel2", at="main~2")
        assert store.delete_tag("rel2") == store.resolve("main~2")


def test_deleting_a_tag_as_a_branch_or_a_branch_as_a_tag_says_which_it_is(store_url, capsys):
    before = refs_of(store_url)
    rc, out, err = run(store_url, "branch", "-d", "rel", capsys=capsys)
    assert (rc, out, err) == (1, "", "ckpt: error: no branch 'rel': 'rel' is a tag; delete it with ckpt tag -d rel\n")
    rc, out, err = run(store_url, "tag", "-d", "side", capsys=capsys)
    assert (rc, out, err) == (1, "", "ckpt: error: no tag 'side': 'side' is a branch; delete it with ckpt branch -d side\n")
    with ckptstore.open(store_url) as store:
        with pytest.raises(WrongRefKind, match=re.escape("delete it with delete_tag('rel')")) as info:
            store.delete_branch("rel", force=True)
        assert isinstance(info.value, UnknownRef) and (info.value.asked, info.value.found) == ("branch", "tag")
        with pytest.raises(WrongRefKind, match=re.escape("delete it with delete_branch('side')")):
            store.delete_tag("side")
    assert refs_of(store_url) == before
    rc, out, err = run(store_url, "branch", "-d", "nosuch", capsys=capsys)
    assert rc == 1 and "unknown revision 'nosuch'" in err


def test_api_messages_name_python_options(store_url):
    with ckptstore.open(store_url) as store:
        with pytest.raises(RefExists, match=re.escape("use force=True to move it")):
            store.branch("side", at="main")
        with pytest.raises(RefExists, match=re.escape("use force=True to move it")):
            store.tag("rel", at="main")


def test_cli_messages_use_the_cli_option_names(tmp_path, capsys, caplog):
    """Every CLI error path that once printed Python keyword syntax (``force=True``,
    ``exclude=['optimizer']``, ``branch=``) now names the CLI's options."""
    url = str(tmp_path / "store")
    with ckptstore.open(url) as store:
        for i in range(3):
            store.commit({"model": {"w": torch.full((4,), float(i))}, "optimizer": {"m": torch.full((4,), float(i))}}, message=str(i))
        store.branch("side", at="main~1")
        store.commit({"model": {"w": torch.zeros(4)}}, branch="side")
        store.tag("rel", at="main")
    rc, _, err = run(url, "gc", "--keep-last", "3", "--keep-whole-last", "1", "--demote", "optimizer", "--grace-period", "0", capsys=capsys)
    assert rc == 0, err
    cases = {  # argv → what the message must say instead
        ("branch", "side", "main"): "--force",
        ("tag", "rel", "main~1"): "--force",
        ("branch", "-d", "side"): "-D",
        ("branch", "-d", "main"): "-D",
        ("branch", "-d", "rel"): "ckpt tag -d rel",
        ("tag", "-d", "side"): "ckpt branch -d side",
        ("export", "main~1", str(tmp_path / "out"), "--component", "optimizer"): "--exclude optimizer",
        ("branch", "-m", "main", "trunk"): "commits that name no branch",  # a warning, and it renames
    }
    for argv, expected in cases.items():
        caplog.clear()
        rc, out, err = run(url, *argv, capsys=capsys)
        said = out + err + caplog.text  # warnings reach stderr through logging
        assert expected in said, (argv, rc, said)
        assert PYTHON_WORDING.search(said) is None, (argv, said)
