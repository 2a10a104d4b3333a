"""Tests for MODERATE_INPUT (L{Moderation.check_input})."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from openai_proxy.moderation import (
    Moderation,
    ModerationConfig,
    RequestRefused,
    Verdict,
)
from openai_proxy.moderation.inputs import input_text
from tests.moderation_fakes import FixedBackend


def moderation(moderate_input: bool = True) -> tuple[Moderation, FixedBackend]:
    backend = FixedBackend({"bomb": Verdict.BLOCK})
    config = ModerationConfig(
        mode="request",
        backend="keywords",
        keywords_file="x",
        moderate_input=moderate_input,
    )
    return Moderation(config, Clock(), backend=backend), backend


class InputTextTests(TestCase):
    def test_chat_user_and_system_text(self) -> None:
        body = {
            "messages": [
                {"role": "system", "content": "be nice"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hi"},
                        {"type": "image_url", "image_url": {}},
                    ],
                },
                {"role": "assistant", "content": "not me"},
                {"role": "tool", "content": "nor me"},
                {"role": "developer", "content": "dev"},
            ]
        }
        self.assertEqual(input_text("chat", body), "be nice\n\nhi\n\ndev")

    def test_completions_prompt(self) -> None:
        self.assertEqual(input_text("completions", {"prompt": "p"}), "p")
        self.assertEqual(
            input_text("completions", {"prompt": ["a", "b", [1, 2]]}), "a\n\nb"
        )

    def test_responses_instructions_and_input(self) -> None:
        self.assertEqual(
            input_text("responses", {"instructions": "i", "input": "x"}), "i\n\nx"
        )
        body = {
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "q"}]},
                {"type": "message", "content": "plain"},
                {"type": "function_call_output", "output": "skip"},
                {"role": "assistant", "content": "skip"},
            ]
        }
        self.assertEqual(input_text("responses", body), "q\n\nplain")


class CheckInputTests(TestCase):
    def outcome(self, m: Moderation, body: dict[str, Any]) -> Any:
        out: list[Any] = []
        m.check_input(b"/v1/chat/completions", body, "sk-u").addBoth(out.append)
        [result] = out
        return result

    def test_clean_input_passes(self) -> None:
        m, backend = moderation()
        body = {"moderation": True, "messages": [{"role": "user", "content": "hello"}]}
        self.assertIsNone(self.outcome(m, body))
        self.assertEqual(backend.asked, [("hello", "sk-u")])

    def test_blocked_input_refused_with_content_filter(self) -> None:
        m, _ = moderation()
        body = {"moderation": True, "messages": [{"role": "user", "content": "a bomb"}]}
        failure = self.outcome(m, body)
        failure.trap(RequestRefused)
        self.assertEqual(
            (failure.value.status, failure.value.code), (400, "content_filter")
        )

    def test_off_unless_moderate_input(self) -> None:
        m, backend = moderation(moderate_input=False)
        body = {"moderation": True, "messages": [{"role": "user", "content": "a bomb"}]}
        self.assertIsNone(self.outcome(m, body))
        self.assertEqual(backend.asked, [])

    def test_input_checked_even_when_the_reply_is_not_moderated(self) -> None:
        m, backend = moderation()
        failure = self.outcome(m, {"messages": [{"role": "user", "content": "a bomb"}]})
        failure.trap(RequestRefused)
        self.assertEqual(backend.asked, [("a bomb", "sk-u")])

    def test_other_paths_not_checked(self) -> None:
        m, backend = moderation()
        out: list[Any] = []
        body = {"input": "a bomb"}
        m.check_input(b"/v1/embeddings", body, "sk-u").addBoth(out.append)
        self.assertEqual(out, [None])
        self.assertEqual(backend.asked, [])
