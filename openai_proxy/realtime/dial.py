"""
Opening the upstream hop: a TCP (or TLS) connection, the WebSocket
handshake sent with the proxy's headers, and the upstream's answer: the
hop ready to relay, or its refusal as an HTTP status, headers and body.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectingCancelledError, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

#: Of a refusal's body, at most this much is kept for the client.
_MAX_REFUSAL_BODY = 1_048_576

Headers = list[tuple[bytes, bytes]]


class Accepted(NamedTuple):
    """The upstream accepted: C{attach} hands the connection to a protocol."""

    subprotocol: str | None
    headers: Headers
    attach: Callable[[TwistedProtocol], None]


class Refused(NamedTuple):
    """The upstream answered the handshake with an ordinary HTTP response."""

    status: int
    headers: Headers
    body: bytes


class DialFailed(Exception):
    """
    No answer to the handshake: C{kind} is C{"timeout"} (none in time),
    C{"reset"} (reached, but it broke off or answered nonsense) or
    C{"unreachable"}.
    """

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind


def _endpoint(
    reactor: Any,
    host: str,
    port: int,
    tls: bool,
    server_name: str,
    timeout: float,
    policy: IPolicyForHTTPS,
) -> IStreamClientEndpoint:
    """
    The one place the upstream hop's connection is made: the endpoint for
    C{host}:C{port}, TLS with C{server_name} checked when C{tls}.  (An
    egress proxy would replace the plain endpoint here.)
    """
    endpoint: IStreamClientEndpoint
    # An address needs no lookup: HostnameEndpoint would still send it
    # through the resolver's thread pool, adding a thread hop per session.
    if isIPAddress(host):
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    elif isIPv6Address(host):
        endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    else:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if tls:
        creator = policy.creatorForNetloc(server_name.encode("idna"), port)
        endpoint = wrapClientTLS(creator, endpoint)
    return endpoint


class _Handshake(TwistedProtocol):
    """Sends the handshake; then hands every byte to the protocol attached."""

    def __init__(self, request: Request) -> None:
        self.answer: Deferred[Accepted | Refused] = Deferred()
        self._request = request
        self._handshake = H11Handshake(ConnectionType.CLIENT)
        self._next: TwistedProtocol | None = None
        self._refusal: RejectConnection | None = None
        self._body = bytearray()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        assert transport is not None
        # Each relayed message is one write: send it now, not after an ACK.
        tcp = getattr(transport, "transport", transport)  # under TLS
        if hasattr(tcp, "setTcpNoDelay"):
            tcp.setTcpNoDelay(True)
        transport.write(self._handshake.send(self._request))

    def dataReceived(self, data: bytes) -> None:
        if self._next is not None:
            self._next.dataReceived(data)
            return
        if self.answer.called:
            return
        try:
            self._handshake.receive_data(data)
            for event in self._handshake.events():
                if isinstance(event, AcceptConnection):
                    self._accepted(event)
                    return
                if isinstance(event, RejectConnection):
                    self._refusal = event
                    if not event.has_body:
                        self._refused()
                        return
                elif isinstance(event, RejectData):
                    if len(self._body) < _MAX_REFUSAL_BODY:
                        self._body += event.data
                    if event.body_finished:
                        self._refused()
                        return
        except RemoteProtocolError as e:
            self._fail(DialFailed("reset", f"bad handshake answer: {e}"))

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._next is not None:
            self._next.connectionLost(reason)  # type: ignore[arg-type]
        elif self._refusal is not None and not self.answer.called:
            self._refused()  # a body that ended with the connection
        else:
            self._fail(DialFailed("reset", "the upstream closed the connection"))

    def connection(self) -> Connection:
        """The WebSocket connection the accepted handshake made."""
        connection = self._handshake.connection
        assert connection is not None
        return connection

    def _accepted(self, event: AcceptConnection) -> None:
        self.answer.callback(
            Accepted(event.subprotocol, list(event.extra_headers), self._attach)
        )

    def _attach(self, protocol: TwistedProtocol) -> None:
        self._next = protocol
        assert self.transport is not None
        protocol.makeConnection(self.transport)

    def _refused(self) -> None:
        refusal = self._refusal
        assert refusal is not None
        if self.transport is not None:
            self.transport.loseConnection()
        self.answer.callback(
            Refused(refusal.status_code, list(refusal.headers), bytes(self._body))
        )

    def _fail(self, error: DialFailed) -> None:
        if not self.answer.called:
            self.answer.errback(Failure(error))
            if self.transport is not None:
                self.transport.loseConnection()


class Dialled(NamedTuple):
    """An upstream answer, with the handshake that got it (to take its connection)."""

    answer: Accepted | Refused
    connection: Callable[[], Connection]
    abort: Callable[[], None]


async def dial(
    reactor: Any,
    url: str,
    headers: Sequence[tuple[bytes, bytes]],
    subprotocols: Sequence[str],
    timeout: float,
    policy: IPolicyForHTTPS | None = None,
) -> Dialled:
    """
    Open a WebSocket to C{url} (C{ws://} or C{wss://}, path and query),
    sending C{headers} and offering C{subprotocols}; no extensions (no
    permessage-deflate).  The connection and the answer's head must come
    within C{timeout} seconds.

    @raise DialFailed: no answer.
    """
    parts = urlsplit(url)
    tls = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    request = Request(
        host=parts.netloc,
        target=target,
        extra_headers=list(headers),
        subprotocols=list(subprotocols),
    )
    handshake = _Handshake(request)
    endpoint = _endpoint(
        reactor, host, port, tls, host, timeout, policy or BrowserLikePolicyForHTTPS()
    )
    factory = _OneShot(handshake)
    connecting = endpoint.connect(factory)
    timer: IDelayedCall = reactor.callLater(timeout, _give_up, connecting, handshake)
    try:
        try:
            await connecting
        except (CancelledError, ConnectingCancelledError, TimeoutError) as e:
            raise DialFailed("timeout", "the upstream did not answer in time") from e
        except Exception as e:
            raise DialFailed("unreachable", str(e)) from e
        answer = await handshake.answer
    finally:
        if timer.active():
            timer.cancel()
    return Dialled(answer, handshake.connection, lambda: _abort(handshake))


class _OneShot(ClientFactory):
    """Hands out one protocol; quiet (no "Starting factory" line per session)."""

    noisy = False

    def __init__(self, protocol: _Handshake) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> _Handshake:
        return self._protocol


def _give_up(connecting: Deferred[Any], handshake: _Handshake) -> None:
    if not connecting.called:
        connecting.cancel()
    elif not handshake.answer.called:
        handshake._fail(DialFailed("timeout", "no handshake answer in time"))


def _abort(handshake: _Handshake) -> None:
    transport: Any = handshake.transport
    if transport is not None:
        transport.abortConnection()
