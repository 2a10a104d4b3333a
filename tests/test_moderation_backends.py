"""Tests for the C{keywords} and C{openai} backends."""

from __future__ import annotations

import json
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from openai_proxy.moderation import Moderation, ModerationConfig, Verdict
from openai_proxy.moderation.backends.keywords import KeywordsBackend


def result(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    return out[0]


class KeywordsTests(TestCase):
    def test_case_insensitive_hit_blocks(self) -> None:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("Forbidden\n\n  炸弹 \n")
        backend = KeywordsBackend.from_file(path)
        self.assertEqual(result(backend.check("a FORBIDDEN word", "k")), Verdict.BLOCK)
        self.assertEqual(result(backend.check("造炸弹", "k")), Verdict.BLOCK)
        self.assertEqual(result(backend.check("all fine", "k")), Verdict.PASS)

    def test_configured_from_settings(self) -> None:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("bad\n")
        config = ModerationConfig(mode="always", backend="keywords", keywords_file=path)
        plan = Moderation(config, Clock()).plan(b"/v1/completions", {})
        assert plan is not None
        self.assertTrue(result(plan.stops("so BAD", "k")))
        self.assertFalse(result(plan.stops("good", "k")))


class _Moderations(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes | None, Any]] = []
        self.status = 200

    def render_POST(self, request: Request) -> bytes:
        request.channel.persistent = False
        assert request.content is not None
        body = json.loads(request.content.read())
        self.seen.append((request.path, request.getHeader(b"authorization"), body))
        request.setResponseCode(self.status)
        flagged = "bad" in body["input"]
        return json.dumps({"id": "modr-1", "results": [{"flagged": flagged}]}).encode()


class OpenAIBackendTests(TestCase):
    def setUp(self) -> None:
        self.resource = _Moderations()
        port = reactor.listenTCP(0, Site(self.resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        base = f"http://127.0.0.1:{port.getHost().port}/"

        def factory() -> tuple[HTTPClient, str]:
            return HTTPClient(Agent(reactor, pool=pool)), base

        self.factory = factory

    def plan(self, on_error: str = "block") -> Any:
        config = ModerationConfig(mode="always", backend="openai", on_error=on_error)
        return Moderation(config, reactor, openai_client_factory=self.factory).plan(
            b"/v1/chat/completions", {}
        )

    @inlineCallbacks
    def test_flagged_blocks_with_the_users_key(self) -> Any:
        plan = self.plan()
        self.assertTrue((yield plan.stops("bad text", "sk-user-1")))
        self.assertFalse((yield plan.stops("good text", "sk-user-2")))
        self.assertEqual(
            self.resource.seen,
            [
                (b"/v1/moderations", b"Bearer sk-user-1", {"input": "bad text"}),
                (b"/v1/moderations", b"Bearer sk-user-2", {"input": "good text"}),
            ],
        )

    @inlineCallbacks
    def test_error_status_counts_per_on_error(self) -> Any:
        self.resource.status = 500
        self.assertTrue((yield self.plan("block").stops("good text", "k")))
        self.assertFalse((yield self.plan("pass").stops("bad text", "k")))

    def test_needs_a_client_factory(self) -> None:
        config = ModerationConfig(backend="openai")
        self.assertRaises(ValueError, Moderation, config, reactor)
