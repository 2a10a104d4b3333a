"""
The usage report: per-key counts for today and this month (by the calendar
of C{QUOTA_TZ}, UTC by default), what each key uses right now, requests
refused by each limit, and tokens per hour, as a limiter hands them to
C{GET /usage}; and the C{/usage} JSON document, with what is left of each
key's quotas.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from openai_proxy.keys.named import NamedKey
from openai_proxy.keys.quotas import (
    QUOTA_KINDS,
    UTC_CALENDAR,
    QuotaCalendar,
    QuotaStatus,
    quota_status,
)

#: The counts kept per key and period.
COUNTS = ("requests", "prompt_tokens", "completion_tokens")
#: The limits that refuse requests (the C{limit} label of the metric).
REFUSALS = ("requests", "tokens", "concurrency", *QUOTA_KINDS)
#: How far back the hourly series reaches on the page and in the JSON.
RECENT_HOURS = 48
#: Days that tokens per hour are kept (a month, and the hours before it).
HOURS_KEPT_DAYS = 40


class Current(NamedTuple):
    """
    What a key uses now: requests and tokens in the last minute's window
    (counted only for a key with C{rpm} / C{tpm}), requests in flight.
    """

    requests: int = 0
    tokens: int = 0
    in_flight: int = 0


@dataclass
class Report:
    """
    Usage counts per key name for one day and one month of C{calendar}.

    @ivar today / this_month: per name, counts named as in L{COUNTS} and
        C{refused_<limit>} for each limit in L{REFUSALS}.
    @ivar current: per name, what it uses now (when the limiter knows).
    @ivar hours: per name, tokens per hour, by hour number (seconds since
        the epoch // 3600), for the hours the limiter still keeps.
    @ivar calendar: the calendar C{day} and C{month} are days of.
    """

    day: str
    month: str
    today: dict[str, dict[str, int]] = field(default_factory=dict)
    this_month: dict[str, dict[str, int]] = field(default_factory=dict)
    current: dict[str, Current] = field(default_factory=dict)
    hours: dict[str, dict[int, int]] = field(default_factory=dict)
    calendar: QuotaCalendar = UTC_CALENDAR
    # The day of each hour number asked about, shared by every key's series.
    _dates: dict[int, str] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def recent_hours(self, name: str, now: float) -> list[tuple[int, int]]:
        """C{(hour, tokens)} for the last L{RECENT_HOURS} hours up to C{now}'s."""
        last = int(now) // 3600
        found = self.hours.get(name, {})
        return [(h, found.get(h, 0)) for h in range(last - RECENT_HOURS + 1, last + 1)]

    def month_days(self, name: str) -> list[tuple[str, int]]:
        """
        C{(YYYY-MM-DD, tokens)} for each day of this month up to today.  An
        hour counts on the day it begins on (in a zone whose offset is not
        whole hours, an hour across midnight counts on the day before).
        """
        today = int(self.day[8:10])
        totals = [0] * today
        dates, date_of = self._dates, self.calendar.date_of
        for hour, tokens in self.hours.get(name, {}).items():
            date = dates.get(hour)
            if date is None:
                date = dates[hour] = date_of(hour * 3600)
            if date[:7] == self.month:
                index = int(date[8:10]) - 1
                if index < today:
                    totals[index] += tokens
        return [(f"{self.month}-{d + 1:02d}", totals[d]) for d in range(today)]

    def quotas(self, key: NamedKey, now: float) -> dict[str, QuotaStatus]:
        """What is used and left of each of C{key}'s quotas (see L{quota_status})."""
        return quota_status(
            key,
            self.today.get(key.name, {}),
            self.this_month.get(key.name, {}),
            self.calendar,
            now,
        )

    def as_json(
        self,
        names: Sequence[str],
        now: float,
        keys_by_name: Mapping[str, NamedKey] | None = None,
    ) -> dict[str, object]:
        """
        The C{GET /usage} document, listing every name in C{names}; a key of
        C{keys_by_name} with quotas gets its C{quota} entry.
        """
        keys = {}
        for name in names:
            entry: dict[str, object] = {
                "today": _period(self.today.get(name, {})),
                "month": _period(self.this_month.get(name, {})),
            }
            key = None if keys_by_name is None else keys_by_name.get(name)
            if key is not None and key.has_quota:
                entry["quota"] = {
                    kind: status._asdict()
                    for kind, status in self.quotas(key, now).items()
                }
            current = self.current.get(name)
            if current is not None:
                entry["now"] = current._asdict()
            entry["hours"] = {
                hour_label(h): n for h, n in self.recent_hours(name, now) if n
            }
            entry["days"] = {d: n for d, n in self.month_days(name) if n}
            keys[name] = entry
        return {
            "day": self.day,
            "month": self.month,
            "time_zone": self.calendar.name,
            "keys": keys,
        }


def hour_label(hour: int) -> str:
    """An hour number as C{YYYY-MM-DDTHH:00Z}."""
    return time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(hour * 3600))


def _period(counts: dict[str, int]) -> dict[str, object]:
    out: dict[str, object] = {name: int(counts.get(name, 0)) for name in COUNTS}
    out["total_tokens"] = int(counts.get("prompt_tokens", 0)) + int(
        counts.get("completion_tokens", 0)
    )
    out["refused"] = {
        limit: int(counts.get("refused_" + limit, 0)) for limit in REFUSALS
    }
    return out
