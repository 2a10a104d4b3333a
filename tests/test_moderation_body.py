"""Tests for moderating replies that are not streamed (L{Plan.moderate_body})."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from openai_proxy.moderation import Moderation, ModerationConfig, Plan, Verdict
from tests.moderation_fakes import FixedBackend

REFUSAL = "换个话题吧。"


def plan(kind_path: bytes, backend: FixedBackend) -> Plan:
    config = ModerationConfig(
        mode="always", backend="keywords", keywords_file="x", refusal_text=REFUSAL
    )
    p = Moderation(config, Clock(), backend=backend).plan(kind_path, {})
    assert p is not None
    return p


def run(p: Plan, body: Any) -> tuple[Any, bool]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    out: list[tuple[bytes, bool]] = []
    p.moderate_body(raw, "sk-u").addCallback(out.append)
    [(new, blocked)] = out
    if new == raw:
        return raw, blocked
    return json.loads(new), blocked


BLOCKING = FixedBackend({"bomb": Verdict.BLOCK, "meh": Verdict.REVIEW})


def chat_reply(*contents: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c},
                "finish_reason": "stop",
            }
            for i, c in enumerate(contents)
        ],
    }


class ChatBodyTests(TestCase):
    def test_passing_body_is_unchanged_bytes(self) -> None:
        raw = json.dumps(chat_reply("hello", "world"), indent=2).encode()
        self.assertEqual(
            run(plan(b"/v1/chat/completions", BLOCKING), raw), (raw, False)
        )

    def test_blocked_choice_replaced(self) -> None:
        reply, blocked = run(
            plan(b"/v1/chat/completions", BLOCKING), chat_reply("fine", "a bomb")
        )
        self.assertTrue(blocked)
        self.assertEqual(reply["choices"][0], chat_reply("fine")["choices"][0])
        self.assertEqual(reply["choices"][1]["message"]["content"], REFUSAL)
        self.assertEqual(reply["choices"][1]["finish_reason"], "content_filter")

    def test_long_text_checked_in_pieces(self) -> None:
        backend = FixedBackend({"bomb": Verdict.BLOCK})
        reply, blocked = run(
            plan(b"/v1/chat/completions", backend), chat_reply("a" * 15_000 + "bomb")
        )
        self.assertTrue(blocked)
        self.assertEqual([len(t) for t, _ in backend.asked], [10_000, 5_004])
        self.assertEqual(backend.asked[0][1], "sk-u")

    def test_non_json_and_odd_shapes_pass_through(self) -> None:
        p = plan(b"/v1/chat/completions", BLOCKING)
        for raw in (
            b"not json bomb",
            b"[1, 2]",
            b'{"error": {"message": "bomb"}}',
            b'{"choices": "bomb"}',
        ):
            self.assertEqual(run(p, raw), (raw, False))

    def test_null_content_ignored(self) -> None:
        reply = chat_reply("x")
        reply["choices"][0]["message"]["content"] = None
        raw = json.dumps(reply).encode()
        self.assertEqual(
            run(plan(b"/v1/chat/completions", BLOCKING), raw), (raw, False)
        )


class CompletionsBodyTests(TestCase):
    def test_blocked_text_replaced(self) -> None:
        body = {
            "choices": [{"index": 0, "text": "bomb recipe", "finish_reason": "length"}]
        }
        reply, blocked = run(plan(b"/v1/completions", BLOCKING), body)
        self.assertTrue(blocked)
        self.assertEqual(
            reply["choices"][0],
            {"index": 0, "text": REFUSAL, "finish_reason": "content_filter"},
        )


def responses_reply(*texts: str) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "incomplete_details": None,
        "output": [
            {"type": "reasoning", "summary": []},
            {
                "type": "message",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": t, "annotations": [{"x": 1}]}
                    for t in texts
                ],
            },
        ],
    }


class ResponsesBodyTests(TestCase):
    def test_blocked_output_text_and_status(self) -> None:
        reply, blocked = run(
            plan(b"/v1/responses", BLOCKING), responses_reply("ok", "bomb")
        )
        self.assertTrue(blocked)
        parts = reply["output"][1]["content"]
        self.assertEqual(parts[0]["text"], "ok")
        self.assertEqual(
            parts[1], {"type": "output_text", "text": REFUSAL, "annotations": []}
        )
        self.assertEqual(reply["status"], "incomplete")
        self.assertEqual(reply["incomplete_details"], {"reason": "content_filter"})

    def test_review_passes_at_low_level(self) -> None:
        raw = json.dumps(responses_reply("meh")).encode()
        self.assertEqual(run(plan(b"/v1/responses", BLOCKING), raw), (raw, False))
