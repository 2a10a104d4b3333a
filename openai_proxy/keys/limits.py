"""
Per-key limits (requests per minute, tokens per minute, requests in flight,
and the quotas per day and month of L{openai_proxy.keys.quotas}) and usage
counts: the L{Limiter} interface, what a decision looks like to a
client (429 body and C{x-ratelimit-*} headers, shaped like OpenAI's), and
the in-process implementation.

Windows slide over the last 60 seconds in one-second buckets, so a client
is never let through twice its limit at a minute's edge and never waits more
than a minute.  The Redis implementation (L{openai_proxy.keys.redisstore}) runs
the same algorithm in a server-side script.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from twisted.internet.defer import Deferred, succeed

from openai_proxy.http.errors import ProxyError
from openai_proxy.keys.named import NamedKey
from openai_proxy.keys.quotas import (
    QUOTA_KINDS,
    UTC_CALENDAR,
    QuotaCalendar,
    over_quota,
    quota_reset,
)
from openai_proxy.keys.usagereport import HOURS_KEPT_DAYS, Current, Report

#: Seconds a window spans.
WINDOW = 60
#: Seconds a client over its concurrency limit is told to wait.
CONCURRENCY_RETRY = 1.0
#: The C{limit} label values of C{openai_proxy_rate_limited_total}.
LIMIT_KINDS = ("requests", "tokens", "concurrency", *QUOTA_KINDS)


class Decision(NamedTuple):
    """
    The outcome of one admission check (a named tuple: made on every
    request, and a frozen dataclass costs three times as much to make).

    @ivar denied: L{None} when admitted, else which limit refused it
        (one of L{LIMIT_KINDS}).
    @ivar retry_after: seconds until the refusing limit lets one through.
    @ivar requests_used: requests in the window (this one included when
        admitted).
    @ivar tokens_used: tokens charged in the window.
    @ivar requests_reset / tokens_reset: seconds until the oldest request /
        tokens in the window leave it.
    @ivar quota_used / quota_reset: for a refusal by a quota, what was used
        of it and when it starts afresh (epoch seconds).
    """

    denied: str | None = None
    retry_after: float = 0.0
    requests_used: int = 0
    requests_reset: float = 0.0
    tokens_used: int = 0
    tokens_reset: float = 0.0
    quota_used: int = 0
    quota_reset: float = 0.0


class Usage(NamedTuple):
    """Tokens one reply used, as the upstream reported them."""

    prompt: int = 0
    completion: int = 0


class LimitsUnavailable(Exception):
    """The shared store could not be asked (Redis down)."""


class Limiter(Protocol):
    """
    Where limits are checked and usage is counted; days and months (of the
    usage counts and the quotas) are those of C{calendar}.
    """

    calendar: QuotaCalendar

    def admit(self, key: NamedKey, ticket: str) -> Deferred[Decision]:
        """
        Check C{key}'s limits for one more request; when admitted, count it
        (its request, and its slot in flight under C{ticket}).  Fails with
        L{LimitsUnavailable} when the store cannot be asked.
        """

    def settle(self, key: NamedKey, ticket: str, usage: Usage | None) -> None:
        """An admitted request ended: free its slot, charge its tokens."""

    def charge(self, key: NamedKey, usage: Usage) -> None:
        """
        Charge tokens to C{key} while its request goes on (a WebSocket
        session's turns), without freeing its slot.
        """

    def report(self, now: float, names: Sequence[str] = ()) -> Deferred[Report]:
        """
        Usage counts for the day and month of C{now}, with what each key of
        C{names} uses now.
        """


def periods(now: float) -> tuple[str, str]:
    """The UTC day (C{YYYY-MM-DD}) and month (C{YYYY-MM}) of C{now}."""
    return UTC_CALENDAR.periods(now)


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI's C{x-ratelimit-reset-*} headers write it."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    if seconds < 59.9995:  # the usual case, every request: no divmod
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    rest_text = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{rest_text}" if minutes else rest_text


_ONE_REQUEST = (("requests", 1),)
_REFUSED = {kind: (("refused_" + kind, 1),) for kind in LIMIT_KINDS}


_REQUESTS_HEADERS = (
    b"x-ratelimit-limit-requests",
    b"x-ratelimit-remaining-requests",
    b"x-ratelimit-reset-requests",
)
_TOKENS_HEADERS = (
    b"x-ratelimit-limit-tokens",
    b"x-ratelimit-remaining-tokens",
    b"x-ratelimit-reset-tokens",
)


def rate_headers(key: NamedKey, decision: Decision) -> list[tuple[bytes, bytes]]:
    """The C{x-ratelimit-*} headers for C{key} after C{decision}."""
    headers: list[tuple[bytes, bytes]] = []
    if key.rpm is not None:
        headers += _window_headers(
            _REQUESTS_HEADERS, key.rpm, decision.requests_used, decision.requests_reset
        )
    if key.tpm is not None:
        headers += _window_headers(
            _TOKENS_HEADERS, key.tpm, decision.tokens_used, decision.tokens_reset
        )
    return headers


def _window_headers(
    names: tuple[bytes, bytes, bytes], limit: int, used: int, reset: float
) -> tuple[tuple[bytes, bytes], ...]:
    limit_name, remaining_name, reset_name = names
    remaining = limit - used
    return (
        (limit_name, b"%d" % limit),
        (remaining_name, b"%d" % (remaining if remaining > 0 else 0)),
        (reset_name, format_reset(reset).encode()),
    )


def rate_limited(key: NamedKey, decision: Decision) -> ProxyError:
    """The 429 a client gets when C{decision} refused it."""
    wait = max(decision.retry_after, 0.001)
    when = format_reset(wait)
    if decision.denied == "tokens":
        message = (
            f"Rate limit reached for key {key.name!r} on tokens per minute (TPM): "
            f"Limit {key.tpm}, Used {decision.tokens_used}. "
            f"Please try again in {when}."
        )
        type_ = "tokens"
    elif decision.denied == "concurrency":
        message = (
            f"Too many requests in flight for key {key.name!r}: "
            f"Limit {key.concurrency}. Please try again in {when}."
        )
        type_ = "requests"
    else:
        message = (
            f"Rate limit reached for key {key.name!r} on requests per minute (RPM): "
            f"Limit {key.rpm}, Used {decision.requests_used}, Requested 1. "
            f"Please try again in {when}."
        )
        type_ = "requests"
    headers = [
        (b"retry-after", b"%d" % max(1, math.ceil(wait))),
        (b"retry-after-ms", b"%d" % max(1, math.ceil(wait * 1000))),
        *rate_headers(key, decision),
    ]
    return ProxyError(
        429, message, "rate_limit_exceeded", type_, headers=tuple(headers)
    )


class _Window:
    """Amounts in one-second buckets over the last L{WINDOW} seconds."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()
        self.total = 0

    def trim(self, now: float) -> None:
        buckets = self.buckets
        while buckets and buckets[0][0] + WINDOW <= now:
            self.total -= buckets.popleft()[1]

    def add(self, now: float, amount: int) -> None:
        second = int(now)
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += amount
        else:
            self.buckets.append([second, amount])
        self.total += amount

    def wait(self, limit: int, now: float) -> float:
        """Seconds until the total falls below C{limit}."""
        need = self.total - limit + 1
        for second, amount in self.buckets:
            need -= amount
            if need <= 0:
                return second + WINDOW - now
        return 0.0

    def reset(self, now: float) -> float:
        return self.buckets[0][0] + WINDOW - now if self.buckets else 0.0


class _KeyState:
    __slots__ = ("requests", "tokens", "in_flight")

    def __init__(self) -> None:
        self.requests = _Window()
        self.tokens = _Window()
        self.in_flight = 0


class LocalLimiter:
    """
    Limits and usage kept in this process: with several worker processes,
    each enforces its own share.

    @ivar clock: where the time comes from (a test may move it).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        calendar: QuotaCalendar | None = None,
    ) -> None:
        self.clock = clock
        self.calendar = QuotaCalendar() if calendar is None else calendar
        self._keys: dict[str, _KeyState] = {}
        self._usage: dict[str, dict[str, dict[str, int]]] = {}
        # Per key name: the periods() pair last seen, and its count dicts.
        self._counts: dict[str, tuple[tuple[str, str], tuple[dict[str, int], ...]]] = {}
        # Per key name: tokens per hour number; hours older than
        # HOURS_KEPT_DAYS are dropped when a new hour begins.
        self._hours: dict[str, dict[int, int]] = {}
        self._hour = 0

    def admit(self, key: NamedKey, ticket: str) -> Deferred[Decision]:
        return succeed(self.decide(key))

    def decide(self, key: NamedKey) -> Decision:
        """L{admit}, without the L{Deferred}."""
        now = self.clock()
        state = self._keys.get(key.name)
        if state is None:
            state = self._keys[key.name] = _KeyState()
        requests, tokens = state.requests, state.tokens
        requests.trim(now)
        tokens.trim(now)
        denied, retry = None, 0.0
        quota_used, reset_at = 0, 0.0
        # A quota first: when one is spent, the minute's limits are moot.
        if key.has_quota and (over := self._over_quota(key, now)) is not None:
            denied, quota_used = over
            reset_at = quota_reset(self.calendar, denied, now)
            retry = reset_at - now
        elif key.concurrency is not None and state.in_flight >= key.concurrency:
            denied, retry = "concurrency", CONCURRENCY_RETRY
        elif key.rpm is not None and requests.total >= key.rpm:
            denied, retry = "requests", requests.wait(key.rpm, now)
        elif key.tpm is not None and tokens.total >= key.tpm:
            denied, retry = "tokens", tokens.wait(key.tpm, now)
        else:
            if key.rpm is not None:
                requests.add(now, 1)
            state.in_flight += 1
            self._count(key.name, now, _ONE_REQUEST)
        if denied is not None:
            self._count(key.name, now, _REFUSED[denied])
        return Decision(
            denied,
            retry,
            requests.total,
            requests.reset(now),
            tokens.total,
            tokens.reset(now),
            quota_used,
            reset_at,
        )

    def _over_quota(self, key: NamedKey, now: float) -> tuple[str, int] | None:
        today, month = self._tables_now(key.name, now)
        return over_quota(key, today, month)

    def settle(self, key: NamedKey, ticket: str, usage: Usage | None) -> None:
        state = self._keys.get(key.name)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1
        if usage is not None:
            self.charge(key, usage)

    def charge(self, key: NamedKey, usage: Usage) -> None:
        now = self.clock()
        state = self._keys.get(key.name)
        spent = usage.prompt + usage.completion
        if state is not None and key.tpm is not None and spent > 0:
            state.tokens.trim(now)
            state.tokens.add(now, spent)
        self._count(
            key.name,
            now,
            (("prompt_tokens", usage.prompt), ("completion_tokens", usage.completion)),
        )
        if spent > 0:
            self._count_hour(key.name, now, spent)

    def _count_hour(self, name: str, now: float, tokens: int) -> None:
        hour = int(now) // 3600
        if hour != self._hour:
            self._hour = hour
            oldest = hour - HOURS_KEPT_DAYS * 24
            for kept in self._hours.values():
                for old in [h for h in kept if h < oldest]:
                    del kept[old]
        hours = self._hours.get(name)
        if hours is None:
            hours = self._hours[name] = {}
        hours[hour] = hours.get(hour, 0) + tokens

    def _count(
        self, name: str, now: float, amounts: tuple[tuple[str, int], ...]
    ) -> None:
        for counts in self._tables_now(name, now):
            for what, amount in amounts:
                if amount:
                    counts[what] = counts.get(what, 0) + amount

    def _tables_now(self, name: str, now: float) -> tuple[dict[str, int], ...]:
        # The count dicts of C{name} for the day and month of C{now}.
        current = self.calendar.periods(now)
        found = self._counts.get(name)
        if found is None or found[0] is not current:
            found = self._counts[name] = (current, self._tables(name, now, current))
        return found[1]

    def _tables(
        self, name: str, now: float, current: tuple[str, str]
    ) -> tuple[dict[str, int], ...]:
        # The count dicts of C{name} for the day and month of C{now}; found
        # again only when the calendar hands out a new pair (once a day).
        tables = []
        for period in current:
            table = self._usage.get(period)
            if table is None:
                self._forget_old(now)
                table = self._usage[period] = {}
            counts = table.get(name)
            if counts is None:
                counts = table[name] = {}
            tables.append(counts)
        return tuple(tables)

    def _forget_old(self, now: float) -> None:
        current = self.calendar.periods(now)
        for period in list(self._usage):
            if period not in current:
                del self._usage[period]

    def report(self, now: float, names: Sequence[str] = ()) -> Deferred[Report]:
        day, month = self.calendar.periods(now)
        current = {}
        for name in names:
            state = self._keys.get(name)
            if state is None:
                current[name] = Current()
                continue
            state.requests.trim(now)
            state.tokens.trim(now)
            current[name] = Current(
                state.requests.total, state.tokens.total, state.in_flight
            )
        return succeed(
            Report(
                day,
                month,
                {k: dict(v) for k, v in self._usage.get(day, {}).items()},
                {k: dict(v) for k, v in self._usage.get(month, {}).items()},
                current,
                {k: dict(v) for k, v in self._hours.items()},
                self.calendar,
            )
        )
