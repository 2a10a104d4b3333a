"""
The scenarios: each starts what it needs, measures, stops it, and returns
a dict of figures (and C{"skipped"} with a reason when it cannot run).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks import probes, procs, streams
from benchmarks.limits import limits, limits_instructions
from benchmarks.websocket import websocket
from benchmarks.wrk import CHAT, CHAT_STREAM, run_wrk

#: Events per streamed reply from the fake upstream, plus "data: [DONE]".
EVENTS = 70
#: Seconds of load before a throughput figure is measured.
_WARM_UP = 15.0 if platform.python_implementation() == "PyPy" else 3.0


@dataclass
class Settings:
    quick: bool
    workers: int
    streams: int
    seed: str | None = None  # the Node original's app.js, for the seed rows

    def seconds(self, full: float) -> float:
        return max(1.0, full / 5) if self.quick else full


class Harness:
    """The fake upstream, shared by the scenarios; a fresh proxy for each."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.upstream, self.upstream_port = procs.start_upstream()
        self._tls: tuple[Any, int, str] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-tls-")

    def proxy(self, upstream: str | None = None, **env: str) -> procs.Proxy:
        return procs.start_proxy(
            self.upstream_port, self.settings.workers, upstream, **env
        )

    def tls_upstream(self) -> tuple[int, str]:
        """A second fake upstream speaking https: its port and the CA file to trust."""
        if self._tls is None:
            from tests.certs import make_certs

            certs = make_certs(self._tmp.name)
            proc, port = procs.start_upstream(tls=(certs.cert, certs.key))
            self._tls = (proc, port, certs.ca)
        return self._tls[1], self._tls[2]

    def close(self) -> None:
        procs.stop(self.upstream)
        if self._tls is not None:
            procs.stop(self._tls[0])
        self._tmp.cleanup()


def _throughput(
    h: Harness,
    body: bytes,
    units_per_reply: int,
    start: Callable[[], procs.Proxy] | None = None,
    direct_port: int | None = None,
) -> dict[str, Any]:
    seconds = h.settings.seconds(10)
    direct = None
    if direct_port != 0:
        direct = run_wrk(direct_port or h.upstream_port, body, 20, seconds)
    proxy = (start or h.proxy)()
    try:
        # Warm-up: pool filled, code paths hot, and JITs settled (node's in
        # a second or two; PyPy's needs ~10 s of this load).
        run_wrk(proxy.port, body, 20, h.settings.seconds(_WARM_UP))
        up_cpu0 = procs.cpu_seconds(h.upstream.pid)
        cpu0 = proxy.cpu()
        through = run_wrk(proxy.port, body, 20, seconds)
        cpu = proxy.cpu() - cpu0
        through["upstream_cpu_s"] = round(
            procs.cpu_seconds(h.upstream.pid) - up_cpu0, 2
        )
    finally:
        procs.stop(proxy.proc)
    through["proxy_cpu_s"] = round(cpu, 2)
    through["proxy_cpu_share"] = round(cpu / through["seconds"], 3)
    done = max(1, through["requests"])
    through["proxy_cpu_us_per_request"] = round(cpu / done * 1e6, 1)
    if units_per_reply > 1:
        through["proxy_cpu_us_per_event"] = round(
            cpu / (done * units_per_reply) * 1e6, 2
        )
    result = {"workers": h.settings.workers, "connections": 20, "proxy": through}
    if direct is not None:
        result["direct"] = direct
    return result


def non_stream(h: Harness) -> dict[str, Any]:
    """~1 KB replies, 20 connections: rate and latency direct vs. through the proxy."""
    return _throughput(h, CHAT, 1)


def stream(h: Harness) -> dict[str, Any]:
    """70-event SSE replies as fast as the fake sends them, 20 connections."""
    return _throughput(h, CHAT_STREAM, EVENTS + 1)


def non_stream_https(h: Harness) -> dict[str, Any]:
    """
    As non-stream, with the proxy's upstream on https (a local TLS fake whose
    CA the proxy trusts through SSL_CERT_FILE), next to a plain-http run.
    """
    port, ca = h.tls_upstream()
    https = _throughput(
        h,
        CHAT,
        1,
        start=lambda: h.proxy(upstream=f"https://localhost:{port}", SSL_CERT_FILE=ca),
        direct_port=0,
    )
    http = _throughput(h, CHAT, 1, direct_port=0)
    result: dict[str, Any] = {"https": https["proxy"], "http": http["proxy"]}
    result["https_vs_http"] = {
        "rate": round(https["proxy"]["rate"] / max(1.0, http["proxy"]["rate"]), 3),
        "cpu_per_request": round(
            https["proxy"]["proxy_cpu_us_per_request"]
            / max(0.1, http["proxy"]["proxy_cpu_us_per_request"]),
            3,
        ),
    }
    return result


def seed(h: Harness) -> dict[str, Any]:
    """
    The Node original (--seed PATH/app.js) against the same fake upstream:
    non-streamed and streamed throughput, as for the proxy.
    """
    app_js = h.settings.seed
    if not app_js:
        return {"skipped": "no --seed PATH (the Node original's app.js) given"}
    start = lambda: procs.start_seed(app_js, h.upstream_port)  # noqa: E731
    return {
        "non-stream": _throughput(h, CHAT, 1, start=start, direct_port=0)["proxy"],
        "stream": _throughput(h, CHAT_STREAM, EVENTS + 1, start=start, direct_port=0)[
            "proxy"
        ],
    }


def added_latency(h: Harness) -> dict[str, Any]:
    """Concurrency 1, alternating direct and proxied requests on keep-alive connections."""
    count = 300 if h.settings.quick else 3000
    raw = probes.request_bytes(CHAT)
    proxy = h.proxy()
    direct_conn = probes.Connection(h.upstream_port)
    proxy_conn = probes.Connection(proxy.port)
    try:
        for _ in range(100):  # warm-up
            direct_conn.exchange(raw)
            proxy_conn.exchange(raw)
        direct, through, added = [], [], []
        cpu0 = proxy.cpu()
        for _ in range(count):
            d = direct_conn.exchange(raw).seconds
            p = proxy_conn.exchange(raw).seconds
            direct.append(d)
            through.append(p)
            added.append(p - d)
        cpu = proxy.cpu() - cpu0
    finally:
        direct_conn.close()
        proxy_conn.close()
        procs.stop(proxy.proc)
    d_pct, p_pct = probes.percentiles(direct), probes.percentiles(through)
    return {
        "requests": count,
        "direct_ms": d_pct,
        "proxy_ms": p_pct,
        "added_ms": {k: round(p_pct[k] - d_pct[k], 4) for k in ("p50", "p90", "p99")},
        "paired_difference_ms": probes.percentiles(added),
        "proxy_cpu_us_per_request": round(cpu / count * 1e6, 1),
    }


def relay_delay(h: Harness) -> dict[str, Any]:
    """Each event's arrival minus the upstream's send stamp; events 5 ms apart."""
    count = 4 if h.settings.quick else 30
    raw = probes.request_bytes(CHAT_STREAM, events=EVENTS, interval_ms=5)
    proxy = h.proxy()
    try:
        result: dict[str, Any] = {"streams": count, "events_per_stream": EVENTS}
        for name, port in (("direct", h.upstream_port), ("proxy", proxy.port)):
            conn = probes.Connection(port)
            conn.exchange(raw)  # warm-up
            delays: list[float] = []
            cpu0 = proxy.cpu()
            for _ in range(count):
                delays += conn.exchange(raw).delays
            cpu = proxy.cpu() - cpu0
            conn.close()
            result[f"{name}_ms"] = probes.percentiles(delays)
            if name == "proxy":
                result["proxy_cpu_us_per_event"] = round(
                    cpu / max(1, len(delays)) * 1e6, 2
                )
    finally:
        procs.stop(proxy.proc)
    return result


def many_open_streams(h: Harness) -> dict[str, Any]:
    """N streams open at once, one event every 500 ms each."""
    count = h.settings.streams
    events = 10 if h.settings.quick else 20 + count // 250
    limit = procs.raise_nofile(3 * count + 1000)
    # The proxy holds two descriptors per stream, spread over its workers.
    needed = 2 * count // h.settings.workers + 200
    if limit < needed:
        return {
            "skipped": f"RLIMIT_NOFILE is {limit} (hard limit); {count} streams need "
            f"~{needed} per proxy process: use fewer streams or --workers 2"
        }
    proxy = h.proxy()
    try:
        _touch(proxy.port)
        result = streams.many_streams(proxy, count, events, 500)
    finally:
        procs.stop(proxy.proc)
    result["nofile_limit"] = limit
    return result


def _touch(port: int) -> None:
    # One request through, so lazily built state is not counted per stream.
    conn = probes.Connection(port)
    conn.exchange(probes.request_bytes(CHAT_STREAM, events=3, interval_ms=1))
    conn.exchange(probes.request_bytes(CHAT))
    conn.close()


def moderated_stream(h: Harness) -> dict[str, Any]:
    """Time to first token and total, MODERATION=always with a 20 ms fake TMS."""
    count = 3 if h.settings.quick else 20
    raw = probes.request_bytes(CHAT_STREAM, events=EVENTS, interval_ms=5)
    tms, tms_port = procs.start_upstream(tms_delay=0.02)
    result: dict[str, Any] = {
        "streams": count,
        "tms_delay_ms": 20,
        "event_interval_ms": 5,
    }
    try:
        for name, env in (
            ("unmoderated", {"MODERATION": "off"}),
            (
                "moderated",
                {
                    "MODERATION": "always",
                    "MODERATION_BACKEND": "tencent",
                    "TENCENT_CLOUD_ENDPOINT": f"http://127.0.0.1:{tms_port}",
                    "TENCENT_CLOUD_SID": "AKIDbenchbenchbench",
                    "TENCENT_CLOUD_SKEY": "bench-secret-key",
                },
            ),
        ):
            proxy = h.proxy(**env)
            try:
                conn = probes.Connection(proxy.port)
                conn.exchange(raw)  # warm-up
                replies = [conn.exchange(raw) for _ in range(count)]
                conn.close()
            finally:
                procs.stop(proxy.proc)
            result[name] = {
                "status": sorted({r.status for r in replies}),
                "ttft_ms": probes.percentiles([r.first_event or 0.0 for r in replies]),
                "total_ms": probes.percentiles([r.seconds for r in replies]),
                "events": sorted({r.events for r in replies}),
            }
        calls = _stats(tms_port)["tms"]
    finally:
        procs.stop(tms)
    result["tms_calls"] = calls
    if calls == 0:
        result["skipped"] = (
            "moderation is not integrated into the proxy yet: with MODERATION=always "
            "the fake TMS received no call (openai_proxy/app.py passes moderation=None)"
        )
    return result


def _tinyproxy(directory: str) -> tuple[Any, int] | None:
    # Debian's tinyproxy on a free loopback port (None when not installed).
    binary = shutil.which("tinyproxy")
    if binary is None:
        return None
    port = procs.free_port()
    conf = os.path.join(directory, "tinyproxy.conf")
    with open(conf, "w") as f:
        f.write(
            f"Port {port}\nListen 127.0.0.1\nTimeout 600\nAllow 127.0.0.1\n"
            "MaxClients 200\nLogLevel Warning\n"
        )
    proc = procs.spawn([binary, "-d", "-c", conf], procs.RESULTS / "tinyproxy.log")
    deadline = time.monotonic() + 10
    while not procs._listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("tinyproxy did not start; see tinyproxy.log")
        time.sleep(0.05)
    return proc, port


def _dante(directory: str) -> tuple[Any, int] | None:
    # Debian's danted (SOCKS5, no authentication) on a free loopback port.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])
    binary = shutil.which("danted", path=path)
    if binary is None:
        return None
    port = procs.free_port()
    conf = os.path.join(directory, "danted.conf")
    with open(conf, "w") as f:
        f.write(
            f"logoutput: stderr\ninternal: 127.0.0.1 port = {port}\n"
            "external: 127.0.0.1\nsocksmethod: none\nclientmethod: none\n"
            + ("user.notprivileged: nobody\n" if os.geteuid() == 0 else "")
            + "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
            "socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
        )
    proc = procs.spawn([binary, "-f", conf, "-N", "1"], procs.RESULTS / "danted.log")
    deadline = time.monotonic() + 10
    while not procs._listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("danted did not start; see danted.log")
        time.sleep(0.05)
    return proc, port


def _paired_p50(
    h: Harness, proxies: tuple[procs.Proxy, procs.Proxy], raw: bytes
) -> dict[str, Any]:
    # Concurrency 1, alternating the two proxies on keep-alive connections:
    # latency, and CPU per request with no load competing for the CPUs.
    count = 300 if h.settings.quick else 2000
    a, b = (probes.Connection(p.port) for p in proxies)
    try:
        for _ in range(100):
            a.exchange(raw)
            b.exchange(raw)
        first, second = [], []
        cpu0 = [p.cpu() for p in proxies]
        for _ in range(count):
            first.append(a.exchange(raw).seconds)
            second.append(b.exchange(raw).seconds)
        cpu = [p.cpu() - c for p, c in zip(proxies, cpu0, strict=True)]
    finally:
        a.close()
        b.close()
    p_a, p_b = probes.percentiles(first), probes.percentiles(second)
    return {
        "requests": count,
        "direct_ms": p_a,
        "egress_ms": p_b,
        "added_p50_ms": round(p_b["p50"] - p_a["p50"], 4),
        "direct_cpu_us_per_request": round(cpu[0] / count * 1e6, 1),
        "egress_cpu_us_per_request": round(cpu[1] / count * 1e6, 1),
    }


def egress(h: Harness) -> dict[str, Any]:
    """
    The proxy to its https upstream directly vs through tinyproxy (HTTP
    CONNECT, pooled tunnels): proxy CPU per request and added p50,
    non-streamed and streamed; and the added p50 through dante (SOCKS5),
    when installed.
    """
    port, ca = h.tls_upstream()
    upstream = f"https://localhost:{port}"
    with tempfile.TemporaryDirectory(prefix="bench-egress-") as directory:
        started = _tinyproxy(directory)
        if started is None:
            return {"skipped": "tinyproxy is not installed (apt-get install tinyproxy)"}
        tiny, tiny_port = started
        via = f"http://127.0.0.1:{tiny_port}"
        try:
            result: dict[str, Any] = {}
            for name, body, units in (
                ("non-stream", CHAT, 1),
                ("stream", CHAT_STREAM, EVENTS + 1),
            ):
                direct = _throughput(
                    h,
                    body,
                    units,
                    start=lambda: h.proxy(upstream=upstream, SSL_CERT_FILE=ca),
                    direct_port=0,
                )["proxy"]
                tiny_cpu0 = procs.cpu_seconds(tiny.pid)
                through = _throughput(
                    h,
                    body,
                    units,
                    start=lambda: h.proxy(
                        upstream=upstream, SSL_CERT_FILE=ca, EGRESS_PROXY=via
                    ),
                    direct_port=0,
                )["proxy"]
                through["tinyproxy_cpu_s"] = round(
                    procs.cpu_seconds(tiny.pid) - tiny_cpu0, 2
                )
                a = h.proxy(upstream=upstream, SSL_CERT_FILE=ca)
                b = h.proxy(upstream=upstream, SSL_CERT_FILE=ca, EGRESS_PROXY=via)
                try:
                    raw = probes.request_bytes(body)
                    latency = _paired_p50(h, (a, b), raw)
                finally:
                    procs.stop(a.proc)
                    procs.stop(b.proc)
                socks = _dante(directory)
                if socks is not None:
                    b = h.proxy(
                        upstream=upstream,
                        SSL_CERT_FILE=ca,
                        EGRESS_PROXY=f"socks5h://127.0.0.1:{socks[1]}",
                    )
                    a = h.proxy(upstream=upstream, SSL_CERT_FILE=ca)
                    try:
                        socks_latency = _paired_p50(h, (a, b), raw)
                    finally:
                        procs.stop(a.proc)
                        procs.stop(b.proc)
                        procs.stop(socks[0])
                    latency["socks5_dante"] = socks_latency
                result[name] = {
                    "direct": direct,
                    "egress": through,
                    "cpu_per_request_ratio": round(
                        through["proxy_cpu_us_per_request"]
                        / max(0.1, direct["proxy_cpu_us_per_request"]),
                        3,
                    ),
                    "latency": latency,
                }
        finally:
            procs.stop(tiny)
    return result


def _stats(port: int) -> dict[str, int]:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /__stats HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.05)
        data = s.recv(65536)
    stats: dict[str, int] = json.loads(data.split(b"\r\n\r\n", 1)[1])
    return stats


def by_model(h: Harness) -> dict[str, Any]:
    """Choosing the upstream by model: see L{benchmarks.bymodel}."""
    from benchmarks.bymodel import by_model as measure

    return measure(h)


SCENARIOS: dict[str, Callable[[Harness], dict[str, Any]]] = {
    "non-stream": non_stream,
    "non-stream-https": non_stream_https,
    "stream": stream,
    "seed": seed,
    "added-latency": added_latency,
    "relay-delay": relay_delay,
    "many-streams": many_open_streams,
    "moderated-stream": moderated_stream,
    "limits": limits,
    "limits-callgrind": limits_instructions,
    "by-model": by_model,
    "egress": egress,
    "websocket": websocket,
}
