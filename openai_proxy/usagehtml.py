"""
The C{/usage} page as HTML: per-key limits and counts, the last 48 hours and
this month drawn as bars (with their numbers as tables), and the server-key
pool.  Plain HTML and inline SVG: no script, nothing fetched from elsewhere,
every name escaped, and no secret (not a key, nor a prefix of one).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from openai_proxy.keys import NamedKey
from openai_proxy.svgchart import colour, stacked_bars
from openai_proxy.usagereport import REFUSALS, Current, Report, hour_label

#: A share of a limit at or above which a key is shown as near it.
NEAR = 0.8

_STYLE = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  margin: 0 auto; padding: 12px 16px 40px; max-width: 1200px; color: #1c1c1c;
  background: #fafafa; }
h1 { font-size: 1.45em; margin: .3em 0 .1em; }
h2 { font-size: 1.15em; margin: 1.6em 0 .5em; }
p.meta { color: #555; margin: 0 0 .4em; }
.notice { background: #fff3cd; border: 1px solid #e0c36c; padding: 8px 12px;
  border-radius: 6px; }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; }
table { border-collapse: collapse; background: #fff; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 10px; border-bottom: 1px solid #e4e4e4; text-align: right;
  white-space: nowrap; vertical-align: top; }
th { background: #f0f0f0; font-weight: 600; }
th[scope=row], td.text, th.text { text-align: left; }
thead th { position: sticky; top: 0; }
.state { font-size: .85em; padding: 1px 7px; border-radius: 9px; }
.active { background: #d8f0de; color: #14532d; }
.disabled, .expired { background: #eee; color: #555; }
.near { color: #8a4b00; font-weight: 600; }
.at { color: #b00020; font-weight: 700; }
.small { color: #666; font-size: .85em; }
.swatch { display: inline-block; width: .8em; height: .8em; margin-right: .3em;
  border-radius: 2px; vertical-align: -.05em; }
.legend span { margin-right: 1em; white-space: nowrap; }
svg.chart { width: 100%; height: auto; max-width: 980px; background: #fff;
  border: 1px solid #e4e4e4; border-radius: 6px; }
details { margin: .4em 0 1em; }
summary { cursor: pointer; color: #0b57d0; }
@media (max-width: 600px) {
  body { padding: 8px 8px 30px; font-size: 14px; }
  th, td { padding: 5px 6px; }
}
"""


@dataclass(frozen=True)
class PageData:
    """
    What the page shows.

    @ivar report: the counts, or L{None} when they could not be read.
    @ivar keys: the named keys, in file order.
    @ivar benches: per server key (by index), when its bench ends (seconds
        since the epoch; in the past: not benched).
    @ivar where: where the counters live, in words.
    @ivar problem: why the counts are missing, when they are.
    """

    report: Report | None
    keys: Sequence[NamedKey]
    benches: Sequence[float]
    where: str
    now: float
    problem: str | None = None


def render_page(data: PageData) -> bytes:
    """The page, as UTF-8 HTML."""
    now = data.now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta http-equiv="refresh" content="60">',
        "<title>Usage · openai-proxy</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Usage</h1>",
        f'<p class="meta">As of {stamp} (refreshes every minute). '
        f"Counters: {escape(data.where)}.</p>",
    ]
    report = data.report
    if report is None:
        parts.append(
            '<p class="notice" role="alert">The usage counts cannot be read '
            f"right now: {escape(data.problem or 'unknown reason')}. "
            "Keys and server keys are shown without them.</p>"
        )
    else:
        parts.append(
            f'<p class="meta">Today is {escape(report.day)}, this month '
            f"{escape(report.month)} (UTC).</p>"
        )
    names = [k.name for k in data.keys]
    if report is not None:
        names += sorted(set(report.this_month) - set(names))
    by_name = {k.name: k for k in data.keys}
    parts.append("<h2>Keys</h2>")
    if not names:
        parts.append("<p>No named keys (KEYS_FILE lists none).</p>")
    else:
        parts.append(_keys_table(names, by_name, report, now))
        if report is not None:
            parts.append(_charts(names, report, now))
    parts.append(_pool_table(data.benches, now))
    parts.append("</body></html>")
    return "\n".join(parts).encode("utf-8")


def _state(key: NamedKey | None, now: float) -> str:
    if key is None:
        return "removed"
    if key.disabled:
        return "disabled"
    expires = key.expires
    when = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    if expires is not None and when >= expires:
        return "expired"
    return "active"


def _used(used: int, limit: int | None) -> str:
    if limit is None:
        return '<span class="small">no limit</span>'
    share = used / limit
    css = "at" if used >= limit else ("near" if share >= NEAR else "")
    cell = f"{used:,} / {limit:,}"
    if css == "at":
        cell += " (at limit)"
    elif css == "near":
        cell += " (near)"
    return f'<span class="{css}">{cell}</span>' if css else cell


def _keys_table(
    names: Sequence[str],
    by_name: dict[str, NamedKey],
    report: Report | None,
    now: float,
) -> str:
    head = (
        "<tr>"
        '<th scope="col" class="text">Key</th>'
        '<th scope="col" class="text">State</th>'
        '<th scope="col">Requests this minute / rpm</th>'
        '<th scope="col">Tokens this minute / tpm</th>'
        '<th scope="col">In flight / concurrency</th>'
        '<th scope="col">Requests today</th>'
        '<th scope="col">Tokens today<br><span class="small">prompt + completion</span></th>'
        '<th scope="col">Requests this month</th>'
        '<th scope="col">Tokens this month<br><span class="small">prompt + completion</span></th>'
        '<th scope="col">Refused today<br><span class="small">rpm · tpm · concurrency</span></th>'
        '<th scope="col">Refused this month<br><span class="small">rpm · tpm · concurrency</span></th>'
        "</tr>"
    )
    rows = []
    for name in names:
        key = by_name.get(name)
        state = _state(key, now)
        cells = [
            f'<th scope="row" class="text">{escape(name)}</th>',
            f'<td class="text"><span class="state {state}">{state}</span></td>',
        ]
        if report is None:
            current = None
        else:
            current = report.current.get(name)
        cells += _now_cells(key, current)
        for counts in (
            (report.today if report else {}).get(name, {}),
            (report.this_month if report else {}).get(name, {}),
        ):
            cells.append(f"<td>{_count(report, counts, 'requests')}</td>")
            cells.append(f"<td>{_tokens(report, counts)}</td>")
        for counts in (
            (report.today if report else {}).get(name, {}),
            (report.this_month if report else {}).get(name, {}),
        ):
            cells.append(f"<td>{_refused(report, counts)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<div class="scroll"><table><caption class="small" style="text-align:left">'
        "Per named key: limits, what is used now, and totals (UTC)</caption>"
        f"<thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _now_cells(key: NamedKey | None, current: Current | None) -> list[str]:
    if key is None:
        return ["<td>–</td>"] * 3
    if current is None:
        return [
            f"<td>{_limit_only(key.rpm)}</td>",
            f"<td>{_limit_only(key.tpm)}</td>",
            f"<td>{_limit_only(key.concurrency)}</td>",
        ]
    # Windows are kept only for a key with that limit: without one, the
    # minute's figure is not known and the cell says there is no limit.
    return [
        f"<td>{_used(current.requests, key.rpm)}</td>",
        f"<td>{_used(current.tokens, key.tpm)}</td>",
        f"<td>{_in_flight(current.in_flight, key.concurrency)}</td>",
    ]


def _in_flight(count: int, limit: int | None) -> str:
    if limit is None:
        return f'{count:,} <span class="small">(no limit)</span>'
    return _used(count, limit)


def _limit_only(limit: int | None) -> str:
    return '<span class="small">no limit</span>' if limit is None else f"? / {limit:,}"


def _count(report: Report | None, counts: dict[str, int], what: str) -> str:
    return "–" if report is None else f"{counts.get(what, 0):,}"


def _tokens(report: Report | None, counts: dict[str, int]) -> str:
    if report is None:
        return "–"
    prompt = counts.get("prompt_tokens", 0)
    completion = counts.get("completion_tokens", 0)
    return (
        f"{prompt + completion:,}<br>"
        f'<span class="small">{prompt:,} + {completion:,}</span>'
    )


def _refused(report: Report | None, counts: dict[str, int]) -> str:
    if report is None:
        return "–"
    values = [counts.get("refused_" + limit, 0) for limit in REFUSALS]
    text = " · ".join(f"{v:,}" for v in values)
    return f'<span class="near">{text}</span>' if any(values) else text


def _charts(names: Sequence[str], report: Report, now: float) -> str:
    hours = [report.recent_hours(name, now) for name in names]
    hour_labels = [hour_label(h)[:10] + " " + hour_label(h)[11:16] for h, _ in hours[0]]
    hour_series = [
        (name, [n for _, n in found]) for name, found in zip(names, hours, strict=True)
    ]
    days = [report.month_days(name) for name in names]
    day_labels = [d for d, _ in days[0]]
    day_series = [
        (name, [n for _, n in found]) for name, found in zip(names, days, strict=True)
    ]
    legend = (
        '<p class="legend">'
        + "".join(
            f'<span><i class="swatch" style="background:{colour(i)}"></i>'
            f"{escape(name)}</span>"
            for i, name in enumerate(names)
        )
        + "</p>"
    )
    return "".join(
        [
            "<h2>Tokens per hour, last 48 hours (UTC)</h2>",
            legend,
            stacked_bars(
                "Tokens per hour over the last 48 hours, stacked by key",
                hour_labels,
                hour_series,
                label_every=6,
            ),
            _numbers_table("Tokens per hour", "Hour (UTC)", hour_labels, hour_series),
            f"<h2>Tokens per day, {escape(report.month)}</h2>",
            legend,
            stacked_bars(
                f"Tokens per day in {report.month}, stacked by key",
                day_labels,
                day_series,
            ),
            _numbers_table("Tokens per day", "Day (UTC)", day_labels, day_series),
        ]
    )


def _numbers_table(
    what: str,
    first: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[int]]],
) -> str:
    head = f'<th scope="col" class="text">{escape(first)}</th>' + "".join(
        f'<th scope="col">{escape(name)}</th>' for name, _ in series
    )
    rows = []
    for i, label in enumerate(labels):
        if not any(values[i] for _, values in series):
            continue
        rows.append(
            f'<tr><th scope="row" class="text">{escape(label)}</th>'
            + "".join(f"<td>{values[i]:,}</td>" for _, values in series)
            + "</tr>"
        )
    body = "".join(rows) or (
        f'<tr><td class="text" colspan="{len(series) + 1}">No tokens yet.</td></tr>'
    )
    return (
        f"<details><summary>{escape(what)} as a table</summary>"
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div></details>"
    )


def _pool_table(benches: Sequence[float], now: float) -> str:
    if not benches:
        return (
            "<h2>Server keys</h2><p>No server-held keys (OPENAI_KEY): "
            "clients send their own.</p>"
        )
    rows = []
    for index, until in enumerate(benches):
        if until > now:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
            state = f'<span class="at">benched</span> until {when}'
        else:
            state = '<span class="state active">in use</span>'
        rows.append(
            f'<tr><th scope="row">{index}</th><td class="text">{state}</td></tr>'
        )
    return (
        "<h2>Server keys</h2>"
        '<div class="scroll"><table><thead><tr><th scope="col">Index</th>'
        '<th scope="col" class="text">State</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
