"""
Item 10 of issue 9: one huge streamed event cannot make thousands of
moderation calls; the caps per event and per stream follow
MODERATION_ON_ERROR.
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase

from openai_proxy.moderation import stream
from openai_proxy.moderation.chunks import shape_for
from openai_proxy.moderation.stream import BATCH, StreamModerator
from tests.fake_upstream import Script, chat_stream
from tests.harness import ModeratedRelayTestCase
from tests.moderation_fakes import DONE, ManualCheck, chat, payloads

REFUSAL = "REFUSED."


def moderator(
    check: ManualCheck,
    written: list[bytes],
    *,
    max_calls: int = 1000,
    max_event_calls: int = 20,
    over_cap_stops: bool = True,
) -> StreamModerator:
    return StreamModerator(
        shape_for("chat"),
        check,
        written.append,
        lambda: None,
        REFUSAL,
        max_calls=max_calls,
        max_event_calls=max_event_calls,
        over_cap_stops=over_cap_stops,
    )


def text_of(output: bytes) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for p in payloads(output)
        if isinstance(p, dict)
        for choice in p["choices"]
    )


class HugeEventTests(TestCase):
    def test_one_huge_event_is_checked_in_a_few_batches(self) -> None:
        check, written = ManualCheck(), []
        text = "This is a sentence. " * 5000  # 100,000 characters, 5,000 sentences
        m = moderator(check, written, max_event_calls=1000)
        m.feed(chat(content=text, finish="stop") + DONE)
        self.assertEqual("".join(check.texts), text.rstrip())
        self.assertLessEqual(len(check.texts), 11)
        self.assertTrue(all(len(t) <= BATCH for t in check.texts))
        check.answer_all(stopped=False)
        m.end()
        self.assertEqual(text_of(b"".join(written)), text)

    def test_past_the_event_cap_the_rest_is_blocked_under_on_error_block(
        self,
    ) -> None:
        check, written = ManualCheck(), []
        text = "Fine words here. " * 20_000  # 340,000 characters: 34+ batches
        m = moderator(check, written, max_event_calls=3)
        m.feed(chat(content=text, finish="stop") + DONE)
        self.assertEqual(len(check.texts), 3)
        check.answer_all(stopped=False)
        m.end()
        self.assertTrue(m.blocked)
        output = text_of(b"".join(written))
        self.assertTrue(output.endswith(REFUSAL))
        self.assertLess(len(output), len(text))

    def test_past_the_event_cap_the_rest_passes_under_on_error_pass(self) -> None:
        check, written = ManualCheck(), []
        text = "Fine words here. " * 20_000
        m = moderator(check, written, max_event_calls=3, over_cap_stops=False)
        m.feed(chat(content=text, finish="stop") + DONE)
        self.assertEqual(len(check.texts), 3)
        check.answer_all(stopped=False)
        m.end()
        self.assertFalse(m.blocked)
        self.assertEqual(text_of(b"".join(written)), text)

    def test_the_stream_cap_counts_calls_across_events(self) -> None:
        check, written = ManualCheck(), []
        m = moderator(check, written, max_calls=5, over_cap_stops=False)
        for n in range(12):
            m.feed(chat(content=f"Sentence {n}. "))
        m.feed(chat(finish="stop") + DONE)
        self.assertEqual(len(check.texts), 5)
        check.answer_all(stopped=False)
        m.end()
        self.assertIn("Sentence 11.", text_of(b"".join(written)))


class HugeEventRelayTests(ModeratedRelayTestCase):
    """Through the proxy and the real SDK: calls stay within the caps."""

    moderation_env = {"MODERATION_MAX_EVENT_CALLS": "4", "MODERATION_ON_ERROR": "pass"}

    async def test_a_two_megabyte_event_makes_at_most_the_capped_calls(self) -> None:
        words = "Plain words go by. " * 100_000  # 1.9 MB in one event
        events = chat_stream([words])
        self.fake.script = Script(events=events)
        response = await self.post_json(
            "/v1/chat/completions",
            {"model": "m", "messages": [], "stream": True, "moderation": True},
        )
        body = await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"".join(events))
        texts = [c.text for c in self.tms.calls if c.text != "ping"]
        self.assertLessEqual(len(texts), 4)
        self.assertTrue(all(len(t) <= BATCH for t in texts))


class LargeEventThreadTests(TestCase):
    """A large event is parsed and split in a thread; order and verdicts hold."""

    def setUp(self) -> None:
        self.patch(stream, "LARGE_EVENT", 300)
        self.threads: list[threading.Thread] = []
        original = stream._prepare

        def prepare(*args: Any) -> Any:
            self.threads.append(threading.current_thread())
            return original(*args)

        self.patch(stream, "_prepare", prepare)
        self.texts: list[str] = []

    def check(self, text: str) -> Deferred[bool]:
        self.texts.append(text)
        return succeed("bomb" in text)

    def moderator(self, written: list[bytes]) -> StreamModerator:
        return StreamModerator(
            shape_for("chat"), self.check, written.append, lambda: None, REFUSAL
        )

    async def test_events_around_a_large_one_are_relayed_unchanged_in_order(
        self,
    ) -> None:
        written: list[bytes] = []
        m = self.moderator(written)
        events = [
            chat(content="Short one. "),
            chat(content="A longer sentence. " * 40),
            chat(content="After it. "),
            chat(content="And more. "),
            chat(finish="stop"),
            DONE,
        ]
        for data in events:
            m.feed(data)
        await m.end()
        self.assertEqual(b"".join(written), b"".join(events))
        self.assertIn(threading.main_thread(), self.threads)
        self.assertTrue([t for t in self.threads if t is not threading.main_thread()])
        self.assertEqual(
            "".join(self.texts),
            "Short one. " + "A longer sentence. " * 40 + "After it. And more.",
        )

    async def test_a_stopped_sentence_in_a_large_event_blocks_the_rest(self) -> None:
        written: list[bytes] = []
        m = self.moderator(written)
        m.feed(chat(content="Fine start. "))
        m.feed(chat(content="Fine words. " * 30 + "Make a bomb now. " + "x. " * 30))
        m.feed(chat(content="Never shown. "))
        m.feed(chat(finish="stop") + DONE)
        await m.end()
        self.assertTrue(m.blocked)
        text = text_of(b"".join(written))
        self.assertTrue(text.startswith("Fine start. "))
        self.assertTrue(text.endswith(REFUSAL))
        self.assertNotIn("bomb", text)
        self.assertNotIn("Never shown", text)

    async def test_abandoned_while_a_large_event_is_in_a_thread(self) -> None:
        written: list[bytes] = []
        m = self.moderator(written)
        started: list[Deferred[Any]] = []
        original = stream.deferToThread

        def in_thread(*args: Any) -> Deferred[Any]:
            d: Deferred[Any] = original(*args)
            started.append(d)
            return d

        self.patch(stream, "deferToThread", in_thread)
        m.feed(chat(content="Long words here. " * 40))
        m.abandon()
        await m.end()
        await started[0]  # the thread's answer lands after the hang-up
        self.assertEqual(written, [])
        self.assertEqual(self.texts, [])
