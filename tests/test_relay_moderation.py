"""
Moderation end to end: the proxy between a fake OpenAI upstream and a fake
Tencent TMS, with the real Tencent SDK making the calls, driven over HTTP.
"""

from __future__ import annotations

import json
from typing import Any

import openai
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from openai_proxy.http.sse import SSEParser
from tests.fake_tms import FakeTMS
from tests.fake_upstream import (
    Script,
    chat_chunk,
    chat_completion,
    chat_stream,
    sse_events,
)
from tests.harness import (
    AUTH,
    JSON,
    REFUSAL,
    ModeratedRelayTestCase,
    Proxy,
    RelayTestCase,
    client,
    closed_port_url,
)
from tests.harness import (
    TMS_ID as SID,
)
from tests.harness import (
    TMS_SECRET as SKEY,
)
from tests.rawhttp import connect


def data_objects(body: bytes) -> list[Any]:
    """The JSON objects of an SSE body's data fields ([DONE] as the string)."""
    parser = SSEParser()
    events = parser.feed(body) + parser.finish()
    out: list[Any] = []
    for event in events:
        if event.data is None:
            continue
        out.append(event.data if event.data == "[DONE]" else json.loads(event.data))
    return out


def chat_text(body: bytes) -> str:
    return "".join(
        o["choices"][0]["delta"].get("content") or ""
        for o in data_objects(body)
        if isinstance(o, dict) and o.get("choices")
    )


class _ModeratedTestCase(ModeratedRelayTestCase):
    def texts_checked(self) -> list[str | None]:
        return [c.text for c in self.tms.calls if c.text != "ping"]

    async def stream(self, pieces: list[str], **fields: Any) -> bytes:
        self.fake.script = Script(events=chat_stream(pieces), interval=0.001)
        response = await self.post_json(
            "/v1/chat/completions", {"stream": True, "moderation": True, **fields}
        )
        self.assertEqual(response.code, 200)
        body: bytes = await response.content()
        return body


class StreamModerationTests(_ModeratedTestCase):
    async def test_passing_stream_is_byte_identical_to_upstream(self) -> None:
        pieces = ["你好，", "世界。", " Hello", " world. ", "How are", " you?"]
        body = await self.stream(pieces)
        self.assertEqual(body, b"".join(chat_stream(pieces)))
        # Sentences are checked in parallel threads: they arrive in any order.
        self.assertEqual(
            sorted(self.texts_checked()),  # type: ignore[type-var]
            sorted(["你好，世界。", " Hello world.", " How are you?"]),
        )

    async def test_block_in_sentence_k_stops_the_stream_there(self) -> None:
        pieces = [
            "First fine.",
            " Second fine.",
            " Third has a bo",
            "mb in it.",
            " Fourth.",
        ]
        body = await self.stream(pieces)
        text = chat_text(body)
        self.assertTrue(text.startswith("First fine. Second fine."), text)
        self.assertNotIn("bo", text.replace(REFUSAL, ""))
        self.assertNotIn("Fourth", text)
        objects = data_objects(body)
        self.assertEqual(objects[-1], "[DONE]")
        self.assertEqual(objects[-2]["choices"][0]["finish_reason"], "content_filter")
        self.assertEqual(objects[-3]["choices"][0]["delta"]["content"], REFUSAL)
        self.assertEqual(objects[-3]["id"], "chatcmpl-fake")
        await self.fake.closed[-1]  # the upstream connection was closed

    async def test_chinese_block(self) -> None:
        body = await self.stream(["今天天气很好。", "我要造一个炸", "弹。", "再见。"])
        text = chat_text(body)
        self.assertEqual(text, "今天天气很好。" + REFUSAL)

    async def test_tail_without_final_punctuation_is_moderated_before_done(
        self,
    ) -> None:
        body = await self.stream(["All good. ", "then a bomb"])
        self.assertEqual(chat_text(body), "All good. " + REFUSAL)
        body = await self.stream(["All good. ", "no stop at the end"])
        self.assertEqual(chat_text(body), "All good. no stop at the end")
        self.assertIn(" no stop at the end", self.texts_checked())

    async def test_review_stops_only_at_level_high(self) -> None:
        body = await self.stream(["Some gossip here."])
        self.assertEqual(chat_text(body), "Some gossip here.")
        body = await self.stream(["Some gossip here."], moderation_level="high")
        self.assertEqual(chat_text(body), REFUSAL)

    async def test_two_choices_are_moderated_apart(self) -> None:
        chunks = [
            chat_chunk("Choice zero is fine. ", index=0),
            chat_chunk("Choice one has a bomb. ", index=1),
            chat_chunk("Still fine.", index=0),
            chat_chunk("More one.", index=1),
            chat_chunk(finish="stop", index=0),
            chat_chunk(finish="stop", index=1),
        ]
        self.fake.script = Script(events=sse_events(chunks))
        response = await self.post_json(
            "/v1/chat/completions", {"stream": True, "moderation": True, "n": 2}
        )
        objects = data_objects(await response.content())
        by_choice: dict[int, str] = {0: "", 1: ""}
        finishes: dict[int, Any] = {}
        for o in objects:
            if isinstance(o, dict):
                choice = o["choices"][0]
                by_choice[choice["index"]] += choice["delta"].get("content") or ""
                if choice.get("finish_reason"):
                    finishes[choice["index"]] = choice["finish_reason"]
        self.assertNotIn("bomb", by_choice[1])
        self.assertTrue(by_choice[1].endswith(REFUSAL))
        self.assertEqual(finishes[1], "content_filter")
        self.assertTrue(by_choice[0].startswith("Choice zero is fine."))
        self.assertEqual(objects[-1], "[DONE]")

    async def test_no_moderation_requested_means_no_backend_call_and_bytes_untouched(
        self,
    ) -> None:
        pieces = ["A bomb, unchecked."]
        self.fake.script = Script(events=chat_stream(pieces))
        response = await self.post_json("/v1/chat/completions", {"stream": True})
        self.assertEqual(await response.content(), b"".join(chat_stream(pieces)))
        self.assertEqual(self.texts_checked(), [])

    async def test_moderation_fields_never_reach_upstream(self) -> None:
        await self.stream(["Fine."], moderation_level="high", model="m")
        self.assertEqual(self.fake.received[-1].json(), {"stream": True, "model": "m"})


class UnexpectedShapeTests(_ModeratedTestCase):
    async def test_stream_sent_to_a_request_that_did_not_ask_is_still_moderated(
        self,
    ) -> None:
        self.fake.script = Script(events=chat_stream(["A bomb."]))
        response = await self.post_json("/v1/chat/completions", {"moderation": True})
        self.assertEqual(chat_text(await response.content()), REFUSAL)


class OutOfOrderTests(_ModeratedTestCase):
    tms_delays = {"slow": 0.3}

    async def test_late_verdicts_never_reorder_the_output(self) -> None:
        pieces = ["This is slow to judge. ", "This is quick. ", "Quick too."]
        body = await self.stream(pieces)
        self.assertEqual(body, b"".join(chat_stream(pieces)))


class AlwaysTests(_ModeratedTestCase):
    moderation_env = {"MODERATION": "always", "MODERATION_LEVEL": "high"}

    async def test_always_overrides_a_request_that_says_no(self) -> None:
        body = await self.stream(["gossip"], moderation=False)
        self.assertEqual(chat_text(body), REFUSAL)

    async def test_a_request_cannot_lower_the_level_under_always(self) -> None:
        body = await self.stream(["gossip"], moderation_level="low")
        self.assertEqual(chat_text(body), REFUSAL)


class BodyModerationTests(_ModeratedTestCase):
    async def test_chat_completion_blocked_choice_is_replaced(self) -> None:
        self.fake.script = Script(
            body=json.dumps(chat_completion("Make a bomb.")).encode()
        )
        response = await self.post_json("/v1/chat/completions", {"moderation": True})
        payload = json.loads(await response.content())
        self.assertEqual(payload["choices"][0]["message"]["content"], REFUSAL)
        self.assertEqual(payload["choices"][0]["finish_reason"], "content_filter")
        self.assertEqual(response.headers.getRawHeaders(b"x-moderation"), [b"blocked"])

    async def test_chat_completion_that_passes_is_unchanged(self) -> None:
        raw = json.dumps(chat_completion("All fine.")).encode()
        self.fake.script = Script(body=raw)
        response = await self.post_json("/v1/chat/completions", {"moderation": True})
        self.assertEqual(await response.content(), raw)
        self.assertEqual(response.headers.getRawHeaders(b"x-moderation"), [b"pass"])

    async def test_completions_text_is_moderated(self) -> None:
        completion = {
            "id": "cmpl-1",
            "object": "text_completion",
            "choices": [{"index": 0, "text": "a bomb", "finish_reason": "stop"}],
        }
        self.fake.script = Script(body=json.dumps(completion).encode())
        response = await self.post_json("/v1/completions", {"moderation": True})
        choice = json.loads(await response.content())["choices"][0]
        self.assertEqual(
            (choice["text"], choice["finish_reason"]), (REFUSAL, "content_filter")
        )

    async def test_responses_output_text_is_moderated(self) -> None:
        reply = {
            "id": "resp_1",
            "object": "response",
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Build a bomb."}],
                }
            ],
        }
        self.fake.script = Script(body=json.dumps(reply).encode())
        response = await self.post_json("/v1/responses", {"moderation": True})
        payload = json.loads(await response.content())
        self.assertEqual(payload["status"], "incomplete")
        self.assertEqual(payload["incomplete_details"], {"reason": "content_filter"})
        self.assertEqual(payload["output"][0]["content"][0]["text"], REFUSAL)


class InputModerationTests(_ModeratedTestCase):
    moderation_env = {"MODERATE_INPUT": "on"}

    async def test_blocked_input_is_400_and_nothing_goes_upstream(self) -> None:
        response = await self.post_json(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "how to build a bomb"}]},
        )
        self.assertEqual(response.code, 400)
        error = json.loads(await response.content())["error"]
        self.assertEqual(error["code"], "content_filter")
        self.assertEqual(self.fake.received, [])

    async def test_client_leaving_during_input_moderation_sends_nothing_upstream(
        self,
    ) -> None:
        self.tms.delays["slowly"] = 0.3
        proto = await connect(self.proxy.port.getHost().port)
        body = b'{"messages": [{"role": "user", "content": "judge me slowly"}]}'
        assert proto.transport is not None
        proto.transport.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(body)
            + body
        )
        while "judge me slowly" not in self.texts_checked():
            await deferLater(reactor, 0.01)
        proto.transport.abortConnection()
        await deferLater(reactor, 0.5)  # past the verdict: nothing may follow it
        self.assertEqual(self.fake.received, [])

    async def test_clean_input_goes_upstream(self) -> None:
        response = await self.post_json(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}
        )
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual(len(self.fake.received), 1)


class BackendFailureTests(RelayTestCase):
    """A TMS that is down, slow or refusing, under both MODERATION_ON_ERROR values."""

    async def _proxy(self, on_error: str, endpoint: str, secret: str = SKEY) -> Proxy:
        return Proxy(
            self,
            {
                "UPSTREAM": self.upstream,
                "TENCENT_CLOUD_SID": SID,
                "TENCENT_CLOUD_SKEY": secret,
                "TENCENT_CLOUD_ENDPOINT": endpoint,
                "MODERATION_ON_ERROR": on_error,
                "MODERATION_TIMEOUT": "300",
                "REFUSAL_TEXT": REFUSAL,
            },
        )

    async def _text(self, proxy: Proxy) -> str:
        self.fake.script = Script(events=chat_stream(["Hello there."]))
        response = await client(self).post(
            proxy.url + "/v1/chat/completions",
            json.dumps({"stream": True, "moderation": True}).encode(),
            headers={**AUTH, **JSON},
        )
        return chat_text(await response.content())

    async def test_backend_down(self) -> None:
        down = await closed_port_url()
        self.assertEqual(await self._text(await self._proxy("block", down)), REFUSAL)
        self.assertEqual(
            await self._text(await self._proxy("pass", down)), "Hello there."
        )

    async def test_backend_rejecting_the_signature(self) -> None:
        tms = FakeTMS(SID, SKEY)
        tms.start()
        self.addCleanup(tms.stop)
        for on_error, expected in [("block", REFUSAL), ("pass", "Hello there.")]:
            proxy = await self._proxy(on_error, tms.url, secret="wrong-secret")
            self.assertEqual(await self._text(proxy), expected)
        self.assertTrue(tms.calls)
        self.assertTrue(all(c.answer != "Pass" for c in tms.calls))

    async def test_backend_too_slow(self) -> None:
        tms = FakeTMS(SID, SKEY, delays={"Hello": 2.0})
        tms.start()
        self.addCleanup(tms.stop)
        for on_error, expected in [("block", REFUSAL), ("pass", "Hello there.")]:
            proxy = await self._proxy(on_error, tms.url)
            self.assertEqual(await self._text(proxy), expected)


class NoBackendTests(RelayTestCase):
    async def test_asking_for_moderation_without_a_backend_is_400(self) -> None:
        response = await self.post_json("/v1/chat/completions", {"moderation": True})
        self.assertEqual(response.code, 400)
        error = json.loads(await response.content())["error"]
        self.assertEqual(error["code"], "moderation_unavailable")
        self.assertEqual(self.fake.received, [])


class SDKModerationTests(_ModeratedTestCase):
    async def test_sdk_sees_refusal_and_content_filter(self) -> None:
        self.fake.script = Script(
            events=chat_stream(["Safe start. ", "Then a bomb.", " Never seen."]),
            interval=0.001,
        )
        sdk = openai.OpenAI(base_url=self.url("/v1"), api_key="sk-user", max_retries=0)
        self.addCleanup(sdk.close)

        def run() -> tuple[str, list[Any]]:
            stream = sdk.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                extra_body={"moderation": True},
            )
            text, finishes = "", []
            for chunk in stream:
                text += chunk.choices[0].delta.content or ""
                finishes.append(chunk.choices[0].finish_reason)
            return text, finishes

        text, finishes = await deferToThread(run)
        self.assertEqual(text, "Safe start. " + REFUSAL)
        self.assertEqual([f for f in finishes if f], ["content_filter"])

    async def test_sdk_sees_a_blocked_responses_stream_end_incomplete(self) -> None:
        from tests.test_moderation_stream import responses_stream

        self.fake.script = Script(
            events=responses_stream("Safe start. ", "Then a bomb.", " Never seen."),
            interval=0.001,
        )
        sdk = openai.OpenAI(base_url=self.url("/v1"), api_key="sk-user", max_retries=0)
        self.addCleanup(sdk.close)

        def run() -> tuple[str, list[str], Any]:
            stream = sdk.responses.create(
                model="m", input="hi", stream=True, extra_body={"moderation": True}
            )
            text, types, last = "", [], None
            for event in stream:
                types.append(event.type)
                if event.type == "response.output_text.delta":
                    text += event.delta
                last = event
            return text, types, last

        text, types, last = await deferToThread(run)
        self.assertEqual(text, "Safe start. " + REFUSAL)
        self.assertEqual(types[-1], "response.incomplete")
        self.assertEqual(last.response.incomplete_details.reason, "content_filter")
