"""
The WebSocket relay, end to end over loopback: the official SDK's realtime
clients and raw WebSocket clients (the websockets package, in threads)
through the proxy to a fake realtime upstream (tests/fake_realtime.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.certs import make_certs
from tests.fake_realtime import DELTAS, FakeRealtime
from tests.harness import KEY, Proxy, closed_port_url

PROXY_KEY = "pk-realtime-0123456789abcdef"
SERVER_KEY = "sk-server-0123456789"


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (in 5 ms steps) for C{check}, which another thread makes true."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await deferLater(reactor, 0.005, lambda: None)


def events_until(ws: ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Read events until one of type C{kind} (included)."""
    seen = []
    while True:
        event = json.loads(ws.recv(timeout=5))
        seen.append(event)
        if event["type"] == kind:
            return seen


def closed_with(ws: ClientConnection) -> tuple[int | None, str]:
    """Read until the proxy closes; the code and reason it sent."""
    try:
        while True:
            ws.recv(timeout=5)
    except ConnectionClosed as e:
        assert e.rcvd is not None, "closed without a close frame"
        return e.rcvd.code, e.rcvd.reason


def _needs_the_sdk() -> None:
    # Imported where used: the rest of this module runs without the SDK
    # (on PyPy, where it does not install).
    if importlib.util.find_spec("openai") is None:
        raise SkipTest("the openai SDK is not installed")


class RealtimeTestCase(TestCase):
    """A fake realtime upstream and a proxy in front of it, per test."""

    env: dict[str, str] = {}

    def setUp(self) -> None:
        self.fake = FakeRealtime()
        self.upstream = self.fake.start(self)
        self.proxy = Proxy(self, {"UPSTREAM": self.upstream, **self.env})
        self.ws_base = self.proxy.url.replace("http://", "ws://")

    def open(
        self,
        path: str = "/v1/realtime?model=gpt-realtime",
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> ClientConnection:
        """Connect (blocking: call it in a thread)."""
        if headers is None:
            headers = {"Authorization": f"Bearer {KEY}"}
        return connect(
            self.ws_base + path,
            additional_headers=headers,
            compression=None,
            max_size=None,
            open_timeout=5,
            **options,
        )

    def session(self) -> Any:
        sessions = self.proxy.app.resource._realtime.sessions
        assert len(sessions) == 1
        return sessions[0]


class SDKTests(RealtimeTestCase):
    async def test_the_ga_sdk_holds_a_session_through_the_proxy(self) -> None:
        _needs_the_sdk()
        from openai import OpenAI

        def run() -> list[Any]:
            client = OpenAI(
                api_key=KEY,
                base_url=self.proxy.url + "/v1",
                websocket_base_url=self.ws_base + "/v1",
            )
            with client.realtime.connect(model="gpt-realtime") as conn:
                conn.session.update(
                    session={"type": "realtime", "instructions": "Be brief."}
                )
                conn.response.create()
                seen = []
                for event in conn:
                    seen.append(event)
                    if event.type == "response.done":
                        break
            return seen

        seen = await deferToThread(run)
        kinds = [e.type for e in seen]
        self.assertEqual(
            kinds[:3], ["session.created", "session.updated", "response.created"]
        )
        self.assertEqual(kinds[-1], "response.done")
        text = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
        self.assertEqual(text, "".join(DELTAS))
        handshake = self.fake.handshakes[0]
        self.assertEqual(handshake.path, "/v1/realtime?model=gpt-realtime")
        self.assertEqual(handshake.headers["Authorization"], f"Bearer {KEY}")
        self.assertEqual(
            self.fake.events("session.update")[0]["session"]["instructions"],
            "Be brief.",
        )

    async def test_the_beta_sdk_holds_a_session_over_a_tls_listen(self) -> None:
        _needs_the_sdk()
        from openai import OpenAI

        directory = self.mktemp()
        os.makedirs(directory)
        certs = make_certs(directory)
        description = (
            f"ssl:0:interface=127.0.0.1:privateKey={certs.key}:certKey={certs.cert}"
        )
        port = await serverFromString(reactor, description).listen(self.proxy.app.site)
        self.addCleanup(port.stopListening)
        context = ssl.create_default_context(cafile=certs.ca)

        def run() -> list[str]:
            client = OpenAI(
                api_key=KEY, base_url=f"https://localhost:{port.getHost().port}/v1"
            )
            # The beta client always dials wss://, whatever the base URL says.
            with client.beta.realtime.connect(
                model="gpt-4o-realtime-preview",
                websocket_connection_options={"ssl": context},
            ) as conn:
                conn.response.create()
                kinds = []
                for event in conn:
                    kinds.append(event.type)
                    if event.type == "response.done":
                        break
            return kinds

        kinds = await deferToThread(run)
        self.assertIn("response.text.delta", kinds)
        self.assertEqual(kinds[-1], "response.done")
        self.assertEqual(self.fake.handshakes[0].headers["OpenAI-Beta"], "realtime=v1")


class HandshakeTests(RealtimeTestCase):
    env = {"PROXY_KEY": PROXY_KEY, "OPENAI_KEY": SERVER_KEY}

    async def test_a_browser_key_in_the_subprotocol_is_taken_and_not_sent_upstream(
        self,
    ) -> None:
        def run() -> str | None:
            ws = self.open(
                headers={"OpenAI-Beta": "realtime=v1", "x-request-id": "req_1"},
                subprotocols=["realtime", f"openai-insecure-api-key.{PROXY_KEY}"],  # type: ignore[list-item]
            )
            with ws:
                events_until(ws, "session.created")
                return ws.subprotocol

        chosen = await deferToThread(run)
        self.assertEqual(chosen, "realtime")
        handshake = self.fake.handshakes[0]
        self.assertEqual(handshake.subprotocols, ["realtime"])
        self.assertEqual(handshake.headers["Authorization"], f"Bearer {SERVER_KEY}")
        self.assertEqual(handshake.headers["OpenAI-Beta"], "realtime=v1")
        self.assertEqual(handshake.headers["x-request-id"], "req_1")
        self.assertNotIn(PROXY_KEY, str(handshake.headers))

    async def test_a_wrong_key_is_refused_before_anything_goes_upstream(self) -> None:
        def run() -> int:
            try:
                self.open(subprotocols=["realtime", "openai-insecure-api-key.pk-wrong"])  # type: ignore[list-item]
            except InvalidStatus as e:
                body = json.loads(e.response.body or b"{}")
                assert body["error"]["code"] == "invalid_proxy_key", body
                return e.response.status_code
            raise AssertionError("accepted")

        self.assertEqual(await deferToThread(run), 403)
        self.assertEqual(self.fake.handshakes, [])

    async def test_an_upstream_refusal_reaches_the_client_as_http(self) -> None:
        body = b'{"error": {"message": "bad key", "code": "invalid_api_key"}}'
        self.fake.refuse = (401, body)

        def run() -> Any:
            try:
                self.open(headers={"Authorization": f"Bearer {PROXY_KEY}"})
            except InvalidStatus as e:
                return e.response
            raise AssertionError("accepted")

        response = await deferToThread(run)
        self.assertEqual(response.status_code, 401)
        self.assertEqual(response.body, body)
        self.assertEqual(response.headers["x-request-id"], "req_refused")
        self.assertEqual(self.fake.opened, 0)


class UnreachableTests(TestCase):
    async def test_an_unreachable_upstream_gets_502(self) -> None:
        proxy = Proxy(self, {"UPSTREAM": await closed_port_url()})
        url = proxy.url.replace("http://", "ws://") + "/v1/realtime"

        def run() -> int:
            try:
                connect(url, additional_headers={"Authorization": f"Bearer {KEY}"})
            except InvalidStatus as e:
                return e.response.status_code
            raise AssertionError("accepted")

        self.assertEqual(await deferToThread(run), 502)


class FrameTests(RealtimeTestCase):
    env = {"WS_MAX_MESSAGE": "100000"}

    async def test_text_and_binary_messages_cross_unchanged_and_in_order(self) -> None:
        payloads: list[str | bytes] = [
            "plain text",
            b"\x00\xffbinary",
            "é" * 1000,
            bytes(70000),
        ]

        def run() -> list[str | bytes]:
            with self.open() as ws:
                events_until(ws, "session.created")
                for payload in payloads:
                    ws.send(payload)
                # A fragmented message is relayed as one message.
                ws.send(iter(["frag", "mented"]))
                return [ws.recv(timeout=5) for _ in range(len(payloads) + 1)]

        echoed = await deferToThread(run)
        self.assertEqual(echoed, [*payloads, "fragmented"])

    async def test_close_codes_and_reasons_cross_both_ways(self) -> None:
        def client_closes() -> None:
            with self.open() as ws:
                events_until(ws, "session.created")
                ws.close(4000, "client done")

        await deferToThread(client_closes)
        await until(lambda: len(self.fake.closes) == 1)
        self.assertEqual(
            (self.fake.closes[0].code, self.fake.closes[0].reason),
            (4000, "client done"),
        )

        def upstream_closes() -> tuple[int | None, str]:
            with self.open() as ws:
                events_until(ws, "session.created")
                ws.send(
                    json.dumps(
                        {"type": "fake.close", "code": 4001, "reason": "server done"}
                    )
                )
                return closed_with(ws)

        self.assertEqual(await deferToThread(upstream_closes), (4001, "server done"))

    async def test_a_message_over_the_limit_closes_with_1009(self) -> None:
        def run() -> tuple[int | None, str]:
            with self.open() as ws:
                events_until(ws, "session.created")
                ws.send("x" * 100_001)
                return closed_with(ws)

        code, _ = await deferToThread(run)
        self.assertEqual(code, 1009)
        await until(lambda: len(self.fake.closes) == 1)
        self.assertEqual(self.fake.closes[0].code, 1009)
        self.assertEqual(self.fake.received, [])

    async def test_a_client_hang_up_closes_the_upstream_within_100_ms(self) -> None:
        def run() -> float:
            ws = self.open()
            events_until(ws, "session.created")
            ws.socket.shutdown(socket.SHUT_RDWR)
            ws.socket.close()
            return time.monotonic()

        hung_up = await deferToThread(run)
        await until(lambda: len(self.fake.closes) == 1)
        self.assertLess(self.fake.closes[0].at - hung_up, 0.1)
        self.assertEqual(self.fake.closes[0].code, 1001)

    async def test_an_upstream_hang_up_closes_the_client_with_1011(self) -> None:
        def run() -> tuple[float, tuple[int | None, str]]:
            with self.open() as ws:
                events_until(ws, "session.created")
                sent = time.monotonic()
                ws.send(json.dumps({"type": "fake.hangup"}))
                closed = closed_with(ws)
                return time.monotonic() - sent, closed

        took, (code, _) = await deferToThread(run)
        self.assertEqual(code, 1011)
        self.assertLess(took, 0.1)

    async def test_a_client_that_stops_reading_pauses_the_upstream(self) -> None:
        def run() -> ClientConnection:
            ws = self.open(close_timeout=0.1)  # it will never read the answer
            events_until(ws, "session.created")
            # Ask for ~64 MB the client will not read.
            ws.send(json.dumps({"type": "fake.flood", "count": 1000, "size": 65536}))
            return ws

        ws = await deferToThread(run)
        self.addCleanup(deferToThread, ws.close)
        await until(lambda: self.fake.flooded > 10)
        await deferLater(reactor, 0.3, lambda: None)
        transport = self.session().client.transport
        buffered = len(transport.dataBuffer) + transport._tempDataLen
        self.assertLess(self.fake.flooded, 200)
        self.assertLess(buffered, 2_000_000)


KEYS_TOML = """
[[keys]]
name = "alice"
key = "pk-alice-0123456789abcdef"
concurrency = 1
tpm = 20
models = ["gpt-realtime*"]

[[keys]]
name = "bob"
key = "pk-bob-0123456789abcdef"
"""
ALICE = {"Authorization": "Bearer pk-alice-0123456789abcdef"}
BOB = {"Authorization": "Bearer pk-bob-0123456789abcdef"}


class NamedKeyTests(RealtimeTestCase):
    def setUp(self) -> None:
        fd, path = tempfile.mkstemp(suffix=".toml")
        os.write(fd, KEYS_TOML.encode())
        os.close(fd)
        self.addCleanup(os.unlink, path)
        self.env = {"KEYS_FILE": path, "OPENAI_KEY": SERVER_KEY}
        super().setUp()

    async def test_a_model_outside_models_is_refused_at_the_handshake(self) -> None:
        def run() -> Any:
            try:
                self.open("/v1/realtime?model=gpt-4o-realtime-preview", headers=ALICE)
            except InvalidStatus as e:
                return e.response
            raise AssertionError("accepted")

        response = await deferToThread(run)
        self.assertEqual(response.status_code, 403)
        self.assertEqual(
            json.loads(response.body)["error"]["code"], "model_not_allowed"
        )
        self.assertEqual(self.fake.handshakes, [])

    async def test_a_session_update_to_another_model_is_refused_with_an_error_event(
        self,
    ) -> None:
        def run() -> dict[str, Any]:
            with self.open(headers=ALICE) as ws:
                events_until(ws, "session.created")
                ws.send(
                    json.dumps(
                        {
                            "type": "session.update",
                            "event_id": "e1",
                            "session": {"model": "gpt-4o"},
                        }
                    )
                )
                error = json.loads(ws.recv(timeout=5))
                ws.send(
                    json.dumps(
                        {
                            "type": "session.update",
                            "session": {"model": "gpt-realtime-mini"},
                        }
                    )
                )
                events_until(ws, "session.updated")
                return error  # type: ignore[no-any-return]

        error = await deferToThread(run)
        self.assertEqual(error["type"], "error")
        self.assertEqual(error["error"]["code"], "model_not_allowed")
        self.assertEqual(error["error"]["event_id"], "e1")
        updates = self.fake.events("session.update")
        self.assertEqual(
            [u["session"]["model"] for u in updates], ["gpt-realtime-mini"]
        )

    async def test_a_session_holds_a_concurrency_slot_while_open(self) -> None:
        def run() -> int:
            with self.open(headers=ALICE) as ws:
                events_until(ws, "session.created")
                try:
                    self.open(headers=ALICE)
                except InvalidStatus as e:
                    return e.response.status_code
                raise AssertionError("a second session was accepted")

        self.assertEqual(await deferToThread(run), 429)
        await until(lambda: self.proxy.app.accounting.unsettled == 0)

        def again() -> None:
            with self.open(headers=ALICE) as ws:
                events_until(ws, "session.created")

        await deferToThread(again)

    async def test_tokens_are_charged_as_each_response_is_done(self) -> None:
        def run() -> list[str]:
            with self.open(headers=BOB) as ws:
                events_until(ws, "session.created")
                ws.send(json.dumps({"type": "response.create"}))
                events_until(ws, "response.done")
                return []

        await deferToThread(run)
        await until(lambda: self.proxy.app.accounting.unsettled == 0)
        report = await self.proxy.app.limiter.report(time.time(), ["bob"])
        self.assertEqual(report.today["bob"]["prompt_tokens"], 12)
        self.assertEqual(report.today["bob"]["completion_tokens"], 18)
        self.assertEqual(report.today["bob"]["requests"], 1)
        metrics = self.proxy.app.metrics.registry
        self.assertEqual(
            metrics.get_sample_value(
                "openai_proxy_tokens_total", {"key": "bob", "kind": "prompt"}
            ),
            12,
        )

    async def test_a_key_over_tpm_is_stopped_before_its_next_response(self) -> None:
        def run() -> tuple[dict[str, Any], tuple[int | None, str]]:
            with self.open(headers=ALICE) as ws:
                events_until(ws, "session.created")
                ws.send(json.dumps({"type": "response.create"}))
                events_until(ws, "response.done")  # 30 tokens: over tpm = 20
                ws.send(json.dumps({"type": "response.create", "event_id": "e2"}))
                error = json.loads(ws.recv(timeout=5))
                return error, closed_with(ws)

        error, (code, _) = await deferToThread(run)
        self.assertEqual(error["error"]["code"], "rate_limit_exceeded")
        self.assertEqual(code, 1008)
        self.assertEqual(len(self.fake.events("response.create")), 1)

    async def test_responses_over_websocket_is_relayed_and_its_usage_charged(
        self,
    ) -> None:
        completed = {
            "type": "response.completed",
            "response": {
                "id": "resp_1",
                "usage": {"input_tokens": 7, "output_tokens": 5},
            },
        }

        def run() -> dict[str, Any]:
            with self.open("/v1/responses", headers=BOB) as ws:
                events_until(ws, "session.created")
                ws.send(json.dumps({"type": "fake.say", "event": completed}))
                return events_until(ws, "response.completed")[-1]

        self.assertEqual(await deferToThread(run), completed)
        self.assertEqual(self.fake.handshakes[0].path, "/v1/responses")
        await until(lambda: self.proxy.app.accounting.unsettled == 0)
        report = await self.proxy.app.limiter.report(time.time(), ["bob"])
        self.assertEqual(report.today["bob"]["prompt_tokens"], 7)
        self.assertEqual(report.today["bob"]["completion_tokens"], 5)


class OperationsTests(RealtimeTestCase):
    env = {"GRACE": "0.2"}

    async def test_sessions_are_counted_and_logged_when_they_end(self) -> None:
        from twisted.logger import globalLogPublisher

        lines: list[dict[str, Any]] = []
        observer = lines.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        metrics = self.proxy.app.metrics.registry

        def run() -> None:
            with self.open() as ws:
                events_until(ws, "session.created")
                ws.send(json.dumps({"type": "response.create"}))
                events_until(ws, "response.done")
                assert metrics.get_sample_value("openai_proxy_websocket_sessions") == 1
                ws.close(4002, "bye")

        await deferToThread(run)
        await until(lambda: not self.proxy.app.resource._realtime.sessions)
        self.assertEqual(metrics.get_sample_value("openai_proxy_websocket_sessions"), 0)
        self.assertEqual(
            metrics.get_sample_value(
                "openai_proxy_websocket_closes_total", {"code": "4002"}
            ),
            1,
        )
        self.assertEqual(
            metrics.get_sample_value(
                "openai_proxy_websocket_messages_total", {"direction": "upstream"}
            ),
            1,
        )
        self.assertEqual(
            metrics.get_sample_value(
                "openai_proxy_websocket_messages_total", {"direction": "client"}
            ),
            12,
        )
        self.assertGreater(
            metrics.get_sample_value(
                "openai_proxy_websocket_bytes_total", {"direction": "client"}
            ),
            0,
        )
        [line] = [e for e in lines if e.get("method") == "WS"]
        self.assertEqual(line["path"], "/v1/realtime")
        self.assertEqual((line["close_code"], line["closed_by"]), (4002, "client"))
        self.assertEqual((line["messages_in"], line["messages_out"]), (1, 12))
        self.assertNotIn("model=", line["line"])

    async def test_a_drain_lets_sessions_run_for_the_grace_then_closes_them_with_1001(
        self,
    ) -> None:
        def run() -> ClientConnection:
            ws = self.open()
            events_until(ws, "session.created")
            return ws

        ws = await deferToThread(run)
        self.addCleanup(deferToThread, ws.close)
        started = time.monotonic()
        stopping = self.proxy.app.drain.stopService()
        self.assertEqual(self.proxy.app.resource._realtime.sessions[0].close_code, None)

        def refused() -> int:
            try:
                self.open()
            except InvalidStatus as e:
                return e.response.status_code
            raise AssertionError("a session opened while draining")

        self.assertEqual(await deferToThread(refused), 503)
        await stopping
        self.assertGreaterEqual(time.monotonic() - started, 0.2)
        self.assertEqual((await deferToThread(closed_with, ws))[0], 1001)
        await until(lambda: len(self.fake.closes) == 1)
        self.assertEqual(self.fake.closes[0].code, 1001)


class ChannelTests(TestCase):
    def test_hand_over_leans_on_http_channel(self) -> None:
        """
        ProxyChannel.hand_over reads twisted.web's private C{_dataBuffer}
        (bytes a client sent while its request was handled) and expects the
        channel to be its transport's producer: if Twisted changes either,
        this fails first.
        """
        from twisted.internet.testing import StringTransport
        from twisted.web.http import HTTPChannel

        from openai_proxy.http.server import ProxyChannel

        channel = HTTPChannel()
        transport = StringTransport()
        channel.makeConnection(transport)
        self.assertIsInstance(channel._dataBuffer, list)
        self.assertIs(transport.producer, channel)
        self.assertTrue(callable(getattr(ProxyChannel, "hand_over", None)))


class QueryTests(RealtimeTestCase):
    async def test_the_moderation_parameters_are_not_sent_upstream(self) -> None:
        def run() -> None:
            path = (
                "/v1/realtime?model=gpt-realtime&moderation=false&moderation_level=high"
            )
            with self.open(path) as ws:
                events_until(ws, "session.created")

        await deferToThread(run)
        self.assertEqual(
            self.fake.handshakes[0].path, "/v1/realtime?model=gpt-realtime"
        )

    async def test_an_unknown_moderation_level_refuses_the_handshake(self) -> None:
        def run() -> int:
            path = "/v1/realtime?model=gpt-realtime&moderation=true&moderation_level=strict"
            try:
                with self.open(path):
                    return 101
            except InvalidStatus as e:
                return e.response.status_code

        self.assertEqual(await deferToThread(run), 400)
        self.assertEqual(self.fake.handshakes, [])


class ModeratedSessionTests(RealtimeTestCase):
    """A session moderated through the relay, with the keywords backend."""

    def setUp(self) -> None:
        terms = self.mktemp()
        with open(terms, "w", encoding="utf-8") as f:
            f.write("fake model\n")
        self.env = {
            "MODERATION_BACKEND": "keywords",
            "MODERATION_KEYWORDS_FILE": terms,
        }
        super().setUp()

    async def test_a_blocked_sentence_never_reaches_the_client_and_cancels_upstream(
        self,
    ) -> None:
        def run() -> list[dict[str, Any]]:
            with self.open("/v1/realtime?model=gpt-realtime&moderation=true") as ws:
                events_until(ws, "session.created")
                ws.send(json.dumps({"type": "response.create"}))
                return events_until(ws, "response.done")

        events = await deferToThread(run)
        said = "".join(
            e.get("delta", "") for e in events if e["type"].endswith("text.delta")
        )
        self.assertNotIn("fake model", json.dumps(events))
        self.assertNotIn("fake model", said)
        errors = [e for e in events if e["type"] == "error"]
        self.assertEqual(errors[0]["error"]["code"], "content_filter")
        self.assertEqual(events[-1]["response"]["status"], "cancelled")
        await until(lambda: bool(self.fake.events("response.cancel")))


class KeepAliveTests(RealtimeTestCase):
    env = {"WS_PING_INTERVAL": "0.05"}

    async def test_a_client_gone_silent_is_dropped_after_unanswered_pings(self) -> None:
        def run() -> bytes:
            sock = socket.create_connection(
                ("127.0.0.1", self.proxy.port.getHost().port)
            )
            sock.sendall(
                b"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\n"
                b"Host: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n"
                b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n"
            )
            sock.settimeout(5)
            received = b""
            try:
                while chunk := sock.recv(65536):  # never answering a ping
                    received += chunk
            except OSError:
                pass
            sock.close()
            return received

        received = await deferToThread(run)
        self.assertTrue(received.startswith(b"HTTP/1.1 101 "))
        self.assertIn(b"\x89\x00", received)  # the proxy's pings
        await until(lambda: len(self.fake.closes) == 1)
        self.assertEqual(self.fake.closes[0].code, 1001)


#: Where the Node SDK is installed once (npm install is the slow part).
NODE_SDK = os.path.join(tempfile.gettempdir(), "openai-proxy-node-sdk")
NODE_SCRIPT = os.path.join(os.path.dirname(__file__), "node_realtime.js")


def _node_sdk() -> str | None:
    """Install openai and ws for Node once; the reason to skip, or None."""
    if not shutil.which("node") or not shutil.which("npm"):
        return "node and npm are not installed"
    if os.path.isdir(os.path.join(NODE_SDK, "node_modules", "openai", "realtime")):
        return None
    os.makedirs(NODE_SDK, exist_ok=True)
    run = subprocess.run(
        [
            "npm",
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            NODE_SDK,
            "openai",
            "ws",
        ],
        capture_output=True,
        timeout=300,
    )
    if run.returncode != 0:
        return "npm install openai ws failed: " + run.stderr.decode()[-300:]
    return None


class NodeSDKTests(RealtimeTestCase):
    async def test_the_node_sdk_holds_a_session_over_a_tls_listen(self) -> None:
        skip = await deferToThread(_node_sdk)
        if skip is not None:
            raise SkipTest(skip)
        directory = self.mktemp()
        os.makedirs(directory)
        certs = make_certs(directory)
        description = (
            f"ssl:0:interface=127.0.0.1:privateKey={certs.key}:certKey={certs.cert}"
        )
        port = await serverFromString(reactor, description).listen(self.proxy.app.site)
        self.addCleanup(port.stopListening)
        env = {
            **os.environ,
            "NODE_PATH": os.path.join(NODE_SDK, "node_modules"),
            "BASE": f"https://localhost:{port.getHost().port}/v1",
            "CA": certs.ca,
            "KEY": KEY,
        }

        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                ["node", NODE_SCRIPT], env=env, capture_output=True, timeout=30
            )

        done = await deferToThread(run)
        self.assertEqual(done.returncode, 0, done.stderr.decode())
        kinds = json.loads(done.stdout)
        self.assertIn("response.output_text.delta", kinds)
        self.assertEqual(kinds[-1], "response.done")
        self.assertEqual(
            self.fake.handshakes[0].path, "/v1/realtime?model=gpt-realtime"
        )


class SendTimeoutTests(RealtimeTestCase):
    env = {"SEND_TIMEOUT": "300"}

    async def test_a_client_that_takes_nothing_for_send_timeout_is_closed(self) -> None:
        def run() -> ClientConnection:
            ws = self.open()
            events_until(ws, "session.created")
            ws.send(json.dumps({"type": "fake.flood", "count": 1000, "size": 65536}))
            return ws

        ws = await deferToThread(run)
        self.addCleanup(deferToThread, ws.close)
        await until(lambda: len(self.fake.closes) == 1)
        self.assertEqual(self.fake.closes[0].code, 1008)
        await until(lambda: not self.proxy.app.resource._realtime.sessions)


class SlowUpstreamTests(TestCase):
    async def test_an_upstream_that_never_answers_the_handshake_gets_504(self) -> None:
        silent = reactor.listenTCP(
            0, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )
        self.addCleanup(silent.stopListening)
        upstream = f"http://127.0.0.1:{silent.getHost().port}"
        proxy = Proxy(self, {"UPSTREAM": upstream, "TIMEOUT": "200"})
        url = proxy.url.replace("http://", "ws://") + "/v1/realtime"

        def run() -> int:
            try:
                connect(url, additional_headers={"Authorization": f"Bearer {KEY}"})
            except InvalidStatus as e:
                return e.response.status_code
            raise AssertionError("accepted")

        self.assertEqual(await deferToThread(run), 504)
