"""
The WebSocket relay: a request with C{Upgrade: websocket}, on any path,
checked like an HTTP request (key, routes, a named key's models and limits),
then its handshake relayed to the same path and query upstream.  The
upstream's refusal reaches the client as the HTTP response it was; its
acceptance becomes the client's C{101}, and a L{Session} relays from then
on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.server import NOT_DONE_YET, Request
from websockets.datastructures import Headers as WSHeaders
from websockets.http11 import Request as WSRequest
from websockets.protocol import Protocol as WebSocket
from websockets.protocol import Side, State
from websockets.server import ServerProtocol

from openai_proxy.http.errors import ProxyError, egress_proxy_error, write_error
from openai_proxy.http.headers import REQUEST_DROPPED, RESPONSE_DROPPED, filtered
from openai_proxy.http.upgrade import KEY_PROTOCOL, authorization_of, subprotocols
from openai_proxy.keys.accounting import Account, Accounting
from openai_proxy.keys.allowlist import check_path, check_query
from openai_proxy.keys.auth import Grant, KeyPolicy
from openai_proxy.realtime.dial import Accepted, DialFailed, Dialled, Refused, dial
from openai_proxy.realtime.limits import KeyLimits
from openai_proxy.realtime.session import FilterFactory, Session, SessionObserver
from openai_proxy.realtime.wire import Wire
from openai_proxy.telemetry.access import log_request, log_session
from openai_proxy.telemetry.logs import new_request_id
from openai_proxy.telemetry.metrics import Metrics, route_family
from openai_proxy.upstream.client import Upstreams
from openai_proxy.upstream.egress import EgressProxy, EgressSettings

_log = Logger()

#: Never sent upstream on a handshake, beyond what no request sends: the
#: client's own WebSocket handshake headers (the proxy makes its own), and
#: its Origin (the upstream's client is the proxy).
_HANDSHAKE_DROPPED = REQUEST_DROPPED | {
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
    b"sec-websocket-protocol",
    b"sec-websocket-accept",
    b"origin",
}
_ACCEPT_DROPPED = RESPONSE_DROPPED | {
    b"sec-websocket-accept",
    b"sec-websocket-protocol",
    b"sec-websocket-extensions",
}
#: The query parameters a client asks for moderation with: the proxy's, never
#: sent upstream.
MODERATION_PARAMS = ("moderation", "moderation_level")
#: Seconds between updates of the message and byte counters from open sessions.
_COUNT_EVERY = 5.0


class SessionAsk(NamedTuple):
    """
    What moderation needs to know of a session at its handshake.

    @ivar path: the path (no query).
    @ivar moderation: the query's C{moderation=} value, if any.
    @ivar level: the query's C{moderation_level=} value, if any.
    @ivar upstream_key: the key sent upstream (for a backend that needs one).
    """

    path: bytes
    moderation: str | None
    level: str | None
    upstream_key: str


#: The moderation hook: for a session's handshake, the filter factory that
#: moderates it, or L{None} when it is not moderated.  It may raise a
#: L{ProxyError} to refuse the handshake (an unknown level, say).
ModerationHook = Callable[[SessionAsk], "FilterFactory | None"]


def _bad_handshake(why: str) -> ProxyError:
    return ProxyError(
        400, f"Not a valid WebSocket handshake: {why}.", "invalid_websocket_handshake"
    )


def _shutting_down() -> ProxyError:
    return ProxyError(
        503,
        "The proxy is shutting down; reconnect to open a new session.",
        "shutting_down",
        "api_error",
    )


def _dial_error(failure: DialFailed) -> ProxyError:
    if failure.egress is not None:
        return egress_proxy_error(failure.egress.kind, failure.egress.status)
    if failure.kind == "timeout":
        return ProxyError(
            504,
            "The upstream API did not answer in time.",
            "upstream_timeout",
            "api_error",
        )
    if failure.kind == "reset":
        return ProxyError(
            502,
            "The upstream API broke off the handshake.",
            "upstream_error",
            "api_error",
        )
    return ProxyError(
        502,
        "The upstream API could not be reached.",
        "upstream_unreachable",
        "api_error",
    )


def split_query(uri: bytes) -> tuple[bytes, str | None, str | None]:
    """
    C{uri} less the moderation parameters (see L{MODERATION_PARAMS}), with
    their values.  A query without them is returned byte for byte.
    """
    path, mark, query = uri.partition(b"?")
    if not mark or not any(p.encode() in query for p in MODERATION_PARAMS):
        return uri, None, None
    kept: list[tuple[str, str]] = []
    found: dict[str, str] = {}
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name in MODERATION_PARAMS:
            found[name] = value
        else:
            kept.append((name, value))
    rest = urlencode(kept).encode("latin-1")
    return (
        (path + b"?" + rest if rest else path),
        found.get("moderation"),
        found.get("moderation_level"),
    )


class _Counts(SessionObserver):
    def __init__(self, relay: RealtimeRelay) -> None:
        self._relay = relay

    def ended(self, session: Session) -> None:
        self._relay._ended(session)


class _Open(NamedTuple):
    """What the relay keeps of an open session, for its counters and log line."""

    request: Request
    request_id: str
    key: str | None
    upstream: str
    account: Account | None
    counted: list[int]


class RealtimeRelay:
    """
    Opens sessions for WebSocket upgrade requests (L{render}), and keeps the
    open ones (for the counters, and for a drain to close).

    @param track: told of each session as it opens (the drain).
    @param draining: whether new sessions are refused (503).
    @param moderation: the L{ModerationHook}, if sessions may be moderated.
    @param egress: the egress proxy settings the upstream hop goes through.
    """

    def __init__(
        self,
        reactor: Any,
        keys: KeyPolicy,
        upstreams: Upstreams,
        metrics: Metrics,
        *,
        accounting: Accounting | None = None,
        timeout: float = 60.0,
        send_timeout: float = 60.0,
        ping_interval: float | None = 30.0,
        max_message: int = 16_777_216,
        track: Callable[[Session], None] | None = None,
        draining: Callable[[], bool] = lambda: False,
        moderation: ModerationHook | None = None,
        policy: IPolicyForHTTPS | None = None,
        egress: EgressSettings | None = None,
    ) -> None:
        self._reactor = reactor
        self._keys = keys
        self._upstreams = upstreams
        self._metrics = metrics
        self._accounting = accounting
        self._timeout = timeout
        self._send_timeout = send_timeout
        self._ping_interval = ping_interval
        self._max_message = max_message
        self._track = track
        self._draining = draining
        self._moderation = moderation
        self._policy = policy
        self._egress = egress
        self._open: dict[Session, _Open] = {}
        self._counting = LoopingCall(self._count)
        self._counting.clock = reactor

    @property
    def sessions(self) -> list[Session]:
        """The sessions open now."""
        return list(self._open)

    def _proxy_for(self, url: str) -> EgressProxy | None:
        # The egress proxy the HTTP relay would use for this upstream.
        if self._egress is None:
            return None
        return self._egress.proxy_for_url(url)

    def render(self, request: Request) -> int:
        """Answer a WebSocket upgrade request (the resource hands it over)."""
        Deferred.fromCoroutine(self._handle(request)).addErrback(self._crashed, request)
        return NOT_DONE_YET

    async def _handle(self, request: Request) -> None:
        started = self._reactor.seconds()
        request_id = new_request_id()
        request.setHeader(b"x-proxy-request-id", request_id.encode("ascii"))
        handle = self._metrics.request_started(
            request.method, route_family(request.path)
        )
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        account: Account | None = None
        upstream_host = None

        def answered(status: int, size: int) -> None:
            handle.finished(status, 0, size, bool(gone))
            log_request(
                method=request.method,
                path=request.path,
                status=499 if gone else status,
                bytes_out=size,
                duration=self._reactor.seconds() - started,
                upstream=upstream_host,
                request_id=request_id,
            )

        try:
            handshake, offered = _client_handshake(request)
            early: ProxyError | None = getattr(request, "early_error", None)
            if early is not None:
                raise early
            grant: Grant | None = getattr(request, "grant", None)
            if grant is None:
                grant = self._keys.authorize(authorization_of(request.requestHeaders))
            if grant.named is not None:
                check_path(grant.named, request.method, request.path)
                check_query(grant.named, request.uri)
            if self._draining():
                raise _shutting_down()
            target, moderation, level = split_query(request.uri)
            chain: list[FilterFactory] = []
            if self._moderation is not None:
                moderated = self._moderation(
                    SessionAsk(request.path, moderation, level, grant.upstream_key)
                )
                if moderated is not None:
                    chain.append(moderated)
            if grant.named is not None and self._accounting is not None:
                account = await self._accounting.open(grant.named)
                opened = account
                # Nearest the upstream: it must see every response.done,
                # the usage of a response moderation cut off included.
                chain.append(lambda c, u: KeyLimits(c, u, opened))
            base = self._upstreams.base_for(grant.upstream_key)
            upstream_host = self._upstreams.host_of(base)
            try:
                url = Upstreams.url(base, target)
            except ValueError as e:
                raise _bad_handshake(str(e)) from None
            headers = [
                (name, value)
                for name, values in filtered(request.requestHeaders, _HANDSHAKE_DROPPED)
                for value in values
            ]
            headers.append(
                (b"authorization", b"Bearer " + grant.upstream_key.encode("ascii"))
            )
            offered_upstream = [p for p in offered if not p.startswith(KEY_PROTOCOL)]
            ws_url = url.decode("ascii").replace("http", "ws", 1)
            try:
                dialled = await dial(
                    self._reactor,
                    ws_url,
                    headers,
                    offered_upstream,
                    self._timeout,
                    self._max_message,
                    self._policy,
                    self._proxy_for(ws_url),
                )
            except DialFailed as e:
                self._metrics.upstream_error(e.kind)
                _log.info(
                    "upstream {host} failed: {error}", host=upstream_host, error=str(e)
                )
                raise _dial_error(e) from None
        except ProxyError as e:
            if account is not None:
                account.close()
            if not gone:
                write_error(request, e)
            answered(e.status, len(e.body()))
            return
        answer = dialled.answer
        if gone:
            dialled.abort()
            if account is not None:
                account.close()
            answered(499, 0)
            return
        if isinstance(answer, Refused):
            if account is not None:
                account.close()
            _write_refusal(request, answer)
            answered(answer.status, len(answer.body))
            return
        self._upgrade(
            request,
            handshake,
            answer,
            dialled,
            chain,
            account,
            grant,
            request_id,
            upstream_host,
        )
        answered(101, 0)

    def _upgrade(
        self,
        request: Request,
        handshake: WSRequest,
        answer: Accepted,
        dialled: Dialled,
        chain: list[FilterFactory],
        account: Account | None,
        grant: Grant,
        request_id: str,
        upstream_host: str | None,
    ) -> None:
        chosen = answer.subprotocol
        server = ServerProtocol(
            select_subprotocol=lambda _, offered: chosen,  # type: ignore[arg-type,return-value]
        )
        response = server.accept(handshake)
        for name, values in filtered(_as_headers(answer.headers), _ACCEPT_DROPPED):
            for value in values:
                response.headers[name.decode("latin-1")] = value.decode("latin-1")
        response.headers["X-Proxy-Request-Id"] = request_id
        server.send_response(response)
        head = b"".join(server.data_to_send())
        # The handshake's protocol still waits for a request line it was
        # never fed (the request came through twisted.web): frames are read
        # by a protocol opened as such.
        framing = WebSocket(Side.SERVER, state=State.OPEN, max_size=self._max_message)
        client = Wire(framing, self._reactor, ping_interval=self._ping_interval)
        upstream = Wire(
            answer.websocket, self._reactor, ping_interval=self._ping_interval
        )
        dialled.handshake.attach(upstream)
        channel: Any = request.channel
        early: bytes = channel.hand_over(client, head)
        session = Session(
            client,
            upstream,
            chain,
            self._reactor,
            send_timeout=self._send_timeout,
            observer=_Counts(self),
        )
        self._open[session] = _Open(
            request,
            request_id,
            grant.named.name if grant.named is not None else None,
            upstream_host or "-",
            account,
            [0, 0, 0, 0],
        )
        self._metrics.websocket_opened()
        if not self._counting.running:
            self._counting.start(_COUNT_EVERY, now=False)
        if self._track is not None:
            self._track(session)
        # What either side sent right behind its handshake.
        upstream.start(answer.pending)
        client.start()
        if early:
            client.dataReceived(early)

    def _count(self) -> None:
        for session, kept in self._open.items():
            self._flush(session, kept)

    def _flush(self, session: Session, kept: _Open) -> None:
        counted = kept.counted
        now = (
            session.client.messages,
            session.client.received,
            session.upstream.messages,
            session.upstream.received,
        )
        if now[0] != counted[0]:
            self._metrics.websocket_messages(
                True, now[0] - counted[0], now[1] - counted[1]
            )
        if now[2] != counted[2]:
            self._metrics.websocket_messages(
                False, now[2] - counted[2], now[3] - counted[3]
            )
        counted[:] = now

    def _ended(self, session: Session) -> None:
        kept = self._open.pop(session, None)
        if kept is None:
            return
        if not self._open and self._counting.running:
            self._counting.stop()
        self._flush(session, kept)
        if kept.account is not None:
            kept.account.close()
        self._metrics.websocket_closed(session.close_code)
        log_session(
            path=kept.request.path,
            key=kept.key,
            duration=self._reactor.seconds() - session.started,
            messages_in=session.client.messages,
            bytes_in=session.client.received,
            messages_out=session.upstream.messages,
            bytes_out=session.upstream.received,
            close_code=session.close_code,
            closed_by=session.closed_by,
            upstream=kept.upstream,
            request_id=kept.request_id,
        )

    def _crashed(self, failure: Failure, request: Request) -> None:
        _log.failure("WebSocket handshake failed unexpectedly", failure)
        if not request.finished and not request.startedWriting:
            write_error(
                request,
                ProxyError(
                    500,
                    "The proxy failed to handle this request.",
                    "proxy_error",
                    "api_error",
                ),
            )


def _as_headers(pairs: list[tuple[bytes, bytes]]) -> Headers:
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    return headers


def _client_handshake(request: Request) -> tuple[WSRequest, list[str]]:
    """
    The client's handshake, checked (RFC 6455 section 4.2.1), and the
    subprotocols it offers.

    @raise ProxyError: 400 for a request that is not a valid handshake.
    """
    if request.clientproto != b"HTTP/1.1" or request.method != b"GET":
        raise _bad_handshake("expected a GET over HTTP/1.1")
    headers = WSHeaders()
    for name, values in request.requestHeaders.getAllRawHeaders():
        for value in values:
            headers[name.decode("latin-1")] = value.decode("latin-1")
    handshake = WSRequest(request.uri.decode("latin-1"), headers)
    checker = ServerProtocol()
    if checker.accept(handshake).status_code != 101:
        raise _bad_handshake(str(checker.handshake_exc))
    return handshake, subprotocols(request.requestHeaders)


def _write_refusal(request: Request, refusal: Refused) -> None:
    request.setResponseCode(refusal.status)
    for name, values in filtered(_as_headers(refusal.headers), RESPONSE_DROPPED):
        request.responseHeaders.setRawHeaders(name, values)
    request.responseHeaders.setRawHeaders(
        b"content-length", [b"%d" % len(refusal.body)]
    )
    request.write(refusal.body)
    request.finish()
