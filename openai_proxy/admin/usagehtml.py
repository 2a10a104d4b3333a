"""
The C{/usage} page as HTML: per-key limits, counts and what is left of each
quota, the last 48 hours and
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

from openai_proxy.admin.svgchart import colour, stacked_bars
from openai_proxy.keys.named import NamedKey
from openai_proxy.keys.usagereport import REFUSALS, Current, Report, hour_label

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
tbody th[scope=row] { position: sticky; left: 0; background: #fff; }
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
  /* Each key's row becomes a card: label, then value, line by line. */
  table.keys, table.keys tbody, table.keys tr, table.keys th, table.keys td {
    display: block; width: auto; }
  table.keys thead { position: absolute; left: -9999px; }
  table.keys tr { border: 1px solid #ddd; border-radius: 8px; margin: 0 0 10px;
    background: #fff; }
  table.keys tbody th[scope=row] { position: static; font-size: 1.05em; }
  table.keys td { display: flex; justify-content: space-between; gap: 12px;
    text-align: right; white-space: normal; }
  table.keys td::before { content: attr(data-label); font-weight: 600;
    text-align: left; color: #444; }
  /* Scrolled to the newest bars at first (right to left), drawn left to right. */
  .chartbox { overflow-x: auto; direction: rtl; }
  .chartbox svg.chart { direction: ltr; }
  .chartbox svg.chart { min-width: 620px; }
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
            f"{escape(report.month)} ({escape(report.calendar.name)}).</p>"
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
        '<th scope="col">Requests<br><span class="small">this minute / rpm</span></th>'
        '<th scope="col">Tokens<br><span class="small">this minute / tpm</span></th>'
        '<th scope="col">In flight<br><span class="small">now / concurrency</span></th>'
        '<th scope="col">Today</th>'
        '<th scope="col">This month</th>'
        '<th scope="col">Quotas<br><span class="small">used / limit, left</span></th>'
        "</tr>"
    )
    rows = []
    for name in names:
        key = by_name.get(name)
        state = _state(key, now)
        cells = [
            f'<th scope="row" class="text">{escape(name)}<br>'
            f'<span class="state {state}">{state}</span></th>'
        ]
        current = None if report is None else report.current.get(name)
        cells += _now_cells(key, current)
        if report is None:
            cells += [_td("Today", "–"), _td("This month", "–"), _td("Quotas", "–")]
        else:
            cells.append(_td("Today", _period(report.today.get(name, {}))))
            cells.append(_td("This month", _period(report.this_month.get(name, {}))))
            cells.append(_td("Quotas", _quotas(key, report, now)))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<div class="scroll"><table class="keys">'
        f"<thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _period(counts: dict[str, int]) -> str:
    requests = counts.get("requests", 0)
    prompt = counts.get("prompt_tokens", 0)
    completion = counts.get("completion_tokens", 0)
    lines = [
        _plural(requests, "request"),
        _plural(prompt + completion, "token"),
        f'<span class="small">{prompt:,} prompt + {completion:,} completion</span>',
    ]
    refused = [
        f"{counts.get('refused_' + limit, 0):,} by {_LIMIT_NAMES[limit]}"
        for limit in REFUSALS
        if counts.get("refused_" + limit, 0)
    ]
    if refused:
        lines.append(f'<span class="near">refused: {", ".join(refused)}</span>')
    return "<br>".join(lines)


_QUOTA_NAMES = {
    "requests_per_day": ("requests", "today"),
    "tokens_per_day": ("tokens", "today"),
    "tokens_per_month": ("tokens", "this month"),
}


def _quotas(key: NamedKey | None, report: Report, now: float) -> str:
    if key is None:
        return "–"
    if not key.has_quota:
        return '<span class="small">no quota</span>'
    lines = []
    for kind, status in report.quotas(key, now).items():
        noun, when = _QUOTA_NAMES[kind]
        lines.append(
            f"{noun} {when}: {_used(status.used, status.limit)}<br>"
            f'<span class="small">{status.remaining:,} left; resets '
            f"{escape(status.resets_at)}</span>"
        )
    return "<br>".join(lines)


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


_LIMIT_NAMES = {
    "requests": "rpm",
    "tokens": "tpm",
    "concurrency": "concurrency",
    "requests_per_day": "requests_per_day",
    "tokens_per_day": "tokens_per_day",
    "tokens_per_month": "tokens_per_month",
}


def _now_cells(key: NamedKey | None, current: Current | None) -> list[str]:
    if key is None:
        return [_td(label, "–") for label in _NOW_LABELS]
    if current is None:
        return [
            _td(_NOW_LABELS[0], _limit_only(key.rpm)),
            _td(_NOW_LABELS[1], _limit_only(key.tpm)),
            _td(_NOW_LABELS[2], _limit_only(key.concurrency)),
        ]
    # Windows are kept only for a key with that limit: without one, the
    # minute's figure is not known and the cell says there is no limit.
    return [
        _td(_NOW_LABELS[0], _used(current.requests, key.rpm)),
        _td(_NOW_LABELS[1], _used(current.tokens, key.tpm)),
        _td(_NOW_LABELS[2], _in_flight(current.in_flight, key.concurrency)),
    ]


_NOW_LABELS = (
    "Requests this minute",
    "Tokens this minute",
    "In flight",
)


def _td(label: str, content: str) -> str:
    # The label is shown before the value where rows become cards (phones).
    return f'<td data-label="{escape(label)}"><span>{content}</span></td>'


def _in_flight(count: int, limit: int | None) -> str:
    if limit is None:
        return f'{count:,} <span class="small">(no limit)</span>'
    return _used(count, limit)


def _limit_only(limit: int | None) -> str:
    return '<span class="small">no limit</span>' if limit is None else f"– / {limit:,}"


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
            '<div class="chartbox">',
            stacked_bars(
                "Tokens per hour over the last 48 hours, stacked by key",
                hour_labels,
                hour_series,
                label_every=6,
            ),
            "</div>",
            _numbers_table("Tokens per hour", "Hour (UTC)", hour_labels, hour_series),
            f"<h2>Tokens per day, {escape(report.month)}</h2>",
            legend,
            '<div class="chartbox">',
            stacked_bars(
                f"Tokens per day in {report.month}, stacked by key",
                day_labels,
                day_series,
            ),
            "</div>",
            _numbers_table(
                "Tokens per day",
                f"Day ({report.calendar.name})",
                day_labels,
                day_series,
            ),
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
