"""
The ``websocket`` scenario: the WebSocket relay against a direct connection
to a fake WebSocket upstream (benchmarks/ws_upstream.py), in one run.

- messages relayed per second and proxy CPU per message: small text events
  (upstream to client, in bursts) and 32 KB appends (client to upstream);
- added p50/p99 per round trip at one session (an echo: each round trip
  crosses the proxy twice);
- RSS per open idle session, at N sessions;
- the time a handshake takes, direct and through the proxy.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

from benchmarks import procs

_AUTH = {"Authorization": f"Bearer {procs.PROXY_KEY}"}


def _start_upstream() -> tuple[Any, int]:
    proc = procs._spawn(
        [sys.executable, "-m", "benchmarks.ws_upstream", "--port", "0"],
        procs._env(),
        None,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("READY"):
        raise RuntimeError(f"fake WebSocket upstream did not start: {line!r}")
    return proc, int(line.split()[1])


async def _connect(url: str) -> Any:
    from websockets.asyncio.client import connect

    return await connect(
        url,
        additional_headers=_AUTH,
        compression=None,
        max_size=None,
        ping_interval=None,
    )


async def _burst(url: str, count: int, size: int) -> float:
    ws = await _connect(url)
    started = time.perf_counter()
    await ws.send(f"burst {count} {size}")
    for _ in range(count):
        await ws.recv()
    took = time.perf_counter() - started
    await ws.close()
    return took


async def _appends(url: str, count: int, size: int) -> float:
    ws = await _connect(url)
    payload = '{"type":"input_audio_buffer.append","audio":"' + "A" * (size - 48) + '"}'
    started = time.perf_counter()
    await ws.send(f"count {count}")
    for _ in range(count):
        await ws.send(payload)
    await ws.recv()
    took = time.perf_counter() - started
    await ws.close()
    return took


async def _round_trips(url: str, count: int) -> list[float]:
    ws = await _connect(url)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await ws.send('{"type":"ping"}')
        await ws.recv()
        times.append(time.perf_counter() - started)
    await ws.close()
    return times


async def _handshakes(url: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        ws = await _connect(url)
        times.append(time.perf_counter() - started)
        await ws.close()
    return times


async def _hold(url: str, count: int) -> list[Any]:
    sessions = []
    for start in range(0, count, 100):
        sessions += await asyncio.gather(
            *(_connect(url) for _ in range(start, min(count, start + 100)))
        )
    return sessions


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def websocket(h: Any) -> dict[str, Any]:
    """The WebSocket relay's figures (see the module's docstring)."""
    quick = h.settings.quick
    small_n, big_n = (20_000, 2_000) if quick else (100_000, 10_000)
    trips = 500 if quick else 2_000
    idle = min(h.settings.streams, 1_000)
    procs.raise_nofile(4 * idle + 1000)
    upstream, port = _start_upstream()
    proxy = h.proxy(upstream=f"http://127.0.0.1:{port}")
    direct_url = f"ws://127.0.0.1:{port}/v1/realtime?model=bench"
    proxied_url = f"ws://127.0.0.1:{proxy.port}/v1/realtime?model=bench"
    result: dict[str, Any] = {}
    try:
        run = asyncio.run
        run(_burst(proxied_url, 2_000, 150))  # warm-up
        for name, work, count, size in (
            ("small_events", _burst, small_n, 150),
            ("audio_appends_32k", _appends, big_n, 32_768),
        ):
            direct = run(work(direct_url, count, size))
            cpu0 = proxy.cpu()
            proxied = run(work(proxied_url, count, size))
            cpu = proxy.cpu() - cpu0
            result[name] = {
                "messages": count,
                "direct_per_s": round(count / direct),
                "proxy_per_s": round(count / proxied),
                "proxy_cpu_us_per_message": round(cpu / count * 1e6, 2),
            }
        direct_trips = run(_round_trips(direct_url, trips))
        proxied_trips = run(_round_trips(proxied_url, trips))
        result["round_trip"] = {
            "count": trips,
            "direct_p50_ms": round(_pct(direct_trips, 0.5) * 1e3, 3),
            "proxy_p50_ms": round(_pct(proxied_trips, 0.5) * 1e3, 3),
            "added_p50_ms": round(
                (_pct(proxied_trips, 0.5) - _pct(direct_trips, 0.5)) * 1e3, 3
            ),
            "added_p99_ms": round(
                (_pct(proxied_trips, 0.99) - _pct(direct_trips, 0.99)) * 1e3, 3
            ),
        }
        direct_hs = run(_handshakes(direct_url, 200))
        proxied_hs = run(_handshakes(proxied_url, 200))
        result["handshake"] = {
            "direct_median_ms": round(statistics.median(direct_hs) * 1e3, 3),
            "proxy_median_ms": round(statistics.median(proxied_hs) * 1e3, 3),
            "added_median_ms": round(
                (statistics.median(proxied_hs) - statistics.median(direct_hs)) * 1e3, 3
            ),
        }

        async def idle_sessions() -> dict[str, Any]:
            before = proxy.rss()
            sessions = await _hold(proxied_url, idle)
            await asyncio.sleep(1.0)
            after = proxy.rss()
            for ws in sessions:
                await ws.close()
            return {
                "sessions": idle,
                "rss_before_kb": before,
                "rss_after_kb": after,
                "kb_per_session": round((after - before) / idle, 1),
            }

        result["idle"] = run(idle_sessions())
    finally:
        procs.stop(proxy.proc)
        procs.stop(upstream)
    return result
