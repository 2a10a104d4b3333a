"""
Quotas that last: requests per day, tokens per day and tokens per month on
a named key, counted by the calendar of C{QUOTA_TZ}; the 429 a key over its
quota gets, and what is left of each quota for C{/usage}.

The counts are the day and month usage counts the limiters keep anyway
(for C{/usage}), so a quota costs an admission only a look at them.
"""

from __future__ import annotations

import datetime
import math
import zoneinfo
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from openai_proxy.http.errors import ProxyError

if TYPE_CHECKING:
    from openai_proxy.keys.limits import Decision
    from openai_proxy.keys.named import NamedKey

#: The C{limit} label values of the quotas, and their refusal counts.
QUOTA_KINDS = ("requests_per_day", "tokens_per_day", "tokens_per_month")

_UTC = datetime.timezone.utc
_ONE_DAY = datetime.timedelta(days=1)


class UnknownZone(ValueError):
    """A time zone name that is not an IANA zone known here."""


class QuotaCalendar:
    """
    The calendar day and month that quotas (and the usage counts behind
    them) run by: those of an IANA time zone, UTC by default.

    L{periods} hands out the same tuple for the whole of a day, so a caller
    may compare it by identity to notice that a new day began.
    """

    def __init__(self, zone: str = "UTC") -> None:
        """@raise UnknownZone: when C{zone} is not a known IANA zone name."""
        self.name = zone
        self.zone: datetime.tzinfo
        if zone.upper() in ("UTC", "Z", "ETC/UTC"):
            self.zone = _UTC
        else:
            try:
                self.zone = zoneinfo.ZoneInfo(zone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise UnknownZone(
                    f"unknown time zone {zone!r}; expected an IANA name such as "
                    "UTC, Europe/Paris or Asia/Shanghai"
                ) from None
        # The day last asked about: [start, end) in epoch seconds, its
        # (day, month) names and the end of its month.
        self._day_start = 0.0
        self._day_end = -1.0
        self._periods = ("", "")
        self._month_end = 0.0

    def _move_to(self, now: float) -> None:
        local = datetime.datetime.fromtimestamp(now, self.zone)
        date = local.date()
        start = datetime.datetime.combine(date, datetime.time(), self.zone)
        end = datetime.datetime.combine(date + _ONE_DAY, datetime.time(), self.zone)
        first_next = (date.replace(day=28) + 4 * _ONE_DAY).replace(day=1)
        month_end = datetime.datetime.combine(first_next, datetime.time(), self.zone)
        day = date.isoformat()
        self._day_start, self._day_end = start.timestamp(), end.timestamp()
        self._month_end = month_end.timestamp()
        self._periods = (day, day[:7])

    def periods(self, now: float) -> tuple[str, str]:
        """The day (C{YYYY-MM-DD}) and month (C{YYYY-MM}) of C{now}."""
        if not self._day_start <= now < self._day_end:
            self._move_to(now)
        return self._periods

    def day_end(self, now: float) -> float:
        """When the day of C{now} ends (epoch seconds)."""
        self.periods(now)
        return self._day_end

    def month_end(self, now: float) -> float:
        """When the month of C{now} ends (epoch seconds)."""
        self.periods(now)
        return self._month_end

    def month_start(self, now: float) -> float:
        """When the month of C{now} began (epoch seconds)."""
        local = datetime.datetime.fromtimestamp(now, self.zone).date().replace(day=1)
        return datetime.datetime.combine(local, datetime.time(), self.zone).timestamp()

    def date_of(self, when: float) -> str:
        """The day (C{YYYY-MM-DD}) that C{when} falls on."""
        return datetime.datetime.fromtimestamp(when, self.zone).date().isoformat()

    def isoformat(self, when: float) -> str:
        """C{when} as an ISO 8601 time in this zone (C{Z} for UTC)."""
        text = datetime.datetime.fromtimestamp(round(when), self.zone).isoformat()
        return text[:-6] + "Z" if self.zone is _UTC else text


#: The calendar of the usage counts when none is configured.
UTC_CALENDAR = QuotaCalendar()


def quota_of(key: NamedKey, kind: str) -> int | None:
    """C{key}'s quota of C{kind} (one of L{QUOTA_KINDS}), or L{None}."""
    value: int | None = getattr(key, kind)
    return value


def used_of(kind: str, today: Mapping[str, int], month: Mapping[str, int]) -> int:
    """What counts against a quota of C{kind}, from a key's usage counts."""
    if kind == "requests_per_day":
        return int(today.get("requests", 0))
    counts = today if kind == "tokens_per_day" else month
    return int(counts.get("prompt_tokens", 0)) + int(counts.get("completion_tokens", 0))


def over_quota(
    key: NamedKey,
    today: Mapping[str, int],
    month: Mapping[str, int],
) -> tuple[str, int] | None:
    """
    The first quota of C{key} that its counts (of today and this month)
    have reached, with what was used, or L{None} while all have room left.
    """
    for kind in QUOTA_KINDS:
        limit = quota_of(key, kind)
        if limit is not None:
            used = used_of(kind, today, month)
            if used >= limit:
                return kind, used
    return None


def quota_reset(calendar: QuotaCalendar, kind: str, now: float) -> float:
    """When a quota of C{kind} starts afresh after C{now} (epoch seconds)."""
    if kind == "tokens_per_month":
        return calendar.month_end(now)
    return calendar.day_end(now)


_WORDS = {
    "requests_per_day": "requests per day",
    "tokens_per_day": "tokens per day",
    "tokens_per_month": "tokens per month",
}


def quota_exceeded(
    key: NamedKey, decision: Decision, calendar: QuotaCalendar
) -> ProxyError:
    """
    The 429 for a request refused by one of C{key}'s quotas: OpenAI's
    C{insufficient_quota}, with C{x-should-retry: false} (the SDKs then
    raise at once rather than retry in vain) and the reset time.
    """
    kind = decision.denied or "requests_per_day"
    resets = calendar.isoformat(decision.quota_reset)
    message = (
        f"You exceeded the quota of key {key.name!r} on {_WORDS[kind]}: "
        f"Limit {quota_of(key, kind)}, Used {decision.quota_used}. "
        f"It resets at {resets}."
    )
    wait = max(1, math.ceil(decision.retry_after))
    return ProxyError(
        429,
        message,
        "insufficient_quota",
        "insufficient_quota",
        headers=((b"x-should-retry", b"false"), (b"retry-after", b"%d" % wait)),
    )


class QuotaStatus(NamedTuple):
    """
    One quota of a key: its limit, what is used and left of it, and when it
    starts afresh (an ISO time in the calendar's zone).
    """

    limit: int
    used: int
    remaining: int
    resets_at: str


def quota_status(
    key: NamedKey,
    today: Mapping[str, int],
    month: Mapping[str, int],
    calendar: QuotaCalendar,
    now: float,
) -> dict[str, QuotaStatus]:
    """Per quota C{key} has (in L{QUOTA_KINDS} order), its status at C{now}."""
    out = {}
    for kind in QUOTA_KINDS:
        limit = quota_of(key, kind)
        if limit is not None:
            used = used_of(kind, today, month)
            out[kind] = QuotaStatus(
                limit,
                used,
                max(0, limit - used),
                calendar.isoformat(quota_reset(calendar, kind, now)),
            )
    return out
