"""
Tunnels through an egress proxy: the HTTP C{CONNECT} and SOCKS5 handshakes,
each a small protocol that, once the proxy has opened the way, hands the
connection to the protocol that asked for it.

L{TunnelEndpoint} is an endpoint like any other: what it connects is a byte
stream to the target host, so TLS to the upstream is layered on top of it
(with C{wrapClientTLS}) exactly as on a direct connection, and the
certificate is checked against the upstream's name, never the proxy's.
"""

from __future__ import annotations

import base64
import ipaddress
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

#: The longest CONNECT answer head the proxy may send.
_MAX_HEAD = 16384

_SOCKS_REPLIES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


class EgressProxyError(Exception):
    """
    The egress proxy, not the upstream, is why a connection failed.

    C{kind} is C{"unreachable"} (the proxy could not be reached, or broke
    off the handshake), C{"auth_failed"} (it refused the credentials, or
    asked for some and none were configured) or C{"refused"} (it would not
    open the tunnel; C{status} says what it answered).  C{proxy} names the
    proxy without credentials.
    """

    def __init__(
        self, kind: str, proxy: str, detail: str, status: str | None = None
    ) -> None:
        super().__init__(f"egress proxy {proxy}: {detail}")
        self.kind = kind
        self.proxy = proxy
        self.detail = detail
        self.status = status


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """
    Connects to C{proxy_endpoint}, runs the handshake C{handshake} builds
    (an L{HTTPConnect} or L{SOCKS5} for the target), then gives the
    connection to the protocol the caller's factory builds.

    The connection's L{Deferred} fails with L{EgressProxyError} when the
    proxy is the reason; cancelling it stops the attempt at any stage.
    """

    def __init__(
        self,
        proxy_endpoint: IStreamClientEndpoint,
        handshake: Callable[[], _Handshake],
        proxy: str,
    ) -> None:
        self._proxy_endpoint = proxy_endpoint
        self._handshake = handshake
        self._proxy = proxy

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def cancel(d: Deferred[IProtocol]) -> None:
            shaking = factory.built
            transport: Any = None if shaking is None else shaking.transport
            if transport is not None:
                transport.abortConnection()
            else:
                connecting.cancel()
            if not d.called:
                d.errback(
                    EgressProxyError(
                        "unreachable", self._proxy, "no tunnel within the time allowed"
                    )
                )

        done: Deferred[IProtocol] = Deferred(cancel)
        factory = _HandshakeFactory(self._handshake, protocolFactory, done)
        connecting = self._proxy_endpoint.connect(factory)

        def unreachable(failure: Failure) -> None:
            if not done.called:
                done.errback(
                    EgressProxyError(
                        "unreachable",
                        self._proxy,
                        f"could not connect: {failure.getErrorMessage()}",
                    )
                )

        connecting.addErrback(unreachable)
        return done


class _HandshakeFactory(Factory):
    noisy = False

    def __init__(
        self,
        handshake: Callable[[], _Handshake],
        wrapped: IProtocolFactory,
        done: Deferred[IProtocol],
    ) -> None:
        self._handshake = handshake
        self._wrapped = wrapped
        self._done = done
        #: The handshake under way, once connected to the proxy.
        self.built: _Handshake | None = None

    # The wrapped factory is started and stopped with this one, as a
    # WrappingFactory does (its protocols are built on this one's connection).
    def doStart(self) -> None:
        super().doStart()
        self._wrapped.doStart()

    def doStop(self) -> None:
        self._wrapped.doStop()
        super().doStop()

    def buildProtocol(self, addr: IAddress | None) -> _Handshake:
        protocol = self._handshake()
        protocol.wrapped_factory = self._wrapped
        protocol.done = self._done
        self.built = protocol
        return protocol


class _Handshake(Protocol):
    """
    Talks to the proxy until the tunnel is open (L{opened}), then passes
    every byte and the connection's end to the protocol it was opened for.
    """

    wrapped_factory: IProtocolFactory
    done: Deferred[IProtocol]
    proxy: str

    def __init__(self) -> None:
        self._buffer = b""
        self._inner: IProtocol | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._buffer += data
        self.received()

    def received(self) -> None:
        """Handle what is in C{_buffer}; overridden by each handshake."""
        raise NotImplementedError

    def opened(self, rest: bytes) -> None:
        """The tunnel is open: hand it over, with C{rest} already read from it."""
        if self.done.called:  # cancelled meanwhile
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        inner = self.wrapped_factory.buildProtocol(self.transport.getPeer())  # type: ignore[union-attr]
        if inner is None:
            self.transport.loseConnection()  # type: ignore[union-attr]
            self.done.errback(ConnectionDone("the protocol factory built nothing"))
            return
        self._inner = inner
        self._buffer = b""
        transport: Any = self.transport
        inner.makeConnection(transport)
        self.done.callback(inner)
        if rest:
            inner.dataReceived(rest)

    def fail(self, kind: str, detail: str, status: str | None = None) -> None:
        """The proxy said no: close, and fail the connection attempt."""
        self.transport.loseConnection()  # type: ignore[union-attr]
        if not self.done.called:
            self.done.errback(EgressProxyError(kind, self.proxy, detail, status))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif not self.done.called:
            self.done.errback(
                EgressProxyError(
                    "unreachable",
                    self.proxy,
                    "closed the connection during the handshake",
                )
            )


def _authority(host: str, port: int) -> bytes:
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    text = f"{host}:{port}"
    return text.encode("ascii") if text.isascii() else text.encode("idna")


class HTTPConnect(_Handshake):
    """
    C{CONNECT host:port}, with C{Proxy-Authorization: Basic} when the proxy
    has credentials; any 2xx opens the tunnel, 407 (or 401) is an
    authentication failure, anything else a refusal naming the proxy's
    status.
    """

    def __init__(
        self, proxy: str, host: str, port: int, credentials: tuple[str, str] | None
    ) -> None:
        super().__init__()
        self.proxy = proxy
        authority = _authority(host, port)
        lines = [
            b"CONNECT " + authority + b" HTTP/1.1",
            b"Host: " + authority,
        ]
        if credentials is not None:
            lines.append(b"Proxy-Authorization: " + basic_credentials(*credentials))
        self._request = b"\r\n".join(lines) + b"\r\n\r\n"

    def connectionMade(self) -> None:
        self.transport.write(self._request)  # type: ignore[union-attr]

    def received(self) -> None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEAD:
                self.fail("refused", "answered CONNECT with an oversized head")
            return
        head, rest = self._buffer[:end], self._buffer[end + 4 :]
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            self.fail("refused", f"answered CONNECT with {status_line[:80]!r}")
            return
        status = " ".join(parts[1:]).strip()
        code = int(parts[1])
        if 200 <= code < 300:
            self.opened(rest)
        elif code in (401, 407):  # tinyproxy answers wrong credentials with 401
            self.fail("auth_failed", f"answered CONNECT with {status}", status)
        else:
            self.fail("refused", f"answered CONNECT with {status}", status)


def basic_credentials(user: str, password: str) -> bytes:
    """The C{Basic} value of a C{Proxy-Authorization} header."""
    token = base64.b64encode(f"{user}:{password}".encode())
    return b"Basic " + token


class SOCKS5(_Handshake):
    """
    The SOCKS5 handshake (RFC 1928), with user and password (RFC 1929) when
    the proxy has credentials.  C{host} is sent as a name (the proxy
    resolves it, as C{socks5h://} asks) unless it is an IP address: a
    C{socks5://} caller resolves it first.
    """

    def __init__(
        self, proxy: str, host: str, port: int, credentials: tuple[str, str] | None
    ) -> None:
        super().__init__()
        self.proxy = proxy
        self._host = host
        self._port = port
        self._credentials = credentials
        self._stage = "method"

    def connectionMade(self) -> None:
        methods = b"\x00\x02" if self._credentials is not None else b"\x00"
        self.transport.write(b"\x05" + bytes([len(methods)]) + methods)  # type: ignore[union-attr]

    def received(self) -> None:
        # Each stage waits for its whole answer, then moves on.
        while True:
            stage = self._stage
            if stage == "method":
                self._method()
            elif stage == "auth":
                self._auth()
            elif stage == "reply":
                self._reply()
            if self._stage == stage or self._stage == "done":
                return

    def _method(self) -> None:
        if len(self._buffer) < 2:
            return
        version, method = self._buffer[0], self._buffer[1]
        self._buffer = self._buffer[2:]
        if version != 5:
            self.fail("refused", "is not a SOCKS5 server")
        elif method == 0:
            self._send_request()
        elif method == 2 and self._credentials is not None:
            user, password = (s.encode() for s in self._credentials)
            self.transport.write(  # type: ignore[union-attr]
                b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password
            )
            self._stage = "auth"
        elif method == 0xFF and self._credentials is None:
            self.fail(
                "auth_failed", "requires authentication, none configured", "no method"
            )
        else:
            self.fail(
                "auth_failed",
                f"accepted no offered authentication method ({method:#04x})",
                "no method",
            )

    def _auth(self) -> None:
        if len(self._buffer) < 2:
            return
        status = self._buffer[1]
        self._buffer = self._buffer[2:]
        if status != 0:
            self.fail("auth_failed", "refused the user name and password", "auth")
        else:
            self._send_request()

    def _send_request(self) -> None:
        try:
            address = ipaddress.ip_address(self._host)
        except ValueError:
            name = self._host.encode("idna")
            target = b"\x03" + bytes([len(name)]) + name
        else:
            kind = b"\x01" if address.version == 4 else b"\x04"
            target = kind + address.packed
        self.transport.write(  # type: ignore[union-attr]
            b"\x05\x01\x00" + target + struct.pack("!H", self._port)
        )
        self._stage = "reply"

    def _reply(self) -> None:
        if len(self._buffer) < 5:
            return
        version, reply, atyp = self._buffer[0], self._buffer[1], self._buffer[3]
        if version != 5:
            self.fail("refused", "is not a SOCKS5 server")
            return
        if reply != 0:
            text = _SOCKS_REPLIES.get(reply, "unknown error")
            self.fail(
                "refused",
                f"refused the connection: SOCKS reply {reply} ({text})",
                f"SOCKS reply {reply} ({text})",
            )
            return
        sizes = {1: 4, 4: 16, 3: 1 + self._buffer[4]}
        if atyp not in sizes:
            self.fail("refused", f"answered with address type {atyp}")
            return
        length = 4 + sizes[atyp] + 2
        if len(self._buffer) < length:
            return
        self._stage = "done"
        self.opened(self._buffer[length:])
