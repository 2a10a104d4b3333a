"""
The cost of per-key limits: one proxy with limits off (C{PROXY_KEY}), one
with a named key whose limits live in the process, one with them in Redis
on loopback, all running at once and asked in turn, so that whatever else
the machine does falls on the three alike.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import probes, procs
from benchmarks.wrk import CHAT, run_wrk

#: Limits no benchmark reaches: every check runs, none refuses.
_KEYS_TOML = f"""
[[keys]]
name = "bench"
key = "{procs.PROXY_KEY}"
rpm = 1000000000
tpm = 1000000000000
concurrency = 100000
"""


def start_redis() -> tuple[Any, str] | None:
    """Start a redis-server on a free loopback port; L{None} if not installed."""
    server = shutil.which("redis-server")
    if server is None:
        return None
    port = procs.free_port()
    argv = [server, "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no"]
    proc = procs.spawn(argv, procs.RESULTS / "redis.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    procs.stop(proc)
    raise RuntimeError("redis-server did not start in 10 s")


def _wait_for_redis(port: int) -> None:
    # The proxy connects to Redis in the background: /readyz says when.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if b'"redis": "up"' in s.recv(4096):
                return
        time.sleep(0.05)
    raise RuntimeError("the proxy did not connect to Redis in 10 s")


def limits(h: Any) -> dict[str, Any]:
    """Limits off / named key in-process / named key in Redis: added CPU and p50."""
    count = 500 if h.settings.quick else 5000
    raw = probes.request_bytes(CHAT)
    keys = Path(tempfile.mkdtemp(prefix="bench-keys-")) / "keys.toml"
    keys.write_text(_KEYS_TOML)
    named = {"PROXY_KEY": "", "KEYS_FILE": str(keys)}
    redis = start_redis()
    setups = {"off": {}, "in_process": named}
    if redis is not None:
        setups["redis"] = {**named, "REDIS_URL": redis[1]}
    proxies: dict[str, procs.Proxy] = {}
    result: dict[str, Any] = {"requests": count}
    try:
        for name, env in setups.items():
            proxies[name] = h.proxy(**env)
        if redis is not None:
            _wait_for_redis(proxies["redis"].port)
        result.update(_alternating(proxies, raw, count, redis))
        result["load"] = _under_load(h, proxies, redis)
    finally:
        for proxy in proxies.values():
            procs.stop(proxy.proc)
        if redis is not None:
            procs.stop(redis[0])
        shutil.rmtree(keys.parent, ignore_errors=True)
    if redis is None:
        result["redis_skipped"] = "redis-server is not installed"
    return result


def _alternating(
    proxies: dict[str, procs.Proxy], raw: bytes, count: int, redis: Any
) -> dict[str, Any]:
    """Concurrency 1: each round asks every proxy once, in a rotating order."""
    conns = {name: probes.Connection(p.port) for name, p in proxies.items()}
    names = list(conns)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    try:
        for _ in range(200):  # warm-up: pools filled, code paths hot
            for name in names:
                conns[name].exchange(raw)
        cpu0 = {name: p.cpu() for name, p in proxies.items()}
        redis_cpu0 = procs.cpu_seconds(redis[0].pid) if redis else 0.0
        for i in range(count):
            for j in range(len(names)):
                name = names[(i + j) % len(names)]
                reply = conns[name].exchange(raw)
                if reply.status != 200:
                    raise RuntimeError(f"{name}: status {reply.status}")
                seconds[name].append(reply.seconds)
        cpu = {name: p.cpu() - cpu0[name] for name, p in proxies.items()}
        redis_cpu = procs.cpu_seconds(redis[0].pid) - redis_cpu0 if redis else 0.0
    finally:
        for conn in conns.values():
            conn.close()
    out: dict[str, Any] = {}
    base = probes.percentiles(seconds["off"])
    base_cpu = cpu["off"] / count * 1e6
    for name in names:
        pct = probes.percentiles(seconds[name])
        us = cpu[name] / count * 1e6
        out[name] = {"ms": pct, "cpu_us_per_request": round(us, 1)}
        if name != "off":
            paired = [a - b for a, b in zip(seconds[name], seconds["off"], strict=True)]
            out[name]["added_cpu_us_per_request"] = round(us - base_cpu, 1)
            out[name]["added_p50_ms"] = round(pct["p50"] - base["p50"], 4)
            out[name]["paired_difference_ms"] = probes.percentiles(paired)
    if redis is not None:
        out["redis"]["redis_server_cpu_us_per_request"] = round(
            redis_cpu / count * 1e6, 1
        )
    return out


def _under_load(h: Any, proxies: dict[str, procs.Proxy], redis: Any) -> dict[str, Any]:
    """20 connections with wrk, one proxy at a time: CPU per request under load."""
    seconds = h.settings.seconds(8)
    out: dict[str, Any] = {}
    for name, proxy in proxies.items():
        cpu0 = proxy.cpu()
        redis_cpu0 = procs.cpu_seconds(redis[0].pid) if redis else 0.0
        run = run_wrk(proxy.port, CHAT, 20, seconds)
        done = max(1, run["requests"])
        out[name] = {
            "rate": run["rate"],
            "p50_ms": run["p50_ms"],
            "errors": run["errors"],
            "cpu_us_per_request": round((proxy.cpu() - cpu0) / done * 1e6, 1),
        }
        if name == "redis":
            out[name]["redis_server_cpu_us_per_request"] = round(
                (procs.cpu_seconds(redis[0].pid) - redis_cpu0) / done * 1e6, 1
            )
    for name in out:
        if name != "off":
            out[name]["added_cpu_us_per_request"] = round(
                out[name]["cpu_us_per_request"] - out["off"]["cpu_us_per_request"], 1
            )
    return out
