"""The UI's pages, rendered on the server as HTML with inline SVG.

A :class:`Site` answers a page path (``index.html``, ``storage.html``, ``commit/ID.html``,
``diff/A..B.html``) with its HTML. Every link is relative, so that the same pages work
served (``ckpt ui``) and written as files (``ckpt ui --export``). Rendering only reads
the store.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from functools import cached_property
from html import escape
from typing import Any

from ..codec import HEADER_SIZE, Kind, read_header
from ..errors import CkptStoreError
from ..layout import chunk_key
from ..manifest import Manifest
from ..store import Store
from ..usage import Usage, store_sizes
from .model import History, component_of
from .svg import chart_svg, graph_svg

#: Chunk headers read per commit page to name codecs (the rest are counted, not named).
MAX_CODEC_READS = 256
_COMMIT = re.compile(r"commit/([0-9a-f]{32})\.html")
_DIFF = re.compile(r"diff/([0-9a-f]{32})\.\.([0-9a-f]{32})\.html")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _layout(title: str, body: str, *, root: str) -> str:
    nav = f'<nav><a href="{root}index.html">history</a> <a href="{root}storage.html">storage</a></nav>'
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)} · ckptstore</title>'
        f'<link rel="stylesheet" href="{root}static/ui.css"></head><body>{nav}<main><h1>{escape(title)}</h1>{body}</main>'
        f'<div id="hover"></div><script src="{root}static/ui.js"></script></body></html>'
    )  # fmt: skip


def _table(head: list[str], rows: list[list[str]], *, cls: str = "") -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


class Site:
    """The pages of one store's history. What costs a pass over every commit (the listing of
    stored sizes, ``du``, the bytes per component) is read on first need and kept: a new
    history (a ref moved) is a new site."""

    def __init__(self, store: Store, history: History) -> None:
        self.store = store
        self.history = history
        self._reading = threading.Lock()  # one pass over the commits at a time: the page waits for the warm-up

    @cached_property
    def sizes(self) -> dict[str, int]:
        return store_sizes(self.store.objects)

    @cached_property
    def _row(self) -> dict[str, int]:
        """Commit id → its row in the history (newest first)."""
        return {cid: i for i, cid in enumerate(self.history.nodes)}

    @cached_property
    def usage(self) -> Usage:
        return self.store.du()

    def warm(self) -> None:
        """Read what the storage page needs (a pass over every commit), so that its first
        view is fast: the server calls this in the background as it starts. Idempotent."""
        with self._reading:
            for name in ("sizes", "usage", "components"):
                getattr(self, name)

    def paths(self) -> Iterator[str]:
        """Every page the site links to: each commit's, and its diff from its first parent."""
        yield "index.html"
        yield "storage.html"
        for cid, node in self.history.nodes.items():
            yield f"commit/{cid}.html"
            if node.parents:
                yield f"diff/{node.parents[0]}..{cid}.html"

    def page(self, path: str) -> str | None:
        """The HTML of the page at ``path``, or ``None`` if there is no such page."""
        if path in ("", "index.html"):
            return self.index()
        if path == "storage.html":
            return self.storage()
        if m := _COMMIT.fullmatch(path):
            return self.commit(m[1]) if m[1] in self.history.nodes else None
        if m := _DIFF.fullmatch(path):
            return self.diff(m[1], m[2]) if m[1] in self.history.nodes and m[2] in self.history.nodes else None
        return None

    def index(self) -> str:
        h = self.history
        href = lambda cid: f"commit/{cid}.html"
        charts = "".join(f'<section class="metric"><h2>{escape(m)}</h2>{chart_svg(h, m, href)}</section>' for m in h.metric_names())
        options = "".join(f'<option value="{cid}">{cid[:12]} {escape(n.commit.branch or "")} {escape(n.commit.message)}</option>' for cid, n in h.nodes.items())
        form = (
            '<form id="diff-form" class="diff-form">Compare <select name="a">' + options + '</select> with <select name="b">'
            + options + '</select> <button type="submit">diff</button></form>'
        )  # fmt: skip
        legend = "<p class='legend'>◆ fork point · ★ best · hollow: deleted by the previewed policy · [demoted]: components gc dropped</p>"
        summary = f"<p>{len(h.nodes)} commits on {len(h.branches)} branches, {len(h.tags)} tags.</p>"
        body = summary + legend + "<h2>metrics</h2>" + (charts or "<p>no metrics logged</p>") + "<h2>commits</h2>" + form + graph_svg(h, href)
        return _layout(f"ckptstore history of {self.store.url}", body, root="")

    def _tensor_rows(self, manifest: Manifest, parent_chunks: set[str], dropped: tuple[str, ...]) -> tuple[list[list[str]], dict[str, list[int]]]:
        """A row per tensor, and per component ``[tensors, logical, stored, new]`` bytes
        (nothing stored for a tensor of a component gc dropped)."""
        per_blob: dict[int, int] = {}
        for e in manifest.tensors:
            per_blob[e.blob] = per_blob.get(e.blob, 0) + 1
        codecs: dict[str, str] = {}
        rows: list[list[str]] = []
        components: dict[str, list[int]] = {}
        for e in manifest.tensors:
            blob = manifest.blobs[e.blob]
            share = per_blob[e.blob]
            if any(e.path == p or e.path.startswith(p.rstrip("/") + "/") for p in dropped):
                stored, new, codec = 0, 0, "dropped by gc"
            elif blob.inline is not None:
                stored, new, codec = (
                    len(blob.inline) // share,
                    0,
                    "inline (in the manifest)",
                )  # counted with the manifest, not as new chunks
            else:
                stored = sum(self.sizes.get(chunk_key(c.id), 0) for c in blob.chunks) // share
                new = sum(self.sizes.get(chunk_key(c.id), 0) for c in blob.chunks if c.id not in parent_chunks) // share
                codec = ", ".join(sorted({self._codec(c.id, codecs) for c in blob.chunks})) or "empty"
            shared = f" (blob shared by {share})" if share > 1 else ""
            rows.append(
                [
                    f"<code>{escape(e.path)}</code>",
                    escape(e.dtype),
                    escape(str(tuple(e.shape))),
                    human(e.nbytes),
                    human(stored) + shared,
                    human(new),
                    escape(codec),
                ]
            )
            c = components.setdefault(component_of(e.path), [0, 0, 0, 0])
            c[0] += 1
            c[1] += e.nbytes
            c[2] += stored
            c[3] += new
        return rows, components

    def _codec(self, chunk_id: str, seen: dict[str, str]) -> str:
        if chunk_id not in seen:
            if len(seen) >= MAX_CODEC_READS:
                return "…"
            key = chunk_key(chunk_id)
            try:
                seen[chunk_id] = read_header(self.store.objects.get_range(key, 0, HEADER_SIZE), key=key, kind=Kind.CHUNK)[0].name.lower()
            except CkptStoreError:
                seen[chunk_id] = "missing"
        return seen[chunk_id]

    def commit(self, cid: str) -> str:
        node = self.history.nodes[cid]
        c = node.commit
        manifest = self.store.manifest_of(c)
        parent_chunks = self.store.manifest_of(self.history.nodes[node.parents[0]].commit).chunk_ids() if node.parents else set()
        rows, components = self._tensor_rows(manifest, parent_chunks, node.dropped)

        def link(p: str) -> str:
            return f'<a href="{p}.html" class="commit-link">{p[:12]}</a>'

        facts = [
            ("commit", f"<code>{cid}</code>"), ("branch", escape(c.branch or "")), ("message", escape(c.message)),
            ("date", escape(c.created_at.isoformat(timespec="seconds"))),
            ("parents", " ".join(link(p) + f' (<a href="../diff/{p}..{cid}.html">diff</a>)' for p in node.parents) or "none"),
            ("refs", escape(", ".join(list(node.branches) + [f"tag: {t}" for t in node.tags])) or "—"),
            ("size", f"{human(c.stats.logical_bytes)} logical, {human(c.stats.new_bytes)} newly stored"),
            ("gc", f"demoted: {escape(', '.join(node.dropped))} dropped" if node.dropped else "whole"),
        ]  # fmt: skip
        collected = self.store.collected_parents(c)
        if collected:
            facts.append(("collected parents", escape(", ".join(p[:12] for p in collected))))
        if (outcome := self.history.outcome(cid)) is not None:
            facts.append(("previewed policy", outcome))
        body = "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"
        body += "<h2>metrics</h2>" + _table(["metric", "value"], [[escape(k), f"{v:.6g}"] for k, v in sorted(c.metrics.items())])
        body += "<h2>metadata</h2><pre>" + escape(_json(c.metadata)) + "</pre>"
        body += "<h2>components</h2>" + _table(
            ["component", "tensors", "logical", "stored", "new"],
            [[escape(k), str(v[0]), human(v[1]), human(v[2]), human(v[3])] for k, v in sorted(components.items())],
        )
        body += f"<h2>tensors ({len(rows)})</h2>" + _table(["key path", "dtype", "shape", "bytes", "stored", "new", "codec"], rows, cls="tensors")
        return _layout(f"commit {cid[:12]}", body, root="../")

    def diff(self, a: str, b: str) -> str:
        d = self.store.diff(a, b, values=True)
        rows = [["added", f"<code>{escape(t.path)}</code>", escape(str(t.dtype[1])), escape(str(t.shape[1])), human(t.nbytes[1]), "", ""] for t in d.added]
        rows += [["removed", f"<code>{escape(t.path)}</code>", escape(str(t.dtype[0])), escape(str(t.shape[0])), human(t.nbytes[0]), "", ""] for t in d.removed]
        for t in d.changed:
            layout = (
                f"{t.dtype[0]} {t.shape[0]} → {t.dtype[1]} {t.shape[1]}"
                if (t.dtype[0], t.shape[0]) != (t.dtype[1], t.shape[1])
                else f"{t.dtype[1]} {t.shape[1]}"
            )
            delta = "" if t.max_abs_change is None else f"{t.max_abs_change:.4g}"
            rel = "" if t.relative_change is None else f"{t.relative_change:.4g}"
            rows.append(["changed", f"<code>{escape(t.path)}</code>", escape(layout), "", human(t.nbytes[1]), delta, rel])
        head = (
            f'<p>from <a href="../commit/{a}.html">{a[:12]}</a> to <a href="../commit/{b}.html">{b[:12]}</a>: '
            f"{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed ({human(d.changed_bytes)}), {d.unchanged} unchanged"
            + ("; non-tensor values differ" if d.values_changed else "") + "</p>"
        )  # fmt: skip
        return _layout(
            f"diff {a[:12]}..{b[:12]}",
            head + _table(["", "key path", "dtype / shape", "", "bytes", "max |Δ|", "relative change"], rows, cls="diff"),
            root="../",
        )

    def storage(self) -> str:
        self.warm()
        usage = self.usage
        body = f"<p>{human(usage.logical_bytes)} logical in {len(usage.commits)} commits, {human(usage.physical_bytes)} stored; dedup {usage.dedup_ratio:.2f}×, compression {usage.compression_ratio:.2f}×</p>"
        body += "<h2>branches</h2>" + _table(
            ["branch", "commits", "logical", "stored"],
            [[escape(b.name), str(b.commits), human(b.logical_bytes), human(b.physical_bytes)] for b in usage.branches],
        )
        body += "<h2>components</h2>" + _table(
            ["component", "logical (all commits)", "stored in chunks (each once)", "inline in manifests (raw, each manifest once)"],
            [[escape(k), human(v[0]), human(v[1]), human(v[2])] for k, v in sorted(self.components.items())],
        )
        body += "<h2>retention preview</h2>" + self._retention()
        return _layout("storage", body, root="")

    @cached_property
    def components(self) -> dict[str, list[int]]:
        """Per component: logical bytes over every commit, stored bytes of its chunks (each
        once), and raw bytes of its inline tensors (once per manifest, which stores them)."""
        out: dict[str, list[int]] = {}
        seen: set[str] = set()
        for node in self.history.nodes.values():
            fresh_manifest = node.commit.manifest not in seen
            seen.add(node.commit.manifest)
            manifest = self.store.manifest_of(node.commit)
            for e in manifest.tensors:
                row = out.setdefault(component_of(e.path), [0, 0, 0])
                row[0] += e.nbytes
                blob = manifest.blobs[e.blob]
                if blob.inline is not None and fresh_manifest:
                    row[2] += e.nbytes
                for c in blob.chunks:
                    if c.id not in seen:
                        seen.add(c.id)
                        row[1] += self.sizes.get(chunk_key(c.id), 0)
        return out

    def _retention(self) -> str:
        retention = self.history.retention
        if retention is None:
            plan = self.store.gc(None, dry_run=True)
            return f"<p>No policy given (<code>ckpt ui --policy '--keep-last 3 …'</code>): gc would keep every commit a ref reaches and delete {plan.counts() or 'nothing'} ({human(plan.planned_bytes)}).</p>"
        counts = {k: sum(1 for v in retention.outcome.values() if v == k) for k in ("keep", "demote", "delete")}
        rows = [[f'<a href="commit/{cid}.html">{cid[:12]}</a>', escape(self.history.nodes[cid].commit.branch or '') if cid in self.history.nodes else "", outcome,
                 escape(", ".join(retention.plan.newly_demoted.get(cid, ())))] for cid, outcome in sorted(retention.outcome.items(), key=lambda item: self._row.get(item[0], -1)) if outcome != "keep"]  # fmt: skip
        return (
            f"<p class='retention'>keep {counts['keep']}, demote {counts['demote']}, delete {counts['delete']}; "
            f"frees {human(retention.freed_bytes)} ({retention.freed_bytes:,} bytes, by gc's own dry run)</p>"
            + _table(["commit", "branch", "outcome", "drops"], rows)
        )


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, sort_keys=True, default=repr, ensure_ascii=False)
