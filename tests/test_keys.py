"""
Named keys with limits, usage counting and server-key failover, through a
real proxy on loopback in front of the fake upstream.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import openai
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from openai_proxy.keys.limits import LocalLimiter, Usage, format_reset
from openai_proxy.keys.named import KeysFileError, parse_keys
from openai_proxy.keys.usage import Meter
from tests.fake_upstream import (
    AUDIO,
    Script,
    chat_chunk,
    chat_completion,
    sse_events,
)
from tests.harness import JSON, RelayTestCase
from tests.test_formfield import form

ALICE = "pk-alice-3f9c2a71d5e8"
BOB = "pk-bob-77aa01"
CAROL = "pk-carol-5150"
ADMIN = "admin-secret-9911"
SERVER_KEYS = "sk-server-one,sk-server-two"

KEYS_TOML = f"""
[[keys]]
name = "alice"
key = "{ALICE}"
rpm = 2
models = ["gpt-4o*"]

[[keys]]
name = "bob"
sha256 = "{hashlib.sha256(BOB.encode()).hexdigest()}"
tpm = 3

[[keys]]
name = "carol"
key = "{CAROL}"
concurrency = 1

[[keys]]
name = "dave"
key = "pk-dave-disabled"
disabled = true

[[keys]]
name = "erin"
key = "pk-erin-expired"
expires = 2001-01-01T00:00:00Z
"""


def keys_file(test: Any, text: str) -> str:
    fd, path = tempfile.mkstemp(suffix=".toml")
    os.write(fd, text.encode())
    os.close(fd)
    test.addCleanup(os.unlink, path)
    return path


def chat(model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


class KeysFileTests(SynchronousTestCase):
    def test_parses_every_field(self) -> None:
        keys = parse_keys(KEYS_TOML)
        self.assertEqual(
            [k.name for k in keys], ["alice", "bob", "carol", "dave", "erin"]
        )
        alice = keys[0]
        self.assertEqual((alice.rpm, alice.tpm, alice.models), (2, None, ("gpt-4o*",)))
        self.assertEqual(keys[1].digest, hashlib.sha256(BOB.encode()).digest())
        self.assertTrue(keys[3].disabled)
        self.assertEqual(keys[4].expires.year, 2001)  # type: ignore[union-attr]

    def test_bad_entries_are_named(self) -> None:
        for text, needle in [
            ('[[keys]]\nname = "x"\n', "exactly one of 'key' and 'sha256'"),
            ('[[keys]]\nname = "x"\nkey = "k"\nrpm = 0\n', "'rpm'"),
            ('[[keys]]\nname = "x"\nsha256 = "zz"\n', "64 hex digits"),
            ('[[keys]]\nname = "x"\nkey = "k"\ncolour = 1\n', "unknown field"),
            ("[[keys]\n", "not valid TOML"),
        ]:
            with self.assertRaises(KeysFileError) as caught:
                parse_keys(text)
            self.assertIn(needle, str(caught.exception))

    def test_reset_is_written_like_openai(self) -> None:
        self.assertEqual(
            [format_reset(s) for s in (0.02, 1, 59.5, 59.9994, 59.9996, 60, 360.25)],
            ["20ms", "1s", "59.5s", "59.999s", "60s", "1m0s", "6m0.25s"],
        )

    def test_usage_counts_move_to_a_new_day_and_month(self) -> None:
        # 2026-01-31 23:59:59 UTC, then one second later: a new day and month.
        now = [1769903999.0]
        limiter = LocalLimiter(lambda: now[0])
        carol = parse_keys(KEYS_TOML)[2]  # no rpm: every request admitted
        limiter.decide(carol)
        limiter.settle(carol, "t1", Usage(3, 4))
        now[0] += 1
        limiter.decide(carol)
        limiter.settle(carol, "t2", Usage(10, 20))
        limiter.decide(carol)
        limiter.settle(carol, "t3", None)
        report = self.successResultOf(limiter.report(now[0]))
        self.assertEqual((report.day, report.month), ("2026-02-01", "2026-02"))
        expected = {"requests": 2, "prompt_tokens": 10, "completion_tokens": 20}
        self.assertEqual(report.today, {"carol": expected})
        self.assertEqual(report.this_month, {"carol": expected})
        earlier = self.successResultOf(limiter.report(now[0] - 1))
        self.assertEqual(earlier.today, {}, "January's counts are forgotten")

    def test_rpm_window_slides(self) -> None:
        now = [1000.0]
        limiter = LocalLimiter(lambda: now[0])
        alice = parse_keys(KEYS_TOML)[0]
        self.assertIsNone(limiter.decide(alice).denied)
        now[0] += 30
        self.assertIsNone(limiter.decide(alice).denied)
        denied = limiter.decide(alice)
        self.assertEqual(denied.denied, "requests")
        self.assertEqual(denied.retry_after, 30.0)
        now[0] += 30  # the first request leaves the window
        self.assertIsNone(limiter.decide(alice).denied)


class JSONUsageTests(SynchronousTestCase):
    def usage(self, reply: Any, pieces: int = 3) -> Usage | None:
        body = json.dumps(reply).encode()
        passed: list[bytes] = []
        meter = Meter(passed.append, sse=False, strip=False)
        step = len(body) // pieces + 1
        for at in range(0, len(body), step):
            meter.feed(body[at : at + step])
        meter.end()
        self.assertEqual(b"".join(passed), body)
        return meter.usage

    def test_the_replys_usage_not_text_that_looks_like_it(self) -> None:
        fake = '"usage": {"prompt_tokens": 999, "completion_tokens": 999}'
        reply = chat_completion(fake)
        reply["usage"] = {
            "prompt_tokens": 12,
            "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 10},
        }
        self.assertEqual(self.usage(reply), Usage(12, 3))
        del reply["usage"]
        self.assertIsNone(self.usage(reply))

    def test_responses_and_embeddings(self) -> None:
        responses = {"output": [], "usage": {"input_tokens": 7, "output_tokens": 2}}
        self.assertEqual(self.usage(responses), Usage(7, 2))
        embeddings = {"data": [], "usage": {"prompt_tokens": 4, "total_tokens": 4}}
        self.assertEqual(self.usage(embeddings), Usage(4, 0))
        self.assertIsNone(self.usage({"usage": None, "x": 1}))


class NamedKeyTests(RelayTestCase):
    def setUp(self) -> None:
        self.path = keys_file(self, KEYS_TOML)
        self.env = {
            "KEYS_FILE": self.path,
            "OPENAI_KEY": SERVER_KEYS,
            "ADMIN_KEY": ADMIN,
            "TIMEOUT": "2000",
        }
        super().setUp()

    async def post(
        self, key: str, payload: Any, path: str = "/v1/chat/completions"
    ) -> Any:
        return await self.http.post(
            self.url(path),
            json.dumps(payload).encode(),
            headers={"Authorization": f"Bearer {key}", **JSON},
        )

    async def test_over_rpm_gets_an_openai_style_429_with_retry_headers(self) -> None:
        for _ in range(2):
            ok = await self.post(ALICE, chat())
            self.assertEqual(ok.code, 200)
            await ok.content()
        self.assertEqual(
            ok.headers.getRawHeaders(b"x-ratelimit-limit-requests"), [b"2"]
        )
        self.assertEqual(
            ok.headers.getRawHeaders(b"x-ratelimit-remaining-requests"), [b"0"]
        )
        refused = await self.post(ALICE, chat())
        body = json.loads(await refused.content())
        self.assertEqual(refused.code, 429)
        self.assertEqual(body["error"]["type"], "requests")
        self.assertEqual(body["error"]["code"], "rate_limit_exceeded")
        retry = float(refused.headers.getRawHeaders(b"retry-after")[0])
        retry_ms = float(refused.headers.getRawHeaders(b"retry-after-ms")[0])
        self.assertTrue(0 < retry <= 60 and 0 < retry_ms <= 60000)
        self.assertEqual(
            refused.headers.getRawHeaders(b"x-ratelimit-remaining-requests"), [b"0"]
        )
        self.assertTrue(refused.headers.getRawHeaders(b"x-ratelimit-reset-requests"))
        self.assertEqual(len(self.fake.received), 2)

    async def test_the_sdk_raises_rate_limit_error(self) -> None:
        sdk = openai.OpenAI(
            base_url=self.url("/v1"), api_key=ALICE, max_retries=0, timeout=10
        )
        self.addCleanup(sdk.close)

        def three() -> Any:
            for _ in range(2):
                sdk.chat.completions.create(**chat())
            try:
                sdk.chat.completions.create(**chat())
            except openai.RateLimitError as e:
                return e
            return None

        error = await deferToThread(three)
        self.assertIsInstance(error, openai.RateLimitError)
        self.assertEqual(error.code, "rate_limit_exceeded")

    async def test_a_model_outside_models_is_refused_before_going_upstream(
        self,
    ) -> None:
        refused = await self.post(ALICE, chat(model="gpt-3.5-turbo"))
        body = json.loads(await refused.content())
        self.assertEqual(
            (refused.code, body["error"]["code"]), (403, "model_not_allowed")
        )
        self.assertEqual(self.fake.received, [])

    async def post_form(self, key: str, *parts: tuple[bytes, bytes]) -> Any:
        boundary = b"----keysboundary"
        body = form(*parts, boundary=boundary)
        response = await self.http.post(
            self.url("/v1/audio/transcriptions"),
            body,
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "multipart/form-data; boundary=" + boundary.decode(),
            },
        )
        return response, body

    async def test_a_form_model_outside_models_is_refused_before_going_upstream(
        self,
    ) -> None:
        # The field after a 300 KB upload, which twisted.web spools to a file.
        refused, _ = await self.post_form(
            ALICE,
            (b'name="file"; filename="a.mp3"', os.urandom(300 * 1024)),
            (b'name="model"', b"whisper-1"),
        )
        body = json.loads(await refused.content())
        self.assertEqual(
            (refused.code, body["error"]["code"]), (403, "model_not_allowed")
        )
        self.assertIn("whisper-1", body["error"]["message"])
        self.assertEqual(self.fake.received, [])

    async def test_a_form_naming_a_second_model_is_refused(self) -> None:
        refused, _ = await self.post_form(
            ALICE,
            (b'name="model"', b"gpt-4o-transcribe"),
            (b'name="file"; filename="a.mp3"', b"\0" * 1000),
            (b"name=model", b"whisper-1"),
        )
        body = json.loads(await refused.content())
        self.assertEqual(
            (refused.code, body["error"]["code"]), (403, "model_not_allowed")
        )
        self.assertEqual(self.fake.received, [])

    async def test_a_form_with_an_allowed_model_goes_upstream_unchanged(
        self,
    ) -> None:
        response, sent = await self.post_form(
            ALICE,
            (b'name="model"', b"gpt-4o-transcribe"),
            (b'name="file"; filename="a.mp3"', os.urandom(200 * 1024)),
        )
        await response.content()
        self.assertEqual(self.fake.received[-1].body, sent)

    async def test_the_sdk_raises_permission_denied_for_a_transcription_model(
        self,
    ) -> None:
        sdk = openai.OpenAI(
            base_url=self.url("/v1"), api_key=ALICE, max_retries=0, timeout=10
        )
        self.addCleanup(sdk.close)

        def transcribe() -> Any:
            try:
                sdk.audio.transcriptions.create(
                    model="whisper-1", file=("a.mp3", AUDIO, "audio/mpeg")
                )
            except openai.PermissionDeniedError as e:
                return e
            return None

        error = await deferToThread(transcribe)
        self.assertIsInstance(error, openai.PermissionDeniedError)
        self.assertEqual(error.code, "model_not_allowed")
        self.assertEqual(self.fake.received, [])

    async def test_a_model_is_checked_however_the_json_is_sent(self) -> None:
        messages = json.dumps(chat()["messages"])
        for ctype, body in [
            ("text/plain", json.dumps(chat(model="gpt-3.5-turbo"))),
            (
                "application/json",
                f'{{"model": "gpt-4o-mini", "messages": {messages}, '
                f'"model": "gpt-3.5-turbo"}}',
            ),
            (
                "application/json",
                f'{{"model": "gpt-3.5-turbo", "messages": {messages}, '
                f'"model": "gpt-4o-mini"}}',
            ),
        ]:
            refused = await self.http.post(
                self.url("/v1/chat/completions"),
                body.encode(),
                headers={"Authorization": f"Bearer {ALICE}", "Content-Type": ctype},
            )
            error = json.loads(await refused.content())["error"]
            self.assertEqual((refused.code, error["code"]), (403, "model_not_allowed"))
        self.assertEqual(self.fake.received, [])

    async def test_disabled_expired_and_unknown_keys_are_refused(self) -> None:
        for key, code in [
            ("pk-dave-disabled", "key_disabled"),
            ("pk-erin-expired", "key_expired"),
            ("pk-nobody", "invalid_proxy_key"),
        ]:
            refused = await self.post(key, chat())
            body = json.loads(await refused.content())
            self.assertEqual((refused.code, body["error"]["code"]), (403, code))
        self.assertEqual(self.fake.received, [])

    async def test_concurrency_limits_requests_in_flight(self) -> None:
        self.fake.script = Script(stall=True)
        first = Deferred.fromCoroutine(self.post(CAROL, chat()))
        while not self.fake.received:  # let the first reach the fake
            await (await self.http.get(self.url("/healthz"))).content()
        refused = await self.post(CAROL, chat())
        body = json.loads(await refused.content())
        self.assertEqual((refused.code, body["error"]["type"]), (429, "requests"))
        self.fake._cleanup()
        await first

    async def test_tpm_is_checked_before_and_charged_after(self) -> None:
        # The fake's completion reports 2 tokens: 0 < 3, then 2 < 3, then 4 ≥ 3.
        for _ in range(2):
            ok = await self.post(BOB, chat())
            await ok.content()
            self.assertEqual(ok.code, 200)
        refused = await self.post(BOB, chat())
        body = json.loads(await refused.content())
        self.assertEqual((refused.code, body["error"]["type"]), (429, "tokens"))
        self.assertEqual(
            refused.headers.getRawHeaders(b"x-ratelimit-remaining-tokens"), [b"0"]
        )

    async def test_stream_usage_asked_for_by_the_proxy_is_hidden(self) -> None:
        chunks = [
            chat_chunk("", role="assistant"),
            chat_chunk("Hi"),
            chat_chunk(finish="stop"),
        ]
        wanted = b"".join(sse_events(chunks))
        for c in chunks:
            c["usage"] = None
        usage_chunk = {
            **chat_chunk(),
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }
        self.fake.script = Script(events=sse_events([*chunks, usage_chunk]))
        response = await self.post(BOB, chat(stream=True))
        got = await response.content()
        sent = self.fake.received[-1].json()
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertEqual(
            [
                json.loads(line[6:])
                for line in got.split(b"\n\n")
                if line.startswith(b"data: {")
            ],
            [
                json.loads(line[6:])
                for line in wanted.split(b"\n\n")
                if line.startswith(b"data: {")
            ],
        )
        self.assertTrue(got.endswith(b"data: [DONE]\n\n"))
        usage = await self.usage()
        self.assertEqual(usage["keys"]["bob"]["today"]["prompt_tokens"], 5)
        self.assertEqual(usage["keys"]["bob"]["today"]["completion_tokens"], 7)

    async def test_stream_usage_the_client_asked_for_passes_unchanged(self) -> None:
        chunks = [
            chat_chunk("Hi"),
            {
                **chat_chunk(),
                "choices": [],
                "usage": {
                    "prompt_tokens": 2,
                    "completion_tokens": 3,
                    "total_tokens": 5,
                },
            },
        ]
        events = sse_events(chunks)
        self.fake.script = Script(events=events)
        response = await self.post(
            BOB, chat(stream=True, stream_options={"include_usage": True})
        )
        self.assertEqual(await response.content(), b"".join(events))
        usage = await self.usage()
        self.assertEqual(usage["keys"]["bob"]["month"]["total_tokens"], 5)

    async def usage(self, key: str = ADMIN) -> Any:
        response = await self.http.get(
            self.url("/usage"), headers={"Authorization": f"Bearer {key}"}
        )
        body = json.loads(await response.content())
        return body if response.code == 200 else (response.code, body)

    async def test_usage_needs_the_admin_key_and_counts_requests(self) -> None:
        await (await self.post(ALICE, chat())).content()
        code, body = await self.usage("not-the-admin-key")
        self.assertEqual((code, body["error"]["code"]), (401, "invalid_api_key"))
        usage = await self.usage()
        self.assertEqual(usage["keys"]["alice"]["today"]["requests"], 1)
        self.assertEqual(usage["keys"]["alice"]["today"]["total_tokens"], 2)
        self.assertEqual(usage["keys"]["carol"]["month"]["requests"], 0)

    async def test_tokens_and_refusals_are_metrics_by_key_name(self) -> None:
        for _ in range(3):
            await (await self.post(ALICE, chat())).content()
        text = (await (await self.http.get(self.url("/metrics"))).content()).decode()
        self.assertIn('openai_proxy_tokens_total{key="alice",kind="prompt"} 2.0', text)
        self.assertIn(
            'openai_proxy_rate_limited_total{key="alice",limit="requests"} 1.0', text
        )
        self.assertNotIn(ALICE, text)

    async def test_reload_takes_new_keys_and_keeps_old_ones_on_a_bad_file(self) -> None:
        registry = self.proxy.app.registry
        assert registry is not None
        with open(self.path, "w") as f:
            f.write('[[keys]]\nname = "frank"\nkey = "pk-frank-1"\n')
        self.assertTrue(registry.reload())
        self.assertEqual((await self.post("pk-frank-1", chat())).code, 200)
        self.assertEqual((await self.post(ALICE, chat())).code, 403)
        with open(self.path, "w") as f:
            f.write("[[keys]\n")
        self.assertFalse(registry.reload())
        self.assertEqual((await self.post("pk-frank-1", chat())).code, 200)


class FailoverTests(RelayTestCase):
    env = {"OPENAI_KEY": SERVER_KEYS, "PROXY_KEY": "pk-team", "KEY_COOLDOWN": "600"}

    async def post(self) -> Any:
        return await self.http.post(
            self.url("/v1/chat/completions"),
            json.dumps(chat()).encode(),
            headers={"Authorization": "Bearer pk-team", **JSON},
        )

    def keys_used(self) -> list[bytes | None]:
        return [r.header(b"authorization") for r in self.fake.received]

    async def test_a_revoked_key_is_benched_and_the_next_one_answers(self) -> None:
        self.fake.by_key["sk-server-one"] = Script(
            status=401, body=b'{"error": {"code": "invalid_api_key"}}'
        )
        first = await self.post()
        self.assertEqual(first.code, 200)
        await first.content()
        for _ in range(3):
            await (await self.post()).content()
        self.assertEqual(
            self.keys_used(),
            [b"Bearer sk-server-one"] + [b"Bearer sk-server-two"] * 4,
        )
        text = (await (await self.http.get(self.url("/metrics"))).content()).decode()
        self.assertIn('openai_proxy_upstream_key_benched_total{index="0"} 1.0', text)
        self.assertIn('openai_proxy_upstream_key_failures_total{index="0"} 1.0', text)
        self.assertNotIn("sk-server", text)

    async def test_all_keys_failing_passes_the_last_answer_through(self) -> None:
        error = b'{"error": {"message": "quota", "code": "insufficient_quota"}}'
        self.fake.script = Script(status=429, body=error)
        response = await self.post()
        self.assertEqual(response.code, 429)
        self.assertEqual(await response.content(), error)
        self.assertEqual(len(self.fake.received), 2)
        again = await self.post()  # both benched: one try, passed through
        self.assertEqual(again.code, 429)
        await again.content()
        self.assertEqual(len(self.fake.received), 3)

    async def test_a_429_retry_after_benches_for_that_long_and_replays_big_bodies(
        self,
    ) -> None:
        self.fake.by_key["sk-server-one"] = Script(
            status=429, headers={b"retry-after": [b"20"]}, body=b"{}"
        )
        big = chat(padding="x" * 300_000)
        response = await self.http.post(
            self.url("/v1/chat/completions"),
            json.dumps(big).encode(),
            headers={"Authorization": "Bearer pk-team", **JSON},
        )
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual(self.fake.received[0].body, self.fake.received[1].body)
        self.assertEqual(len(self.fake.received[1].body), len(json.dumps(big)))
        self.assertTrue(self.proxy.app.key_pool.benched(0))
