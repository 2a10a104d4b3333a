"""Starting the proxy on loopback, in the test's reactor, from settings."""

from __future__ import annotations

import json
import sys
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from openai_proxy.app import ProxyApp
from openai_proxy.config import Config
from tests.fake_tms import FakeTMS
from tests.fake_upstream import FakeOpenAI

#: The command users run, as a child process of a test: twistd itself.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

KEY = "sk-test-upstream-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
TMS_ID, TMS_SECRET = "AKIDfakeid", "fake-secret-key"
REFUSAL = "REFUSED."


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


async def closed_port_url() -> str:
    """The URL of a loopback port on which nothing listens any more."""
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    return f"http://127.0.0.1:{number}"


class RelayTestCase(TestCase):
    """Starts a fake upstream and a proxy in front of it for each test."""

    env: dict[str, str] = {}

    def setUp(self) -> None:
        self.fake = FakeOpenAI()
        self.upstream = self.fake.start(self)
        self.proxy = Proxy(self, {"UPSTREAM": self.upstream, **self.env})
        self.http = client(self)

    def url(self, path: str) -> str:
        return self.proxy.url + path

    async def post_json(
        self, path: str, payload: Any, headers: dict[str, str] | None = None
    ) -> Any:
        return await self.http.post(
            self.url(path),
            json.dumps(payload).encode(),
            headers={**AUTH, **JSON, **(headers or {})},
        )


class ModeratedRelayTestCase(RelayTestCase):
    """
    A proxy with the tencent moderation backend, the real SDK calling a fake
    TMS that blocks "bomb"/"炸弹", reviews "gossip" and answers texts holding
    a word of C{tms_delays} late.
    """

    moderation_env: dict[str, str] = {}
    tms_delays: dict[str, float] = {}

    def setUp(self) -> None:
        self.tms = FakeTMS(
            TMS_ID,
            TMS_SECRET,
            block_words=["bomb", "炸弹"],
            review_words=["gossip"],
            delays=self.tms_delays,
        )
        self.tms.start()
        self.addCleanup(self.tms.stop)
        self.env = {
            "TENCENT_CLOUD_SID": TMS_ID,
            "TENCENT_CLOUD_SKEY": TMS_SECRET,
            "TENCENT_CLOUD_ENDPOINT": self.tms.url,
            "REFUSAL_TEXT": REFUSAL,
            **self.moderation_env,
        }
        super().setUp()
