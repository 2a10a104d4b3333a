"""
The relay end to end: a fake OpenAI upstream and the proxy on loopback
sockets, driven over real HTTP.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.fake_upstream import AUDIO, FILE_CONTENT, FakeOpenAI, Script, chat_stream
from tests.harness import (
    AUTH,
    JSON,
    KEY,
    Proxy,
    RelayTestCase,
    client,
    closed_port_url,
)
from tests.rawhttp import connect, raw_request


def _error(body: bytes) -> dict[str, Any]:
    err = json.loads(body)["error"]
    assert set(err) >= {"message", "type", "code"}, err
    return err  # type: ignore[no-any-return]


class ForwardingTests(RelayTestCase):
    async def test_chat_completion_relayed_unchanged(self) -> None:
        response = await self.post_json(
            "/v1/chat/completions", {"model": "m", "messages": []}
        )
        body = await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(
            json.loads(body)["choices"][0]["message"]["content"], "Hello world!"
        )
        received = self.fake.received[-1]
        self.assertEqual(
            (received.method, received.uri), (b"POST", b"/v1/chat/completions")
        )
        self.assertEqual(received.json(), {"model": "m", "messages": []})
        self.assertEqual(received.header(b"authorization"), f"Bearer {KEY}".encode())

    async def test_chat_stream_events_identical_and_in_order(self) -> None:
        events = chat_stream(["Hel", "lo ", "wor", "ld", "。"])
        self.fake.script = Script(events=events, interval=0.001)
        response = await self.post_json("/v1/chat/completions", {"stream": True})
        body = await response.content()
        self.assertEqual(body, b"".join(events))
        headers = response.headers
        self.assertEqual(
            headers.getRawHeaders(b"content-type"),
            [b"text/event-stream; charset=utf-8"],
        )
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-cache"])
        self.assertEqual(headers.getRawHeaders(b"x-accel-buffering"), [b"no"])

    async def test_stream_events_arrive_before_the_stream_ends(self) -> None:
        self.fake.script = Script(events=chat_stream(["a", "b"]), stall_after=2)
        proto = await connect(self.proxy.port.getHost().port)
        proto.transport.write(  # type: ignore[union-attr]
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b'Content-Type: application/json\r\nContent-Length: 16\r\n\r\n{"stream": true}'
        )
        await proto.first
        while b'"role"' not in proto.data:
            await deferLater(reactor, 0.005)
        self.assertIn(b"data: ", bytes(proto.data))
        proto.transport.loseConnection()  # type: ignore[union-attr]
        await proto.done

    async def test_models_get(self) -> None:
        response = await self.http.get(self.url("/v1/models?limit=2"), headers=AUTH)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            json.loads(await response.content())["data"][0]["id"], "gpt-fake"
        )
        self.assertEqual(self.fake.received[-1].uri, b"/v1/models?limit=2")
        self.assertEqual(self.fake.received[-1].body, b"")

    async def test_embeddings(self) -> None:
        response = await self.post_json("/v1/embeddings", {"input": "x", "model": "e"})
        self.assertEqual(
            json.loads(await response.content())["data"][0]["embedding"],
            [0.1, 0.2, 0.3],
        )

    async def test_multipart_upload_of_300kb_reaches_upstream_byte_for_byte(
        self,
    ) -> None:
        payload = os.urandom(300 * 1024)
        boundary = b"----proxyboundary"
        body = (
            b"--"
            + boundary
            + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b"--"
            + boundary
            + b'\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n"
            + payload
            + b"\r\n--"
            + boundary
            + b"--\r\n"
        )
        ctype = b"multipart/form-data; boundary=" + boundary
        response = await self.http.post(
            self.url("/v1/files"),
            body,
            headers={**AUTH, "Content-Type": ctype.decode()},
        )
        self.assertEqual(response.code, 200)
        await response.content()
        received = self.fake.received[-1]
        self.assertEqual(received.body, body)
        self.assertEqual(received.header(b"content-type"), ctype)
        self.assertEqual(received.header(b"content-length"), b"%d" % len(body))

    async def test_audio_bytes_identical(self) -> None:
        response = await self.post_json(
            "/v1/audio/speech", {"input": "hi", "voice": "alloy"}
        )
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"audio/mpeg"]
        )
        self.assertEqual(await response.content(), AUDIO)

    async def test_file_download_identical(self) -> None:
        response = await self.http.get(
            self.url("/v1/files/file-1/content"), headers=AUTH
        )
        self.assertEqual(await response.content(), FILE_CONTENT)
        # twisted's client keeps Content-Length out of .headers; .length is it.
        self.assertEqual(response.length, len(FILE_CONTENT))

    async def test_delete_forwarded(self) -> None:
        response = await self.http.delete(self.url("/v1/files/file-9"), headers=AUTH)
        self.assertEqual(json.loads(await response.content())["deleted"], True)
        self.assertEqual(self.fake.received[-1].method, b"DELETE")

    async def test_local_moderation_fields_never_reach_upstream(self) -> None:
        await self.post_json(
            "/v1/embeddings",
            {"input": "x", "moderation": False, "moderation_level": "low"},
        )
        self.assertEqual(self.fake.received[-1].json(), {"input": "x"})

    async def test_json_body_without_local_fields_is_forwarded_byte_for_byte(
        self,
    ) -> None:
        raw = b'{ "input" : "caf\\u00e9",  "model":"e" }'
        response = await self.http.post(
            self.url("/v1/embeddings"), raw, headers={**AUTH, **JSON}
        )
        await response.content()
        self.assertEqual(self.fake.received[-1].body, raw)

    async def test_upstream_redirect_reaches_client_unfollowed(self) -> None:
        self.fake.script = Script(
            status=302, headers={b"location": [b"http://127.0.0.1:1/elsewhere"]}
        )
        response = await self.http.get(
            self.url("/v1/models"), headers=AUTH, allow_redirects=False
        )
        self.assertEqual(response.code, 302)
        self.assertEqual(len(self.fake.received), 1)


class UpstreamPrefixTests(RelayTestCase):
    def setUp(self) -> None:
        self.fake = FakeOpenAI()
        self.proxy = Proxy(self, {"UPSTREAM": self.fake.start(self) + "/openai/"})
        self.http = client(self)

    async def test_path_prefix_of_upstream_is_kept(self) -> None:
        await (await self.http.get(self.url("/v1/models"), headers=AUTH)).content()
        self.assertEqual(self.fake.received[-1].uri, b"/openai/v1/models")


class HeaderHygieneTests(RelayTestCase):
    async def test_end_to_end_headers_pass_and_hop_by_hop_do_not(self) -> None:
        self.fake.script = Script(
            status=429,
            headers={
                b"retry-after": [b"3"],
                b"x-ratelimit-remaining-requests": [b"0"],
                b"access-control-allow-origin": [b"https://upstream.example"],
            },
            body=b'{"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}',
        )
        response = await self.http.get(
            self.url("/v1/models"),
            headers={
                **AUTH,
                "OpenAI-Organization": "org-1",
                "OpenAI-Project": "proj-1",
                "OpenAI-Beta": "assistants=v2",
                "Cookie": "client_session=abc",
                "Connection": "keep-alive, x-client-hop",
                "X-Client-Hop": "1",
                "Keep-Alive": "timeout=5",
                "Proxy-Authorization": "Basic eA==",
                "X-Forwarded-For": "10.0.0.1",
            },
        )
        await response.content()
        received = self.fake.received[-1]
        for name, value in [
            (b"openai-organization", b"org-1"),
            (b"openai-project", b"proj-1"),
            (b"openai-beta", b"assistants=v2"),
        ]:
            self.assertEqual(received.header(name), value)
        for name in [
            b"cookie",
            b"x-client-hop",
            b"keep-alive",
            b"proxy-authorization",
            b"x-forwarded-for",
        ]:
            self.assertIsNone(received.header(name), name)
        self.assertEqual(
            received.header(b"host"), self.upstream.split("//")[1].encode()
        )
        headers = response.headers
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"3"])
        self.assertEqual(
            headers.getRawHeaders(b"x-ratelimit-remaining-requests"), [b"0"]
        )
        self.assertEqual(headers.getRawHeaders(b"x-request-id"), [b"req-fake-123"])
        self.assertIsNone(headers.getRawHeaders(b"set-cookie"))
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])

    async def test_upstream_cookies_never_reach_a_later_caller(self) -> None:
        for _ in range(2):
            await (await self.http.get(self.url("/v1/models"), headers=AUTH)).content()
        self.assertIsNone(self.fake.received[1].header(b"cookie"))


class KeyTests(TestCase):
    """Every key rule, against a live proxy."""

    async def _proxy(self, env: dict[str, str]) -> tuple[FakeOpenAI, Proxy]:
        fake = FakeOpenAI()
        proxy = Proxy(self, {"UPSTREAM": fake.start(self), **env})
        return fake, proxy

    async def _get(self, proxy: Proxy, authorization: str | None) -> tuple[int, bytes]:
        headers = {} if authorization is None else {"Authorization": authorization}
        response = await client(self).get(proxy.url + "/v1/models", headers=headers)
        return response.code, await response.content()

    async def test_no_token_is_401(self) -> None:
        fake, proxy = await self._proxy({})
        code, body = await self._get(proxy, None)
        self.assertEqual(code, 401)
        self.assertEqual(_error(body)["code"], "missing_api_key")
        self.assertEqual(fake.received, [])

    async def test_client_key_goes_upstream_when_proxy_holds_none(self) -> None:
        fake, proxy = await self._proxy({})
        code, _ = await self._get(proxy, "Bearer sk-client")
        self.assertEqual(code, 200)
        self.assertEqual(
            fake.received[-1].header(b"authorization"), b"Bearer sk-client"
        )

    async def test_wrong_proxy_key_is_403(self) -> None:
        fake, proxy = await self._proxy({"PROXY_KEY": "pk-1,pk-2"})
        code, body = await self._get(proxy, "Bearer sk-client:pk-3")
        self.assertEqual(code, 403)
        self.assertEqual(_error(body)["type"], "permission_error")
        self.assertEqual(fake.received, [])

    async def test_token_without_a_proxy_key_is_told_it_is_missing(self) -> None:
        fake, proxy = await self._proxy({"PROXY_KEY": "pk-1,pk-2"})
        for token in [
            "Bearer sk-client",
            "Bearer not-an-openai-key",
            "Bearer sk-client:",
        ]:
            code, body = await self._get(proxy, token)
            self.assertEqual(code, 401, token)
            self.assertEqual(_error(body)["code"], "missing_proxy_key", token)
            self.assertIn("<openai-key>:<proxy-key>", _error(body)["message"])
        self.assertEqual(fake.received, [])

    async def test_upstream_and_proxy_key_split_at_first_colon(self) -> None:
        fake, proxy = await self._proxy({"PROXY_KEY": "pk-1,pk:2"})
        code, _ = await self._get(proxy, "Bearer sk-client:pk:2")
        self.assertEqual(code, 200)
        self.assertEqual(
            fake.received[-1].header(b"authorization"), b"Bearer sk-client"
        )

    async def test_proxy_key_without_upstream_key_is_401(self) -> None:
        fake, proxy = await self._proxy({"PROXY_KEY": "pk-1"})
        code, body = await self._get(proxy, "Bearer :pk-1")
        self.assertEqual(code, 401)
        self.assertEqual(fake.received, [])

    async def test_server_keys_used_in_turn_with_a_proxy_key(self) -> None:
        fake, proxy = await self._proxy(
            {"PROXY_KEY": "pk-1", "OPENAI_KEY": "sk-a,sk-b"}
        )
        for token in ["Bearer pk-1", "Bearer pk-1", "Bearer ignored:pk-1"]:
            code, _ = await self._get(proxy, token)
            self.assertEqual(code, 200)
        sent = [r.header(b"authorization") for r in fake.received]
        self.assertEqual(sent, [b"Bearer sk-a", b"Bearer sk-b", b"Bearer sk-a"])

    async def test_open_proxy_spends_server_key_for_anyone(self) -> None:
        fake, proxy = await self._proxy({"OPENAI_KEY": "sk-a", "OPEN_PROXY": "1"})
        code, _ = await self._get(proxy, "Bearer anything")
        self.assertEqual(code, 200)
        self.assertEqual(fake.received[-1].header(b"authorization"), b"Bearer sk-a")

    async def test_routes_send_keys_by_prefix(self) -> None:
        other = FakeOpenAI()
        fake, proxy = await self._proxy({"ROUTES": f"fk={other.start(self)}"})
        await self._get(proxy, "Bearer fk-123")
        await self._get(proxy, "Bearer sk-123")
        self.assertEqual(
            [r.header(b"authorization") for r in other.received], [b"Bearer fk-123"]
        )
        self.assertEqual(
            [r.header(b"authorization") for r in fake.received], [b"Bearer sk-123"]
        )


class ErrorTests(RelayTestCase):
    env = {"TIMEOUT": "300"}

    async def test_absolute_uri_is_400_and_never_fetched(self) -> None:
        raw = await raw_request(
            self.proxy.port.getHost().port,
            b"GET " + self.upstream.encode() + b"/v1/models HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer k\r\nConnection: close\r\n\r\n",
        )
        self.assertTrue(raw.startswith(b"HTTP/1.1 400 "), raw)
        self.assertEqual(
            _error(raw.split(b"\r\n\r\n", 1)[1])["code"], "invalid_request_target"
        )
        self.assertEqual(self.fake.received, [])

    async def test_dot_segments_are_400_and_never_fetched(self) -> None:
        for target in [b"/v1/../admin", b"/v1/%2e%2e/admin"]:
            raw = await raw_request(
                self.proxy.port.getHost().port,
                b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer k\r\nConnection: close\r\n\r\n",
            )
            self.assertTrue(raw.startswith(b"HTTP/1.1 400 "), raw)
        self.assertEqual(self.fake.received, [])

    async def test_passthrough_of_upstream_errors_with_stream_true(self) -> None:
        for status in (401, 429, 500):
            body = json.dumps(
                {"error": {"message": f"e{status}", "type": "x", "code": str(status)}}
            ).encode()
            self.fake.script = Script(
                status=status, headers={b"x-upstream": [b"yes"]}, body=body
            )
            response = await self.post_json("/v1/chat/completions", {"stream": True})
            self.assertEqual(response.code, status)
            self.assertEqual(await response.content(), body)
            self.assertEqual(response.headers.getRawHeaders(b"x-upstream"), [b"yes"])

    async def test_unreachable_upstream_is_502(self) -> None:
        proxy = Proxy(self, {"UPSTREAM": await closed_port_url()})
        response = await self.http.get(proxy.url + "/v1/models", headers=AUTH)
        self.assertEqual(response.code, 502)
        self.assertEqual(
            _error(await response.content())["code"], "upstream_unreachable"
        )

    async def test_no_headers_within_timeout_is_504(self) -> None:
        self.fake.script = Script(stall=True)
        response = await self.post_json("/v1/chat/completions", {})
        self.assertEqual(response.code, 504)
        self.assertEqual(_error(await response.content())["code"], "upstream_timeout")

    async def test_silent_body_ends_the_stream_and_closes_upstream(self) -> None:
        events = chat_stream(["a", "b", "c"])
        self.fake.script = Script(events=events, stall_after=2)
        response = await self.post_json("/v1/chat/completions", {"stream": True})
        body = await response.content()
        self.assertTrue(body.startswith(events[0] + events[1]))
        self.assertIn(b"event: error\ndata: ", body)
        self.assertIn(b"upstream_timeout", body)
        await self.fake.closed[-1]

    async def test_upstream_hang_up_mid_stream_tells_the_client(self) -> None:
        self.fake.script = Script(events=chat_stream(["a", "b"]), hang_up_after=2)
        response = await self.post_json("/v1/chat/completions", {"stream": True})
        body = await response.content()
        self.assertIn(b"upstream_error", body)

    async def test_client_hang_up_closes_upstream_within_100ms(self) -> None:
        self.fake.script = Script(events=chat_stream(["x"] * 1000), interval=0.02)
        proto = await connect(self.proxy.port.getHost().port)
        proto.transport.write(  # type: ignore[union-attr]
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b'Content-Type: application/json\r\nContent-Length: 16\r\n\r\n{"stream": true}'
        )
        await proto.first
        hung_up = time.monotonic()
        proto.transport.abortConnection()  # type: ignore[union-attr]
        closed = await self.fake.closed[-1]
        self.assertLess(closed - hung_up, 0.1)

    async def test_client_hang_up_before_headers_cancels_upstream_request(self) -> None:
        self.fake.script = Script(stall=True)
        proto = await connect(self.proxy.port.getHost().port)
        proto.transport.write(  # type: ignore[union-attr]
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n"
        )
        while not self.fake.received:
            await deferLater(reactor, 0.005)
        hung_up = time.monotonic()
        proto.transport.abortConnection()  # type: ignore[union-attr]
        closed = await self.fake.closed[-1]
        self.assertLess(closed - hung_up, 0.1)

    async def test_slow_reader_does_not_make_proxy_buffer(self) -> None:
        total = 64 * 1024 * 1024
        chunk = b"x" * 65536
        self.fake.script = Script(
            headers={b"content-type": [b"application/octet-stream"]},
            chunks=[chunk] * (total // len(chunk)),
        )
        sent = self.fake.sent_bytes
        proto = await connect(self.proxy.port.getHost().port)
        assert proto.transport is not None
        proto.transport.write(
            b"GET /v1/files/f/content HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n"
        )
        await proto.first
        proto.transport.pauseProducing()  # the client stops reading
        # Give a proxy without backpressure ample time to pull everything.
        await deferLater(reactor, 0.5)
        self.assertLess(sent[0], total // 4)
        proto.transport.abortConnection()
        await self.fake.closed[-1]


class LocalAnswerTests(RelayTestCase):
    async def test_cors_preflight_answered_locally(self) -> None:
        response = await self.http.request(
            "OPTIONS",
            self.url("/v1/chat/completions"),
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        self.assertEqual(response.code, 204)
        headers = response.headers
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])
        self.assertIn(
            b"POST", headers.getRawHeaders(b"access-control-allow-methods")[0]
        )
        self.assertEqual(
            headers.getRawHeaders(b"access-control-allow-headers"),
            [b"authorization, content-type"],
        )
        self.assertTrue(headers.getRawHeaders(b"access-control-max-age"))
        self.assertEqual(self.fake.received, [])

    async def test_healthz_needs_no_key(self) -> None:
        response = await self.http.get(self.url("/healthz"))
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(await response.content()), {"status": "ok"})
        self.assertEqual(self.fake.received, [])

    async def test_errors_carry_cors_header(self) -> None:
        response = await self.http.get(self.url("/v1/models"))
        await response.content()
        self.assertEqual(
            response.headers.getRawHeaders(b"access-control-allow-origin"), [b"*"]
        )


class RestrictedCORSTests(RelayTestCase):
    env = {"CORS_ORIGINS": "https://a.example,https://b.example"}

    async def test_only_listed_origins_are_echoed(self) -> None:
        for origin, expected in [
            ("https://b.example", [b"https://b.example"]),
            ("https://evil.example", None),
        ]:
            response = await self.http.get(
                self.url("/healthz"), headers={"Origin": origin}
            )
            await response.content()
            self.assertEqual(
                response.headers.getRawHeaders(b"access-control-allow-origin"), expected
            )


class BodyLimitTests(RelayTestCase):
    env = {"MAX_BODY": "1000"}

    async def test_declared_oversized_body_is_413_before_it_is_sent(self) -> None:
        raw = await raw_request(
            self.proxy.port.getHost().port,
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b"Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
        )
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw)
        self.assertNotIn(b"100 Continue", raw)
        self.assertEqual(
            _error(raw.split(b"\r\n\r\n", 1)[1])["code"], "request_too_large"
        )
        self.assertEqual(self.fake.received, [])

    async def test_refused_body_gets_an_access_line(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        await raw_request(
            self.proxy.port.getHost().port,
            b"POST /v1/files?x=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b"Content-Length: 5000\r\n"
            b"Expect: 100-continue\r\n\r\n",
        )
        [line] = [e for e in events if e.get("log_namespace") == "openai_proxy.access"]
        self.assertEqual(
            (line["method"], line["path"], line["status"]), ("POST", "/v1/files", 413)
        )

    async def test_chunked_oversized_body_is_413(self) -> None:
        chunk = b"x" * 600
        raw = await raw_request(
            self.proxy.port.getHost().port,
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2
            + b"0\r\n\r\n",
        )
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw)
        self.assertEqual(self.fake.received, [])

    async def test_body_at_the_limit_passes(self) -> None:
        response = await self.http.post(
            self.url("/v1/files"), b"y" * 1000, headers=AUTH
        )
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual(self.fake.received[-1].body, b"y" * 1000)


class SecretLoggingTests(RelayTestCase):
    env = {"PROXY_KEY": "pk-secret-proxy-key", "OPENAI_KEY": "sk-secret-server-key"}

    async def test_no_key_in_log_output(self) -> None:
        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            lines.append(formatEvent(event) + repr(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        tokens = [
            "sk-client-key:pk-secret-proxy-key",
            "pk-secret-proxy-key",
            "sk-client-key:wrong-pk",
        ]
        for token in tokens:
            r = await self.http.get(
                self.url("/v1/models?key=x"),
                headers={"Authorization": f"Bearer {token}"},
            )
            await r.content()
        self.fake.script = Script(stall=True)
        bad = Proxy(self, {"UPSTREAM": await closed_port_url(), **self.env})
        r = await self.http.get(
            bad.url + "/v1/models",
            headers={"Authorization": "Bearer pk-secret-proxy-key"},
        )
        await r.content()
        text = "\n".join(lines)
        self.assertIn("/v1/models", text)
        for secret in [
            "pk-secret-proxy-key",
            "sk-secret-server-key",
            "sk-client-key",
            "wrong-pk",
        ]:
            self.assertNotIn(secret, text)
