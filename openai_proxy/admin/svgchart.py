"""
Stacked bar charts as inline SVG, drawn on the server: no script, nothing
fetched, readable by screen readers (a C{<title>} on the chart and on each
bar).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

#: Colours told apart also by most colour-blind readers (Okabe-Ito, then
#: a few more).
PALETTE = (
    "#0072b2",
    "#e69f00",
    "#009e73",
    "#cc79a7",
    "#56b4e9",
    "#d55e00",
    "#f0e442",
    "#000000",
    "#999999",
    "#7f3c8d",
)

_WIDTH = 720
_HEIGHT = 220
_LEFT = 56  # room for the y-axis labels
_RIGHT = 8
_TOP = 10
_BOTTOM = 28  # room for the x-axis labels


def colour(index: int) -> str:
    """The colour of the C{index}th series."""
    return PALETTE[index % len(PALETTE)]


def stacked_bars(
    title: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[int]]],
    *,
    unit: str = "tokens",
    label_every: int = 1,
) -> str:
    """
    An SVG chart of one bar per label, each stacking the series' values in
    order (series I{i} drawn in L{colour}(i)).

    @param labels: the bars' names, left to right.
    @param series: C{(name, values)}, one value per label.
    @param label_every: write every this many labels under the axis.
    """
    count = max(len(labels), 1)
    totals = [sum(values[i] for _, values in series) for i in range(len(labels))]
    top = _nice_top(max(totals, default=0))
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM
    step = plot_w / count
    bar_w = max(step * 0.8, 1.0)
    out = [
        f'<svg class="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMidYMid meet">',
        f"<title>{escape(title)}</title>",
    ]
    for tick in range(5):
        value = top * tick / 4
        y = _TOP + plot_h - plot_h * tick / 4
        out.append(
            f'<line x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="#ddd" stroke-width="1"/>'
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" '
            f'font-size="11" fill="#555">{_short(value)}</text>'
        )
    for i, label in enumerate(labels):
        x = _LEFT + step * i + (step - bar_w) / 2
        base = float(_TOP + plot_h)
        for index, (name, values) in enumerate(series):
            value = values[i]
            if value <= 0:
                continue
            h = plot_h * value / top
            base -= h
            out.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" '
                f'height="{h:.1f}" fill="{colour(index)}">'
                f"<title>{escape(name)}, {escape(label)}: {value:,} {unit}</title>"
                "</rect>"
            )
        if i % label_every == 0:
            out.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{_HEIGHT - 10}" '
                f'text-anchor="middle" font-size="11" fill="#555">'
                f"{escape(_tick_label(label))}</text>"
            )
    out.append(
        f'<line x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{_TOP + plot_h}" '
        f'y2="{_TOP + plot_h}" stroke="#888" stroke-width="1"/>'
    )
    out.append("</svg>")
    return "".join(out)


def _nice_top(peak: int) -> int:
    # The axis' top: 1, 2, 4 or 8 times a power of ten (at least 4), at or
    # above the peak, so the gridlines at quarters fall on round numbers.
    magnitude = 1
    while True:
        for factor in (1, 2, 4, 8):
            if magnitude * factor >= max(peak, 4):
                return magnitude * factor
        magnitude *= 10


def _short(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if value >= 1_000:
        return f"{value / 1_000:g}k"
    return f"{value:g}"


def _tick_label(label: str) -> str:
    # "2026-12-06 04:00" under an hour's bar is written "04h"; a day's
    # "2026-12-06" is written "6".
    if len(label) == 16:
        return label[11:13] + "h"
    if len(label) == 10:
        return str(int(label[8:]))
    return label
