"""
One place that turns a backend's answers into "stop this text or not":
long texts in pieces, a timeout per call, failures per MODERATION_ON_ERROR.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from openai_proxy.moderation.backends import Backend
from openai_proxy.moderation.policy import Verdict, error_verdict, stops

#: The longest text one backend call is given (TMS's limit).
MAX_PIECE = 10_000

_SEVERITY = {Verdict.PASS: 0, Verdict.REVIEW: 1, Verdict.BLOCK: 2}

log = Logger()
_T = TypeVar("_T")

#: C{on_call(backend, result, seconds)} after each backend call; C{result}
#: is C{"pass"}, C{"review"}, C{"block"} or C{"error"} (failed or timed out).
#: Matches C{openai_proxy.telemetry.metrics.Metrics.moderation_call}.
CallObserver = Callable[[str, str, float], None]


def pieces(text: str, size: int = MAX_PIECE) -> list[str]:
    """Cut C{text} into consecutive pieces of at most C{size} characters."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class Checker:
    """
    Judge texts with a backend.  The Deferreds returned never errback: a
    failed, timed-out or cancelled call counts as
    L{error_verdict}C{(on_error)} (failures and timeouts are logged); a
    result arriving after that is ignored.
    """

    def __init__(
        self,
        backend: Backend,
        reactor: IReactorTime,
        *,
        timeout: float,
        on_error: str,
        on_call: CallObserver | None = None,
    ) -> None:
        self.backend = backend
        self._on_call = on_call
        self._reactor = reactor
        self._timeout = timeout
        self._on_error = error_verdict(on_error)
        self._inflight: set[Deferred[Verdict]] = set()

    def verdict(self, text: str, upstream_key: str) -> Deferred[Verdict]:
        """
        The worst verdict over the pieces of C{text} (all pieces are judged
        at once).
        """
        if not text:
            return succeed(Verdict.PASS)
        calls = [self._call(piece, upstream_key) for piece in pieces(text)]
        d: Deferred[list[Verdict]] = gatherResults(calls)
        return d.addCallback(lambda verdicts: max(verdicts, key=_SEVERITY.__getitem__))

    def stops(self, text: str, level: str, upstream_key: str) -> Deferred[bool]:
        """Fire with whether C{text} must not reach the client at C{level}."""
        return self.verdict(text, upstream_key).addCallback(stops, level)

    def _call(self, piece: str, upstream_key: str) -> Deferred[Verdict]:
        d: Deferred[Verdict] = maybeDeferred(self.backend.check, piece, upstream_key)
        d.addTimeout(self._timeout, self._reactor)
        self._inflight.add(d)
        d.addBoth(self._settled, d)
        if self._on_call is not None:
            d.addBoth(self._observe, self._reactor.seconds())
        return d.addErrback(self._failed)

    def cancel_all(self) -> None:
        """
        Cancel every call still waiting (at shutdown): each counts as
        C{on_error}, without waiting for its timeout.
        """
        inflight, self._inflight = self._inflight, set()
        for d in inflight:
            d.cancel()

    def _settled(self, result: _T, d: Deferred[Verdict]) -> _T:
        self._inflight.discard(d)
        return result

    def _observe(self, result: Verdict | Failure, started: float) -> Verdict | Failure:
        assert self._on_call is not None
        if isinstance(result, Failure) and isinstance(result.value, CancelledError):
            return result  # not a call that failed: nobody wants its answer
        outcome = "error" if isinstance(result, Failure) else result.value.lower()
        try:
            self._on_call(self.backend.name, outcome, self._reactor.seconds() - started)
        except Exception:
            # Counting must never change a verdict.
            log.failure("moderation call observer failed")
        return result

    def _failed(self, failure: Failure) -> Verdict:
        if isinstance(failure.value, CancelledError):
            return self._on_error
        # Never log the text or the key: only what went wrong.
        log.warn(
            "moderation call to {backend} failed ({error}); counted as {verdict}",
            backend=self.backend.name,
            error=f"{type(failure.value).__name__}: {failure.getErrorMessage()}",
            verdict=self._on_error.value,
        )
        return self._on_error
