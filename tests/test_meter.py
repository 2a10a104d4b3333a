"""
Counting a reply's tokens: its usage read from its place in the document
(never from a client's own fields), and an estimate charged for a reply
that ends without usage (a stream the client abandons, say).
"""

from __future__ import annotations

import json
from typing import Any

import openai
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from openai_proxy.keys.limits import Usage
from openai_proxy.keys.usage import Meter, estimate
from tests.fake_upstream import Script, chat_chunk, chat_stream, sse_events
from tests.harness import RelayTestCase
from tests.test_keys import keys_file

METERED = "pk-metered-5e1f0c"
ADMIN = "admin-meter-4471"


def responses_reply(
    usage: dict[str, int] | None, metadata: dict[str, str], text: str = "Hi"
) -> dict[str, Any]:
    """A Responses API object, its metadata (the client's) after its usage."""
    reply: dict[str, Any] = {
        "id": "resp_fake",
        "object": "response",
        "created_at": 1700000000,
        "status": "completed",
        "model": "gpt-fake",
        "output": [
            {
                "id": "msg_fake",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }
    if usage is not None:
        reply["usage"] = usage
    reply["metadata"] = metadata
    return reply


USAGE_3000 = {"input_tokens": 1000, "output_tokens": 2000, "total_tokens": 3000}
# What a client puts in its metadata to look like a reply that used nothing.
ZERO_METADATA = {"usage": '{"input_tokens": 0, "output_tokens": 0}'}


def meter_json(body: bytes, pieces: int = 3, request_bytes: int = 0) -> Meter:
    passed: list[bytes] = []
    meter = Meter(passed.append, sse=False, strip=False, request_bytes=request_bytes)
    step = len(body) // pieces + 1
    for at in range(0, len(body), step):
        meter.feed(body[at : at + step])
    meter.end()
    assert b"".join(passed) == body
    return meter


def meter_stream(
    events: list[bytes], request_bytes: int = 0, strip: bool = False
) -> tuple[Meter, bytes]:
    passed: list[bytes] = []
    meter = Meter(passed.append, sse=True, strip=strip, request_bytes=request_bytes)
    for event in events:
        meter.feed(event)
    meter.end()
    return meter, b"".join(passed)


class JSONReplyUsageTests(SynchronousTestCase):
    """Item 4: the usage of a JSON reply is its top-level member."""

    def test_usage_in_the_clients_metadata_is_not_the_replys(self) -> None:
        body = json.dumps(responses_reply(USAGE_3000, ZERO_METADATA)).encode()
        meter = meter_json(body)
        self.assertEqual(meter.usage, Usage(1000, 2000))
        self.assertFalse(meter.estimated)
        nested = {"usage": {"input_tokens": 0, "output_tokens": 0}}
        body = json.dumps(responses_reply(USAGE_3000, nested)).encode()
        self.assertEqual(meter_json(body).usage, Usage(1000, 2000))

    def test_a_reply_without_usage_is_not_charged_the_metadatas(self) -> None:
        for metadata in (ZERO_METADATA, {"usage": {"input_tokens": 0}}):
            body = json.dumps(responses_reply(None, metadata)).encode()
            self.assertIsNone(meter_json(body, request_bytes=400).usage)

    def test_a_large_reply_is_read_as_it_passes(self) -> None:
        # Over 64 KiB: not parsed whole, and not held whole either.
        text = 'word \\ "usage": {} ' * 20_000
        body = json.dumps(responses_reply(USAGE_3000, ZERO_METADATA, text)).encode()
        self.assertGreater(len(body), 300_000)
        meter = meter_json(body, pieces=40)
        self.assertEqual(meter.usage, Usage(1000, 2000))
        self.assertEqual(meter._chunks, [])

    def test_counts_that_are_not_counts_are_ignored(self) -> None:
        for usage in (
            {"prompt_tokens": -5000, "completion_tokens": 1},
            {"prompt_tokens": True, "completion_tokens": 1},
            {"prompt_tokens": "12", "completion_tokens": 1},
        ):
            body = json.dumps({"object": "chat.completion", "usage": usage}).encode()
            self.assertIsNone(meter_json(body).usage, usage)

    def test_a_reply_nested_too_deep_to_parse_does_not_break_the_meter(
        self,
    ) -> None:
        deep = b'{"usage": {"prompt_tokens": 1}, "x": ' + b"[" * 50_000
        self.assertEqual(meter_json(deep).usage, Usage(1, 0))
        event = b"data: " + b"[" * 50_000 + b"\n\n"
        meter, passed = meter_stream([event], request_bytes=4)
        self.assertEqual((passed, meter.usage), (event, estimate(4, 0)))

    def test_ending_twice_keeps_the_usage(self) -> None:
        meter = meter_json(json.dumps(responses_reply(USAGE_3000, {})).encode())
        meter.end()
        self.assertEqual((meter.usage, meter.estimated), (Usage(1000, 2000), False))

    def test_a_cut_reply_is_charged_an_estimate(self) -> None:
        body = json.dumps(responses_reply(USAGE_3000, {}, "x" * 1000)).encode()
        cut = body[:800]
        meter = meter_json(cut, request_bytes=401)
        self.assertEqual(meter.usage, estimate(401, 800))
        self.assertTrue(meter.estimated)
        big = json.dumps(responses_reply(USAGE_3000, {}, "x" * 100_000)).encode()
        meter = meter_json(big[:90_000], pieces=10, request_bytes=40)
        self.assertEqual(meter.usage, estimate(40, 90_000))
        # A usage member read whole before the cut is the upstream's count.
        cut_after = body.index(b'"metadata"')
        self.assertEqual(meter_json(body[:cut_after]).usage, Usage(1000, 2000))


class StreamEstimateTests(SynchronousTestCase):
    """Item 5: a stream that ends without usage is charged an estimate."""

    def test_estimate_is_four_bytes_of_request_and_four_characters_per_token(
        self,
    ) -> None:
        self.assertEqual(estimate(0, 0), Usage(0, 0))
        self.assertEqual(estimate(401, 8), Usage(101, 2))

    def test_a_cut_chat_stream_counts_the_request_and_the_deltas_relayed(
        self,
    ) -> None:
        events = chat_stream(["Hello", " world"] * 10)[:8]  # role + 7 pieces
        meter, passed = meter_stream(events, request_bytes=100)
        self.assertEqual(passed, b"".join(events))
        chars = len("Hello world") * 3 + len("Hello")
        self.assertEqual(meter.usage, estimate(100, chars))
        self.assertTrue(meter.estimated)

    def test_a_whole_stream_sent_without_usage_is_estimated_too(self) -> None:
        # As with INJECT_USAGE=0, or an upstream that never reports usage.
        meter, _ = meter_stream(chat_stream(["abc", "de"]), request_bytes=9)
        self.assertEqual((meter.usage, meter.estimated), (estimate(9, 5), True))

    def test_tool_calls_and_completions_text_count_as_output(self) -> None:
        tool = chat_chunk()
        tool["choices"][0]["delta"] = {
            "tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]
        }
        completion = {"object": "text_completion", "choices": [{"text": "abcdefgh"}]}
        meter, _ = meter_stream(sse_events([tool, completion], done=False))
        self.assertEqual(meter.usage, estimate(0, 17 + 8))

    def test_responses_text_deltas_count_and_audio_and_done_events_do_not(
        self,
    ) -> None:
        meter, _ = meter_stream(
            sse_events(
                [
                    {"type": "response.created", "response": {"usage": None}},
                    {"type": "response.output_text.delta", "delta": "four"},
                    {"type": "response.function_call_arguments.delta", "delta": "{}"},
                    {"type": "response.audio.delta", "delta": "QUJDRA=="},
                    {"type": "response.output_text.done", "text": "four"},
                ],
                done=False,
            ),
            request_bytes=8,
        )
        self.assertEqual(meter.usage, estimate(8, 6))

    def test_reported_usage_wins_over_the_estimate(self) -> None:
        completed = {
            "type": "response.completed",
            "response": {**responses_reply(USAGE_3000, ZERO_METADATA)},
        }
        created = {**completed, "type": "response.created"}
        created["response"] = {**completed["response"], "usage": None}
        delta = {"type": "response.output_text.delta", "delta": "Hi"}
        meter, _ = meter_stream(
            sse_events([created, delta, completed], done=False), request_bytes=50
        )
        self.assertEqual((meter.usage, meter.estimated), (Usage(1000, 2000), False))

    def test_usage_after_blank_space_in_the_data_is_read(self) -> None:
        # JSON may start with blank space, as the SDKs' parsers allow.
        usage = b'{"choices": [], "usage": {"prompt_tokens": 3}}'
        meter, _ = meter_stream([b"data:  \t" + usage + b"\n\n"], request_bytes=99)
        self.assertEqual((meter.usage, meter.estimated), (Usage(3, 0), False))

    def test_a_stream_stripped_of_its_usage_and_cut_is_still_estimated(self) -> None:
        chunks = [chat_chunk("", role="assistant"), chat_chunk("abcd")]
        for chunk in chunks:
            chunk["usage"] = None
        meter, passed = meter_stream(sse_events(chunks, done=False), strip=True)
        self.assertNotIn(b'"usage"', passed)
        self.assertEqual(meter.usage, estimate(0, 4))


KEYS = f"""
[[keys]]
name = "metered"
key = "{METERED}"
tpm = %d
"""


class _MeteredKeyTest(RelayTestCase):
    tpm = 0

    def setUp(self) -> None:
        self.env = {
            "KEYS_FILE": keys_file(self, KEYS % self.tpm),
            "OPENAI_KEY": "sk-server-meter",
            "ADMIN_KEY": ADMIN,
        }
        super().setUp()
        self.sdk = openai.OpenAI(
            base_url=self.url("/v1"), api_key=METERED, max_retries=0, timeout=10
        )
        self.addCleanup(self.sdk.close)

    async def usage(self) -> dict[str, int]:
        response = await self.http.get(
            self.url("/usage"), headers={"Authorization": f"Bearer {ADMIN}"}
        )
        counts: dict[str, int] = json.loads(await response.content())["keys"][
            "metered"
        ]["today"]
        return counts


class MetadataUsageTests(_MeteredKeyTest):
    """Item 4, end to end: a client's metadata cannot zero a reply's usage."""

    tpm = 5000

    async def test_replies_of_3000_tokens_on_a_5000_tpm_key_admit_two(self) -> None:
        reply = responses_reply(USAGE_3000, ZERO_METADATA)
        self.fake.script = Script(body=json.dumps(reply).encode())

        def create() -> Any:
            return self.sdk.responses.create(
                model="gpt-fake", input="hi", metadata=ZERO_METADATA
            )

        for _ in range(2):
            answer = await deferToThread(create)
            self.assertEqual(answer.usage.total_tokens, 3000)
        with self.assertRaises(openai.RateLimitError):
            await deferToThread(create)
        self.assertEqual(len(self.fake.received), 2)
        counts = await self.usage()
        self.assertEqual(
            (counts["prompt_tokens"], counts["total_tokens"]), (2000, 6000)
        )


class AbandonedStreamTests(_MeteredKeyTest):
    """Item 5, end to end: a stream the client cuts is charged what it got."""

    tpm = 60

    async def test_streams_cut_by_the_client_are_charged_until_the_key_is_over(
        self,
    ) -> None:
        # 40 events; the upstream sends 30 and the client reads 30 and leaves.
        self.fake.script = Script(events=chat_stream(["hi "] * 37), stall_after=30)
        sent: list[int] = []

        def read_30_and_leave() -> str:
            text = ""
            request = {
                "model": "gpt-fake",
                "messages": [{"role": "user", "content": "Say 'hi' 40 times."}],
            }
            with self.sdk.chat.completions.create(**request, stream=True) as stream:
                sent.append(len(stream.response.request.content))
                for got, chunk in enumerate(stream, 1):
                    text += chunk.choices[0].delta.content or ""
                    if got == 30:
                        break
            return text

        for count in (1, 2):
            text = await deferToThread(read_30_and_leave)
            await self.fake.closed[-1]  # the proxy let go of the upstream
            self.assertEqual(text, "hi " * 29)
            counts = await self.usage()
            charged = estimate(sent[0], len(text))
            self.assertEqual(
                (counts["prompt_tokens"], counts["completion_tokens"]),
                (charged.prompt * count, charged.completion * count),
            )
        self.assertLess(sum(charged), 60)  # (so the second one was admitted)
        with self.assertRaises(openai.RateLimitError):
            await deferToThread(read_30_and_leave)
        self.assertEqual(len(self.fake.received), 2)

    async def test_a_stream_the_upstream_cuts_is_charged_what_was_relayed(
        self,
    ) -> None:
        self.fake.script = Script(
            events=chat_stream(["hi "] * 37), hang_up_after=10, interval=0.005
        )
        body = json.dumps(
            {"model": "gpt-fake", "stream": True, "messages": [{"role": "user"}]}
        ).encode()
        response = await self.http.post(
            self.url("/v1/chat/completions"),
            body,
            headers={
                "Authorization": f"Bearer {METERED}",
                "Content-Type": "application/json",
            },
        )
        got = await response.content()
        self.assertIn(b"event: error", got)
        counts = await self.usage()
        charged = estimate(len(body), len("hi ") * 9)
        self.assertEqual(
            (counts["prompt_tokens"], counts["completion_tokens"]), tuple(charged)
        )
