"""The server's channel: per-connection facts are looked up once."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.resource import Resource
from twisted.web.server import Request

from openai_proxy.http.server import ProxySite


class _Hosts(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        host = request.getHost()
        return b"%s:%d" % (host.host.encode(), host.port)


class ChannelTests(TestCase):
    async def test_socket_address_is_asked_once_per_connection(self) -> None:
        asked: list[object] = []
        real = tcp.Server.getHost

        def counting(transport: Any) -> Any:
            asked.append(transport)
            return real(transport)

        self.patch(tcp.Server, "getHost", counting)
        port = reactor.listenTCP(0, ProxySite(_Hosts(), 1000), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)
        bodies = []
        for _ in range(3):
            response = await agent.request(b"GET", b"http://127.0.0.1:%d/" % number)
            bodies.append(await readBody(response))
        self.assertEqual(bodies, [b"127.0.0.1:%d" % number] * 3)
        self.assertEqual(len(asked), 1)  # one connection, three requests


class TwistedInternalsTests(TestCase):
    """
    What the server reads of twisted.web's channel that is not public API:
    the request line's parts (C{_command}, C{_path}, C{_version}, known
    before C{requestReceived}) and whether the channel is still on the
    request line (C{_HTTPChannel__first_line}).  Should a Twisted release
    rename them, this fails, naming the attribute, before the early key
    check or the 414 quietly stop working.
    """

    def test_request_line_parts_are_known_when_the_headers_are(self) -> None:
        channel = ProxySite(Resource(), 1000).buildProtocol(None)
        seen: dict[str, object] = {}

        def screen(request: Any) -> None:
            for name in ("_command", "_path", "_version"):
                seen[name] = getattr(request.channel, name, "missing")
            return None

        channel.site.screen = screen  # type: ignore[method-assign]
        self.assertEqual(getattr(channel, "_HTTPChannel__first_line", "missing"), 1)
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"POST /v1/x?y=1 HTTP/1.1\r\n")
        self.assertEqual(getattr(channel, "_HTTPChannel__first_line", "missing"), 0)
        channel.dataReceived(b"Host: h\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(
            seen,
            {"_command": b"POST", "_path": b"/v1/x?y=1", "_version": b"HTTP/1.1"},
        )
        channel.connectionLost(Failure(ConnectionDone()))


class _NoDelay(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        sock = request.channel.transport.getHandle()
        return b"%d" % sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


class NoDelayTests(TestCase):
    """
    Streamed events are small writes spaced in time: with Nagle's algorithm
    on, each would wait until the client acknowledged the one before (up to
    a round trip, or a delayed-ACK timeout, per event).  twisted.web turns
    it off from Twisted 24.10, which setup.cfg requires.
    """

    async def test_client_connections_have_nagle_off(self) -> None:
        port = reactor.listenTCP(0, ProxySite(_NoDelay(), 1000), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, pool=pool)
        response = await agent.request(
            b"GET", b"http://127.0.0.1:%d/" % port.getHost().port
        )
        self.assertEqual(await readBody(response), b"1")
