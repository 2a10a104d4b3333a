"""
What a request on a named key goes through (once its body was checked, see
L{openai_proxy.keys.allowlist}): its limits checked and counted before it goes
upstream, its tokens counted from the reply and charged when it ends.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from openai_proxy.http.errors import ErrorTemplate
from openai_proxy.keys.limits import (
    Decision,
    Limiter,
    LimitsUnavailable,
    LocalLimiter,
    Usage,
    rate_headers,
    rate_limited,
)
from openai_proxy.keys.named import NamedKey
from openai_proxy.keys.quotas import QUOTA_KINDS, quota_exceeded
from openai_proxy.keys.usage import Meter
from openai_proxy.telemetry.metrics import Metrics

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
        #: Whether a stream's usage is asked for when the client did not.
        self.inject_usage = inject_usage
        self._tickets = itertools.count()
        self._prefix = f"{os.getpid()}-{id(self):x}-"
        self._unsettled = 0
        self._settled_waiters: list[Deferred[None]] = []

    @property
    def unsettled(self) -> int:
        """How many opened accounts are not closed yet."""
        return self._unsettled

    def settled(self) -> Deferred[None]:
        """
        Fires once every account opened so far is closed (at once when
        none is open): at shutdown, the limiter is stopped only after the
        requests cut off have settled.
        """
        d: Deferred[None] = Deferred()
        if self._unsettled:
            self._settled_waiters.append(d)
        else:
            d.callback(None)
        return d

    async def open(
        self, key: NamedKey, *, injected: bool = False, request_bytes: int = 0
    ) -> Account:
        """
        Admit a request on C{key} (whose body was checked already), or
        refuse it.  C{injected}: the proxy asked for the stream's usage.
        C{request_bytes}: the client's body as it came, the prompt of an
        estimate when the reply reports no usage.

        @raise ProxyError: 429 over a limit (C{insufficient_quota} over a
            quota), 503 when the limiter is down and
            C{on_error} is deny.
        """
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
            return self._opened(key, ticket, None, injected, request_bytes)
        if decision.denied is not None:
            self._metrics.rate_limited(key.name, decision.denied)
            if decision.denied in QUOTA_KINDS:
                raise quota_exceeded(key, decision, self.limiter.calendar)
            raise rate_limited(key, decision)
        return self._opened(key, ticket, decision, injected, request_bytes)

    def _opened(
        self,
        key: NamedKey,
        ticket: str,
        decision: Decision | None,
        injected: bool,
        request_bytes: int,
    ) -> Account:
        self._unsettled += 1
        return Account(self, key, ticket, decision, injected, request_bytes)

    def _charge(self, account: Account, usage: Usage) -> None:
        self._metrics.tokens(account.key.name, usage.prompt, usage.completion)
        self.limiter.charge(account.key, usage)

    def _settle(self, account: Account) -> None:
        usage = account.meter.usage if account.meter is not None else None
        if usage is not None:
            self._metrics.tokens(account.key.name, usage.prompt, usage.completion)
        self.limiter.settle(account.key, account.ticket, usage)
        self._unsettled -= 1
        if not self._unsettled and self._settled_waiters:
            waiting, self._settled_waiters = self._settled_waiters, []
            for d in waiting:
                if not d.called:  # not timed out meanwhile
                    d.callback(None)


class Account:
    """One admitted request on a named key, until L{close}."""

    def __init__(
        self,
        accounting: Accounting,
        key: NamedKey,
        ticket: str,
        decision: Decision | None,
        injected: bool,
        request_bytes: int = 0,
    ) -> None:
        self._accounting = accounting
        self.key = key
        self.ticket = ticket
        self.decision = decision
        self.injected = injected
        self.request_bytes = request_bytes
        self.meter: Meter | None = None
        #: Tokens charged with L{charge} so far.
        self.charged = 0
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
        """
        A sink that counts the reply's tokens on the way to C{sink} (or,
        should it end without usage, estimates them).
        """
        self.meter = Meter(
            sink, sse=sse, strip=self.injected, request_bytes=self.request_bytes
        )
        return self.meter.feed

    @property
    def rewrites(self) -> bool:
        """Whether the body the client gets may differ from the upstream's."""
        return self.injected

    def end_of_body(self) -> None:
        """The reply body ended (normally or not)."""
        if self.meter is not None:
            self.meter.end()

    def charge(self, usage: Usage) -> None:
        """
        Charge tokens as they are reported while the request goes on (a
        WebSocket session's turns): counted against C{tpm} and in the usage
        report at once, not when it ends.
        """
        self.charged += usage.prompt + usage.completion
        self._accounting._charge(self, usage)

    def over_tokens(self) -> bool:
        """
        Whether the key has spent its C{tpm}: what the window held when this
        request was admitted, plus what this request was charged since.
        """
        tpm = self.key.tpm
        if tpm is None:
            return False
        before = self.decision.tokens_used if self.decision is not None else 0
        return before + self.charged >= tpm

    def close(self) -> None:
        """The request ended: free its slot and charge its tokens (once)."""
        if not self._closed:
            self._closed = True
            self._accounting._settle(self)
