"""
The HTTP server side: a C{Site} whose connections give a request's head a
deadline and a size limit, and whose requests are screened (key, C{Host},
C{Authorization}, body size) as soon as their headers are in, before any
of their body is read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from openai_proxy.http import errors
from openai_proxy.http.errors import ProxyError
from openai_proxy.http.upgrade import authorization_of
from openai_proxy.telemetry.access import log_request
from openai_proxy.telemetry.logs import new_request_id

#: C{authorize(method, path, authorization)}: what a request may do (the
#: key check's own grant, carried here unread; L{None} when its path needs
#: no key), or raise the L{ProxyError} refusing it.
Authorize = Callable[[bytes, bytes, "bytes | None"], object]

#: C{refused(method, path, status)}: told of each request answered by the
#: server itself, before any resource saw it (for the metrics).
Refused = Callable[[bytes, bytes, int], None]

#: Of a refused request's body, at most this much is read (and thrown away)
#: before the connection is closed: enough for a client that sends its whole
#: body before reading to see the answer, too little to cost anything.
_DRAIN_LIMIT = 1_048_576

_log = Logger()

_REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    507: b"Insufficient Storage",
}


def _insufficient_storage() -> ProxyError:
    """The 507 for a request body the proxy had no room to store."""
    return ProxyError(
        507,
        "The proxy has no room to store the request body right now; try again later.",
        "insufficient_storage",
        "api_error",
    )


def _raw_error(transport: Any, error: ProxyError, *, cors: bool) -> tuple[str, int]:
    """
    Write C{error} straight to the connection, which is closed after it: the
    request never reaches a resource.  Returns the response's request id and
    the size of its body, for the access log.
    """
    body = error.body()
    request_id = new_request_id()
    reason = _REASONS.get(error.status, b"Error")
    head = [
        b"HTTP/1.1 %d %s" % (error.status, reason),
        b"Content-Type: " + errors.JSON_CONTENT_TYPE,
        b"Content-Length: %d" % len(body),
        b"X-Proxy-Request-Id: " + request_id.encode("ascii"),
        b"Connection: close",
    ]
    if cors:
        head.append(b"Access-Control-Allow-Origin: *")
    transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
    return request_id, len(body)


class ProxyRequest(Request):
    """
    A request screened when its headers are complete (L{ProxySite.screen}):
    a bad one is answered at once.  When a body was coming, the answer is
    written straight away, without a C{100 Continue}, the body is not
    stored, and the connection is closed; otherwise the resource answers it
    with L{early_error}.  A chunked body that passes C{max_body} is refused
    with 413 the same way, and a body that cannot be stored (the temporary
    directory is full or unwritable) with 507.

    @ivar grant: what the early key check granted, so that the forwarder
        need not check again.
    @ivar early_error: the error to answer a body-less request with.
    """

    channel: Any
    grant: object = None
    early_error: ProxyError | None = None
    _refused = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        site: ProxySite = self.channel.site
        error = site.screen(self)
        if error is None and length is not None and length > site.max_body:
            error = errors.body_too_large(site.max_body)
        if error is not None and length == 0:
            # No "100 Continue" for it; the resource answers.
            self.requestHeaders.removeHeader(b"expect")
            self.early_error = error
        elif error is not None:
            self._refuse_unread(error)
            return
        try:
            # A body that may be large is spooled to a new temporary file.
            super().gotLength(length)
        except OSError as e:
            site.spool_failed(e)
            self._refuse_unread(_insufficient_storage())

    def _refuse_unread(self, error: ProxyError) -> None:
        # Before any of the body was read.
        expecting = self.requestHeaders.getRawHeaders(b"expect")
        # No "100 Continue": the client need not send the body at all.
        self.requestHeaders.removeHeader(b"expect")
        self._refuse(error)
        if expecting:
            # It is waiting for our word before sending: nothing to drain.
            self.channel.loseConnection()

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._refused:
            if self._received > _DRAIN_LIMIT:
                self.channel.loseConnection()
            return
        if self._received > self.channel.site.max_body:
            self._refuse(errors.body_too_large(self.channel.site.max_body))
            return
        try:
            super().handleContentChunk(data)
        except OSError as e:
            self._no_room(e)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        content = self.content
        if (
            not self._refused
            and content is not None
            and not isinstance(content, BytesIO)
        ):
            # A spooled body's last writes may still sit in the file's
            # buffer: their failure must be seen here, not as the resource
            # reads a short body.
            try:
                content.flush()
            except OSError as e:
                # The channel has forgotten the request line by now.
                self._no_room(e, line=(command, path))
            else:
                self.channel.site.spooled()
        if self._refused:
            self.channel.loseConnection()
            return
        super().requestReceived(command, path, version)

    def _no_room(
        self, error: OSError, *, line: tuple[bytes, bytes] | None = None
    ) -> None:
        self.channel.site.spool_failed(error)
        self._refuse(_insufficient_storage(), line=line)

    def _refuse(
        self, error: ProxyError, *, line: tuple[bytes, bytes] | None = None
    ) -> None:
        self._refused = True
        self._received = 0
        if self.content is not None:
            # Closing flushes, which fails again on a full disk; the file is
            # closed all the same.
            with contextlib.suppress(OSError):
                self.content.close()
            self.content = None
        site: ProxySite = self.channel.site
        self.channel.persistent = False
        request_id, sent = _raw_error(
            self.channel.transport, error, cors=site.allow_any_origin
        )
        site.refused(
            self, error.status, request_id=request_id, bytes_out=sent, line=line
        )


class ProxyChannel(HTTPChannel):
    """
    A connection whose requests' line and headers must arrive within the
    site's C{header_timeout} of their first byte (of the connection's start,
    for the first), however they trickle: else 408 and the connection is
    closed.  An idle keep-alive connection is left to twisted.web's own
    idle timeout.  A request line over C{MAX_LENGTH} gets 414, headers over
    C{totalHeadersSize} get 431, before the close.

    It also asks its socket for its own address once: every C{Request} asks
    for it (C{Request.__init__} calls C{getHost}), and on a TCP connection
    each ask is a C{getsockname} system call.
    """

    # Slots, not instance attributes: each key added to a channel's
    # __dict__ after it is made can make the dict grow, ~1.3 KB per open
    # connection for the first one.
    __slots__ = ("_cached_host", "_deadline", "_awaiting_head", "_head_started")
    _cached_host: IAddress
    site: ProxySite
    _deadline: IDelayedCall | None
    _awaiting_head: bool
    _head_started: bool

    def __init__(self) -> None:
        super().__init__()
        self._deadline = None
        self._awaiting_head = True
        self._head_started = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline()

    def getHost(self) -> IAddress:
        try:
            host: IAddress = self._cached_host
        except AttributeError:
            assert self.transport is not None
            host = self._cached_host = self.transport.getHost()
        return host

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_head and not self._head_started:
            self._head_started = True
            if self._deadline is None:  # else the connection's own is running
                self._start_deadline()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._head_too_large()
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._head_too_large()

    def allHeadersReceived(self) -> None:
        self._awaiting_head = False
        self._cancel_deadline()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        # The next request's deadline starts with its first byte.
        self._awaiting_head = True
        self._head_started = False
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def hand_over(self, protocol: IProtocol, head: bytes) -> bytes:
        """
        Give this connection to C{protocol} (a WebSocket session) after
        writing C{head} (the C{101} response): from now on every byte it
        receives goes there, and so does the loss of the connection.  The
        request in progress is never finished.  Returns the bytes the client
        sent early (buffered while its request was handled), for the caller
        to give C{protocol} once it is ready for them.

        Leans on twisted.web's private C{_dataBuffer} (the early bytes) and
        on the channel being the transport's producer; pinned by
        tests/test_realtime_relay.py (C{test_hand_over_leans_on_http_channel}).
        """
        transport: Any = self.transport
        assert transport is not None
        early = b"".join(self._dataBuffer)
        self._dataBuffer = []
        self._cancel_deadline()
        self.setTimeout(None)
        # The channel paces its own reads as a producer: the session does.
        transport.unregisterProducer()
        self.dataReceived = protocol.dataReceived  # type: ignore[method-assign]
        self.connectionLost = protocol.connectionLost  # type: ignore[method-assign,assignment]
        transport.write(head)
        protocol.makeConnection(transport)
        transport.resumeProducing()
        return early

    def _start_deadline(self) -> None:
        self._cancel_deadline()
        self._deadline = self.callLater(self.site.header_timeout, self._too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self._head_started:
            self._answer_and_close(errors.HEADER_TIMEOUT())
        elif self.transport is not None:
            self.transport.loseConnection()

    def _head_too_large(self) -> None:
        # Still on the request line (twisted.web's private flag): 414.
        on_first_line = bool(getattr(self, "_HTTPChannel__first_line", 0))
        self._answer_and_close(
            (errors.URI_TOO_LONG if on_first_line else errors.HEADERS_TOO_LARGE)()
        )

    def _answer_and_close(self, error: ProxyError) -> None:
        self._cancel_deadline()
        self._awaiting_head = False
        self.persistent = False
        request_id, sent = _raw_error(
            self.transport, error, cors=self.site.allow_any_origin
        )
        # Ignore whatever else it sends; close once the answer is out.
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        if self.transport is not None:
            self.transport.loseConnection()
        self.site.refused_head(
            self, error.status, request_id=request_id, bytes_out=sent
        )


class ProxySite(Site):
    """
    The proxy's C{Site}: no form parsing (a relay never needs it), no
    combined-format access log (the resource logs each request with keyword
    fields and no secrets), the body-size limit and header deadline its
    requests and connections enforce, and the early screening of requests.

    @param authorize: called as soon as a request's headers are in (see
        L{Authorize}); L{None} leaves key checks to the resource.
    @param on_refused: told of every request the site answers itself (see
        L{Refused}), after it is logged.
    """

    requestFactory = ProxyRequest
    # HTTP/1.1 only (as before: no TLS ALPN offers h2), with the deadline.
    protocol = ProxyChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        max_body: int,
        *,
        allow_any_origin: bool = True,
        header_timeout: float = 30.0,
        authorize: Authorize | None = None,
        on_refused: Refused | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.max_body = max_body
        self.allow_any_origin = allow_any_origin
        self.header_timeout = header_timeout
        self._authorize = authorize
        self._on_refused = on_refused
        self._spool_failing = False

    def log(self, request: Any) -> None:
        pass

    def screen(self, request: ProxyRequest) -> ProxyError | None:
        """
        Check a request whose headers are complete (its body not yet read):
        exactly one C{Host} (for HTTP/1.1; at most one before), at most one
        C{Authorization}, and a key its path accepts.  Returns the error to
        refuse it with, or L{None} (remembering the grant on the request).
        """
        channel = request.channel
        headers = request.requestHeaders
        hosts = headers.getRawHeaders(b"host") or []
        needed = 1 if getattr(channel, "_version", b"") == b"HTTP/1.1" else 0
        if not needed <= len(hosts) <= 1:
            return errors.BAD_HOST()
        authorization = headers.getRawHeaders(b"authorization") or []
        if len(authorization) > 1:
            return errors.DUPLICATE_AUTHORIZATION()
        if self._authorize is None:
            return None
        target: bytes = getattr(channel, "_path", b"")
        try:
            request.grant = self._authorize(
                getattr(channel, "_command", b""),
                target.split(b"?", 1)[0],
                authorization[0] if authorization else authorization_of(headers),
            )
        except ProxyError as e:
            return e
        return None

    def spool_failed(self, error: OSError) -> None:
        """
        Say that a request body could not be stored: logged once, not again
        until a body has been stored since (L{spooled}), however many
        uploads fail meanwhile.
        """
        if not self._spool_failing:
            self._spool_failing = True
            _log.error(
                "cannot store request bodies in the temporary directory "
                "({error}); answering 507 until it has room",
                error=str(error),
            )

    def spooled(self) -> None:
        """Say that a request body was stored in a temporary file."""
        if self._spool_failing:
            self._spool_failing = False
            _log.info("request bodies can be stored again")

    def refused(
        self,
        request: ProxyRequest,
        status: int = 413,
        *,
        request_id: str | None = None,
        bytes_out: int = 0,
        line: tuple[bytes, bytes] | None = None,
    ) -> None:
        """
        Log a request refused before it reached the resource (before or
        while its body was read), with the id and body size of the answer it
        got.  Its method and target are the channel's, or C{line} if given.
        """
        # Only the channel knows the request line yet (requestReceived, which
        # sets request.method and .uri, comes after the body).
        channel = request.channel
        method: bytes = getattr(channel, "_command", b"-")
        target: bytes = getattr(channel, "_path", b"-")
        if line is not None:
            method, target = line
        path = target.split(b"?", 1)[0]
        self._log_refused(method, path, path, status, bytes_out, request_id)

    def refused_head(
        self,
        channel: ProxyChannel,
        status: int,
        *,
        request_id: str | None = None,
        bytes_out: int = 0,
    ) -> None:
        """
        Log a connection refused before its request's headers were complete,
        with the id and body size of the answer it got.
        """
        self._log_refused(b"-", b"-", b"", status, bytes_out, request_id)

    def _log_refused(
        self,
        method: bytes,
        logged_path: bytes,
        counted_path: bytes,
        status: int,
        bytes_out: int,
        request_id: str | None,
    ) -> None:
        # One access line and one count for each refused request.
        log_request(
            method=method,
            path=logged_path,
            status=status,
            bytes_out=bytes_out,
            duration=0.0,
            upstream=None,
            request_id=request_id,
        )
        if self._on_refused is not None:
            self._on_refused(method, counted_path, status)
