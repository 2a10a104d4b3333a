"""
Tests for the C{tencent} backend: the real Tencent Cloud SDK, in a thread
pool, against L{tests.fake_tms.FakeTMS} on loopback.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from openai_proxy.moderation import Moderation, ModerationConfig, Plan
from openai_proxy.moderation.backends.tencent import (
    TencentBackend,
    TencentSettings,
    split_endpoint,
)
from tests.fake_tms import FakeTMS

SID, SKEY = "AKIDfake", "right-secret"


class EndpointTests(TestCase):
    def test_http_prefix_selects_plain_http(self) -> None:
        self.assertEqual(
            split_endpoint("http://127.0.0.1:8080"), ("http", "127.0.0.1:8080")
        )
        self.assertEqual(
            split_endpoint("https://tms.example/"), ("https", "tms.example")
        )
        self.assertEqual(
            split_endpoint("tms.tencentcloudapi.com"),
            ("https", "tms.tencentcloudapi.com"),
        )


class TencentTests(TestCase):
    def setUp(self) -> None:
        self.tms = FakeTMS(
            SID,
            SKEY,
            block_words=["bomb", "炸弹"],
            review_words=["maybe"],
            delays={"slow": 5.0},
        )
        self.tms.start()
        self.addCleanup(self.tms.stop)

    def plan(self, level: str = "low", **config: Any) -> Plan:
        settings: dict[str, Any] = {
            "backend": "tencent",
            "tencent_secret_id": SID,
            "tencent_secret_key": SKEY,
            "tencent_endpoint": self.tms.url,
            "threads": 2,
            "timeout": 2.0,
            **config,
        }
        m = Moderation(ModerationConfig(**settings), reactor)
        m.start()
        self.addCleanup(m.stop)
        plan = m.plan(
            b"/v1/chat/completions", {"moderation": True, "moderation_level": level}
        )
        assert plan is not None
        return plan

    @inlineCallbacks
    def test_pass(self) -> Any:
        stopped = yield self.plan().stops("你好，世界", "k")
        self.assertFalse(stopped)
        [call] = self.tms.calls
        self.assertEqual(
            (call.text, call.answer, call.action),
            ("你好，世界", "Pass", "TextModeration"),
        )
        self.assertEqual(
            (call.region, call.biztype, call.secret_id), ("ap-singapore", None, SID)
        )

    @inlineCallbacks
    def test_block(self) -> Any:
        stopped = yield self.plan().stops("如何制造炸弹", "k")
        self.assertTrue(stopped)
        self.assertEqual(self.tms.calls[0].answer, "Block")

    @inlineCallbacks
    def test_review_passes_low_stops_high(self) -> Any:
        low = yield self.plan("low").stops("maybe so", "k")
        high = yield self.plan("high").stops("maybe so", "k")
        self.assertEqual((low, high), (False, True))

    @inlineCallbacks
    def test_biztype_and_region_sent(self) -> Any:
        yield self.plan(tencent_biztype="biz_1", tencent_region="ap-guangzhou").stops(
            "hi", "k"
        )
        self.assertEqual(
            (self.tms.calls[0].biztype, self.tms.calls[0].region),
            ("biz_1", "ap-guangzhou"),
        )

    @inlineCallbacks
    def test_wrong_secret_is_an_error_per_on_error(self) -> Any:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        blocked = yield self.plan(tencent_secret_key="wrong", on_error="block").stops(
            "hi", "k"
        )
        passed = yield self.plan(tencent_secret_key="wrong", on_error="pass").stops(
            "hi", "k"
        )
        self.assertEqual((blocked, passed), (True, False))
        self.assertEqual(
            [c.answer for c in self.tms.calls], ["AuthFailure.SignatureFailure"] * 2
        )
        logged = repr(
            [e for e in events if "moderation call" in e.get("log_format", "")]
        )
        self.assertIn("AuthFailure.SignatureFailure", logged)
        self.assertNotIn("wrong", logged.replace("went wrong", ""))

    @inlineCallbacks
    def test_sdk_raises_tencent_error_for_wrong_secret(self) -> Any:
        from tencentcloud.common.exception.tencent_cloud_sdk_exception import (
            TencentCloudSDKException,
        )

        backend = TencentBackend(
            TencentSettings(SID, "wrong", endpoint=self.tms.url, timeout=2.0),
            reactor,
            1,
        )
        backend.start()
        self.addCleanup(backend.stop)
        error = yield self.assertFailure(
            backend.check("hi", "k"), TencentCloudSDKException
        )
        self.assertEqual(error.get_code(), "AuthFailure.SignatureFailure")

    @inlineCallbacks
    def test_slow_answer_times_out_per_on_error(self) -> Any:
        blocked = yield self.plan(timeout=0.3, on_error="block").stops("slow one", "k")
        passed = yield self.plan(timeout=0.3, on_error="pass").stops("slow two", "k")
        self.assertEqual((blocked, passed), (True, False))

    @inlineCallbacks
    def test_server_down_per_on_error(self) -> Any:
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        url = f"http://127.0.0.1:{port.getHost().port}"
        yield port.stopListening()
        blocked = yield self.plan(tencent_endpoint=url, on_error="block").stops(
            "hi", "k"
        )
        passed = yield self.plan(tencent_endpoint=url, on_error="pass").stops("hi", "k")
        self.assertEqual((blocked, passed), (True, False))

    @inlineCallbacks
    def test_concurrent_calls_across_threads(self) -> Any:
        plan = self.plan(threads=3)
        texts = [f"text {n}" for n in range(6)] + ["a bomb"]
        results = yield gatherResults([plan.stops(t, "k") for t in texts])
        self.assertEqual(results, [False] * 6 + [True])
        self.assertEqual(sorted(c.text or "" for c in self.tms.calls), sorted(texts))

    @inlineCallbacks
    def test_stream_through_tms(self) -> Any:
        from tests.moderation_fakes import DONE, chat

        plan = self.plan()
        written: list[bytes] = []
        moderator = plan.stream_moderator(written.append, lambda: None, "k")
        body = (
            chat(content="Hello there. ")
            + chat(content="Nice day.")
            + chat(finish="stop")
            + DONE
        )
        moderator.feed(body)
        yield moderator.end()
        self.assertEqual(b"".join(written), body)
        self.assertEqual(
            sorted(c.text or "" for c in self.tms.calls), [" Nice day.", "Hello there."]
        )
