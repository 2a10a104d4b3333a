"""
The request fields C{moderation} and C{moderation_level}, spelled the ways a
Node project user sends them: read over real loopback, through the real
Tencent SDK and a fake TMS, and never sent upstream.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import TestCase

from openai_proxy.moderation import RequestRefused
from openai_proxy.moderation.policy import requested_level, requested_moderation
from tests.fake_upstream import Script, chat_stream
from tests.harness import AUTH, JSON, REFUSAL, ModeratedRelayTestCase

ON = [True, 1, 2, -1, 0.5, "true", "TRUE", "1", "yes", "Yes", "on", "ON", " on "]
OFF = [False, 0, 0.0, None, "", "false", "False", "0", "no", "NO", "off", "Off"]
BAD = ["maybe", "y", "2", [], {}, [True], "truthy"]


class RequestedModerationTests(TestCase):
    def test_yes_values(self) -> None:
        for value in ON:
            self.assertTrue(requested_moderation({"moderation": value}), value)

    def test_no_values_and_no_field(self) -> None:
        for value in OFF:
            self.assertFalse(requested_moderation({"moderation": value}), value)
        self.assertFalse(requested_moderation({}))
        self.assertFalse(requested_moderation(None))

    def test_any_other_value_is_refused_naming_the_field(self) -> None:
        for value in BAD:
            with self.assertRaises(RequestRefused) as e:
                requested_moderation({"moderation": value})
            self.assertEqual(e.exception.code, "invalid_moderation")
            self.assertEqual(e.exception.param, "moderation")
            self.assertIn("moderation", e.exception.message)

    def test_level_is_case_insensitive(self) -> None:
        for asked in ("HIGH", "High", " high "):
            level = requested_level("request", "low", {"moderation_level": asked})
            self.assertEqual(level, "high")
        level = requested_level("request", "high", {"moderation_level": "LOW"})
        self.assertEqual(level, "low")

    def test_unknown_level_is_refused(self) -> None:
        for asked in ("extreme", 1, ["high"], ""):
            with self.assertRaises(RequestRefused) as e:
                requested_level("request", "low", {"moderation_level": asked})
            self.assertEqual(e.exception.code, "invalid_moderation_level")
            self.assertEqual(e.exception.param, "moderation_level")


class ModerationFieldOverHTTPTests(ModeratedRelayTestCase):
    async def send(self, raw: bytes) -> tuple[int, bytes]:
        self.fake.script = Script(events=chat_stream(["A bomb."]))
        response = await self.http.post(
            self.url("/v1/chat/completions"), raw, headers={**AUTH, **JSON}
        )
        return response.code, await response.content()

    def checked(self) -> list[Any]:
        return [c.text for c in self.tms.calls if c.text != "ping"]

    async def test_every_yes_spelling_turns_moderation_on(self) -> None:
        for value in ON:
            before = len(self.checked())
            raw = json.dumps({"stream": True, "model": "m", "moderation": value})
            code, body = await self.send(raw.encode())
            self.assertEqual(code, 200, value)
            self.assertIn(REFUSAL.encode(), body, value)
            self.assertNotIn(b"bomb", body, value)
            self.assertGreater(len(self.checked()), before, value)
            self.assertEqual(
                self.fake.received[-1].json(), {"stream": True, "model": "m"}
            )

    async def test_every_no_spelling_leaves_moderation_off(self) -> None:
        for value in OFF:
            raw = json.dumps({"stream": True, "model": "m", "moderation": value})
            code, body = await self.send(raw.encode())
            self.assertEqual(code, 200, value)
            self.assertEqual(body, b"".join(chat_stream(["A bomb."])), value)
            self.assertEqual(
                self.fake.received[-1].json(), {"stream": True, "model": "m"}
            )
        self.assertEqual(self.checked(), [])

    async def test_spacing_and_key_order_do_not_hide_the_field(self) -> None:
        for raw in (
            b'{"moderation" : "on", "stream": true}',
            b'{ "stream":true,"moderation":1}',
            b'{"stream": true,\n  "moderation"\t:\t"YES"\n}',
        ):
            code, body = await self.send(raw)
            self.assertEqual(code, 200, raw)
            self.assertIn(REFUSAL.encode(), body, raw)
            self.assertEqual(self.fake.received[-1].json(), {"stream": True})

    async def test_any_other_value_is_400_naming_the_field(self) -> None:
        for value in BAD:
            raw = json.dumps({"stream": True, "moderation": value}).encode()
            code, body = await self.send(raw)
            self.assertEqual(code, 400, value)
            error = json.loads(body)["error"]
            self.assertEqual(error["code"], "invalid_moderation")
            self.assertEqual(error["param"], "moderation")
            self.assertEqual(error["type"], "invalid_request_error")
            self.assertIn("moderation", error["message"])
        self.assertEqual(self.fake.received, [])

    async def test_level_in_any_case(self) -> None:
        self.fake.script = Script(events=chat_stream(["Some gossip."]))
        raw = b'{"stream": true, "moderation": "yes", "moderation_level": "HIGH"}'
        response = await self.http.post(
            self.url("/v1/chat/completions"), raw, headers={**AUTH, **JSON}
        )
        self.assertIn(REFUSAL.encode(), await response.content())
        self.assertEqual(self.fake.received[-1].json(), {"stream": True})

    async def test_unknown_level_is_400(self) -> None:
        raw = b'{"stream": true, "moderation": true, "moderation_level": "max"}'
        code, body = await self.send(raw)
        self.assertEqual(code, 400)
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], "invalid_moderation_level")
        self.assertEqual(error["param"], "moderation_level")
        self.assertEqual(self.fake.received, [])
