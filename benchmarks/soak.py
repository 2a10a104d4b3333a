"""
``python -m benchmarks.soak [--minutes M] [--checkout DIR] [--max-growth-mb N]``

Minutes of mixed traffic against a proxy started the way users run it
(``twistd -n --pidfile= openai-proxy``, from the checkout C{DIR}: default
this one; pass another, e.g. an export of the main branch, for a "before"
figure), with the fake upstream of L{benchmarks.upstream}, all on loopback:
streams read to the end, non-streamed answers, streams the client hangs up
on mid-way, wrong and missing keys, requests routed to an upstream that
cannot be reached, named keys (one of them rate-limited) and C{GET /usage}.

It samples the proxy's RSS (C{/proc/PID/status}) and open descriptors
(C{/proc/PID/fd}) every C{--sample} seconds and prints a table: at the
start, after the warm-up (the first fifth of the run), at the end (the
traffic stopped, one quiet second later), and the RSS slope after the
warm-up.  Exits 1 when RSS grew more than C{--max-growth-mb} after the
warm-up, or when descriptors did not come back near where they started.
Stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

from benchmarks import procs
from benchmarks.abuse import _get, _post

#: Descriptors the proxy may hold at the end beyond those at the start:
#: idle upstream connections its pool keeps.
_FD_SLACK = 16
_NAMED = "pk-soak-named-0123456789"
_LIMITED = "pk-soak-limited-0123456789"
_ADMIN = "admin-soak-0123456789"
_DEAD_ROUTE = "sk-dead"
_KEYS_TOML = f"""
[[keys]]
name = "soak-named"
key = "{_NAMED}"

[[keys]]
name = "soak-limited"
key = "{_LIMITED}"
rpm = 60
"""
_CHAT = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
_STREAM = (
    b'{"model": "gpt-4o-mini", "stream": true,'
    b' "messages": [{"role": "user", "content": "hi"}]}'
)


def _request(
    path: str, body: bytes | None, token: str | None, extra: str = ""
) -> bytes:
    """A whole HTTP/1.1 request (Connection: close) with this bearer token."""
    raw = _get(path, key=False) if body is None else _post(path, body, key=False)
    head, _, rest = raw.partition(b"\r\n")
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    return head + b"\r\n" + (auth + extra).encode() + rest


def _plan() -> dict[str, tuple[int, bytes, bool]]:
    """What each kind of request sends: (weight, payload, read it whole?)."""
    # No server-held key: the client names the upstream key, so that a
    # route can send some requests where nothing listens.
    key = f"{procs.OPENAI_KEY}:{procs.PROXY_KEY}"
    dead = f"{_DEAD_ROUTE}-0123456789:{procs.PROXY_KEY}"
    slow = "X-Bench-Events: 40\r\nX-Bench-Interval-Ms: 10\r\n"
    chat, stream = "/v1/chat/completions", _STREAM
    return {
        "chat": (6, _request(chat, _CHAT, key), True),
        "stream": (3, _request(chat, stream, key, "X-Bench-Events: 30\r\n"), True),
        "stream_hang_up": (2, _request(chat, stream, key, slow), False),
        "wrong_key": (4, _request(chat, _CHAT, "sk-x:pk-wrong-key"), True),
        "missing_key": (4, _request(chat, _CHAT, None), True),
        "unreachable": (2, _request(chat, _CHAT, dead), True),
        "named": (3, _request(chat, _CHAT, f"{procs.OPENAI_KEY}:{_NAMED}"), True),
        "limited": (2, _request(chat, _CHAT, f"{procs.OPENAI_KEY}:{_LIMITED}"), True),
        "usage": (1, _request("/usage", None, _ADMIN), True),
    }


class _Tally:
    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, kind: str, raw: bytes) -> None:
        status = raw[9:12].decode("ascii", "replace") if raw else "---"
        self.counts[f"{kind} {status}"] += 1


async def _send(port: int, payload: bytes, whole: bool) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        if whole:
            return await asyncio.wait_for(reader.read(-1), 30)
        # Hang up once the stream has begun.
        seen = b""
        while b"data:" not in seen:
            piece = await asyncio.wait_for(reader.read(4096), 30)
            if not piece:
                break
            seen += piece
        return seen
    finally:
        writer.transport.abort()


async def _client(port: int, until: float, tally: _Tally, seed: int) -> None:
    plan = _plan()
    kinds = list(plan)
    weights = [plan[k][0] for k in kinds]
    rng = random.Random(seed)
    while time.monotonic() < until:
        kind = rng.choices(kinds, weights)[0]
        _, payload, whole = plan[kind]
        try:
            tally.add(kind, await _send(port, payload, whole))
        except (OSError, asyncio.TimeoutError) as e:
            tally.counts[f"{kind} {type(e).__name__}"] += 1


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _slope_mb_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KiB) samples, in MiB per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    cov = sum((t - mean_t) * (r - mean_r) for t, r in samples)
    return cov / var * 60 / 1024 if var else 0.0


async def _sampler(
    pid: int, every: float, until: float, out: list[tuple[float, int, int]]
) -> None:
    start = time.monotonic()
    while time.monotonic() < until:
        out.append((time.monotonic() - start, procs.rss_kb(pid), _fds(pid)))
        await asyncio.sleep(every)


async def soak(args: argparse.Namespace) -> int:
    upstream, upstream_port = await asyncio.to_thread(procs.start_upstream)
    dead_port = procs.free_port()  # nothing listens there
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    keys = work / "keys.toml"
    keys.write_text(_KEYS_TOML)
    env = {
        "KEYS_FILE": str(keys),
        "ADMIN_KEY": _ADMIN,
        "OPENAI_KEY": "",
        "ROUTES": f"{_DEAD_ROUTE}=http://127.0.0.1:{dead_port}",
        "PYTHONPATH": str(Path(args.checkout).resolve()),
    }
    proxy = await asyncio.to_thread(procs.start_proxy, upstream_port, 1, **env)
    pid = proxy.proc.pid
    try:
        started = time.monotonic()
        first = (procs.rss_kb(pid), _fds(pid))
        seconds = args.minutes * 60
        until = started + seconds
        samples: list[tuple[float, int, int]] = []
        tally = _Tally()
        runners: list[Awaitable[None]] = [
            _client(proxy.port, until, tally, seed) for seed in range(args.clients)
        ]
        runners.append(_sampler(pid, args.sample, until, samples))
        await asyncio.gather(*runners)
        await asyncio.sleep(1.0)  # in-flight hang-ups and closes settle
        last = (procs.rss_kb(pid), _fds(pid))
    finally:
        await asyncio.to_thread(procs.stop, proxy.proc)
        await asyncio.to_thread(procs.stop, upstream)
    warm = seconds / 5
    after = [(t, r) for t, r, _ in samples if t >= warm]
    at_warm = next(((r, f) for t, r, f in samples if t >= warm), last)
    growth_mb = (last[0] - at_warm[0]) / 1024
    slope = _slope_mb_per_min(after)
    fds_back = last[1] <= first[1] + _FD_SLACK
    print(f"proxy: {Path(args.checkout).resolve()} on {sys.version.split()[0]}")
    print(f"{args.minutes:g} min, {args.clients} clients, warm-up {warm:.0f} s")
    print(f"{'':16}{'RSS MiB':>10}{'fds':>6}")
    for name, (rss, fds) in (
        ("start", first),
        ("after warm-up", at_warm),
        ("end", last),
    ):
        print(f"{name:16}{rss / 1024:>10.1f}{fds:>6}")
    print(f"RSS slope after warm-up: {slope:+.2f} MiB/min ({len(after)} samples)")
    print(
        f"RSS growth after warm-up: {growth_mb:+.1f} MiB (bound {args.max_growth_mb})"
    )
    total = sum(tally.counts.values())
    print(f"requests: {total} ({total / seconds:.0f}/s)")
    for line, count in sorted(tally.counts.items()):
        print(f"  {line:28}{count:>8}")
    if growth_mb > args.max_growth_mb:
        print("FAIL: RSS grew after the warm-up")
        return 1
    if not fds_back:
        print(f"FAIL: descriptors {first[1]} -> {last[1]}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--checkout", default=str(procs.ROOT))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--sample", type=float, default=2.0, help="seconds")
    parser.add_argument("--max-growth-mb", type=float, default=4.0)
    args = parser.parse_args(argv)
    procs.raise_nofile(4096)
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
