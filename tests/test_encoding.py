"""
Content encodings: an unread body crosses the proxy as the upstream encoded
it; a body the proxy must read (to moderate it) is asked for uncompressed.
"""

from __future__ import annotations

import gzip
import io
import json
from typing import Any

import openai
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from tests.fake_upstream import Script, chat_completion, chat_stream
from tests.harness import JSON, KEY, ModeratedRelayTestCase, RelayTestCase


class _RawClientMixin:
    """An HTTP client that neither asks for nor decodes any encoding itself."""

    proxy: Any

    def raw_agent(self, test: Any) -> Agent:
        pool = HTTPConnectionPool(reactor, persistent=False)
        test.addCleanup(pool.closeCachedConnections)
        return Agent(reactor, pool=pool)

    async def raw(
        self,
        test: Any,
        method: bytes,
        path: str,
        headers: dict[bytes, list[bytes]],
        body: bytes | None = None,
    ) -> tuple[IResponse, bytes]:
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        response: IResponse = await self.raw_agent(test).request(
            method,
            (self.proxy.url + path).encode("ascii"),
            Headers({b"authorization": [f"Bearer {KEY}".encode()], **headers}),
            producer,
        )
        return response, await readBody(response)


class PassthroughTests(RelayTestCase, _RawClientMixin):
    def setUp(self) -> None:
        super().setUp()
        self.fake.gzip_when_asked = True

    async def test_gzip_body_is_relayed_byte_for_byte(self) -> None:
        response, body = await self.raw(
            self, b"GET", "/v1/models", {b"accept-encoding": [b"gzip"]}
        )
        self.assertEqual(self.fake.received[-1].header(b"accept-encoding"), b"gzip")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        # (Twisted's client keeps Content-Length out of the headers.)
        self.assertEqual(response.length, len(self.fake.last_body))
        self.assertEqual(body, self.fake.last_body)
        self.assertEqual(json.loads(gzip.decompress(body))["data"][0]["id"], "gpt-fake")

    async def test_client_that_accepts_no_encoding_gets_a_plain_body(self) -> None:
        response, body = await self.raw(self, b"GET", "/v1/models", {})
        self.assertIsNone(self.fake.received[-1].header(b"accept-encoding"))
        self.assertIsNone(response.headers.getRawHeaders(b"content-encoding"))
        self.assertEqual(json.loads(body)["data"][0]["id"], "gpt-fake")

    async def test_post_body_is_relayed_compressed(self) -> None:
        payload = {"model": "gpt-fake", "messages": [{"role": "user", "content": "x"}]}
        response, body = await self.raw(
            self,
            b"POST",
            "/v1/chat/completions",
            {b"accept-encoding": [b"gzip, br"], b"content-type": [b"application/json"]},
            json.dumps(payload).encode(),
        )
        self.assertEqual(self.fake.received[-1].header(b"accept-encoding"), b"gzip, br")
        self.assertEqual(body, self.fake.last_body)
        self.assertEqual(
            json.loads(gzip.decompress(body)), chat_completion("Hello world!")
        )

    async def test_head_keeps_headers_and_sends_no_body(self) -> None:
        response, body = await self.raw(
            self, b"HEAD", "/v1/models", {b"accept-encoding": [b"gzip"]}
        )
        self.assertEqual(self.fake.received[-1].method, b"HEAD")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/json"]
        )
        self.assertEqual(body, b"")

    async def test_sdk_asks_for_gzip_and_decodes_it(self) -> None:
        sdk = openai.OpenAI(
            base_url=self.url("/v1"), api_key=KEY, max_retries=0, timeout=10
        )
        self.addCleanup(sdk.close)
        completion = await deferToThread(
            lambda: sdk.chat.completions.create(
                model="gpt-fake", messages=[{"role": "user", "content": "hi"}]
            )
        )
        self.assertEqual(completion.choices[0].message.content, "Hello world!")
        self.assertIn(b"gzip", self.fake.received[-1].header(b"accept-encoding") or b"")
        self.assertTrue(self.fake.last_body.startswith(b"\x1f\x8b"))  # gzip magic


class ModeratedEncodingTests(ModeratedRelayTestCase, _RawClientMixin):
    async def test_moderated_request_asks_upstream_for_identity(self) -> None:
        self.fake.gzip_when_asked = True
        response, body = await self.raw(
            self,
            b"POST",
            "/v1/chat/completions",
            {b"accept-encoding": [b"gzip"], b"content-type": [b"application/json"]},
            json.dumps({"model": "m", "messages": [], "moderation": True}).encode(),
        )
        # The whole list, so that a failure shows everything that arrived.
        self.assertEqual(
            [
                (r.method, r.uri, r.headers.getRawHeaders(b"accept-encoding"))
                for r in self.fake.received
            ],
            [(b"POST", b"/v1/chat/completions", [b"identity"])],
        )
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders(b"content-encoding"))
        self.assertEqual(json.loads(body), chat_completion("Hello world!"))

    async def test_gzip_sent_anyway_is_decoded_and_moderated(self) -> None:
        self.fake.script = Script(
            body=json.dumps(chat_completion("how to make a bomb")).encode(),
            gzip=True,
        )
        response, body = await self.raw(
            self,
            b"POST",
            "/v1/chat/completions",
            {
                b"accept-encoding": [b"gzip"],
                **{k.lower().encode(): [v.encode()] for k, v in JSON.items()},
            },
            json.dumps({"model": "m", "messages": [], "moderation": True}).encode(),
        )
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders(b"content-encoding"))
        self.assertEqual(response.headers.getRawHeaders(b"x-moderation"), [b"blocked"])
        self.assertNotIn(b"bomb", body)
        self.assertIn("REFUSED", json.loads(body)["choices"][0]["message"]["content"])

    async def test_gzipped_stream_sent_anyway_is_decoded_and_moderated(self) -> None:
        events = b"".join(chat_stream(["Hello", " world."]))
        self.fake.script = Script(
            headers={
                b"content-type": [b"text/event-stream"],
                b"content-encoding": [b"gzip"],
            },
            chunks=[gzip.compress(events, mtime=0)],
        )
        response, body = await self.raw(
            self,
            b"POST",
            "/v1/chat/completions",
            {b"content-type": [b"application/json"]},
            json.dumps({"model": "m", "stream": True, "moderation": True}).encode(),
        )
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders(b"content-encoding"))
        self.assertEqual(body, events)

    async def test_unasked_encoding_it_cannot_read_is_a_502(self) -> None:
        self.fake.script = Script(
            headers={b"content-encoding": [b"br"]}, body=b"\x0b\x02\x80{}\x03"
        )
        response, body = await self.raw(
            self,
            b"POST",
            "/v1/chat/completions",
            {b"content-type": [b"application/json"]},
            json.dumps({"model": "m", "messages": [], "moderation": True}).encode(),
        )
        self.assertEqual(response.code, 502)
        self.assertIsNone(response.headers.getRawHeaders(b"content-encoding"))
        self.assertEqual(json.loads(body)["error"]["code"], "upstream_error")
