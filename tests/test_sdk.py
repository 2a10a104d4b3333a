"""
The official C{openai} SDK, pointed at the proxy the way users do it, run in
a thread (it blocks) while the reactor serves the proxy and the fake upstream.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any, TypeVar

import openai
from twisted.internet.threads import deferToThread

from tests.fake_upstream import AUDIO, Script, chat_stream
from tests.harness import Proxy, RelayTestCase

T = TypeVar("T")


class SDKTests(RelayTestCase):
    env = {"PROXY_KEY": "pk-team", "TIMEOUT": "500"}

    def sdk(self, api_key: str = "sk-user:pk-team") -> openai.OpenAI:
        sdk = openai.OpenAI(
            base_url=self.url("/v1"), api_key=api_key, max_retries=0, timeout=10
        )
        self.addCleanup(sdk.close)
        return sdk

    async def in_thread(self, f: Callable[[], T]) -> T:
        result: T = await deferToThread(f)
        return result

    async def test_chat_completion(self) -> None:
        sdk = self.sdk()
        completion = await self.in_thread(
            lambda: sdk.chat.completions.create(
                model="gpt-fake", messages=[{"role": "user", "content": "hi"}]
            )
        )
        self.assertEqual(completion.choices[0].message.content, "Hello world!")
        self.assertEqual(
            self.fake.received[-1].header(b"authorization"), b"Bearer sk-user"
        )

    async def test_chat_stream_yields_the_upstream_deltas_in_order(self) -> None:
        pieces = ["你好", "，世界", "。", " Hello", " world."]
        self.fake.script = Script(events=chat_stream(pieces), interval=0.002)
        sdk = self.sdk()

        def stream() -> list[Any]:
            chunks = sdk.chat.completions.create(
                model="gpt-fake",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
            )
            return [c.choices[0].delta.content for c in chunks]

        deltas = await self.in_thread(stream)
        self.assertEqual([d for d in deltas if d], pieces)

    async def test_models_and_embeddings(self) -> None:
        sdk = self.sdk()
        models = await self.in_thread(lambda: [m.id for m in sdk.models.list()])
        self.assertEqual(models, ["gpt-fake"])
        emb = await self.in_thread(lambda: sdk.embeddings.create(model="e", input="x"))
        self.assertEqual(emb.data[0].embedding, [0.1, 0.2, 0.3])

    async def test_file_upload_and_delete(self) -> None:
        payload = os.urandom(300 * 1024)
        sdk = self.sdk()
        created = await self.in_thread(
            lambda: sdk.files.create(
                file=("batch.jsonl", io.BytesIO(payload)), purpose="batch"
            )
        )
        self.assertEqual(created.id, "file-fake")
        self.assertIn(payload, self.fake.received[-1].body)
        deleted = await self.in_thread(lambda: sdk.files.delete("file-fake"))
        self.assertTrue(deleted.deleted)

    async def test_upload_over_the_limit_raises_413_in_the_sdk(self) -> None:
        proxy = Proxy(self, {"UPSTREAM": self.upstream, "MAX_BODY": "100000"})
        sdk = openai.OpenAI(
            base_url=proxy.url + "/v1", api_key="sk-user", max_retries=0, timeout=10
        )
        self.addCleanup(sdk.close)
        payload = os.urandom(300 * 1024)
        with self.assertRaises(openai.APIStatusError) as e:
            await self.in_thread(
                lambda: sdk.files.create(
                    file=("a.jsonl", io.BytesIO(payload)), purpose="batch"
                )
            )
        self.assertEqual(e.exception.status_code, 413)
        self.assertEqual(self.fake.received, [])

    async def test_speech_bytes_identical(self) -> None:
        sdk = self.sdk()
        audio = await self.in_thread(
            lambda: sdk.audio.speech.create(
                model="tts-1", voice="alloy", input="hi"
            ).read()
        )
        self.assertEqual(audio, AUDIO)

    async def test_sdk_raises_its_usual_exceptions(self) -> None:
        self.fake.script = Script(
            status=429,
            headers={b"retry-after": [b"1"]},
            body=b'{"error": {"message": "slow", "type": "requests", "code": "rate_limit_exceeded"}}',
        )
        cases: list[tuple[str, type[Exception]]] = [
            ("sk-user:pk-team", openai.RateLimitError),
            ("sk-user:wrong", openai.PermissionDeniedError),
            (":pk-team", openai.AuthenticationError),
        ]
        for key, error in cases:
            sdk = self.sdk(key)
            with self.assertRaises(error):
                await self.in_thread(
                    lambda sdk=sdk: sdk.chat.completions.create(  # type: ignore[misc]
                        model="m", messages=[], stream=True
                    )
                )

    async def test_timeout_and_dead_upstream_raise_api_errors(self) -> None:
        self.fake.script = Script(stall=True)
        sdk = self.sdk()
        with self.assertRaises(openai.InternalServerError) as e:
            await self.in_thread(lambda: sdk.models.list())
        self.assertEqual(e.exception.status_code, 504)

    async def test_stream_cut_by_silence_raises_in_the_sdk(self) -> None:
        self.fake.script = Script(events=chat_stream(["a", "b", "c"]), stall_after=2)
        sdk = self.sdk()

        def stream() -> None:
            for _ in sdk.chat.completions.create(model="m", messages=[], stream=True):
                pass

        with self.assertRaises(openai.APIError):
            await self.in_thread(stream)
