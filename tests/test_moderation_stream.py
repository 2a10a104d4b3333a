"""Tests for L{openai_proxy.moderation.stream.StreamModerator}."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase

from openai_proxy.http.sse import SSEParser
from openai_proxy.moderation.chunks import shape_for
from openai_proxy.moderation.stream import Check, StreamModerator
from tests.moderation_fakes import (
    CHUNK,
    DONE,
    ManualCheck,
    chat,
    completion,
    event,
    payloads,
)

REFUSAL = "不行。"


class Harness:
    def __init__(self, kind: str = "chat", check: Check | None = None) -> None:
        self.check = ManualCheck()
        self.written: list[bytes] = []
        self.stops = 0
        self.moderator = StreamModerator(
            shape_for(kind),
            check if check is not None else self.check,
            self.written.append,
            self._stop,
            REFUSAL,
        )

    def _stop(self) -> None:
        self.stops += 1

    @property
    def output(self) -> bytes:
        return b"".join(self.written)

    def feed(self, *events: bytes) -> None:
        for data in events:
            self.moderator.feed(data)


def fired(d: Deferred[None]) -> bool:
    results: list[object] = []
    d.addBoth(results.append)
    return bool(results)


class ReleaseTests(TestCase):
    def test_events_without_text_go_out_at_once(self) -> None:
        h = Harness()
        role = chat(role="assistant", content="")
        h.feed(role)
        self.assertEqual(h.output, role)

    def test_events_already_cut_apart_are_taken_whole(self) -> None:
        # A WebSocket session hands over messages, not a byte stream: each
        # is one event, and write gets back its raw bytes as given.
        h = Harness()
        first = chat(content="你好。")
        event = SSEParser().feed(first)[0]
        h.moderator.feed_events([event])
        self.assertEqual(h.check.texts, ["你好。"])
        h.check.answer("你好。")
        self.assertEqual(h.written, [first])

    def test_event_held_until_its_sentence_passes(self) -> None:
        h = Harness()
        first = chat(content="你好。")
        h.feed(first)
        self.assertEqual((h.output, h.check.texts), (b"", ["你好。"]))
        h.check.answer("你好。")
        self.assertEqual(h.output, first)

    def test_sentence_sent_before_it_is_complete_event_wise(self) -> None:
        """A sentence spanning events is checked once complete; every event
        carrying part of it waits for it."""
        h = Harness()
        a, b = chat(content="Hel"), chat(content="lo! And")
        h.feed(a, b)
        self.assertEqual(h.check.texts, ["Hello!"])
        h.check.answer("Hello!")
        self.assertEqual(h.output, a)  # b also carries " And", still unchecked

    def test_out_of_order_answers_never_reorder_output(self) -> None:
        h = Harness()
        events = [chat(content=t) for t in ("一。", "二。", "三。")]
        h.feed(*events)
        h.check.answer("三。")
        h.check.answer("二。")
        self.assertEqual(h.output, b"")
        h.check.answer("一。")
        self.assertEqual(h.output, b"".join(events))

    def test_events_keep_their_place_behind_held_text(self) -> None:
        h = Harness()
        text, tool, usage = (
            chat(content="Hi!"),
            chat(tool_calls=[]),
            event({"usage": {}}),
        )
        h.feed(text, tool, usage)
        self.assertEqual(h.output, b"")
        h.check.answer("Hi!")
        self.assertEqual(h.output, text + tool + usage)

    def test_non_json_data_passes_through_in_place(self) -> None:
        h = Harness()
        odd = b"data: not json\n\n: ping\n\n"
        h.feed(chat(content="a!"), odd)
        h.check.answer("a!")
        self.assertEqual(h.output, chat(content="a!") + odd)

    def test_punctuation_only_sentences_are_not_sent(self) -> None:
        h = Harness()
        h.feed(chat(content="好……\n"))
        self.assertEqual(h.check.texts, ["好…"])

    def test_two_choices_moderated_separately(self) -> None:
        h = Harness()
        a0, a1, b0 = chat(0, "zero one. "), chat(1, "一。"), chat(0, "zero two!")
        h.feed(a0, a1, b0)
        self.assertEqual(h.check.texts, ["zero one.", "一。", " zero two!"])
        h.check.answer("一。")
        self.assertEqual(h.output, b"")  # a0 is first and not yet checked
        h.check.answer("zero one.")
        self.assertEqual(h.output, a0 + a1)  # b0 still waits for " zero two!"

    def test_completions_text_is_moderated(self) -> None:
        h = Harness("completions")
        h.feed(
            completion(text="Once upon a time."), completion(text=" End", finish="stop")
        )
        self.assertEqual(h.check.texts, ["Once upon a time.", " End"])


class EndTests(TestCase):
    def test_tail_moderated_before_done(self) -> None:
        h = Harness()
        body = chat(content="no punctuation") + chat(finish="stop") + DONE
        h.feed(body)
        self.assertEqual(h.check.texts, ["no punctuation"])
        d = h.moderator.end()
        self.assertEqual(h.output, b"")
        self.assertFalse(fired(d))
        h.check.answer("no punctuation")
        self.assertEqual(h.output, body)
        self.assertTrue(fired(d))

    def test_tail_checked_at_end_without_finish_event(self) -> None:
        h = Harness()
        h.feed(chat(content="cut off"))
        self.assertEqual(h.check.texts, [])
        d = h.moderator.end()
        self.assertEqual(h.check.texts, ["cut off"])
        h.check.answer("cut off")
        self.assertTrue(fired(d))
        self.assertEqual(h.output, chat(content="cut off"))

    def test_unterminated_last_event_forwarded(self) -> None:
        h = Harness()
        h.feed(b"data: [DO")
        self.assertTrue(fired(h.moderator.end()))
        self.assertEqual(h.output, b"data: [DO")

    def test_end_of_empty_stream_fires_at_once(self) -> None:
        h = Harness()
        self.assertTrue(fired(h.moderator.end()))
        self.assertEqual((h.output, h.moderator.blocked), (b"", False))


class BlockTests(TestCase):
    def test_block_in_sentence_k(self) -> None:
        h = Harness()
        role = chat(role="assistant", content="")
        e1, e2, e3 = (
            chat(content="好的。"),
            chat(content="坏的。"),
            chat(content="然后。"),
        )
        h.feed(role, e1, e2, e3)
        h.check.answer("然后。")
        h.check.answer("坏的。", stopped=True)
        self.assertEqual(h.output, role)  # "好的。" not answered yet
        h.check.answer("好的。")
        self.assertTrue(h.moderator.blocked)
        self.assertEqual(h.stops, 1)
        self.assertTrue(h.output.startswith(role + e1))
        self.assertEqual(
            payloads(h.output[len(role + e1) :]),
            [
                {
                    **CHUNK,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"content": REFUSAL},
                            "finish_reason": None,
                        }
                    ],
                },
                {
                    **CHUNK,
                    "choices": [
                        {"index": 0, "delta": {}, "finish_reason": "content_filter"}
                    ],
                },
                "[DONE]",
            ],
        )
        self.assertNotIn("然后".encode(), h.output)

    def test_text_before_block_in_a_shared_event_is_delivered(self) -> None:
        h = Harness()
        h.feed(chat(content="好。坏"), chat(content="事。"))
        h.check.answer("好。")
        self.assertEqual(h.output, b"")
        h.check.answer("坏事。", stopped=True)
        first, refusal, finish, done = payloads(h.output)
        self.assertEqual(first["choices"][0]["delta"], {"content": "好。"})
        self.assertEqual(refusal["choices"][0]["delta"], {"content": REFUSAL})
        self.assertEqual(finish["choices"][0]["finish_reason"], "content_filter")
        self.assertEqual(done, "[DONE]")
        self.assertNotIn("坏".encode(), h.output)

    def test_nothing_after_block_and_late_answers_dropped(self) -> None:
        h = Harness()
        h.feed(chat(content="bad!"), chat(content="more!"))
        h.check.answer("bad!", stopped=True)
        before = h.output
        self.assertEqual(h.check.cancelled, ["more!"])
        h.check.answer("more!")
        h.feed(chat(content="even more!") + DONE)
        self.assertTrue(fired(h.moderator.end()))
        self.assertEqual(h.output, before)
        self.assertEqual(h.check.texts, ["bad!", "more!"])

    def test_block_in_second_choice_names_its_index(self) -> None:
        h = Harness()
        h.feed(chat(0, "fine!"), chat(1, "nasty!"))
        h.check.answer("fine!")
        h.check.answer("nasty!", stopped=True)
        refusal, finish, _ = payloads(h.output[len(chat(0, "fine!")) :])
        self.assertEqual(refusal["choices"][0]["index"], 1)
        self.assertEqual(
            finish["choices"][0],
            {"index": 1, "delta": {}, "finish_reason": "content_filter"},
        )

    def test_earlier_events_of_other_choices_still_go_out_after_a_block(
        self,
    ) -> None:
        h = Harness()
        first, blocked, later = chat(0, "fine!"), chat(1, "nasty!"), chat(0, "more!")
        h.feed(first, blocked, later)
        h.check.answer("nasty!", stopped=True)
        self.assertEqual(h.stops, 1)  # the upstream is closed at once
        self.assertEqual(h.output, b"")  # but "fine!" has not been judged yet
        h.check.answer("fine!")
        self.assertTrue(h.output.startswith(first))
        refusal, finish, done = payloads(h.output[len(first) :])
        self.assertEqual(refusal["choices"][0]["index"], 1)
        self.assertEqual(done, "[DONE]")
        self.assertNotIn(b"more!", h.output)

    def test_later_passing_sentences_of_a_stopped_choice_stay_cut(self) -> None:
        h = Harness()
        first, blocked = chat(0, "fine!"), chat(1, "nasty! nice!")
        h.feed(first, blocked)
        h.check.answer("nasty!", stopped=True)
        h.check.answer(" nice!")  # passes, but comes after the stopped one
        h.check.answer("fine!")
        self.assertNotIn(b"nasty", h.output)
        self.assertNotIn(b"nice", h.output)
        self.assertTrue(h.output.startswith(first))

    def test_blocked_tail_while_end_waits(self) -> None:
        h = Harness()
        h.feed(chat(content="tail") + chat(finish="stop") + DONE)
        d = h.moderator.end()
        h.check.answer("tail", stopped=True)
        self.assertTrue(fired(d))
        self.assertEqual(
            [
                p if isinstance(p, str) else p["choices"][0]["finish_reason"]
                for p in payloads(h.output)
            ],
            [None, "content_filter", "[DONE]"],
        )

    def test_completions_refusal_shape(self) -> None:
        h = Harness("completions")
        h.feed(completion(text="bad!"))
        h.check.answer("bad!", stopped=True)
        refusal, finish, done = payloads(h.output)
        self.assertEqual(refusal["object"], "text_completion")
        self.assertEqual(refusal["id"], "cmpl-1")
        self.assertEqual(refusal["choices"][0]["text"], REFUSAL)
        self.assertEqual(finish["choices"][0]["finish_reason"], "content_filter")
        self.assertEqual(done, "[DONE]")

    def test_stop_upstream_may_end_the_stream_at_once(self) -> None:
        """The relay may call end() from inside stop_upstream."""
        ends: list[Deferred[None]] = []
        check = ManualCheck()
        written: list[bytes] = []
        moderator = StreamModerator(
            shape_for("chat"),
            check,
            written.append,
            lambda: ends.append(moderator.end()),
            REFUSAL,
        )
        moderator.feed(chat(content="x!"))
        check.answer("x!", stopped=True)
        self.assertTrue(fired(ends[0]))
        self.assertEqual(payloads(b"".join(written))[-1], "[DONE]")


class AbandonTests(TestCase):
    def test_abandon_drops_late_answers(self) -> None:
        h = Harness()
        h.feed(chat(content="a!"), chat(content="b!"))
        d = h.moderator.end()
        h.moderator.abandon()
        self.assertTrue(fired(d))
        self.assertEqual(h.check.cancelled, ["a!", "b!"])
        h.check.answer("a!")
        h.check.answer("b!", stopped=True)
        self.assertEqual((h.output, h.stops), (b"", 0))
        h.feed(chat(content="c!"))
        self.assertTrue(fired(h.moderator.end()))
        self.assertEqual(h.output, b"")


def responses_stream(*deltas: str) -> list[bytes]:
    created = {
        "id": "resp_1",
        "object": "response",
        "status": "in_progress",
        "output": [],
    }
    events = [
        event(
            {"type": "response.created", "sequence_number": 0, "response": created},
            "response.created",
        )
    ]
    for n, delta in enumerate(deltas, start=1):
        events.append(
            event(
                {
                    "type": "response.output_text.delta",
                    "sequence_number": n,
                    "item_id": "msg_1",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": delta,
                },
                "response.output_text.delta",
            )
        )
    text = "".join(deltas)
    n = len(deltas)
    events.append(
        event(
            {
                "type": "response.output_text.done",
                "sequence_number": n + 1,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "text": text,
            },
            "response.output_text.done",
        )
    )
    events.append(
        event(
            {
                "type": "response.completed",
                "sequence_number": n + 2,
                "response": {**created, "status": "completed"},
            },
            "response.completed",
        )
    )
    return events


class ResponsesTests(TestCase):
    def test_deltas_moderated_and_relayed_unchanged(self) -> None:
        h = Harness("responses")
        events = responses_stream("Hello. ", "World")
        h.feed(*events)
        self.assertEqual(h.check.texts, ["Hello.", " World"])  # done flushes the tail
        h.check.answer_all()
        self.assertEqual(h.output, b"".join(events))

    def test_block_emits_refusal_delta_and_incomplete(self) -> None:
        h = Harness("responses")
        events = responses_stream("Fine. ", "Awful!", " More.")
        h.feed(*events)
        h.check.answer("Fine.")
        h.check.answer(" Awful!", stopped=True)
        self.assertEqual(h.stops, 1)
        out = h.output
        self.assertTrue(out.startswith(events[0] + events[1]))
        refusal, incomplete = payloads(out[len(events[0] + events[1]) :])
        self.assertEqual(refusal["type"], "response.output_text.delta")
        self.assertEqual(
            (refusal["delta"], refusal["item_id"], refusal["output_index"]),
            (REFUSAL, "msg_1", 0),
        )
        self.assertEqual(refusal["sequence_number"], 6)
        self.assertEqual(incomplete["type"], "response.incomplete")
        self.assertEqual(incomplete["response"]["id"], "resp_1")
        self.assertEqual(incomplete["response"]["status"], "incomplete")
        self.assertEqual(
            incomplete["response"]["incomplete_details"], {"reason": "content_filter"}
        )
        self.assertNotIn(b"[DONE]", out)
        self.assertIn(b"event: response.incomplete\n", out)


_TEXTS = st.sampled_from(
    ["你好。", "Hello. ", "wor", "ld", "！\n", "a" * 130, "", "é😀", "? "]
)


def _chat_stream(parts: list[tuple[int, str]], crlf: bool) -> bytes:
    body = chat(role="assistant", content="")
    for index, text in parts:
        body += chat(index, text) if text else b": keep-alive\n\n"
    body += (
        chat(finish="stop")
        + event({**CHUNK, "choices": [], "usage": {"total_tokens": 3}})
        + DONE
    )
    return body.replace(b"\n", b"\r\n") if crlf else body


class PropertyTests(TestCase):
    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, 1), _TEXTS), max_size=25),
        st.booleans(),
        st.lists(st.integers(0, 5000), max_size=20),
    )
    def test_passing_backend_output_equals_upstream(
        self, parts: list[tuple[int, str]], crlf: bool, cuts: list[int]
    ) -> None:
        body = _chat_stream(parts, crlf)
        h = Harness(check=lambda text: succeed(False))
        points = sorted({min(c, len(body)) for c in cuts})
        start = 0
        for point in [*points, len(body)]:
            h.moderator.feed(body[start:point])
            start = point
        self.assertTrue(fired(h.moderator.end()))
        self.assertEqual(h.output, body)

    @settings(max_examples=100, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, 1), _TEXTS), max_size=20),
        st.lists(st.integers(0, 3000), max_size=10),
        st.randoms(use_true_random=False),
    )
    def test_answers_in_any_order_give_upstream_bytes(
        self, parts: list[tuple[int, str]], cuts: list[int], rng: random.Random
    ) -> None:
        body = _chat_stream(parts, False)
        h = Harness()
        points = sorted({min(c, len(body)) for c in cuts})
        start = 0
        for point in [*points, len(body)]:
            h.moderator.feed(body[start:point])
            start = point
            pending = [d for _, d in h.check.asked if not d.called]
            for d in rng.sample(pending, len(pending) // 2):
                d.callback(False)
            self.assertTrue(body.startswith(h.output))
        d = h.moderator.end()
        pending = [d for _, d in h.check.asked if not d.called]
        rng.shuffle(pending)
        for answer in pending:
            answer.callback(False)
        self.assertTrue(fired(d))
        self.assertEqual(h.output, body)


class ResponsesPropertyTests(TestCase):
    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(_TEXTS, max_size=15),
        st.lists(st.integers(0, 4000), max_size=15),
    )
    def test_passing_backend_output_equals_upstream(
        self, deltas: list[str], cuts: list[int]
    ) -> None:
        body = b"".join(responses_stream(*deltas))
        h = Harness("responses", check=lambda text: succeed(False))
        start = 0
        for point in [*sorted({min(c, len(body)) for c in cuts}), len(body)]:
            h.moderator.feed(body[start:point])
            start = point
        self.assertTrue(fired(h.moderator.end()))
        self.assertEqual(h.output, body)
