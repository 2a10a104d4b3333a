"""
The cost of per-key limits: one proxy with limits off (C{PROXY_KEY}), one
with a named key whose limits live in the process, one with them in Redis
on loopback, all running at once and asked in turn, so that whatever else
the machine does falls on the three alike.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
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
    """
    20 connections with wrk, one proxy at a time, in short turns (rotating
    the order) so that a change in the machine's load weighs on all three.
    """
    rounds = 4
    seconds = max(1.0, h.settings.seconds(12) / rounds)
    names = list(proxies)
    totals = {name: {"requests": 0, "seconds": 0.0, "cpu": 0.0} for name in names}
    redis_cpu = 0.0
    p50s: dict[str, list[float]] = {name: [] for name in names}
    errors = dict.fromkeys(names, 0)
    for turn in range(rounds):
        for j in range(len(names)):
            name = names[(turn + j) % len(names)]
            proxy = proxies[name]
            cpu0 = proxy.cpu()
            redis_cpu0 = procs.cpu_seconds(redis[0].pid) if redis else 0.0
            run = run_wrk(proxy.port, CHAT, 20, seconds)
            totals[name]["cpu"] += proxy.cpu() - cpu0
            totals[name]["requests"] += run["requests"]
            totals[name]["seconds"] += run["seconds"]
            p50s[name].append(run["p50_ms"])
            errors[name] += run["errors"]
            if name == "redis":
                redis_cpu += procs.cpu_seconds(redis[0].pid) - redis_cpu0
    out: dict[str, Any] = {}
    for name in names:
        done = max(1, totals[name]["requests"])
        out[name] = {
            "rate": round(done / max(totals[name]["seconds"], 1e-9), 1),
            "p50_ms_per_turn": p50s[name],
            "errors": errors[name],
            "cpu_us_per_request": round(totals[name]["cpu"] / done * 1e6, 1),
        }
        if name == "redis":
            out[name]["redis_server_cpu_us_per_request"] = round(
                redis_cpu / done * 1e6, 1
            )
    for name in names:
        if name != "off":
            out[name]["added_cpu_us_per_request"] = round(
                out[name]["cpu_us_per_request"] - out["off"]["cpu_us_per_request"], 1
            )
    return out


def limits_instructions(h: Any) -> dict[str, Any]:
    """
    The same three set-ups under valgrind's callgrind: user-space
    instructions per request, which other work on the machine does not
    change (kernel time is not in them).
    """
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    if valgrind is None or control is None:
        return {"skipped": "valgrind is not installed (apt-get install valgrind)"}
    count = 100 if h.settings.quick else 300
    raw = probes.request_bytes(CHAT)
    work = Path(tempfile.mkdtemp(prefix="bench-callgrind-"))
    keys = work / "keys.toml"
    keys.write_text(_KEYS_TOML)
    named = {"PROXY_KEY": "", "KEYS_FILE": str(keys)}
    redis = start_redis()
    setups: dict[str, dict[str, str]] = {"off": {}, "in_process": named}
    if redis is not None:
        setups["redis"] = {**named, "REDIS_URL": redis[1]}
    result: dict[str, Any] = {"requests": count}
    try:
        for name, env in setups.items():
            out = work / name
            wrapper = (valgrind, "--tool=callgrind", "--instr-atstart=no")
            wrapper += (f"--callgrind-out-file={out}.%p",)
            proxy = procs.start_proxy(
                h.upstream_port, 1, wrapper=wrapper, start_limit=180, **env
            )
            try:
                if name == "redis":
                    _wait_for_redis(proxy.port)
                conn = probes.Connection(proxy.port)
                for _ in range(50):  # warm-up, not counted
                    conn.exchange(raw)
                pid = str(proxy.proc.pid)
                subprocess.run(
                    [control, "-i", "on", pid], check=True, capture_output=True
                )
                for _ in range(count):
                    conn.exchange(raw)
                subprocess.run([control, "-d", pid], check=True, capture_output=True)
                subprocess.run(
                    [control, "-i", "off", pid], check=True, capture_output=True
                )
                conn.close()
            finally:
                procs.stop(proxy.proc)
            result[name] = {"instructions_per_request": _dumped(work, name) // count}
    finally:
        if redis is not None:
            procs.stop(redis[0])
        shutil.rmtree(work, ignore_errors=True)
    base = result["off"]["instructions_per_request"]
    for name in setups:
        if name != "off":
            added = result[name]["instructions_per_request"] - base
            result[name]["added_instructions_per_request"] = added
    if redis is None:
        result["redis_skipped"] = "redis-server is not installed"
    return result


def _dumped(work: Path, name: str) -> int:
    # callgrind_control -d writes <out>.<pid>.1; its "totals:" line is the sum.
    for dump in work.glob(f"{name}.*.1"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    raise RuntimeError(f"no callgrind dump for {name} in {work}")
