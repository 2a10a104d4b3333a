"""The summary table: each target next to what was measured."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# (scenario, label, path into its result, target, lower is better)
_ROWS: list[tuple[str, str, tuple[str, ...], float | None, bool]] = [
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
        10,
        True,
    ),
    ("stream", "errors", ("proxy", "errors"), 0, True),
    ("added-latency", "added p50 ms", ("added_ms", "p50"), 0.5, True),
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
]


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
