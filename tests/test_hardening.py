"""
Hardening: slow and hostile clients, broken upstreams, big bodies (issue 9).
Each test reproduces one of the issue's numbered defects against a real
loopback proxy, with fakes that misbehave on purpose.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from openai_proxy import bodies
from openai_proxy.app import SHORT_KEY
from openai_proxy.telemetry import logs
from tests.fake_upstream import Script, chat_completion, chat_stream
from tests.harness import AUTH, JSON, ModeratedRelayTestCase, Proxy, RelayTestCase
from tests.rawhttp import Collector, connect, raw_request
from tests.test_operations import ERRORS, HANGUPS, REQUESTS, parse_samples, series

_CHUNK = b"x" * 65536


def capture_logs(test: Any) -> list[str]:
    """Every log line formatted from now until the end of C{test}."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


async def get_raw(test: RelayTestCase, path: bytes) -> Collector:
    """Open a raw connection to the proxy and send a keyed GET for C{path}."""
    proto = await connect(test.proxy.port.getHost().port)
    assert proto.transport is not None
    proto.transport.write(
        b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
        b"Connection: close\r\n\r\n"
    )
    return proto


class _ScrapingTest(RelayTestCase):
    async def scrape(self) -> dict[str, float]:
        response = await self.http.get(self.url("/metrics"))
        return parse_samples((await response.content()).decode("utf-8"))


class SlowReaderTests(_ScrapingTest):
    """Item 1: the upstream idle timer measures only the upstream's silence."""

    env = {"TIMEOUT": "200", "SEND_TIMEOUT": "5000"}

    async def test_client_pausing_longer_than_timeout_still_gets_the_whole_body(
        self,
    ) -> None:
        total = 16 * 1024 * 1024
        self.fake.script = Script(
            headers={
                b"content-type": [b"application/octet-stream"],
                b"content-length": [b"%d" % total],
            },
            chunks=[_CHUNK] * (total // len(_CHUNK)),
        )
        lines = capture_logs(self)
        proto = await get_raw(self, b"/v1/files/f/content")
        assert proto.transport is not None
        await proto.first
        proto.transport.pauseProducing()  # the client stops reading...
        await deferLater(reactor, 0.8, lambda: None)  # ...for 4 x TIMEOUT
        proto.transport.resumeProducing()
        data = await proto.done
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b" 200 ", head.split(b"\r\n")[0])
        self.assertEqual(len(body), total)
        self.assertFalse([line for line in lines if "idle timeout" in line])


class SendTimeoutTests(_ScrapingTest):
    """Item 1: a client that stops reading is cut off after SEND_TIMEOUT."""

    env = {"TIMEOUT": "5000", "SEND_TIMEOUT": "300"}

    async def test_stalled_client_is_cut_off_and_counted_as_its_hang_up(
        self,
    ) -> None:
        total = 32 * 1024 * 1024
        self.fake.script = Script(
            headers={b"content-type": [b"application/octet-stream"]},
            chunks=[_CHUNK] * (total // len(_CHUNK)),
        )
        before = await self.scrape()
        lines = capture_logs(self)
        proto = await get_raw(self, b"/v1/files/f/content")
        assert proto.transport is not None
        await proto.first
        proto.transport.pauseProducing()  # and never reads again
        await self.fake.closed[-1]  # the proxy closed the upstream for it
        proto.transport.abortConnection()
        data = await proto.done
        self.assertLess(len(data), total)
        after = await self.scrape()
        self.assertEqual(after.get(HANGUPS, 0) - before.get(HANGUPS, 0), 1)
        self.assertEqual(
            after.get(series(ERRORS, kind="timeout"), 0)
            - before.get(series(ERRORS, kind="timeout"), 0),
            0,
        )
        self.assertTrue([line for line in lines if "stopped reading" in line])
        self.assertTrue([line for line in lines if " 499 " in line])


class TruncatedBodyTests(_ScrapingTest):
    """Item 3: an upstream that breaks off a plain body is the upstream's fault."""

    async def test_truncated_plain_body_is_an_upstream_error_not_a_hang_up(
        self,
    ) -> None:
        self.fake.script = Script(
            headers={
                b"content-type": [b"application/octet-stream"],
                b"content-length": [b"1000"],
            },
            chunks=[b"y" * 100],
            hang_up_after=1,
            interval=0.01,
        )
        before = await self.scrape()
        lines = capture_logs(self)
        proto = await get_raw(self, b"/v1/files/f/content")
        data = await proto.done
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "))
        self.assertNotIn(b"y" * 1000, data)
        after = await self.scrape()
        self.assertEqual(after.get(HANGUPS, 0), before.get(HANGUPS, 0))
        reset = series(ERRORS, kind="reset")
        self.assertEqual(after.get(reset, 0) - before.get(reset, 0), 1)
        access = [line for line in lines if "/v1/files/f/content" in line]
        self.assertTrue(access)
        self.assertNotIn(" 499 ", access[-1])
        self.assertEqual(
            after.get(series(REQUESTS, method="GET", route="files", status="499"), 0),
            before.get(series(REQUESTS, method="GET", route="files", status="499"), 0),
        )


class ResponseHeaderTests(RelayTestCase):
    """Items 4 and 5: what the upstream may not put in the client's headers."""

    async def test_upstream_cannot_forge_the_proxy_request_id(self) -> None:
        lines = capture_logs(self)
        self.fake.script = Script(
            headers={b"x-proxy-request-id": [b"forged-by-upstream"]}, body=b"{}"
        )
        response = await self.http.get(self.url("/v1/models"), headers=AUTH)
        await response.content()
        ids = response.headers.getRawHeaders(b"x-proxy-request-id")
        self.assertEqual(len(ids), 1)
        self.assertNotEqual(ids[0], b"forged-by-upstream")
        self.assertRegex(ids[0], rb"^[0-9a-f]{16}$")
        self.assertFalse([line for line in lines if "forged" in line])

    async def test_headers_named_in_the_upstream_connection_header_are_dropped(
        self,
    ) -> None:
        self.fake.script = Script(
            headers={
                b"connection": [b"x-hop-secret, keep-alive"],
                b"x-hop-secret": [b"internal"],
                b"x-end-to-end": [b"kept"],
            },
            body=b"{}",
        )
        response = await self.http.get(self.url("/v1/models"), headers=AUTH)
        await response.content()
        self.assertIsNone(response.headers.getRawHeaders(b"x-hop-secret"))
        self.assertEqual(response.headers.getRawHeaders(b"x-end-to-end"), [b"kept"])


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def _code(raw: bytes) -> str:
    code: str = json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["code"]
    return code


class HeaderDeadlineTests(RelayTestCase):
    """Item 6: a request's head must arrive within HEADER_TIMEOUT, however it trickles."""

    env = {"HEADER_TIMEOUT": "400"}

    async def test_trickled_headers_are_cut_off_at_the_deadline_with_408(
        self,
    ) -> None:
        proto = await connect(self.proxy.port.getHost().port)
        assert proto.transport is not None
        proto.transport.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        lines = iter([b"X-A: 1\r\n"] * 100)

        def trickle() -> None:
            # One header line every 100 ms: each byte would restart an idle timer.
            if proto.done.called or proto.transport is None:
                return
            proto.transport.write(next(lines))
            calls.append(reactor.callLater(0.1, trickle))

        calls = [reactor.callLater(0.1, trickle)]
        self.addCleanup(lambda: [c.cancel() for c in calls if c.active()])
        raw = await proto.done
        self.assertEqual(_status(raw), 408)
        self.assertEqual(_code(raw), "request_timeout")
        self.assertEqual(self.fake.received, [])

    async def test_silent_connection_is_closed_at_the_deadline(self) -> None:
        proto = await connect(self.proxy.port.getHost().port)
        self.assertEqual(await proto.done, b"")

    async def test_keep_alive_connection_serves_a_second_request_after_a_pause(
        self,
    ) -> None:
        proto = await connect(self.proxy.port.getHost().port)
        assert proto.transport is not None
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        proto.transport.write(request)
        await proto.first
        # Idle between requests for longer than the header deadline.
        await deferLater(reactor, 0.6, lambda: None)
        proto.transport.write(request[:-2] + b"Connection: close\r\n\r\n")
        raw = await proto.done
        self.assertEqual(raw.count(b"HTTP/1.1 200 OK"), 2)


class OversizedHeadTests(RelayTestCase):
    """Item 11: oversized request lines and headers get a status before the close."""

    async def test_long_request_line_is_414(self) -> None:
        raw = await raw_request(
            self.proxy.port.getHost().port,
            b"GET /v1/models?" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        self.assertEqual(_status(raw), 414)
        self.assertEqual(_code(raw), "request_uri_too_long")

    async def test_one_huge_header_is_431(self) -> None:
        raw = await raw_request(
            self.proxy.port.getHost().port,
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: "
            + b"a" * 20000
            + b"\r\n\r\n",
        )
        self.assertEqual(_status(raw), 431)
        self.assertEqual(_code(raw), "request_headers_too_large")

    async def test_many_headers_adding_up_past_16kb_are_431(self) -> None:
        raw = await raw_request(
            self.proxy.port.getHost().port,
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(20))
            + b"\r\n",
        )
        self.assertEqual(_status(raw), 431)
        self.assertEqual(self.fake.received, [])


class EarlyKeyCheckTests(RelayTestCase):
    """Item 8: no key, no body read, no 100 Continue."""

    env = {"PROXY_KEY": "pk-right-proxy-key-0001", "OPENAI_KEY": "sk-server-key-abcdef"}

    async def test_wrong_key_with_expect_gets_403_and_no_100_continue(self) -> None:
        raw = await raw_request(
            self.proxy.port.getHost().port,
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Length: 40000000\r\nExpect: 100-continue\r\n\r\n",
        )
        self.assertNotIn(b"100 Continue", raw)
        self.assertEqual(_status(raw), 403)
        self.assertEqual(_code(raw), "invalid_proxy_key")

    async def test_no_key_is_401_before_a_big_body_is_sent(self) -> None:
        proto = await connect(self.proxy.port.getHost().port)
        assert proto.transport is not None
        proto.transport.write(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 40000000\r\n\r\n"
        )
        await proto.first  # answered with no byte of the body sent
        proto.transport.write(b"x" * 2_000_000)  # then the client sends anyway
        raw = await proto.done  # and is cut off, not read to the end
        self.assertEqual(_status(raw), 401)
        self.assertEqual(_code(raw), "missing_api_key")
        self.assertIn(b"Connection: close", raw)
        self.assertEqual(self.fake.received, [])

    async def test_right_key_with_expect_gets_100_continue_and_is_relayed(
        self,
    ) -> None:
        proto = await connect(self.proxy.port.getHost().port)
        assert proto.transport is not None
        proto.transport.write(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer pk-right-proxy-key-0001\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n"
            b"Connection: close\r\nExpect: 100-continue\r\n\r\n"
        )
        await proto.first
        self.assertTrue(bytes(proto.data).startswith(b"HTTP/1.1 100 Continue"))
        proto.transport.write(b"{}")
        raw = await proto.done
        self.assertIn(b"HTTP/1.1 200 OK", raw)
        [received] = self.fake.received
        self.assertEqual(
            received.header(b"authorization"), b"Bearer sk-server-key-abcdef"
        )

    async def test_own_paths_need_no_key(self) -> None:
        raw = await raw_request(
            self.proxy.port.getHost().port,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(_status(raw), 200)


class RefusedRequestMetricsTests(_ScrapingTest):
    """Requests the server answers itself still count in requests_total."""

    env = {"PROXY_KEY": "pk-right-proxy-key-0001", "OPENAI_KEY": "sk-server-key-abcdef"}

    async def test_early_refusals_are_counted_by_status(self) -> None:
        port = self.proxy.port.getHost().port
        before = await self.scrape()
        wrong = await raw_request(
            port,
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Length: 40000000\r\nExpect: 100-continue\r\n\r\n",
        )
        huge = await raw_request(
            port,
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: "
            + b"a" * 20000
            + b"\r\n\r\n",
        )
        self.assertEqual((_status(wrong), _status(huge)), (403, 431))
        after = await self.scrape()
        forbidden = series(REQUESTS, method="POST", route="files", status="403")
        too_large = series(REQUESTS, method="OTHER", route="other", status="431")
        self.assertEqual(
            {k: after.get(k, 0) - before.get(k, 0) for k in (forbidden, too_large)},
            {forbidden: 1, too_large: 1},
        )


class DuplicateHeaderTests(RelayTestCase):
    """Item 12: ambiguous Authorization or Host headers are refused."""

    env = {"PROXY_KEY": "pk-right-proxy-key-0001", "OPENAI_KEY": "sk-server-key-abcdef"}

    async def test_two_authorization_headers_are_400_even_bad_then_good(
        self,
    ) -> None:
        raw = await raw_request(
            self.proxy.port.getHost().port,
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bad\r\n"
            b"Authorization: Bearer pk-right-proxy-key-0001\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(_status(raw), 400)
        self.assertEqual(_code(raw), "duplicate_authorization")
        self.assertEqual(self.fake.received, [])

    async def test_missing_host_is_400(self) -> None:
        raw = await raw_request(
            self.proxy.port.getHost().port,
            b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer pk-right-proxy-key-0001\r\n"
            b"Connection: close\r\n\r\n",
        )
        self.assertEqual(_status(raw), 400)
        self.assertEqual(_code(raw), "invalid_host_header")

    async def test_two_host_headers_are_400(self) -> None:
        raw = await raw_request(
            self.proxy.port.getHost().port,
            b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nHost: b\r\n"
            b"Authorization: Bearer pk-right-proxy-key-0001\r\n"
            b"Content-Length: 2\r\n\r\n{}",
        )
        self.assertEqual(_status(raw), 400)
        self.assertEqual(self.fake.received, [])


class MetricsCORSTests(RelayTestCase):
    """Item 13: a web page's script may not read /metrics."""

    async def test_metrics_has_no_cors_header_while_the_api_does(self) -> None:
        headers = {"Origin": "https://evil.example"}
        metrics = await self.http.get(self.url("/metrics"), headers=headers)
        await metrics.content()
        self.assertEqual(metrics.code, 200)
        self.assertIsNone(metrics.headers.getRawHeaders(b"access-control-allow-origin"))
        api = await self.http.get(self.url("/v1/models"), headers={**headers, **AUTH})
        await api.content()
        self.assertEqual(
            api.headers.getRawHeaders(b"access-control-allow-origin"), [b"*"]
        )


class CompressedModeratedResponseTests(ModeratedRelayTestCase, _ScrapingTest):
    """Items 2 and 7: a compressed body the proxy must read is decoded strictly."""

    moderation_env = {"MAX_DECODED_BODY": "1000000"}

    async def moderated(self, stream: bool = False) -> tuple[int, bytes]:
        response = await self.post_json(
            "/v1/chat/completions",
            {"model": "m", "messages": [], "moderation": True, "stream": stream},
        )
        return response.code, await response.content()

    def gzipped(self, body: bytes, ctype: bytes = b"application/json") -> Script:
        return Script(
            headers={b"content-type": [ctype], b"content-encoding": [b"gzip"]},
            body=body,
        )

    async def assert_upstream_error(self, before: dict[str, float]) -> None:
        after = await self.scrape()
        reset = series(ERRORS, kind="reset")
        self.assertEqual(after.get(reset, 0) - before.get(reset, 0), 1)

    async def test_corrupt_gzip_is_a_502_logged_and_counted(self) -> None:
        packed = bytearray(
            gzip.compress(json.dumps(chat_completion("hello")).encode(), mtime=0)
        )
        packed[20] ^= 0xFF
        self.fake.script = self.gzipped(bytes(packed))
        before = await self.scrape()
        lines = capture_logs(self)
        code, body = await self.moderated()
        self.assertEqual(code, 502)
        self.assertEqual(json.loads(body)["error"]["code"], "upstream_error")
        self.assertTrue([line for line in lines if "corrupt" in line])
        await self.assert_upstream_error(before)

    async def test_truncated_gzip_is_a_502(self) -> None:
        packed = gzip.compress(
            json.dumps(chat_completion("hello " * 500)).encode(), mtime=0
        )
        self.fake.script = self.gzipped(packed[:20])
        before = await self.scrape()
        code, body = await self.moderated()
        self.assertEqual(code, 502)
        self.assertEqual(json.loads(body)["error"]["code"], "upstream_error")
        await self.assert_upstream_error(before)

    async def test_gzip_bomb_is_capped_at_max_decoded_body(self) -> None:
        bomb = gzip.compress(b" " * 50_000_000, mtime=0)
        self.fake.script = self.gzipped(bomb)
        lines = capture_logs(self)
        code, body = await self.moderated()
        self.assertEqual(code, 502)
        self.assertTrue([line for line in lines if "more than 1000000" in line])

    async def test_truncated_gzip_stream_ends_with_an_error_event(self) -> None:
        events = b"".join(chat_stream(["Hello there. "] * 50))
        packed = gzip.compress(events, mtime=0)
        self.fake.script = Script(
            headers={
                b"content-type": [b"text/event-stream"],
                b"content-encoding": [b"gzip"],
            },
            chunks=[packed[: len(packed) - 8]],  # no trailer: CRC and size missing
        )
        code, body = await self.moderated(stream=True)
        self.assertEqual(code, 200)
        self.assertTrue(body.endswith(b"\n\n"))
        self.assertIn(b"event: error\ndata: ", body)
        self.assertIn(b"upstream_error", body)


class LargeJSONBodyTests(RelayTestCase):
    """Item 9: big JSON bodies are streamed, parsed off the reactor, or refused."""

    env = {"MAX_MODERATED_BODY": "300000"}

    def record_parses(self) -> list[threading.Thread]:
        threads: list[threading.Thread] = []
        original = bodies.parse_json

        def parse_json(raw: bytes, *, strict: bool) -> Any:
            threads.append(threading.current_thread())
            return original(raw, strict=strict)

        self.patch(bodies, "parse_json", parse_json)
        return threads

    async def test_large_body_with_local_fields_is_parsed_in_a_thread(self) -> None:
        threads = self.record_parses()
        payload = {"model": "m", "input": "w " * 100_000, "moderation": False}
        response = await self.post_json("/v1/embeddings", payload)
        await response.content()
        self.assertEqual(response.code, 200)
        del payload["moderation"]
        self.assertEqual(self.fake.received[-1].json(), payload)
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.main_thread())

    async def test_large_body_without_local_fields_streams_unparsed(self) -> None:
        threads = self.record_parses()
        raw = json.dumps({"model": "m", "input": ["x" * 1000] * 2000}).encode()
        response = await self.http.post(
            self.url("/v1/embeddings"), raw, headers={**AUTH, **JSON}
        )
        await response.content()
        self.assertEqual(self.fake.received[-1].body, raw)
        self.assertEqual(threads, [])

    async def test_marker_across_a_scan_boundary_is_found(self) -> None:
        self.patch(bodies, "_SCAN_PIECE", 1000)
        raw = b'{"input": "' + b"x" * 150_993 + b'", "moderation": false}'
        response = await self.http.post(
            self.url("/v1/embeddings"), raw, headers={**AUTH, **JSON}
        )
        await response.content()
        self.assertEqual(self.fake.received[-1].json(), {"input": "x" * 150_993})

    async def test_over_the_limit_on_another_path_is_relayed_as_sent(self) -> None:
        raw = json.dumps({"input": "w " * 200_000, "moderation": False}).encode()
        response = await self.http.post(
            self.url("/v1/embeddings"), raw, headers={**AUTH, **JSON}
        )
        await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(self.fake.received[-1].body, raw)

    async def test_over_the_limit_without_moderation_is_relayed_as_sent(
        self,
    ) -> None:
        raw = json.dumps({"messages": ["w " * 200_000], "moderation": False}).encode()
        response = await self.http.post(
            self.url("/v1/chat/completions"), raw, headers={**AUTH, **JSON}
        )
        await response.content()
        self.assertEqual(self.fake.received[-1].body, raw)


class LargeModeratedJSONBodyTests(ModeratedRelayTestCase):
    """Item 9: a JSON body too large to parse is refused where it is moderated."""

    moderation_env = {"MAX_MODERATED_BODY": "300000"}

    async def test_over_the_limit_on_a_moderated_path_is_413(self) -> None:
        payload = {
            "model": "m",
            "messages": [{"role": "user", "content": "w " * 200_000}],
            "moderation": True,
        }
        response = await self.post_json("/v1/chat/completions", payload)
        error = json.loads(await response.content())["error"]
        self.assertEqual(response.code, 413)
        self.assertEqual(error["code"], "request_too_large")
        self.assertIn("MAX_MODERATED_BODY", error["message"])
        self.assertEqual(self.fake.received, [])


class ShortProxyKeyTests(TestCase):
    """Item 14: a short proxy key is warned about (never printed) and redacted."""

    def setUp(self) -> None:
        self.patch(logs, "_registered", set())
        self.patch(logs, "_pattern", logs._pattern)

    async def test_short_proxy_key_warned_about_at_start_and_redacted(self) -> None:
        lines = capture_logs(self)
        env = {
            "PROXY_KEY": "abc,long-enough-proxy-key-0001",
            "OPENAI_KEY": "sk-s-1234567",
        }
        proxy = Proxy(self, env)
        warnings = [line for line in lines if "shorter than 16" in line]
        self.assertEqual(len(warnings), 1)
        self.assertIn("1 proxy key (PROXY_KEY) is shorter than 16", warnings[0])
        self.assertNotIn("abc", warnings[0])
        self.assertEqual(logs.redact_text("key: abc."), "key: [REDACTED].")
        self.assertIsNotNone(proxy.url)

    async def test_several_short_keys_are_counted_in_plain_words(self) -> None:
        lines = capture_logs(self)
        Proxy(self, {"PROXY_KEY": "abc,defgh", "OPENAI_KEY": "sk-s-1234567"})
        warnings = [line for line in lines if "shorter than 16" in line]
        self.assertEqual(len(warnings), 1)
        self.assertIn("2 proxy keys (PROXY_KEY) are shorter than 16", warnings[0])

    def test_readme_examples_use_keys_that_are_not_warned_about(self) -> None:
        # An example that draws the warning teaches readers to ignore it.
        readme = (Path(__file__).parent.parent / "README.md").read_text("utf-8")
        examples = re.findall(r"PROXY_KEY=([^\s.`'\\]+)", readme)
        examples += re.findall(r"sk-your-openai-key:([^\s\"'`]+)", readme)
        examples += re.findall(r'api_key="([^":]+)"', readme)
        self.assertNotEqual(examples, [])
        self.assertEqual([key for key in examples if len(key) < SHORT_KEY], [])


class ModeratedBodyLimitTests(ModeratedRelayTestCase, _ScrapingTest):
    """Items 7 and 10 for a reply that is not streamed: bounded memory and calls."""

    moderation_env = {"MAX_DECODED_BODY": "100000", "MODERATION_MAX_CALLS": "2"}

    async def moderated(self) -> tuple[int, bytes, Any]:
        response = await self.post_json(
            "/v1/chat/completions", {"model": "m", "messages": [], "moderation": True}
        )
        return response.code, await response.content(), response.headers

    async def test_plain_body_over_the_limit_is_a_502_not_held(self) -> None:
        self.fake.script = Script(
            body=json.dumps(chat_completion("word " * 50_000)).encode()
        )
        lines = capture_logs(self)
        code, body, _ = await self.moderated()
        self.assertEqual(code, 502)
        self.assertEqual(json.loads(body)["error"]["code"], "upstream_error")
        self.assertTrue([line for line in lines if "MAX_DECODED_BODY" in line])

    async def test_reply_needing_more_calls_than_the_cap_follows_on_error(
        self,
    ) -> None:
        # 30,000 characters: three calls of 10,000 against a cap of two.
        self.fake.script = Script(
            body=json.dumps(chat_completion("Fine text. " * 2700)).encode()
        )
        code, body, headers = await self.moderated()
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"x-moderation"), [b"blocked"])
        self.assertEqual([c for c in self.tms.calls if c.text != "ping"], [])


class _BadChunking(Protocol):
    """An upstream whose chunked body turns to garbage after one chunk."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ not a size\r\n"
            )


class MalformedChunkingTests(_ScrapingTest):
    """Item 3: invalid chunking from the upstream is its fault, not a hang-up."""

    async def test_invalid_chunking_is_an_upstream_error_not_a_499(self) -> None:
        port = reactor.listenTCP(
            0, Factory.forProtocol(_BadChunking), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        self.proxy = Proxy(
            self, {"UPSTREAM": f"http://127.0.0.1:{port.getHost().port}"}
        )
        before = await self.scrape()
        lines = capture_logs(self)
        proto = await get_raw(self, b"/v1/files/f/content")
        data = await proto.done
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "))
        after = await self.scrape()
        self.assertEqual(after.get(HANGUPS, 0), before.get(HANGUPS, 0))
        reset = series(ERRORS, kind="reset")
        self.assertEqual(after.get(reset, 0) - before.get(reset, 0), 1)
        access = [line for line in lines if "/v1/files/f/content" in line]
        self.assertNotIn(" 499 ", access[-1])
