"""Throughput with wrk (one thread: on a small machine it needs the cores)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.procs import PROXY_KEY

_SCRIPT = Path(__file__).with_name("post.lua")
CHAT = b'{"model":"gpt-bench","messages":[{"role":"user","content":"Say hello."}]}'
CHAT_STREAM = CHAT[:-1] + b',"stream":true}'


def require_wrk() -> str:
    found = shutil.which("wrk")
    if not found:
        raise SystemExit(
            "wrk is needed for the throughput scenarios: "
            "apt-get update && apt-get install -y wrk"
        )
    return found


def run_wrk(
    port: int, body: bytes, connections: int, seconds: float, threads: int = 1
) -> dict[str, Any]:
    """
    Run wrk against C{POST /v1/chat/completions} on C{port}; return its
    summary (requests, rate, latency percentiles in ms, errors) and wrk's
    own CPU seconds.
    """
    argv = [
        require_wrk(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(_SCRIPT),
        f"http://127.0.0.1:{port}/v1/chat/completions",
    ]
    env = dict(os.environ, BENCH_BODY=body.decode(), BENCH_KEY=PROXY_KEY)
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    line = next((x for x in out.splitlines() if x.startswith("JSON")), None)
    if line is None:
        raise RuntimeError(f"wrk failed:\n{out}")
    raw = json.loads(line[4:])
    seconds_run = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {
        "requests": raw["requests"],
        "seconds": round(seconds_run, 3),
        "rate": round(raw["requests"] / seconds_run, 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "errors": errors,
        "error_detail": {
            k: raw[k] for k in ("connect", "read", "write", "status", "timeout")
        },
        "wrk_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
    }
