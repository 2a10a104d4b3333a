"""Starting the proxy on loopback, in the test's reactor, from settings."""

from __future__ import annotations

from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool

from openai_proxy.app import ProxyApp
from openai_proxy.config import Config


class Proxy:
    """
    A proxy started for one test from environment-style settings; C{url} is
    its base URL and C{app} the assembled application.
    """

    def __init__(self, test: Any, env: dict[str, str], **options: Any) -> None:
        self.config = Config.load(options, env)
        self.app = ProxyApp(self.config, reactor)
        self.app.startService()
        self.port = reactor.listenTCP(0, self.app.site, interface="127.0.0.1")
        test.addCleanup(self._stop)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"

    def _stop(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred.fromCoroutine(self._stopping())
        return d

    async def _stopping(self) -> None:
        await self.port.stopListening()
        await self.app.stopService()


def client(test: Any) -> treq.client.HTTPClient:
    """A treq client for the test side, whose connections are closed at cleanup."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    test.addCleanup(pool.closeCachedConnections)
    return treq.client.HTTPClient(Agent(reactor, pool=pool))
