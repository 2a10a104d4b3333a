"""The summary table: each target next to what was measured."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# (scenario, label, path into its result, target, lower is better)
_ROWS: list[tuple[str, str, tuple[str, ...], float | None, bool]] = [
    *(
        row
        for kind in ("non-stream", "stream")
        for row in (
            (
                "egress",
                f"{kind} direct CPU us/req",
                (kind, "direct", "proxy_cpu_us_per_request"),
                None,
                True,
            ),
            (
                "egress",
                f"{kind} CONNECT CPU us/req",
                (kind, "egress", "proxy_cpu_us_per_request"),
                None,
                True,
            ),
            ("egress", f"{kind} CPU ratio", (kind, "cpu_per_request_ratio"), 1.1, True),
            (
                "egress",
                f"{kind} 1-conn CPU direct",
                (kind, "latency", "direct_cpu_us_per_request"),
                None,
                True,
            ),
            (
                "egress",
                f"{kind} 1-conn CPU CONNECT",
                (kind, "latency", "egress_cpu_us_per_request"),
                None,
                True,
            ),
            (
                "egress",
                f"{kind} added p50 ms",
                (kind, "latency", "added_p50_ms"),
                None,
                True,
            ),
            (
                "egress",
                f"{kind} SOCKS5 added p50 ms",
                (kind, "latency", "socks5_dante", "added_p50_ms"),
                None,
                True,
            ),
        )
    ),
    ("websocket", "small: direct msg/s", ("small_events", "direct_per_s"), None, False),
    ("websocket", "small: proxy msg/s", ("small_events", "proxy_per_s"), None, False),
    (
        "websocket",
        "small: proxy CPU us/msg",
        ("small_events", "proxy_cpu_us_per_message"),
        15,
        True,
    ),
    (
        "websocket",
        "32 KB: direct msg/s",
        ("audio_appends_32k", "direct_per_s"),
        None,
        False,
    ),
    (
        "websocket",
        "32 KB: proxy msg/s",
        ("audio_appends_32k", "proxy_per_s"),
        None,
        False,
    ),
    (
        "websocket",
        "32 KB: proxy CPU us/msg",
        ("audio_appends_32k", "proxy_cpu_us_per_message"),
        None,
        True,
    ),
    (
        "websocket",
        "added p50 ms / round trip",
        ("round_trip", "added_p50_ms"),
        None,
        True,
    ),
    (
        "websocket",
        "added p99 ms / round trip",
        ("round_trip", "added_p99_ms"),
        None,
        True,
    ),
    ("websocket", "idle session KB", ("idle", "kb_per_session"), 30, True),
    ("websocket", "handshake added ms", ("handshake", "added_median_ms"), 1.0, True),
    ("non-stream", "direct req/s", ("direct", "rate"), None, False),
    ("non-stream", "direct p50 / p99 ms", ("direct", "p50_ms"), None, True),
    ("non-stream", "proxy req/s", ("proxy", "rate"), None, False),
    ("non-stream", "proxy p50 ms", ("proxy", "p50_ms"), None, True),
    ("non-stream", "proxy p99 ms", ("proxy", "p99_ms"), None, True),
    (
        "non-stream",
        "proxy CPU us/request",
        ("proxy", "proxy_cpu_us_per_request"),
        300,
        True,
    ),
    ("non-stream", "errors", ("proxy", "errors"), 0, True),
    ("stream", "direct streams/s", ("direct", "rate"), None, False),
    ("stream", "proxy streams/s", ("proxy", "rate"), None, False),
    ("stream", "proxy p99 ms", ("proxy", "p99_ms"), None, True),
    (
        "stream",
        "proxy CPU us/event (burst)",
        ("proxy", "proxy_cpu_us_per_event"),
        12,
        True,
    ),
    ("stream", "errors", ("proxy", "errors"), 0, True),
    ("non-stream-https", "https proxy req/s", ("https", "rate"), None, False),
    (
        "non-stream-https",
        "https CPU us/request",
        ("https", "proxy_cpu_us_per_request"),
        300,
        True,
    ),
    ("non-stream-https", "http proxy req/s", ("http", "rate"), None, False),
    (
        "non-stream-https",
        "http CPU us/request",
        ("http", "proxy_cpu_us_per_request"),
        300,
        True,
    ),
    ("non-stream-https", "https ÷ http req/s", ("https_vs_http", "rate"), 0.85, False),
    (
        "non-stream-https",
        "https ÷ http CPU/request",
        ("https_vs_http", "cpu_per_request"),
        1.15,
        True,
    ),
    ("non-stream-https", "errors (https)", ("https", "errors"), 0, True),
    ("seed", "seed req/s", ("non-stream", "rate"), None, False),
    (
        "seed",
        "seed CPU us/request",
        ("non-stream", "proxy_cpu_us_per_request"),
        None,
        True,
    ),
    ("seed", "seed streams/s", ("stream", "rate"), None, False),
    (
        "seed",
        "seed CPU us/event (burst)",
        ("stream", "proxy_cpu_us_per_event"),
        None,
        True,
    ),
    ("seed", "proxy ÷ seed req/s", ("ratios", "non_stream_rate"), 1.3, False),
    ("seed", "proxy ÷ seed streams/s", ("ratios", "stream_rate"), 2.5, False),
    (
        "seed",
        "seed ÷ proxy CPU/request",
        ("ratios", "non_stream_cpu"),
        None,
        False,
    ),
    ("seed", "errors (seed)", ("non-stream", "errors"), 0, True),
    ("added-latency", "added p50 ms", ("added_ms", "p50"), 0.4, True),
    ("added-latency", "added p99 ms", ("added_ms", "p99"), None, True),
    (
        "added-latency",
        "proxy CPU us/request (c=1)",
        ("proxy_cpu_us_per_request",),
        300,
        True,
    ),
    ("relay-delay", "direct delay p99 ms", ("direct_ms", "p99"), None, True),
    ("relay-delay", "proxy delay p50 ms", ("proxy_ms", "p50"), None, True),
    ("relay-delay", "proxy delay p99 ms", ("proxy_ms", "p99"), 1.0, True),
    ("relay-delay", "proxy delay max ms", ("proxy_ms", "max"), None, True),
    (
        "relay-delay",
        "proxy CPU us/event (spaced)",
        ("proxy_cpu_us_per_event",),
        10,
        True,
    ),
    ("many-streams", "streams", ("streams",), None, False),
    ("many-streams", "RSS KB/stream", ("rss_per_stream_kb",), 25, True),
    ("many-streams", "errors", ("errors",), 0, True),
    ("many-streams", "CPU us/event (spaced)", ("cpu_us_per_event",), 10, True),
    (
        "moderated-stream",
        "TTFT p50 ms unmoderated",
        ("unmoderated", "ttft_ms", "p50"),
        None,
        True,
    ),
    (
        "moderated-stream",
        "TTFT p50 ms moderated",
        ("moderated", "ttft_ms", "p50"),
        None,
        True,
    ),
    (
        "moderated-stream",
        "total p50 ms unmoderated",
        ("unmoderated", "total_ms", "p50"),
        None,
        True,
    ),
    (
        "moderated-stream",
        "total p50 ms moderated",
        ("moderated", "total_ms", "p50"),
        None,
        True,
    ),
    (
        "limits",
        "in-process added CPU us/req",
        ("in_process", "added_cpu_us_per_request"),
        30,
        True,
    ),
    ("limits", "in-process added p50 ms", ("in_process", "added_p50_ms"), None, True),
    (
        "limits",
        "redis added CPU us/req",
        ("redis", "added_cpu_us_per_request"),
        None,
        True,
    ),
    ("limits", "redis added p50 ms", ("redis", "added_p50_ms"), 0.3, True),
    (
        "limits",
        "redis-server CPU us/req",
        ("redis", "redis_server_cpu_us_per_request"),
        None,
        True,
    ),
    (
        "limits",
        "load: in-process added CPU us",
        ("load", "in_process", "added_cpu_us_per_request"),
        30,
        True,
    ),
    (
        "limits",
        "load: redis added CPU us",
        ("load", "redis", "added_cpu_us_per_request"),
        None,
        True,
    ),
    (
        "limits-callgrind",
        "off: instructions/req",
        ("off", "instructions_per_request"),
        None,
        True,
    ),
    (
        "limits-callgrind",
        "in-process: added instr/req",
        ("in_process", "added_instructions_per_request"),
        None,
        True,
    ),
    (
        "limits-callgrind",
        "redis: added instr/req",
        ("redis", "added_instructions_per_request"),
        None,
        True,
    ),
    ("by-model", "choice of 20 us/req", ("in_process", "choice_us"), 10, True),
    ("by-model", "of which read model us", ("in_process", "read_model_us"), None, True),
    (
        "by-model",
        "file of 20: added instr/req",
        ("instructions_per_request", "added"),
        None,
        True,
    ),
    (
        "by-model",
        "file of 20: added instr share",
        ("instructions_per_request", "added_share"),
        None,
        True,
    ),
    (
        "by-model",
        "file of 20: added CPU us/req",
        ("non_stream", "added_cpu_us_per_request"),
        10,
        True,
    ),
    (
        "by-model",
        "stream: added CPU us/req",
        ("stream", "added_cpu_us_per_request"),
        10,
        True,
    ),
    (
        "by-model",
        "file of 20: added p50 us",
        ("non_stream", "added_p50_us"),
        None,
        True,
    ),
]


def add_seed_ratios(results: dict[str, Any]) -> None:
    """
    Put the proxy's figures divided by the seed's (same run) into the seed's
    result, for whichever of the proxy's scenarios ran.
    """
    seed = results.get("seed")
    if not isinstance(seed, dict) or "skipped" in seed or "error" in seed:
        return
    ratios: dict[str, float] = {}
    pairs = [
        ("non_stream_rate", ("non-stream", "proxy", "rate"), ("non-stream", "rate")),
        ("stream_rate", ("stream", "proxy", "rate"), ("stream", "rate")),
    ]
    for name, ours, theirs in pairs:
        a, b = _get(results, ours), _get(seed, theirs)
        if a and b:
            ratios[name] = round(a / b, 3)
    a = _get(seed, ("non-stream", "proxy_cpu_us_per_request"))
    b = _get(results, ("non-stream", "proxy", "proxy_cpu_us_per_request"))
    if a and b:
        ratios["non_stream_cpu"] = round(a / b, 3)
    seed["ratios"] = ratios


def _get(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def table(results: dict[str, Any], out: Callable[[str], None] = print) -> None:
    """Print one line per figure: scenario, what, value, target, verdict."""
    out(f"{'scenario':<18}{'figure':<30}{'value':>12}{'target':>10}  ok")
    out("-" * 74)
    for name, result in results.items():
        if "skipped" in result:
            out(f"{name:<18}SKIPPED: {result['skipped']}")
            if name != "moderated-stream":
                continue
        if "error" in result:
            out(f"{name:<18}FAILED: {result['error']}")
            continue
        for scenario, label, path, target, lower in _ROWS:
            if scenario != name:
                continue
            value = _get(result, path)
            if value is None:
                continue
            verdict = ""
            if target is not None:
                verdict = (
                    "yes" if (value <= target if lower else value >= target) else "NO"
                )
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            out(
                f"{name:<18}{label:<30}{shown:>12}{'' if target is None else target:>10}  {verdict}"
            )
