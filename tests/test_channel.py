"""The server's channel: per-connection facts are looked up once."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor, tcp
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.resource import Resource
from twisted.web.server import Request

from openai_proxy.server import ProxySite


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
