"""Every option of every ``ckpt`` command is documented in docs/cli.md's reference.

The command tree is walked from :data:`ckptstore.cli.cli`: each command's long options
(``--keep-last``, and a flag's other half, ``--lower-is-better``) must appear in its own
section, ``### `ckpt NAME` ``; the group's options in "Global options". A new option without
a sentence in the reference fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from ckptstore.cli import cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def sections(text: str) -> dict[str, str]:
    """``### `` heading → the text up to the next heading of level 2 or 3."""
    out: dict[str, str] = {}
    for match in re.finditer(r"^### (.+)\n((?:(?!##).*\n?)*)", text, re.MULTILINE):
        out[match[1].strip()] = match[2]
    return out


def long_options(command: click.Command) -> list[str]:
    return [o for p in command.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]


def documented(option: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def test_every_command_has_a_reference_section() -> None:
    found = sections(DOC.read_text())
    assert "Global options" in found
    missing = [name for name in cli.commands if f"`ckpt {name}`" not in found]
    assert missing == [], f"docs/cli.md has no ### `ckpt NAME` section for {missing}"


@pytest.mark.parametrize("name", ["(global)", *sorted(cli.commands)])
def test_every_option_is_documented_in_its_section(name: str) -> None:
    found = sections(DOC.read_text())
    command = cli if name == "(global)" else cli.commands[name]
    section = found.get("Global options" if name == "(global)" else f"`ckpt {name}`", "")
    missing = [o for o in long_options(command) if not documented(o, section)]
    assert missing == [], f"docs/cli.md's section for {name} does not mention {missing}"


def test_the_walk_sees_options() -> None:
    """The walk is not vacuous: it finds the options a reader knows are there."""
    assert "--keep-last" in long_options(cli.commands["gc"])
    assert "--lower-is-better" in long_options(cli.commands["gc"])
    assert {"--store", "--version"} <= set(long_options(cli))
