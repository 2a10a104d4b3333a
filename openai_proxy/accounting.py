"""
What a request on a named key goes through: its model checked, its limits
checked and counted before it goes upstream, its tokens counted from the
reply and charged when it ends.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence

from twisted.logger import Logger
from twisted.web.server import Request

from openai_proxy.auth import bearer_token
from openai_proxy.errors import JSON_CONTENT_TYPE, ErrorTemplate, write_error
from openai_proxy.keys import NamedKey
from openai_proxy.limits import (
    Decision,
    Limiter,
    LimitsUnavailable,
    LocalLimiter,
    rate_headers,
    rate_limited,
)
from openai_proxy.metrics import Metrics
from openai_proxy.usage import Meter, inspect_request

_log = Logger()

LIMITS_UNAVAILABLE = ErrorTemplate(
    503,
    "The proxy cannot check this key's limits right now; try again shortly.",
    "limits_unavailable",
    "api_error",
)


class Accounting:
    """
    Opens an L{Account} for each request on a named key.

    @param on_error: C{"allow"} or C{"deny"}: what happens to a request when
        the limiter cannot be asked.
    @param inject_usage: ask the upstream for a stream's usage when the
        client did not (and hide it from the client again).
    """

    def __init__(
        self,
        limiter: Limiter,
        metrics: Metrics,
        *,
        on_error: str = "allow",
        inject_usage: bool = True,
    ) -> None:
        self.limiter = limiter
        # In-process limits decide at once: no Deferred to wait on.
        self._decide = limiter.decide if isinstance(limiter, LocalLimiter) else None
        self._metrics = metrics
        self._deny_on_error = on_error == "deny"
        self._inject = inject_usage
        self._tickets = itertools.count()
        self._prefix = f"{os.getpid()}-{id(self):x}-"

    async def open(self, request: Request, key: NamedKey) -> Account:
        """
        Admit a request on C{key}, or refuse it.

        @raise ProxyError: 403 for a model C{key} may not use, 429 over a
            limit, 503 when the limiter is down and C{on_error} is deny.
        """
        injected = inspect_request(request, key, self._inject)
        ticket = self._prefix + str(next(self._tickets))
        try:
            if self._decide is not None:
                decision = self._decide(key)
            else:
                decision = await self.limiter.admit(key, ticket)
        except LimitsUnavailable as e:
            self._metrics.limits_error()
            _log.warn("limits not checked: {why}", why=e)
            if self._deny_on_error:
                raise LIMITS_UNAVAILABLE() from None
            return Account(self, key, ticket, None, injected)
        if decision.denied is not None:
            self._metrics.rate_limited(key.name, decision.denied)
            raise rate_limited(key, decision)
        return Account(self, key, ticket, decision, injected)

    def _settle(self, account: Account) -> None:
        usage = account.meter.usage if account.meter is not None else None
        if usage is not None:
            self._metrics.tokens(account.key.name, usage.prompt, usage.completion)
        self.limiter.settle(account.key, account.ticket, usage)


class Account:
    """One admitted request on a named key, until L{close}."""

    def __init__(
        self,
        accounting: Accounting,
        key: NamedKey,
        ticket: str,
        decision: Decision | None,
        injected: bool,
    ) -> None:
        self._accounting = accounting
        self.key = key
        self.ticket = ticket
        self.decision = decision
        self.injected = injected
        self.meter: Meter | None = None
        self._closed = False

    def decorate(self, request: Request) -> None:
        """Set this key's C{x-ratelimit-*} headers on the response."""
        if self.decision is not None:
            set_header = request.responseHeaders.setRawHeaders
            for name, value in rate_headers(self.key, self.decision):
                set_header(name, [value])

    def metered(
        self, sink: Callable[[bytes], None], *, sse: bool
    ) -> Callable[[bytes], None]:
        """A sink that counts the reply's tokens on the way to C{sink}."""
        self.meter = Meter(sink, sse=sse, strip=self.injected)
        return self.meter.feed

    @property
    def rewrites(self) -> bool:
        """Whether the body the client gets may differ from the upstream's."""
        return self.injected

    def end_of_body(self) -> None:
        """The reply body ended (normally or not)."""
        if self.meter is not None:
            self.meter.end()

    def close(self) -> None:
        """The request ended: free its slot and charge its tokens (once)."""
        if not self._closed:
            self._closed = True
            self._accounting._settle(self)


_ADMIN_ONLY = ErrorTemplate(
    401,
    "Send 'Authorization: Bearer <ADMIN_KEY>' to read usage.",
    "invalid_api_key",
)
_NO_ADMIN_KEY = ErrorTemplate(
    404,
    "Usage is not served: this proxy has no ADMIN_KEY.",
    "not_found",
)


class UsagePage:
    """
    C{GET /usage}: per-key counts for today and this month (UTC) as JSON,
    for a request bearing the admin key.
    """

    def __init__(
        self,
        admin_key: str | None,
        limiter: Limiter,
        names: Callable[[], Sequence[str]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._expected = (
            None if admin_key is None else _digest(admin_key.encode("utf-8"))
        )
        self._limiter = limiter
        self._names = names
        self._clock = clock

    async def render(self, request: Request) -> None:
        """Answer C{request} and finish it."""
        if self._expected is None:
            write_error(request, _NO_ADMIN_KEY())
            return
        token = bearer_token(request.getHeader(b"authorization")) or ""
        if not hmac.compare_digest(_digest(token.encode("utf-8")), self._expected):
            write_error(request, _ADMIN_ONLY())
            return
        try:
            report = await self._limiter.report(self._clock())
        except LimitsUnavailable:
            write_error(request, LIMITS_UNAVAILABLE())
            return
        names = list(self._names())
        names += sorted(set(report.this_month) - set(names))
        body = json.dumps(report.as_json(names)).encode("utf-8")
        request.setHeader(b"content-type", JSON_CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()


def _digest(value: bytes) -> bytes:
    # Fixed-length digests keep even the key's length out of the timing.
    return hashlib.sha256(value).digest()
