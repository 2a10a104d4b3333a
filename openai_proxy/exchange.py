"""
One client request in flight: how its response may end (exactly once), and
what must happen upstream when its client hangs up.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.server import Request

from openai_proxy.http import errors
from openai_proxy.http.errors import ProxyError, write_error
from openai_proxy.keys.accounting import Account
from openai_proxy.moderation import StreamModerator
from openai_proxy.telemetry.metrics import RequestHandle
from openai_proxy.upstream.relay import BodyRelay
from openai_proxy.upstream.tunnel import EgressProxyError

_log = Logger()


class Exchange:
    """
    One client request in flight, and what must happen if its client hangs
    up: cancel the upstream request, or close the upstream connection.

    Exactly one of L{finish}, L{fail} and L{abort} ends the response; later
    calls, and any call after the client has gone, do nothing.
    """

    def __init__(
        self, request: Request, metrics: RequestHandle, started: float
    ) -> None:
        self.request = request
        self.metrics = metrics
        self.started = started
        self.bytes_in = 0
        self.logged_body: str | None = None
        self.gone = False
        self.ended = False
        self.pending: Deferred[Any] | None = None
        self.relay: BodyRelay | None = None
        self.moderator: StreamModerator | None = None
        self.upstream_host: str | None = None
        #: The named key's admission, settled once the forwarder is done.
        self.account: Account | None = None
        #: Set when the proxy cut the client off because the upstream broke
        #: off mid-body: the connection's loss is then not the client's doing.
        self.upstream_fault = False
        request.notifyFinish().addErrback(self._client_left)

    def _client_left(self, reason: Failure) -> None:
        self.gone = True
        if self.pending is not None:
            self.pending.cancel()
        if self.moderator is not None:
            self.moderator.abandon()
        if self.relay is not None:
            self.relay.forget_consumer()
            self.relay.stop()

    def write(self, data: bytes) -> None:
        """Write to the client, unless it has gone."""
        if not self.gone:
            self.request.write(data)

    def _closing(self) -> bool:
        # True once: the response may be ended by exactly one of these.
        if self.relay is not None:
            self.relay.release()
        if self.gone or self.ended:
            return False
        self.ended = True
        return True

    def finish(self) -> None:
        """End the response normally."""
        if self._closing():
            self.request.finish()

    def fail(self, error: ProxyError) -> None:
        """Answer with C{error} (only useful before anything was written)."""
        if self._closing():
            write_error(self.request, error)

    def abort(self, *, upstream_fault: bool = False) -> None:
        """
        Close the connection: the only way to say a body is incomplete.
        C{upstream_fault} says the upstream, not the client, broke it.
        """
        if self._closing():
            self.upstream_fault = upstream_fault
            self.request.loseConnection()

    def client_stalled(self) -> None:
        """
        The client read nothing for the send timeout while the proxy held
        the upstream paused for it: cut it off (counted as its hang-up).
        """
        if self.gone:
            return
        _log.info("client stopped reading for the send timeout; closing its connection")
        transport: Any = self.request.channel.transport
        # loseConnection would wait for a buffer the client never reads.
        transport.abortConnection()


def upstream_error(failure: Failure) -> ProxyError:
    """
    The error a client gets when the upstream request failed before headers:
    C{upstream_timeout} when none came in time, C{upstream_error} when the
    upstream was reached but broke off or sent a head that cannot be read
    (partial, malformed, oversized), C{upstream_unreachable} when it could
    not be reached at all; and C{egress_proxy_*} when the egress proxy on
    the way is why.
    """
    value = failure.value
    if isinstance(value, EgressProxyError):
        return errors.egress_proxy_error(value.kind, value.status)
    if isinstance(failure.value, ResponseFailed):
        # Connected and sent (ResponseNeverReceived) or some of the head
        # came back: either way the upstream was reached.
        reasons = failure.value.reasons
        if any(r.check(CancelledError) for r in reasons):
            return errors.UPSTREAM_TIMEOUT()
        return errors.UPSTREAM_FAILED()
    if failure.check(CancelledError, ConnectingCancelledError, TimeoutError):
        return errors.UPSTREAM_TIMEOUT()
    return errors.UPSTREAM_UNREACHABLE()


#: The C{upstream_errors_total} kind each upstream error counts as.
ERROR_KINDS = {
    errors.UPSTREAM_TIMEOUT.code: "timeout",
    errors.UPSTREAM_UNREACHABLE.code: "unreachable",
    errors.UPSTREAM_FAILED.code: "reset",
    "egress_proxy_unreachable": "egress_proxy",
    "egress_proxy_auth_failed": "egress_proxy",
    "egress_proxy_refused": "egress_proxy",
}
