"""
Opening the upstream hop: a TCP (or TLS) connection, the WebSocket
handshake sent with the proxy's headers, and the upstream's answer: the
hop ready to relay, or its refusal as an HTTP status, headers and body.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from openai_proxy.upstream.egress import EgressProxy, endpoint_to
from openai_proxy.upstream.tunnel import EgressProxyError

Headers = list[tuple[bytes, bytes]]


class Accepted(NamedTuple):
    """
    The upstream accepted: C{websocket} is the open protocol, C{pending}
    the frames that came with its answer.
    """

    subprotocol: str | None
    headers: Headers
    websocket: ClientProtocol
    pending: list[Any]


class Refused(NamedTuple):
    """The upstream answered the handshake with an ordinary HTTP response."""

    status: int
    headers: Headers
    body: bytes


class DialFailed(Exception):
    """
    No answer to the handshake: C{kind} is C{"timeout"} (none in time),
    C{"reset"} (reached, but it broke off or answered nonsense),
    C{"egress_proxy"} (the egress proxy failed: C{egress} says how) or
    C{"unreachable"}.
    """

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind
        self.egress: EgressProxyError | None = None


def _endpoint(
    reactor: Any,
    host: str,
    port: int,
    tls: bool,
    server_name: str,
    timeout: float,
    policy: IPolicyForHTTPS,
    proxy: EgressProxy | None = None,
) -> IStreamClientEndpoint:
    """
    The one place the upstream hop's connection is made: the endpoint for
    C{host}:C{port}, TLS with C{server_name} checked when C{tls}, through
    C{proxy}'s tunnel when there is one (TLS inside it, to the upstream).
    """
    if proxy is not None:
        return endpoint_to(
            reactor, proxy, host, port, tls=tls, server_name=server_name, policy=policy
        )
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


def _pairs(headers: Any) -> Headers:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.raw_items()]


class _Handshake(TwistedProtocol):
    """Sends the handshake; then hands every byte to the protocol attached."""

    def __init__(self, websocket: ClientProtocol) -> None:
        self.answer: Deferred[Accepted | Refused] = Deferred()
        self.websocket = websocket
        self._next: TwistedProtocol | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        # Each relayed message is one write: send it now, not after an ACK.
        tcp = getattr(transport, "transport", transport)  # under TLS
        if hasattr(tcp, "setTcpNoDelay"):
            tcp.setTcpNoDelay(True)
        for data in self.websocket.data_to_send():
            transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        if self._next is not None:
            self._next.dataReceived(data)
            return
        if self.answer.called:
            return
        self.websocket.receive_data(data)
        self._check()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._next is not None:
            self._next.connectionLost(reason)  # type: ignore[arg-type]
            return
        if not self.answer.called:
            self.websocket.receive_eof()  # a body that ends with the connection
            self._check()
        self._fail(DialFailed("reset", "the upstream closed the connection"))

    def attach(self, protocol: TwistedProtocol) -> None:
        """Hand the connection (and what comes next on it) to C{protocol}."""
        self._next = protocol
        assert self.transport is not None
        protocol.makeConnection(self.transport)

    def _check(self) -> None:
        ws = self.websocket
        events = ws.events_received()
        response = next((e for e in events if isinstance(e, Response)), None)
        if ws.state is State.OPEN and response is not None:
            rest = [e for e in events if e is not response]
            self.answer.callback(
                Accepted(ws.subprotocol, _pairs(response.headers), ws, rest)
            )
            return
        failed = ws.handshake_exc
        if failed is None:
            return  # more of the answer to come
        if isinstance(failed, InvalidStatus):
            refusal = failed.response
            if self.transport is not None:
                self.transport.loseConnection()
            self.answer.callback(
                Refused(
                    refusal.status_code,
                    _pairs(refusal.headers),
                    bytes(refusal.body or b""),
                )
            )
            return
        self._fail(DialFailed("reset", f"bad handshake answer: {failed}"))

    def _fail(self, error: DialFailed) -> None:
        if not self.answer.called:
            self.answer.errback(Failure(error))
            if self.transport is not None:
                self.transport.loseConnection()


class _OneShot(ClientFactory):
    """Hands out one protocol; quiet (no "Starting factory" line per session)."""

    noisy = False

    def __init__(self, protocol: _Handshake) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> _Handshake:
        return self._protocol


class Dialled(NamedTuple):
    """An upstream answer, and the connection it came on."""

    answer: Accepted | Refused
    handshake: _Handshake

    def abort(self) -> None:
        """Drop the connection (its client left meanwhile)."""
        transport: Any = self.handshake.transport
        if transport is not None:
            transport.abortConnection()


async def dial(
    reactor: Any,
    url: str,
    headers: Sequence[tuple[bytes, bytes]],
    subprotocols: Sequence[str],
    timeout: float,
    max_message: int,
    policy: IPolicyForHTTPS | None = None,
    proxy: EgressProxy | None = None,
) -> Dialled:
    """
    Open a WebSocket to C{url} (C{ws://} or C{wss://}, path and query),
    sending C{headers} and offering C{subprotocols}; no extensions (no
    permessage-deflate).  The connection and the answer's head must come
    within C{timeout} seconds; through C{proxy} (an egress proxy) if given.

    @raise DialFailed: no answer (C{kind} C{egress_proxy} when the egress
        proxy failed, with its error as C{egress}).
    """
    parts = urlsplit(url)
    tls = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    websocket = ClientProtocol(
        parse_uri(url),
        subprotocols=list(subprotocols) or None,  # type: ignore[arg-type]
        max_size=max_message,
    )
    request = websocket.connect()
    for name, value in headers:
        request.headers[name.decode("latin-1")] = value.decode("latin-1")
    websocket.send_request(request)
    handshake = _Handshake(websocket)
    endpoint = _endpoint(
        reactor,
        host,
        port,
        tls,
        host,
        timeout,
        policy or BrowserLikePolicyForHTTPS(),
        proxy,
    )
    connecting = endpoint.connect(_OneShot(handshake))
    timer: IDelayedCall = reactor.callLater(timeout, _give_up, connecting, handshake)
    try:
        try:
            await connecting
        except (CancelledError, ConnectingCancelledError, TimeoutError) as e:
            raise DialFailed("timeout", "the upstream did not answer in time") from e
        except EgressProxyError as e:
            failed = DialFailed("egress_proxy", str(e))
            failed.egress = e
            raise failed from e
        except Exception as e:
            raise DialFailed("unreachable", str(e)) from e
        answer = await handshake.answer
    finally:
        if timer.active():
            timer.cancel()
    return Dialled(answer, handshake)


def _give_up(connecting: Deferred[Any], handshake: _Handshake) -> None:
    if not connecting.called:
        connecting.cancel()
    elif not handshake.answer.called:
        handshake._fail(DialFailed("timeout", "no handshake answer in time"))
