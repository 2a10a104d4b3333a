"""
Tests for L{openai_proxy.realtime.moderate}: moderation of a WebSocket
session, driven without the relay through recording peers.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from openai_proxy.moderation import (
    Moderation,
    ModerationConfig,
    RequestRefused,
    Verdict,
)
from openai_proxy.moderation.backends import Backend
from openai_proxy.realtime.filters import Message
from openai_proxy.realtime.messages import PARSE_ON_REACTOR
from openai_proxy.realtime.moderate import (
    MAX_HELD,
    ModerationFilter,
    session_moderation,
)
from tests.fake_tms import FakeTMS
from tests.moderation_fakes import FixedBackend, ManualBackend
from tests.realtime_fakes import RealtimeTurn, RecordingPeer, ResponsesTurn, message


def moderation(backend: Backend | None = None, **settings: Any) -> Moderation:
    config = ModerationConfig(
        **{"mode": "always", "backend": "keywords", "keywords_file": "x", **settings}
    )
    return Moderation(
        config, Clock(), backend=backend or FixedBackend({"bomb": Verdict.BLOCK})
    )


class Session:
    """A filter between two recording peers."""

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        query: bytes = b"model=gpt-realtime",
        responses: bool = False,
        max_held: int = MAX_HELD,
        **settings: Any,
    ) -> None:
        plan, self.query = session_moderation(moderation(backend, **settings), query)
        assert plan is not None
        self.client = RecordingPeer()
        self.upstream = RecordingPeer()
        self.filter = ModerationFilter(
            self.client,
            self.upstream,
            plan,
            "sk-upstream",
            responses=responses,
            max_held=max_held,
        )

    def up(self, *messages: Message | list[Message]) -> None:
        for each in messages:
            for m in each if isinstance(each, list) else [each]:
                self.filter.from_upstream(m)

    def down(self, *messages: Message) -> None:
        for m in messages:
            self.filter.from_client(m)


def without_ids(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "event_id"} for e in events]


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def texts(events: list[dict[str, Any]], kind: str) -> str:
    return "".join(e["delta"] for e in of_type(events, kind))


class DownBackend:
    """A backend that cannot be reached."""

    name = "down"

    def check(self, text: str, upstream_key: str) -> Deferred[Verdict]:
        return fail(ConnectionRefusedError("moderation backend is down"))

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return Deferred()


def answer(backend: ManualBackend, text: str, verdict: Verdict = Verdict.PASS) -> None:
    for index, (asked, _, d) in enumerate(backend.asked):
        if asked == text and not d.called:
            backend.answer(index, verdict)
            return
    raise AssertionError(f"{text!r} not asked: {[a for a, _, _ in backend.asked]}")


SPOKEN = ["Hello", " there.", " I will", " say bomb", " now.", " More", " text."]
WHOLE = "".join(SPOKEN)


class BlockedSentenceTests(TestCase):
    def speak(self, s: Session, turn: RealtimeTurn) -> None:
        s.up(turn.start())
        for piece in SPOKEN:
            s.up(turn.delta(piece), turn.audio_delta())
        # The upstream goes on a little before it sees the cancel.
        s.up(turn.finish(WHOLE, status="cancelled"))

    def test_blocked_sentence_cancels_the_response_upstream(self) -> None:
        s = Session()
        self.speak(s, RealtimeTurn("resp_1", "item_1"))
        self.assertEqual(
            without_ids(s.upstream.events),
            [{"type": "response.cancel", "response_id": "resp_1"}],
        )

    def test_no_event_carries_the_blocked_sentence_or_what_follows(self) -> None:
        s = Session()
        turn = RealtimeTurn("resp_1", "item_1")
        self.speak(s, turn)
        for later in ("bomb", "I will", "More", "text."):
            self.assertFalse(s.client.carried(later), later)
        self.assertEqual(texts(s.client.events, turn.delta_type), "Hello there.")
        # Audio that came after the first held delta of the blocked sentence
        # is dropped with it.
        self.assertEqual(
            len(of_type(s.client.events, "response.output_audio.delta")), 2
        )

    def test_client_gets_content_filter_error_then_cancelled_done(self) -> None:
        s = Session()
        self.speak(s, RealtimeTurn("resp_1", "item_1"))
        events = s.client.events
        self.assertEqual([e["type"] for e in events[-2:]], ["error", "response.done"])
        error = events[-2]["error"]
        self.assertEqual(error["type"], "invalid_request_error")
        self.assertEqual(error["code"], "content_filter")
        done = events[-1]["response"]
        self.assertEqual(done["id"], "resp_1")
        self.assertEqual(done["status"], "cancelled")
        self.assertEqual(done["status_details"]["reason"], "content_filter")
        self.assertEqual(done["output"][0]["id"], "item_1")
        self.assertEqual(done["output"][0]["content"][0]["transcript"], "Hello there.")
        self.assertEqual(len(of_type(events, "response.done")), 1)

    def test_each_response_cut_off_is_counted(self) -> None:
        blocked: list[None] = []
        plan, _ = session_moderation(moderation(), b"")
        assert plan is not None
        f = ModerationFilter(
            RecordingPeer(),
            RecordingPeer(),
            plan,
            "k",
            on_block=lambda: blocked.append(None),
        )
        for turn in (RealtimeTurn("r1", "i1"), RealtimeTurn("r2", "i2")):
            for m in [*turn.start(), *map(turn.delta, SPOKEN), *turn.finish(WHOLE)]:
                f.from_upstream(m)
        self.assertEqual(len(blocked), 2)

    def test_next_turn_passes_unchanged(self) -> None:
        s = Session()
        self.speak(s, RealtimeTurn("resp_1", "item_1"))
        before = len(s.client.sent)
        turn = RealtimeTurn("resp_2", "item_2")
        sent = turn.start()
        for piece in ["Nice ", "weather.", " Goodbye."]:
            sent += [turn.delta(piece), turn.audio_delta()]
        sent += turn.finish("Nice weather. Goodbye.")
        s.up(sent)
        self.assertEqual(s.client.sent[before:], sent)
        self.assertEqual(len(s.upstream.sent), 1)

    def test_text_judged_fine_before_the_cut_is_sent(self) -> None:
        # One delta holds the end of a fine sentence and the start of the
        # stopped one: the fine part goes out as a delta of its own.
        s = Session()
        turn = RealtimeTurn("resp_1", "item_1", audio=False)
        s.up(turn.start(), turn.delta("All good. Then bomb"), turn.delta(" here. x"))
        events = s.client.events
        self.assertEqual(texts(events, "response.output_text.delta"), "All good.")
        self.assertFalse(s.client.carried("bomb"))
        done = of_type(events, "response.done")[0]["response"]
        self.assertEqual(done["output"][0]["content"][0]["text"], "All good.")

    def test_done_events_with_the_whole_text_never_leak(self) -> None:
        # The stopped sentence is the unfinished tail: found only when the
        # part is done, by events that carry the whole text.
        s = Session()
        turn = RealtimeTurn("resp_1", "item_1", audio=False)
        s.up(turn.start(), turn.delta("Fine words."), turn.delta(" say bomb"))
        s.up(turn.finish("Fine words. say bomb"))
        self.assertFalse(s.client.carried("bomb"))
        self.assertEqual(
            s.client.types[-3:],
            ["response.output_text.delta", "error", "response.done"],
        )
        self.assertNotIn("response.output_text.done", s.client.types)
        self.assertNotIn("conversation.item.done", s.client.types)

    def test_with_the_keywords_backend(self) -> None:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("bomb\n")
        config = ModerationConfig(mode="always", backend="keywords", keywords_file=path)
        plan, _ = session_moderation(Moderation(config, Clock()), b"")
        assert plan is not None
        client, upstream = RecordingPeer(), RecordingPeer()
        f = ModerationFilter(client, upstream, plan, "k")
        turn = RealtimeTurn("resp_1", "item_1")
        for m in [*turn.start(), *map(turn.delta, SPOKEN), *turn.finish(WHOLE)]:
            f.from_upstream(m)
        self.assertFalse(client.carried("bomb"))
        self.assertEqual(upstream.types, ["response.cancel"])


class CancelTests(TestCase):
    def test_the_upstreams_answer_to_a_late_cancel_is_not_relayed(self) -> None:
        # The response ended upstream while the cancel was on its way: the
        # upstream answers it with an error the client never asked for.
        s = Session()
        turn = RealtimeTurn("resp_1", "item_1")
        s.up(turn.start(), *map(turn.delta, SPOKEN))
        [cancel] = s.upstream.events
        shown = len(s.client.sent)
        late = {
            "type": "error",
            "event_id": "event_9",
            "error": {
                "type": "invalid_request_error",
                "code": "response_cancel_not_active",
                "message": "no active response",
                "param": None,
                "event_id": cancel["event_id"],
            },
        }
        s.up(turn.finish(WHOLE), message(late))
        self.assertEqual(len(s.client.sent), shown)
        # Any other error is the client's to see.
        other = message({**late, "error": {**late["error"], "event_id": None}})
        s.up(other)
        self.assertEqual(s.client.sent[-1], other)

    def test_a_response_that_ended_upstream_is_not_cancelled(self) -> None:
        backend = ManualBackend()
        s = Session(backend)
        turn = RealtimeTurn("resp_1", "item_1", audio=False)
        s.up(turn.start(), turn.delta("Say bomb"), turn.finish("Say bomb")[-1])
        answer(backend, "Say bomb", Verdict.BLOCK)
        self.assertEqual(s.upstream.sent, [])
        self.assertEqual(s.client.types[-2:], ["error", "response.done"])
        self.assertFalse(s.client.carried("bomb"))


class SDKTypesTests(TestCase):
    """The events a blocked response ends with read as the SDKs' own types."""

    def blocked(self, s: Session, turn: RealtimeTurn | ResponsesTurn) -> None:
        s.up(turn.start(), turn.delta("All good. Then bomb"), turn.delta(" here. x"))

    def test_ga_realtime(self) -> None:
        from openai.types.realtime import RealtimeServerEvent

        read = TypeAdapter(RealtimeServerEvent)
        for audio in (True, False):
            s = Session()
            self.blocked(s, RealtimeTurn("resp_1", "item_1", audio=audio))
            events = [read.validate_python(e) for e in s.client.events][-3:]
            done = events[-1].response
            self.assertEqual(done.status, "cancelled")
            self.assertEqual(done.status_details.reason, "content_filter")
            part = done.output[0].content[0]
            self.assertEqual(part.transcript if audio else part.text, "All good.")
            self.assertEqual(events[-2].error.code, "content_filter")
            self.assertEqual(events[0].delta, "All good.")

    def test_beta_realtime(self) -> None:
        from openai.types.beta.realtime import RealtimeServerEvent

        read = TypeAdapter(RealtimeServerEvent)
        for audio in (True, False):
            s = Session()
            self.blocked(s, RealtimeTurn("resp_1", "item_1", beta=True, audio=audio))
            events = [read.validate_python(e) for e in s.client.events][-3:]
            self.assertEqual(events[-1].response.status, "cancelled")
            self.assertEqual(events[0].delta, "All good.")

    def test_responses_over_websocket(self) -> None:
        from openai.types.responses import ResponseStreamEvent

        s = Session(responses=True)
        self.blocked(s, ResponsesTurn("resp_1", "msg_1"))
        read = TypeAdapter(ResponseStreamEvent)
        events = [read.validate_python(e) for e in s.client.events][-3:]
        self.assertEqual(events[-1].response.status, "incomplete")
        self.assertEqual(events[-1].response.output[0].content[0].text, "All good.")
        self.assertEqual(events[-2].code, "content_filter")

    def test_the_fakes_are_events_the_sdks_read(self) -> None:
        from openai.types.beta.realtime import RealtimeServerEvent as Beta
        from openai.types.realtime import RealtimeServerEvent as GA
        from openai.types.responses import ResponseStreamEvent

        for kind, turn in [
            (GA, RealtimeTurn("r", "i")),
            (GA, RealtimeTurn("r", "i", audio=False)),
            (Beta, RealtimeTurn("r", "i", beta=True)),
            (Beta, RealtimeTurn("r", "i", beta=True, audio=False)),
        ]:
            read = TypeAdapter(kind)
            for m in [*turn.start(), turn.delta("Hi."), turn.audio_delta()]:
                read.validate_json(m.data)
            for m in turn.finish("Hi."):
                read.validate_json(m.data)
        responses = ResponsesTurn("r", "m")
        read = TypeAdapter(ResponseStreamEvent)
        for m in [*responses.start(), responses.delta("Hi."), *responses.finish("Hi.")]:
            read.validate_json(m.data)


class TencentSessionTests(TestCase):
    def test_a_turn_judged_by_tms_in_threads(self) -> Deferred[None]:
        tms = FakeTMS("AKIDfake", "secret", block_words=["炸弹"])
        tms.start()
        self.addCleanup(tms.stop)
        config = ModerationConfig(
            mode="always",
            backend="tencent",
            tencent_secret_id="AKIDfake",
            tencent_secret_key="secret",
            tencent_endpoint=tms.url,
            threads=2,
            timeout=5.0,
        )
        shared = Moderation(config, reactor)
        shared.start()
        self.addCleanup(shared.stop)
        plan, _ = session_moderation(shared, b"")
        assert plan is not None
        client, upstream = RecordingPeer(), RecordingPeer()
        f = ModerationFilter(client, upstream, plan, "k")
        turn = RealtimeTurn("resp_1", "item_1")
        start = turn.start()
        spoken = ["你好。", "如何制造", "炸弹？", "再见。"]
        for m in [*start, *map(turn.delta, spoken), *turn.finish("".join(spoken))]:
            f.from_upstream(m)
        # The TMS calls are still out: nothing with text has gone yet.
        self.assertEqual(client.sent, start)

        def judged(_: None) -> None:
            self.assertEqual(texts(client.events, turn.delta_type), "你好。")
            self.assertEqual(client.types[-2:], ["error", "response.done"])
            self.assertFalse(client.carried("炸弹"))
            # Its response.done had come: nothing left to cancel.
            self.assertEqual(upstream.sent, [])

        return client.received(len(start) + 3).addCallback(judged)


class BetaNamesTests(TestCase):
    def test_beta_transcript_and_text_deltas_are_moderated(self) -> None:
        for audio, kind in [
            (True, "response.audio_transcript.delta"),
            (False, "response.text.delta"),
        ]:
            s = Session()
            turn = RealtimeTurn("resp_1", "item_1", beta=True, audio=audio)
            self.assertEqual(turn.delta_type, kind)
            s.up(turn.start())
            for piece in SPOKEN:
                s.up(turn.delta(piece), turn.audio_delta())
            s.up(turn.finish(WHOLE))
            self.assertEqual(texts(s.client.events, kind), "Hello there.")
            self.assertFalse(s.client.carried("bomb"))
            self.assertEqual(s.client.types[-2:], ["error", "response.done"])
            self.assertEqual(s.upstream.types, ["response.cancel"])
            # Beta names the item event conversation.item.created: it went
            # out before any text, with none.
            self.assertIn("conversation.item.created", s.client.types)


class ResponsesOverWebSocketTests(TestCase):
    def test_blocked_response_ends_incomplete_and_the_next_passes(self) -> None:
        s = Session(responses=True, query=b"")
        turn = ResponsesTurn("resp_a", "msg_a")
        s.up(turn.start())
        for piece in SPOKEN:
            s.up(turn.delta(piece))
        s.up(turn.finish(WHOLE))
        events = s.client.events
        self.assertFalse(s.client.carried("bomb"))
        self.assertEqual(texts(events, "response.output_text.delta"), "Hello there.")
        self.assertEqual(
            [e["type"] for e in events[-2:]], ["error", "response.incomplete"]
        )
        self.assertEqual(events[-2]["code"], "content_filter")
        incomplete = events[-1]["response"]
        self.assertEqual(incomplete["incomplete_details"], {"reason": "content_filter"})
        self.assertEqual(incomplete["output"][0]["content"][0]["text"], "Hello there.")
        self.assertNotIn("response.completed", s.client.types)
        numbers = [e["sequence_number"] for e in events]
        self.assertEqual(numbers, sorted(set(numbers)))
        # No response.cancel exists over this protocol.
        self.assertEqual(s.upstream.sent, [])

        before = len(s.client.sent)
        second = ResponsesTurn("resp_b", "msg_b")
        sent = [*second.start(), second.delta("Fine."), *second.finish("Fine.")]
        s.up(sent)
        self.assertEqual(s.client.sent[before:], sent)


class OrderTests(TestCase):
    def test_events_of_a_response_wait_behind_a_delta_being_judged(self) -> None:
        backend = ManualBackend()
        s = Session(backend)
        turn = RealtimeTurn("resp_1", "item_1")
        start = turn.start()
        s.up(start)
        self.assertEqual(s.client.sent, start)
        delta, audio = turn.delta("Hi there. "), turn.audio_delta()
        arguments = message(
            {
                "type": "response.function_call_arguments.delta",
                "response_id": "resp_1",
                "item_id": "fc_1",
                "output_index": 1,
                "call_id": "call_1",
                "delta": '{"say": "bomb"}',
            }
        )
        unrelated = message(
            {"type": "input_audio_buffer.speech_started", "item_id": "u"}
        )
        s.up(delta, audio, arguments, unrelated)
        # Not tied to the response: at once; the rest waits, in order.
        self.assertEqual(s.client.sent, [*start, unrelated])
        answer(backend, "Hi there.")
        self.assertEqual(s.client.sent, [*start, unrelated, delta, audio, arguments])
        # Function-call arguments are not prose: never judged.
        self.assertEqual([a for a, _, _ in backend.asked], ["Hi there."])

    def test_sentences_are_judged_together_and_released_in_order(self) -> None:
        backend = ManualBackend()
        s = Session(backend)
        turn = RealtimeTurn("resp_1", "item_1", audio=False)
        start = turn.start()
        first, second = turn.delta("One. "), turn.delta("Two. ")
        s.up(start, first, second)
        self.assertEqual([a for a, _, _ in backend.asked], ["One.", " Two."])
        answer(backend, " Two.")
        self.assertEqual(s.client.sent, start)
        answer(backend, "One.")
        self.assertEqual(s.client.sent, [*start, first, second])


class BackendDownTests(TestCase):
    def test_on_error_block_stops_the_response(self) -> None:
        s = Session(DownBackend(), on_error="block")
        turn = RealtimeTurn("resp_1", "item_1")
        s.up(turn.start(), turn.delta("Hello there. "), turn.delta("Again."))
        self.assertEqual(texts(s.client.events, turn.delta_type), "")
        self.assertEqual(s.client.types[-2:], ["error", "response.done"])
        self.assertEqual(s.upstream.types, ["response.cancel"])

    def test_on_error_pass_lets_the_response_through(self) -> None:
        s = Session(DownBackend(), on_error="pass")
        turn = RealtimeTurn("resp_1", "item_1")
        sent = [
            *turn.start(),
            turn.delta("Hello there. "),
            *turn.finish("Hello there. "),
        ]
        s.up(sent)
        self.assertEqual(s.client.sent, sent)
        self.assertEqual(s.upstream.sent, [])


class SlowBackend(FixedBackend):
    """Answers at once, except texts with "slow", which wait for the test."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Deferred[Verdict]] = []

    def check(self, text: str, upstream_key: str) -> Deferred[Verdict]:
        if "slow" in text:
            d: Deferred[Verdict] = Deferred()
            self.waiting.append(d)
            return d
        return super().check(text, upstream_key)


class SharedBackendTests(TestCase):
    def test_a_slow_check_holds_only_its_own_session(self) -> None:
        backend = SlowBackend()
        shared = moderation(backend)
        sessions = []
        for _ in range(2):
            plan, _ = session_moderation(shared, b"")
            assert plan is not None
            client, upstream = RecordingPeer(), RecordingPeer()
            sessions.append((ModerationFilter(client, upstream, plan, "k"), client))
        (slow, slow_client), (quick, quick_client) = sessions
        first, second = RealtimeTurn("r1", "i1"), RealtimeTurn("r2", "i2")
        for m in [*first.start(), first.delta("A slow one. "), *first.finish("x")]:
            slow.from_upstream(m)
        sent = [*second.start(), second.delta("Quick. "), *second.finish("Quick. ")]
        for m in sent:
            quick.from_upstream(m)
        self.assertEqual(quick_client.sent, sent)
        self.assertEqual(len(slow_client.sent), len(first.start()))
        backend.waiting[0].callback(Verdict.PASS)
        self.assertEqual(slow_client.types[-1], "response.done")


class HeldBoundTests(TestCase):
    def test_holding_more_than_the_bound_pauses_the_upstream(self) -> None:
        backend = ManualBackend()
        s = Session(backend, max_held=4000)
        turn = RealtimeTurn("resp_1", "item_1")
        s.up(turn.start(), turn.delta("Hi there. "))
        audio = [turn.audio_delta() for _ in range(10)]
        s.up(audio[:4])
        self.assertEqual(s.upstream.pauses, 0)
        s.up(audio[4:])
        self.assertTrue(s.upstream.paused)
        self.assertEqual(s.upstream.pauses, 1)
        answer(backend, "Hi there.")
        self.assertFalse(s.upstream.paused)
        self.assertEqual(s.client.sent[-10:], audio)

    def test_a_stopped_response_frees_what_it_held(self) -> None:
        backend = ManualBackend()
        s = Session(backend, max_held=4000)
        turn = RealtimeTurn("resp_1", "item_1")
        s.up(turn.start(), turn.delta("Say bomb. "))
        s.up([turn.audio_delta() for _ in range(10)])
        self.assertTrue(s.upstream.paused)
        answer(backend, "Say bomb.", Verdict.BLOCK)
        self.assertFalse(s.upstream.paused)

    def test_holding_more_than_the_bound_pauses_the_client(self) -> None:
        backend = ManualBackend()
        s = Session(backend, mode="request", moderate_input=True, max_held=300)
        item = message(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "hello " * 40}],
                },
            }
        )
        s.down(item)
        self.assertEqual(s.client.pauses, 1)
        backend.answer(0, Verdict.PASS)
        self.assertFalse(s.client.paused)
        self.assertEqual(s.upstream.sent, [item])


class ReentryTests(TestCase):
    """A peer whose resume hands over the next message at once."""

    def test_client_message_handed_over_by_resume_goes_after(self) -> None:
        backend = ManualBackend()
        s = Session(backend, mode="request", moderate_input=True, max_held=300)
        first = item("hello " * 60)
        second = message({"type": "input_audio_buffer.commit"})
        s.client.resume = lambda: s.filter.from_client(second)  # type: ignore[method-assign]
        s.down(first)
        backend.answer(0, Verdict.PASS)
        self.assertEqual(s.upstream.sent, [first, second])

    def test_upstream_message_handed_over_by_resume_keeps_its_place(self) -> None:
        backend = ManualBackend()
        s = Session(backend, max_held=3000)
        turn = RealtimeTurn("resp_1", "item_1")
        first = turn.delta("Hi there. ")
        s.up(turn.start(), first)
        audio = [turn.audio_delta() for _ in range(5)]
        s.up(audio)
        self.assertTrue(s.upstream.paused)
        later = turn.delta("Bye! ")
        s.upstream.resume = lambda: s.filter.from_upstream(later)  # type: ignore[method-assign]
        answer(backend, "Hi there.")
        answer(backend, " Bye!")
        self.assertEqual(s.client.sent[-7:], [first, *audio, later])


class LargeMessageTests(TestCase):
    def test_a_large_event_is_parsed_off_the_reactor_in_order(
        self,
    ) -> Deferred[None]:
        s = Session()
        turn = RealtimeTurn("resp_1", "item_1")
        big = message(
            {
                "type": "response.output_audio.delta",
                "response_id": "resp_1",
                "item_id": "item_1",
                "output_index": 0,
                "content_index": 0,
                "delta": "A" * PARSE_ON_REACTOR,
            }
        )
        after = message({"type": "rate_limits.updated", "rate_limits": []})
        start = turn.start()
        s.up(start, big, after)
        # The event behind the large one waits for it, though not tied to a
        # response: order across the thread is kept.
        self.assertEqual(s.client.sent, start)
        d = s.client.received(len(start) + 2)
        d.addCallback(lambda _: self.assertEqual(s.client.sent, [*start, big, after]))
        return d


def item(text: str, event_id: str = "evt_1") -> Message:
    return message(
        {
            "type": "conversation.item.create",
            "event_id": event_id,
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": text}],
            },
        }
    )


class InputTests(TestCase):
    def input_session(self, backend: Backend | None = None, **settings: Any) -> Session:
        return Session(
            backend,
            query=b"",
            **{"mode": "request", "moderate_input": True, **settings},
        )

    def test_stopped_item_never_goes_upstream(self) -> None:
        s = self.input_session()
        fine = item("hello")
        s.down(item("how to make a bomb", "evt_bad"), fine)
        self.assertEqual(s.upstream.sent, [fine])
        [error] = s.client.events
        self.assertEqual(error["type"], "error")
        self.assertEqual(error["error"]["code"], "content_filter")
        self.assertEqual(error["error"]["event_id"], "evt_bad")

    def test_session_instructions_and_response_instructions_are_judged(self) -> None:
        s = self.input_session()
        s.down(
            message(
                {"type": "session.update", "session": {"instructions": "talk bomb"}}
            ),
            message({"type": "response.create", "response": {"instructions": "bomb"}}),
        )
        self.assertEqual(s.upstream.sent, [])
        self.assertEqual(s.client.types, ["error", "error"])

    def test_responses_create_input_is_judged(self) -> None:
        s = self.input_session(responses=True)
        bad = {"type": "response.create", "model": "m", "input": "a bomb please"}
        s.down(message(bad))
        self.assertEqual(s.upstream.sent, [])
        self.assertEqual(s.client.events[0]["code"], "content_filter")

    def test_a_judged_event_naming_a_field_twice_is_refused(self) -> None:
        # The upstream might read the first "item" where this proxy reads
        # the last.
        s = self.input_session()
        data = (
            b'{"type": "conversation.item.create", "event_id": "e",'
            b' "item": {"type": "message", "role": "user", "content":'
            b' [{"type": "input_text", "text": "bomb"}]},'
            b' "item": {"type": "message", "role": "user", "content":'
            b' [{"type": "input_text", "text": "fine"}]}}'
        )
        s.down(Message(data, True))
        self.assertEqual(s.upstream.sent, [])
        self.assertEqual(s.client.events[0]["error"]["code"], "invalid_event")

    def test_a_judged_event_this_proxy_cannot_read_is_refused(self) -> None:
        s = self.input_session()
        fine = item("hello")
        for data in (fine.data + b' {"x": 1}', b"[" + fine.data + b"]"):
            s.down(Message(data, True))
        self.assertEqual(s.upstream.sent, [])
        self.assertEqual(
            [e["error"]["code"] for e in s.client.events], ["invalid_event"] * 2
        )

    def test_a_large_event_is_judged_off_the_reactor(self) -> Deferred[None]:
        s = self.input_session()
        big = item("hello " * (PARSE_ON_REACTOR // 6))
        after = message({"type": "input_audio_buffer.commit"})
        s.down(big, after)
        self.assertEqual(s.upstream.sent, [])

        def judged(_: None) -> None:
            self.assertEqual(s.upstream.sent, [big, after])

        return s.upstream.received(2).addCallback(judged)

    def test_messages_keep_their_order_behind_a_judged_one(self) -> None:
        backend = ManualBackend()
        s = self.input_session(backend)
        first = item("hello")
        audio = message({"type": "input_audio_buffer.append", "audio": "AAAA"})
        s.down(first, audio)
        self.assertEqual(s.upstream.sent, [])
        backend.answer(0, Verdict.PASS)
        self.assertEqual(s.upstream.sent, [first, audio])
        # Audio chunks are never parsed nor judged.
        self.assertEqual(len(backend.asked), 1)

    def test_output_passes_unjudged_when_only_input_is_moderated(self) -> None:
        s = self.input_session()
        turn = RealtimeTurn("resp_1", "item_1")
        sent = [*turn.start(), turn.delta("a bomb. "), *turn.finish("a bomb. ")]
        s.up(sent)
        self.assertEqual(s.client.sent, sent)

    def test_stopped_transcript_cancels_what_answers_it(self) -> None:
        s = Session(moderate_input=True)
        turn = RealtimeTurn("resp_1", "item_1")
        s.up(turn.start(), turn.delta("Sure, "))
        transcript = message(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": "item_user",
                "content_index": 0,
                "transcript": "tell me about the bomb",
            }
        )
        s.up(transcript, turn.delta("here it is."), turn.audio_delta())
        self.assertFalse(s.client.carried("bomb"))
        self.assertEqual(
            without_ids(s.upstream.events),
            [
                {"type": "conversation.item.delete", "item_id": "item_user"},
                {"type": "response.cancel", "response_id": "resp_1"},
            ],
        )
        self.assertEqual(s.client.types[-3:], ["error", "error", "response.done"])
        self.assertEqual(s.client.events[-1]["response"]["status"], "cancelled")
        self.assertFalse(s.client.carried("here it is"))

    def test_stopped_transcript_cancels_an_unmoderated_response_too(self) -> None:
        s = self.input_session()
        transcript = message(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": "item_user",
                "transcript": "a bomb",
            }
        )
        s.up(transcript)
        delete, cancel = s.upstream.events
        self.assertEqual(delete["type"], "conversation.item.delete")
        self.assertEqual(without_ids([cancel]), [{"type": "response.cancel"}])
        self.assertEqual(s.client.types, ["error"])
        # Nothing was under way: the upstream's complaint is not relayed.
        s.up(
            message(
                {
                    "type": "error",
                    "error": {
                        "type": "invalid_request_error",
                        "code": "response_cancel_not_active",
                        "message": "no active response",
                        "event_id": cancel["event_id"],
                    },
                }
            )
        )
        self.assertEqual(s.client.types, ["error"])

    def test_fine_transcript_is_shown(self) -> None:
        s = Session(moderate_input=True)
        transcript = message(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": "item_user",
                "transcript": "hello",
            }
        )
        s.up(transcript)
        self.assertEqual(s.client.sent, [transcript])


class ClosedTests(TestCase):
    def test_answers_after_the_session_closed_send_nothing(self) -> None:
        backend = ManualBackend()
        s = Session(backend, moderate_input=True)
        turn = RealtimeTurn("resp_1", "item_1")
        s.up(turn.start(), turn.delta("Hi there. "))
        s.down(item("hello"))
        sent = len(s.client.sent)
        s.filter.closed()
        for index in range(len(backend.asked)):
            backend.answer(index, Verdict.BLOCK)
        self.assertEqual(len(s.client.sent), sent)
        self.assertEqual(s.upstream.sent, [])


class SessionModerationTests(TestCase):
    def test_asked_in_the_query_and_removed_from_it(self) -> None:
        plan, query = session_moderation(
            moderation(mode="request"),
            b"model=gpt-realtime&moderation=true&moderation_level=high&x=%2B1",
        )
        assert plan is not None
        self.assertTrue(plan.output)
        self.assertEqual(plan.level, "high")
        self.assertEqual(query, b"model=gpt-realtime&x=%2B1")

    def test_always_moderates_without_asking(self) -> None:
        plan, query = session_moderation(moderation(mode="always"), b"model=m")
        assert plan is not None
        self.assertTrue(plan.output)
        self.assertFalse(plan.input)
        self.assertEqual(query, b"model=m")

    def test_not_asked_is_not_moderated(self) -> None:
        for query in (b"model=m", b"model=m&moderation=false", b""):
            plan, rest = session_moderation(moderation(mode="request"), query)
            self.assertIsNone(plan)
            self.assertEqual(rest, b"model=m" if query else b"")

    def test_input_moderation_alone(self) -> None:
        plan, _ = session_moderation(
            moderation(mode="request", moderate_input=True), b"model=m"
        )
        assert plan is not None
        self.assertFalse(plan.output)
        self.assertTrue(plan.input)

    def test_encoded_names_are_removed_too(self) -> None:
        _, query = session_moderation(
            moderation(mode="request"), b"moderatio%6E=1&model=m"
        )
        self.assertEqual(query, b"model=m")

    def test_bad_values_are_refused_like_http(self) -> None:
        for query, code in [
            (b"moderation=maybe", "invalid_moderation"),
            (b"moderation=true&moderation_level=extreme", "invalid_moderation_level"),
        ]:
            with self.assertRaises(RequestRefused) as raised:
                session_moderation(moderation(mode="request"), query)
            self.assertEqual(
                (raised.exception.status, raised.exception.code), (400, code)
            )

    def test_asked_where_moderation_is_off_is_refused(self) -> None:
        with self.assertRaises(RequestRefused) as raised:
            session_moderation(moderation(mode="off"), b"moderation=true")
        self.assertEqual(raised.exception.code, "moderation_unavailable")

    def test_always_cannot_be_lowered(self) -> None:
        plan, _ = session_moderation(
            moderation(mode="always", level="high"), b"moderation_level=low"
        )
        assert plan is not None
        self.assertEqual(plan.level, "high")
