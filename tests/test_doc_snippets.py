"""Every ```python block of README.md and docs/*.md runs, so a snippet that stops working
fails here.

Each file's blocks run in order, in one fresh namespace, in a child process whose working
directory is an empty temporary one; a traceback names the markdown file and line. Markdown
the renderer hides steers the run:

- ``<!-- test-setup`` ... ``-->``: Python run at that point, for context a block does not
  show (a model, a dataset, a process group).
- ``<!-- not-run: REASON -->`` right above a block: the block is not run; each one is listed
  as a skipped test with its reason (``pytest -rs``).

A block that names an ``"s3://BUCKET/..."`` URL runs against moto's S3 server, with the
bucket created and ``AWS_ENDPOINT_URL`` pointing at the server. The walk-through of
docs/cli.md is run, with the shell steps between its blocks, by tests/test_cli.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: Sections whose blocks another test runs: (file, heading) -> that test.
RUN_ELSEWHERE = {
    ("docs/cli.md", "## Walk-through"): ("tests/test_cli.py", "test_docs_walkthrough_runs_from_an_empty_directory"),
}
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:(.*?)-->\s*$")
SETUP = re.compile(r"^\s*<!--\s*test-setup\s*$")
S3_URL = re.compile(r"""["']s3://([a-z0-9][a-z0-9.-]+)/""")


@dataclass(frozen=True)
class Snippet:
    doc: str  # relative to the repository
    line: int  # of the code's first line
    code: str
    hidden: bool = False  # a test-setup comment
    not_run: str | None = None  # why not, if not

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def snippets(path: Path) -> list[Snippet]:
    """The Python blocks and test-setup comments of a markdown file, in order."""
    doc = path.relative_to(REPO).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Snippet] = []
    heading, not_run, i = "", None, 0
    while i < len(lines):
        line = lines[i]
        fence, setup, skip = FENCE.match(line), SETUP.match(line), NOT_RUN.match(line)
        if fence:
            indent, lang = fence.groups()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            if lang == "python":
                body = "\n".join(text[len(indent) :] if text.startswith(indent) else text.lstrip() for text in lines[i + 1 : end])
                elsewhere = next((f"run by {test[0]}::{test[1]}" for (d, h), test in RUN_ELSEWHERE.items() if d == doc and h == heading), None)
                out.append(Snippet(doc, i + 2, body + "\n", not_run=not_run if not_run is not None else elsewhere))
            not_run, i = None, end + 1
            continue
        if setup:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->")
            out.append(Snippet(doc, i + 2, "\n".join(lines[i + 1 : end]) + "\n", hidden=True))
            i = end + 1
            continue
        if skip:
            not_run = skip.group(1).strip()
        elif line.strip():
            not_run = None
            if re.match(r"#{1,2} ", line):  # a ### subsection stays in its ## section
                heading = line.rstrip()
        i += 1
    return out


#: Run in the child: execute each block in one namespace, compiled so that tracebacks point
#: at the markdown file and line.
DRIVER = """
import json, sys
namespace = {"__name__": "__main__"}
for block in json.load(open(sys.argv[1], encoding="utf-8")):
    print("--- running", block["where"], flush=True)
    exec(compile("\\n" * (block["line"] - 1) + block["code"], block["doc"], "exec"), namespace)
"""

ALL = {path.relative_to(REPO).as_posix(): snippets(path) for path in DOCS}
RUN = {doc: found for doc, found in ALL.items() if any(not s.hidden and s.not_run is None for s in found)}
SKIPPED = [s for found in ALL.values() for s in found if s.not_run is not None]


def test_every_python_block_is_found():
    for path in DOCS:
        doc = path.relative_to(REPO).as_posix()
        fences = len(re.findall(r"^\s*```python\s*$", path.read_text(encoding="utf-8"), re.MULTILINE))
        assert len([s for s in ALL[doc] if not s.hidden]) == fences, doc
    assert len(RUN) >= 3 and sum(len(found) for found in RUN.values()) >= 15
    for snippet in SKIPPED:
        assert snippet.not_run, f"{snippet.where}: <!-- not-run: --> needs a reason"
    for (doc, heading), (test_file, test_name) in RUN_ELSEWHERE.items():
        assert heading in (REPO / doc).read_text(encoding="utf-8").splitlines(), (doc, heading)
        assert f"def {test_name}(" in (REPO / test_file).read_text(encoding="utf-8"), test_file


@pytest.mark.parametrize("snippet", SKIPPED, ids=[s.where for s in SKIPPED])
def test_blocks_not_run_here(snippet):
    pytest.skip(f"{snippet.where}: {snippet.not_run}")


@pytest.mark.parametrize("doc", sorted(RUN))
def test_python_blocks_run_in_order(doc, tmp_path, request):
    blocks = [s for s in ALL[doc] if s.not_run is None]
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTSTORE_") or k == "CKPTSTORE_CACHE_DIR"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    code = "\n".join("\n".join(x for x in s.code.splitlines() if not x.lstrip().startswith("#")) for s in blocks)
    buckets = sorted(set(S3_URL.findall(code)))
    if buckets:
        import boto3

        endpoint = request.getfixturevalue("s3_server")
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([{"doc": s.doc, "line": s.line, "code": s.code, "where": s.where} for s in blocks]))
    run = subprocess.run([sys.executable, "-c", DRIVER, str(spec)], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"a python block of {doc} failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
