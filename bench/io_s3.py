"""The S3 part of bench/io.py: commit and checkout of a synthetic state on moto's S3 server,
directly and through a proxy that delays every HTTP request; the server and the proxy run as
long-lived children of io.py (``--op moto_server`` / ``--op latency_proxy``)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from harness import MB, MiB, cli
from harness.child import stop_server, write_port
from harness.files import wait_for_quiet
from harness.report import table_header

# --------------------------------------------------------------------------------------------
# Children


def run_s3_child(args) -> dict:
    """Commit (``s3_commit``) or check out (``s3_checkout``) the synthetic S3 state."""
    import torch

    import ckptstore
    from harness.measure import Measure
    from harness.ops import commit_stats
    from harness.state import synthetic_state

    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": args.endpoint, "region_name": "us-east-1"}}
    state = synthetic_state(args.s3_bytes, args.s3_tensor_bytes, seed=1000) if args.op == "s3_commit" else None
    store = ckptstore.open(args.target, storage_options=opts, chunk_size_bytes=args.s3_chunk_bytes, threads=args.threads)
    with Measure() as m:
        out = store.commit(state, message="s3") if state is not None else store.checkout("latest")
    result: dict[str, Any] = {"op": args.op, **m.result(), "store_threads": store.pipeline.threads}
    if state is not None:
        result["stats"] = commit_stats(out)
    elif args.verify:
        ref = synthetic_state(args.s3_bytes, args.s3_tensor_bytes, seed=1000)
        result["verified"] = ref.keys() == out.keys() and all(torch.equal(ref[k], out[k]) for k in ref)
        if not result["verified"]:
            raise SystemExit("s3_checkout: state differs")
    store.close()
    return result


def run_moto(args) -> None:
    """Start moto's S3 server, write ``{"port": N}`` to ``--result``, serve until killed."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    write_port(args.result, server.get_host_and_port()[1])
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()
    raise SystemExit(0)


class LatencyProxy:
    """Forwards TCP connections to ``upstream_port``, holding the first bytes of every HTTP
    request for ``delay_s``; one line per request (time, kind) to ``trace`` if given."""

    METHODS = (b"GET ", b"PUT ", b"HEAD ", b"POST ", b"DELETE ", b"OPTIONS ", b"PATCH ")

    def __init__(self, upstream_port: int, delay_s: float, trace: Any) -> None:
        self.upstream_port, self.delay_s, self.trace = upstream_port, delay_s, trace

    async def _client_to_server(self, client_r: Any, up_w: Any, state: dict) -> None:
        import asyncio

        try:
            while data := await client_r.read(1 << 16):
                if state["new"]:
                    state["new"] = False
                    if data.startswith(self.METHODS):
                        if self.trace is not None:
                            method, target = data.split(b" ", 2)[:2]
                            kind = "LIST" if method == b"GET" and b"list-type=" in target else method.decode()
                            self.trace.write(f"{time.time():.6f} {kind}\n")
                        await asyncio.sleep(self.delay_s)
                up_w.write(data)
                await up_w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            up_w.close()

    async def _server_to_client(self, up_r: Any, client_w: Any, state: dict) -> None:
        try:
            while data := await up_r.read(1 << 16):
                state["new"] = True
                client_w.write(data)
                await client_w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            client_w.close()

    async def handle(self, client_r: Any, client_w: Any) -> None:
        import asyncio

        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        # A new request starts with the first client bytes after a response began (or on a
        # fresh connection). Keep-alive clients send requests one at a time, so this finds
        # every request boundary; a body sent after "100 Continue" is not a new request.
        state = {"new": True}
        await asyncio.gather(self._client_to_server(client_r, up_w, state), self._server_to_client(up_r, client_w, state))


def run_proxy(args) -> None:
    """Start the latency proxy in front of ``--endpoint``, write ``{"port": N}`` to
    ``--result``, serve until killed."""
    import asyncio

    trace = open(args.trace, "a", buffering=1) if args.trace else None  # noqa: SIM115  one line per request, open until killed
    proxy = LatencyProxy(int(args.endpoint.rsplit(":", 1)[1]), args.latency_ms / 1000, trace)

    async def main() -> None:
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        write_port(args.result, server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set_result, None)
        async with server:
            await stop

    asyncio.run(main())
    raise SystemExit(0)


# --------------------------------------------------------------------------------------------
# Parent


def _requests_since(trace: str, offset: int, wall: list[float]) -> tuple[dict, dict]:
    """Requests by kind the proxy saw after ``offset`` of its trace: (inside the timed
    operation's ``wall`` interval, all)."""
    with open(trace) as f:
        f.seek(offset)
        lines = f.read().splitlines()
    timed: dict[str, int] = {}
    total: dict[str, int] = {}
    for line in lines:
        stamp, kind = line.split()
        total[kind] = total.get(kind, 0) + 1
        if wall[0] <= float(stamp) <= wall[1]:
            timed[kind] = timed.get(kind, 0) + 1
    return timed, total


def _cpu_s(p: Any) -> float:
    import psutil

    c = psutil.Process(p.pid).cpu_times()
    return c.user + c.system


def _empty_bucket(client: Any, bucket: str) -> None:
    """Delete the bucket and all in it (frees moto's memory)."""
    objs = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    while objs:
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": o["Key"]} for o in objs]})
        objs = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    client.delete_bucket(Bucket=bucket)


def _measure_pair(
    child: Any,
    args,
    out: dict,
    servers: tuple[Any, list],
    bucket: str,
    key: str,
    ep: str,
    n: int,
    *,
    latency: float,
    first: bool,
    trace: str,
) -> None:
    """Commit, then check out (verified on the first run), the S3 state in ``bucket``."""
    moto, proxies = servers
    extra = [
        "--s3-bytes",
        str(args.s3_bytes),
        "--s3-tensor-bytes",
        str(args.s3_tensor_bytes),
        "--s3-chunk-bytes",
        str(args.s3_chunk_bytes),
        "--endpoint",
        ep,
    ]
    for opname, verify in (("commit", False), ("checkout", first)):
        offset = os.path.getsize(trace)
        cpu0 = (_cpu_s(moto), sum(_cpu_s(p) for p in proxies))
        res = child(f"s3_{opname}", f"s3://{bucket}/store", threads=n, verify=verify, extra=extra)
        res["server_cpu_s"] = _cpu_s(moto) - cpu0[0]
        res["proxy_cpu_s"] = sum(_cpu_s(p) for p in proxies) - cpu0[1]
        if latency:
            res["requests"], res["requests_incl_open"] = _requests_since(trace, offset, res["wall"])
        out.setdefault(f"{key}/{opname}", []).append(res)


def run_s3(args, report: dict, child: Any, children: Any) -> None:
    """The S3 part: ``child(op, target, **kw)`` runs one io.py child; ``children`` starts the
    server children."""
    import boto3

    moto, moto_port = children.start_server(["--op", "moto_server"])
    proxies = []
    trace = os.path.join(args.workdir, "proxy-trace.txt")
    open(trace, "w").close()
    out: dict[str, list[dict]] = {}
    try:
        endpoint = f"http://127.0.0.1:{moto_port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
        endpoints = {0: endpoint}
        if args.latency_ms:
            proxy, proxy_port = children.start_server(["--op", "latency_proxy", "--endpoint", endpoint, "--latency-ms", str(args.latency_ms), "--trace", trace])
            proxies.append(proxy)
            endpoints[args.latency_ms] = f"http://127.0.0.1:{proxy_port}"
        k = 0
        for r in range(args.extra_repeat):
            wait_for_quiet(args.max_load, args.max_wait_s)
            for latency, ep in endpoints.items():
                for n in args.s3_threads:
                    k += 1
                    bucket, key = f"bench-{k}", f"{latency:g}ms/{n}"
                    client.create_bucket(Bucket=bucket)
                    _measure_pair(child, args, out, (moto, proxies), bucket, key, ep, n, latency=latency, first=r == 0, trace=trace)
                    res, res2 = out[f"{key}/commit"][-1], out[f"{key}/checkout"][-1]
                    cli.log(f"s3 {latency:g} ms, threads {n}: commit {res['seconds']:.3f}s, checkout {res2['seconds']:.3f}s", load=True)
                    _empty_bucket(client, bucket)
    finally:
        for p in proxies:
            stop_server(p)
        stop_server(moto)
    report["s3"] = out


# --------------------------------------------------------------------------------------------
# Report


def s3_section(report: dict, args, bars: Any) -> tuple[list[str], list[str]]:
    """(the S3 table, the S3 bars) of the report; ``bars.check`` records a verdict."""
    from statistics import median

    def med(rs: list[dict], key: str = "seconds") -> float:
        return median(r[key] for r in rs)

    s = report["s3"]
    nbytes = args.s3_bytes
    lines = [f"\n### S3 on moto ({nbytes / MiB:.0f} MiB, {args.s3_chunk_bytes / MiB:g} MiB chunks; {args.extra_repeat} run(s), median)\n"]
    lines += table_header(["per-request latency", "threads", "commit s", "commit MB/s", "checkout s", "checkout MB/s", "commit CPU s: client / moto",
                           "checkout CPU s: client / moto", "commit extra peak RSS", "checkout extra peak RSS"], "rrrrrrrrrr")  # fmt: skip
    lats = sorted({float(k.split("ms")[0]) for k in s})
    for lat in lats:
        for n in args.s3_threads:
            c, k = s[f"{lat:g}ms/{n}/commit"], s[f"{lat:g}ms/{n}/checkout"]
            lines.append(f"| {lat:g} ms | {n} | {med(c):.3f} | {nbytes / MB / med(c):.1f} | {med(k):.3f} | {nbytes / MB / med(k):.1f} | "
                         f"{med(c, 'cpu_s'):.2f} / {med(c, 'server_cpu_s'):.2f} | {med(k, 'cpu_s'):.2f} / {med(k, 'server_cpu_s'):.2f} | "
                         f"{med(c, 'extra_peak_rss') / MB:,.0f} MB | {med(k, 'extra_peak_rss') / MB:,.0f} MB |")  # fmt: skip
    reqs = [(k, v[0]["requests"]) for k, v in s.items() if v[0].get("requests")]
    if reqs:
        lines.append("\nHTTP requests in the timed operation, seen by the proxy (first run): " + "; ".join(
            f"{k.split('/', 1)[1].replace('/', ' threads, ')}: " + ", ".join(f"{m} {c}" for m, c in sorted(v.items())) for k, v in reqs))  # fmt: skip
    verdicts = []
    lo, hi = min(args.s3_threads), max(args.s3_threads)
    for lat in lats:
        for opname in ("commit", "checkout"):
            sp = med(s[f"{lat:g}ms/{lo}/{opname}"]) / med(s[f"{lat:g}ms/{hi}/{opname}"])
            if lat:
                verdicts.append(bars.check(f"(6) S3 {opname}, {lat:g} ms latency: threads {hi} ≥ 5× threads {lo}", sp >= 5, f"{sp:.2f}×"))
            else:
                verdicts.append(f"- (6) S3 {opname}, no added latency: threads {hi} is {sp:.2f}× threads {lo} (informational)")
    return lines, verdicts
