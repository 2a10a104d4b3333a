"""
Operations end to end (issue 5): the Prometheus series as a scraper sees
them after real traffic, C{METRICS_KEY} and C{METRICS_LISTEN}, the JSON log of
a real C{twistd openai-proxy} process, the graceful drain on SIGTERM, and
C{/readyz}.

Everything runs on loopback sockets.  The in-process tests use the harness
proxy; the twistd tests spawn a child process (with C{reactor.spawnProcess},
so the fake upstream in this process keeps serving it) and learn its port
from its "ProxySite starting on N" log line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import (
    ConnectionRefusedError,
    ProcessDone,
    ProcessTerminated,
)
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

import openai_proxy
from openai_proxy.app import ProxyApp
from openai_proxy.tap import Options, makeService
from tests.fake_tms import FakeTMS
from tests.fake_upstream import FakeOpenAI, Script, chat_stream
from tests.harness import (
    AUTH,
    JSON,
    KEY,
    REFUSAL,
    TMS_ID,
    TMS_SECRET,
    TWISTD,
    ModeratedRelayTestCase,
    Proxy,
    RelayTestCase,
    client,
)
from tests.test_migration import expected_backlog, kernel_backlogs

REPO = Path(openai_proxy.__file__).resolve().parents[1]


#: Samples by series, written as C{name{label="value",...}} (labels sorted).
Samples = dict[str, float]

REQUESTS = "openai_proxy_requests_total"
ERRORS = "openai_proxy_upstream_errors_total"
ACTIVE = "openai_proxy_active_requests"
STREAMS = "openai_proxy_active_streams"
HANGUPS = "openai_proxy_client_hangups_total"
SENT = "openai_proxy_sent_bytes_total"
RECEIVED = "openai_proxy_received_bytes_total"
HEADERS_COUNT = "openai_proxy_upstream_headers_seconds_count"
DURATION_COUNT = "openai_proxy_request_duration_seconds_count"
BLOCKED = "openai_proxy_blocked_streams_total"
MODERATION_CALLS = "openai_proxy_moderation_calls_total"
MODERATION_COUNT = "openai_proxy_moderation_seconds_count"


# -- helpers ---------------------------------------------------------------


def series(name: str, **labels: str) -> str:
    """The key of one series in L{Samples}."""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if inner else name


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by L{series} key."""
    return {
        series(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def moved(before: Samples, after: Samples, *keys: str) -> dict[str, float]:
    """How much each series moved between two scrapes (absent counts as 0)."""
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}


def upstream_errors(
    unreachable: int = 0, timeout: int = 0, reset: int = 0
) -> dict[str, float]:
    """Expected moves of every C{upstream_errors_total{kind}} series."""
    return {
        series(ERRORS, kind="unreachable"): unreachable,
        series(ERRORS, kind="timeout"): timeout,
        series(ERRORS, kind="reset"): reset,
    }


async def closed_port() -> int:
    """A loopback port on which nothing listens any more."""
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    number: int = port.getHost().port
    await port.stopListening()
    return number


def free_port() -> int:
    """A loopback port free right now (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def post(path: str, body: bytes, *headers: str) -> bytes:
    """A raw HTTP/1.1 POST request."""
    head = [f"POST {path} HTTP/1.1", "Host: proxy", *headers]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def get(path: str, *headers: str) -> bytes:
    """A raw HTTP/1.1 GET request."""
    return (
        "\r\n".join([f"GET {path} HTTP/1.1", "Host: proxy", *headers]) + "\r\n\r\n"
    ).encode()


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """
    Parse one raw HTTP/1.1 response: status, headers (lower-case names,
    last value wins), body (de-chunked when chunked), and whether the body
    was complete (the final chunk, or all of Content-Length, arrived).
    """
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, val = line.partition(":")
        headers[name.strip().lower()] = val.strip()
    if headers.get("transfer-encoding", "").lower() != "chunked":
        length = int(headers.get("content-length", len(rest)))
        return status, headers, rest[:length], len(rest) >= length
    body = bytearray()
    while True:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            return status, headers, bytes(body), False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return status, headers, bytes(body), True
        if len(rest) < size + 2:
            body += rest[:size]
            return status, headers, bytes(body), False
        body += rest[:size]
        rest = rest[size + 2 :]


class Conn(Protocol):
    """
    A raw TCP client: collects what the server sends; L{until} fires once
    the data holds a marker (or its count of it), L{closed} at the close.
    """

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[bytes] = Deferred()
        self._waits: list[tuple[bytes, int, Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        waits, self._waits = self._waits, []
        for marker, _, d in waits:
            d.errback(AssertionError(f"closed before {marker!r}: {self.data!r}"))
        self.closed.callback(self.data)

    def _check(self) -> None:
        for wait in list(self._waits):
            marker, count, d = wait
            if self.data.count(marker) >= count:
                self._waits.remove(wait)
                d.callback(self.data)

    def until(self, marker: bytes, count: int = 1) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self._waits.append((marker, count, d))
        self._check()
        return d

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


async def connect(test: TestCase, port: int) -> Conn:
    """Open a raw connection to C{127.0.0.1:port}, closed at the test's end."""
    conn = Conn()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), conn)

    async def close() -> None:
        if not conn.closed.called:
            assert conn.transport is not None
            conn.transport.abortConnection()
            await conn.closed

    test.addCleanup(close)
    return conn


def when_ready(test: TestCase, app: ProxyApp) -> Deferred[None]:
    """Fire once the app's readiness has every condition met."""
    if app.readiness.is_ready:
        return succeed(None)
    d: Deferred[None] = Deferred()
    original = app.readiness.mark

    def mark(condition: str) -> None:
        original(condition)
        if app.readiness.is_ready and not d.called:
            d.callback(None)

    test.patch(app.readiness, "mark", mark)
    return d


def next_moderation_call(test: TestCase, app: ProxyApp) -> Deferred[str]:
    """Fire with the result of the app's next moderation backend call."""
    d: Deferred[str] = Deferred()
    original = app.metrics.moderation_call

    def moderation_call(backend: str, result: str, seconds: float) -> None:
        original(backend, result, seconds)
        if not d.called:
            d.callback(result)

    test.patch(app.metrics, "moderation_call", moderation_call)
    return d


# -- metrics after real traffic ---------------------------------------------


class _ProxyTest(RelayTestCase):
    """A fake upstream and an in-process proxy in front of it, scraped."""

    async def scrape(self, proxy: Proxy | None = None) -> Samples:
        """Fetch and parse C{GET /metrics} from the proxy's main port."""
        proxy = proxy or self.proxy
        response = await self.http.get(proxy.url + "/metrics")
        self.assertEqual(response.code, 200)
        return parse_samples((await response.content()).decode("utf-8"))


class MetricsAfterTrafficTests(_ProxyTest):
    env = {"TIMEOUT": "300"}

    def assertMoved(
        self, before: Samples, after: Samples, expected: dict[str, float]
    ) -> None:
        self.assertEqual(moved(before, after, *expected), expected)

    async def test_relayed_stream_counts_request_route_bytes_and_timings(self) -> None:
        events = chat_stream(["Hel", "lo", "!"])
        self.fake.script = Script(events=events, interval=0.001)
        payload = json.dumps({"model": "m", "stream": True}).encode()
        before = await self.scrape()
        response = await self.http.post(
            self.proxy.url + "/v1/chat/completions", payload, headers={**AUTH, **JSON}
        )
        body = await response.content()
        self.assertEqual(body, b"".join(events))
        after = await self.scrape()
        self.assertMoved(
            before,
            after,
            {
                series(REQUESTS, method="POST", route="chat", status="200"): 1,
                series(SENT, route="chat"): len(body),
                series(RECEIVED, route="chat"): len(payload),
                series(HEADERS_COUNT, route="chat"): 1,
                series(DURATION_COUNT, route="chat"): 1,
                HANGUPS: 0,
                **upstream_errors(),
            },
        )
        # The only request in flight is the scrape itself.
        self.assertEqual((after[STREAMS], after[ACTIVE]), (0, 1))

    async def test_429_passthrough_counted_by_status_not_as_upstream_error(
        self,
    ) -> None:
        error = b'{"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}'
        self.fake.script = Script(
            status=429, headers={b"retry-after": [b"2"]}, body=error
        )
        before = await self.scrape()
        response = await self.post_json("/v1/chat/completions", {"model": "m"})
        self.assertEqual((response.code, await response.content()), (429, error))
        after = await self.scrape()
        self.assertMoved(
            before,
            after,
            {
                series(REQUESTS, method="POST", route="chat", status="429"): 1,
                series(SENT, route="chat"): len(error),
                **upstream_errors(),
            },
        )

    async def test_client_hang_up_mid_stream_counted_and_gauges_fall_back(self) -> None:
        self.fake.script = Script(events=chat_stream(["a", "b", "c"]), stall_after=2)
        before = await self.scrape()
        conn = await connect(self, self.proxy.port.getHost().port)
        conn.send(
            post(
                "/v1/chat/completions",
                b'{"stream": true}',
                f"Authorization: Bearer {KEY}",
                "Content-Type: application/json",
            )
        )
        await conn.until(b'"a"')  # the second event: the stream is under way
        during = await self.scrape()
        self.assertEqual((during[STREAMS], during[ACTIVE]), (1, 2))  # + the scrape

        assert conn.transport is not None
        conn.transport.loseConnection()
        await self.fake.closed[-1]  # the proxy closed the upstream: it saw the hang-up
        after = await self.scrape()
        self.assertMoved(
            before,
            after,
            {
                HANGUPS: 1,
                series(REQUESTS, method="POST", route="chat", status="499"): 1,
                **upstream_errors(),
            },
        )
        self.assertGreater(after[series(SENT, route="chat")], 0)
        self.assertEqual((after[STREAMS], after[ACTIVE]), (0, 1))

    async def test_unreachable_upstream_counted_as_unreachable(self) -> None:
        dead = Proxy(self, {"UPSTREAM": f"http://127.0.0.1:{await closed_port()}"})
        before = await self.scrape(dead)
        response = await self.http.get(dead.url + "/v1/models", headers=AUTH)
        self.assertEqual(response.code, 502)
        error = json.loads(await response.content())["error"]
        self.assertEqual(error["code"], "upstream_unreachable")
        after = await self.scrape(dead)
        self.assertMoved(
            before,
            after,
            {
                series(REQUESTS, method="GET", route="models", status="502"): 1,
                **upstream_errors(unreachable=1),
            },
        )

    async def test_header_timeout_counted_as_timeout(self) -> None:
        self.fake.script = Script(stall=True)
        before = await self.scrape()
        response = await self.post_json("/v1/chat/completions", {"model": "m"})
        self.assertEqual(response.code, 504)
        error = json.loads(await response.content())["error"]
        self.assertEqual(error["code"], "upstream_timeout")
        after = await self.scrape()
        self.assertMoved(
            before,
            after,
            {
                series(REQUESTS, method="POST", route="chat", status="504"): 1,
                **upstream_errors(timeout=1),
            },
        )

    async def test_silent_stream_counted_as_timeout(self) -> None:
        self.fake.script = Script(events=chat_stream(["a", "b"]), stall_after=2)
        before = await self.scrape()
        response = await self.post_json("/v1/chat/completions", {"stream": True})
        body = await response.content()
        self.assertIn(b"event: error\ndata: ", body)
        self.assertIn(b"upstream_timeout", body)
        after = await self.scrape()
        self.assertMoved(
            before,
            after,
            {
                series(REQUESTS, method="POST", route="chat", status="200"): 1,
                **upstream_errors(timeout=1),
            },
        )
        self.assertEqual(after[STREAMS], 0)

    async def test_upstream_hang_up_mid_stream_counted_as_reset(self) -> None:
        # The interval lets the two events leave before the connection is aborted.
        self.fake.script = Script(
            events=chat_stream(["a", "b"]), interval=0.01, hang_up_after=2
        )
        before = await self.scrape()
        response = await self.post_json("/v1/chat/completions", {"stream": True})
        body = await response.content()
        self.assertIn(b"event: error\ndata: ", body)
        self.assertIn(b"upstream_error", body)
        after = await self.scrape()
        self.assertMoved(before, after, upstream_errors(reset=1))
        self.assertEqual(after[STREAMS], 0)


class ModerationMetricsTests(ModeratedRelayTestCase, _ProxyTest):
    """The tencent backend (the real SDK) against a fake TMS."""

    def setUp(self) -> None:
        super().setUp()
        self.ready = when_ready(self, self.proxy.app)

    async def test_blocked_sentence_counts_blocked_stream_and_calls(self) -> None:
        await self.ready  # the start-up probe has answered: no call in flight
        self.fake.script = Script(
            # The blocked sentence comes last, so that every check has been
            # answered when the response ends (none is abandoned mid-call).
            events=chat_stream(["Fine here. ", "Still fine. ", "Now a bomb."]),
            interval=0.001,
        )
        before = await self.scrape()
        response = await self.post_json(
            "/v1/chat/completions", {"stream": True, "moderation": True}
        )
        body = await response.content()
        self.assertEqual(response.code, 200)
        self.assertIn(REFUSAL.encode(), body)
        self.assertNotIn(b"bomb", body)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"), body[-80:])
        after = await self.scrape()

        checked = [c.answer for c in self.tms.calls if c.text != "ping"]
        # Checks run in parallel threads: they reach the fake in any order.
        self.assertEqual(sorted(checked), ["Block", "Pass", "Pass"])
        self.assertEqual(
            moved(
                before,
                after,
                BLOCKED,
                series(MODERATION_CALLS, backend="tencent", result="pass"),
                series(MODERATION_CALLS, backend="tencent", result="block"),
                series(MODERATION_CALLS, backend="tencent", result="error"),
                series(MODERATION_COUNT, backend="tencent"),
                series(REQUESTS, method="POST", route="chat", status="200"),
            ),
            {
                BLOCKED: 1,
                series(MODERATION_CALLS, backend="tencent", result="pass"): 2,
                series(MODERATION_CALLS, backend="tencent", result="block"): 1,
                series(MODERATION_CALLS, backend="tencent", result="error"): 0,
                series(MODERATION_COUNT, backend="tencent"): 3,
                series(REQUESTS, method="POST", route="chat", status="200"): 1,
            },
        )
        self.assertEqual(after[STREAMS], 0)


# -- METRICS_KEY and METRICS_LISTEN -----------------------------------------


class MetricsKeyTests(_ProxyTest):
    env = {"METRICS_KEY": "metrics-key-5f2e9a", "PROXY_KEY": "pk-proxy-1234"}

    async def test_metrics_without_the_key_refused_with_openai_style_401(self) -> None:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key"},
            {"Authorization": "Bearer pk-proxy-1234"},
        ):
            response = await self.http.get(self.proxy.url + "/metrics", headers=headers)
            self.assertEqual(response.code, 401, headers)
            error = json.loads(await response.content())["error"]
            self.assertGreaterEqual(set(error), {"message", "type", "code"})
            self.assertNotIn("metrics-key-5f2e9a", json.dumps(error))

    async def test_metrics_with_the_key_served(self) -> None:
        response = await self.http.get(
            self.proxy.url + "/metrics",
            headers={"Authorization": "Bearer metrics-key-5f2e9a"},
        )
        self.assertEqual(response.code, 200)
        samples = parse_samples((await response.content()).decode("utf-8"))
        self.assertIn(ACTIVE, samples)


class MetricsListenTests(TestCase):
    """C{twistd openai-proxy} with metrics on a port of their own."""

    def _serve(self, argv: list[str], env: dict[str, str]) -> None:
        # The environment is read while the options are parsed: only then
        # does it need to be the test's.
        with mock.patch.dict(os.environ, env, clear=True):
            options = Options()
            options.parseOptions(argv)
        top = makeService(options)
        top.startService()
        self.addCleanup(top.stopService)

    async def _check_separate_ports(self, main: int, metrics: int) -> None:
        http = client(self)
        response = await http.get(f"http://127.0.0.1:{metrics}/metrics")
        self.assertEqual(response.code, 200)
        samples = parse_samples((await response.content()).decode("utf-8"))
        self.assertIn(ACTIVE, samples)
        response = await http.get(f"http://127.0.0.1:{metrics}/v1/models")
        self.assertEqual(response.code, 404)
        await response.content()
        # The main port no longer serves them: /metrics is relayed like any
        # path, and without a key it is refused before reaching the upstream.
        response = await http.get(f"http://127.0.0.1:{main}/metrics")
        self.assertEqual(response.code, 401)
        self.assertEqual(
            json.loads(await response.content())["error"]["code"], "missing_api_key"
        )
        response = await http.get(f"http://127.0.0.1:{main}/healthz")
        self.assertEqual(
            (response.code, await response.content()), (200, b'{"status": "ok"}')
        )

    async def test_metrics_listen_env_serves_metrics_on_its_own_port(self) -> None:
        main, metrics = free_port(), free_port()
        self._serve(
            ["--listen", f"tcp:{main}:interface=127.0.0.1"],
            {"METRICS_LISTEN": f"tcp:{metrics}:interface=127.0.0.1"},
        )
        await self._check_separate_ports(main, metrics)
        # The metrics port gets the same default backlog as the main one.
        self.assertEqual(kernel_backlogs(metrics), [expected_backlog()])

    async def test_metrics_listen_option_serves_metrics_on_its_own_port(self) -> None:
        main, metrics = free_port(), free_port()
        self._serve(
            [
                "--listen",
                f"tcp:{main}:interface=127.0.0.1",
                "--metrics-listen",
                f"tcp:{metrics}:interface=127.0.0.1",
            ],
            {},
        )
        await self._check_separate_ports(main, metrics)


# -- readiness ----------------------------------------------------------------


class ReadinessTests(_ProxyTest):
    async def status(self, path: str) -> tuple[int, Any]:
        response = await self.http.get(self.proxy.url + path)
        return response.code, json.loads(await response.content())

    async def test_ready_at_once_without_moderation_backend(self) -> None:
        self.assertEqual(await self.status("/readyz"), (200, {"status": "ok"}))
        self.assertEqual(await self.status("/healthz"), (200, {"status": "ok"}))


class ModerationReadinessTests(_ProxyTest):
    def start_tms(self, **options: Any) -> FakeTMS:
        tms = FakeTMS(TMS_ID, TMS_SECRET, **options)
        tms.start()
        self.addCleanup(tms.stop)
        return tms

    def moderated(self, endpoint: str) -> Proxy:
        return Proxy(
            self,
            {
                "UPSTREAM": self.upstream,
                "TENCENT_CLOUD_SID": TMS_ID,
                "TENCENT_CLOUD_SKEY": TMS_SECRET,
                "TENCENT_CLOUD_ENDPOINT": endpoint,
            },
        )

    async def status(self, proxy: Proxy, path: str) -> tuple[int, Any]:
        response = await self.http.get(proxy.url + path)
        return response.code, json.loads(await response.content())

    async def test_not_ready_until_the_backend_answered_once(self) -> None:
        # The fake answers the start-up probe ("ping") a little later.
        tms = self.start_tms(delays={"ping": 0.3})
        proxy = self.moderated(tms.url)
        ready = when_ready(self, proxy.app)
        self.assertEqual(
            await self.status(proxy, "/readyz"), (503, {"status": "starting"})
        )
        self.assertEqual(await self.status(proxy, "/healthz"), (200, {"status": "ok"}))
        await ready
        self.assertEqual(await self.status(proxy, "/readyz"), (200, {"status": "ok"}))
        self.assertEqual([c.text for c in tms.calls], ["ping"])

    async def test_unreachable_backend_keeps_it_not_ready(self) -> None:
        proxy = self.moderated(f"http://127.0.0.1:{await closed_port()}")
        result = await next_moderation_call(self, proxy.app)
        self.assertEqual(result, "error")
        self.assertEqual(
            await self.status(proxy, "/readyz"), (503, {"status": "starting"})
        )
        self.assertEqual(await self.status(proxy, "/healthz"), (200, {"status": "ok"}))


# -- twistd child processes -----------------------------------------------------


class Twistd(ProcessProtocol):
    """
    C{twistd -n --pidfile= openai-proxy} in a child process.  L{ended} fires
    with (exit reason, monotonic time) once it exited and its pipes closed.
    """

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[tuple[Failure, float]] = Deferred()
        self._waits: list[tuple[re.Pattern[bytes], Deferred[re.Match[bytes]]]] = []

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.out += data
            self._check()
        else:
            self.err += data

    def processEnded(self, reason: Failure) -> None:
        waits, self._waits = self._waits, []
        for pattern, d in waits:
            d.errback(
                AssertionError(
                    f"twistd ended before {pattern.pattern!r}:\n{self.out!r}\n{self.err!r}"
                )
            )
        self.ended.callback((reason, time.monotonic()))

    def _check(self) -> None:
        for wait in list(self._waits):
            match = wait[0].search(self.out)
            if match is not None:
                self._waits.remove(wait)
                wait[1].callback(match)

    def logged(self, pattern: bytes) -> Deferred[re.Match[bytes]]:
        """Fire with the match once stdout matches C{pattern}."""
        d: Deferred[re.Match[bytes]] = Deferred()
        self._waits.append((re.compile(pattern), d))
        self._check()
        return d

    def assert_exited_cleanly(self, test: TestCase, reason: Failure) -> None:
        """
        Check that the process shut down by itself after SIGTERM: twistd
        logs "Server Shut Down." and then re-raises the signal that stopped
        it, so it ends "by signal 15" (or exit code 0), not by SIGKILL.
        """
        value = reason.value
        if not isinstance(value, ProcessDone):
            test.assertIsInstance(value, ProcessTerminated)
            test.assertEqual(value.signal, signal.SIGTERM, value)
        test.assertIn(b"Server Shut Down.", self.out)

    def terminate(self) -> float:
        """Send SIGTERM; return when (monotonic)."""
        assert self.transport is not None
        self.transport.signalProcess("TERM")
        return time.monotonic()

    @property
    def lines(self) -> list[str]:
        return self.out.decode("utf-8").splitlines()


async def start_twistd(
    test: TestCase,
    env: dict[str, str],
    *,
    twistd_options: tuple[str, ...] = ("--pidfile=",),
    workdir: str | None = None,
    twistd: tuple[str, ...] = tuple(TWISTD),
    proto: Twistd | None = None,
) -> tuple[Twistd, int]:
    """
    Start the proxy in a child process on a free port; return it and the
    port.  C{twistd} is the command that runs twistd; C{proto}, if given, is
    the process protocol used (to watch the start itself).
    """
    proto = Twistd() if proto is None else proto
    args = [
        *twistd,
        "-n",
        *twistd_options,
        "openai-proxy",
        "--listen",
        "tcp:0:interface=127.0.0.1",
    ]
    if workdir is None:
        workdir = test.mktemp()
        os.makedirs(workdir)
    full_env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", ""), **env}
    reactor.spawnProcess(proto, sys.executable, args, env=full_env, path=workdir)

    async def stop() -> None:
        if not proto.ended.called:
            assert proto.transport is not None
            proto.transport.signalProcess("KILL")
            await proto.ended

    test.addCleanup(stop)
    match = await proto.logged(rb"ProxySite starting on (\d+)")
    return proto, int(match.group(1))


class ForegroundTests(TestCase):
    async def test_foreground_run_writes_no_pid_file_so_two_start_side_by_side(
        self,
    ) -> None:
        # A stale twistd.pid (say, holding 1 in a container) would stop the
        # next start; in the foreground the proxy needs none.
        workdir = self.mktemp()
        os.makedirs(workdir)
        env = {"UPSTREAM": "http://127.0.0.1:9"}
        await start_twistd(self, env, twistd_options=(), workdir=workdir)
        await start_twistd(self, env, twistd_options=(), workdir=workdir)
        self.assertFalse(os.path.exists(os.path.join(workdir, "twistd.pid")))


class JSONLogTests(TestCase):
    timeout = 30

    PROXY_KEY = "pk-proxy-secret-7f3a9c"
    SERVER_KEY = "sk-server-0123456789abcdefghij"
    CLIENT_KEY = "sk-client-zyxwvutsrqponmlk"
    WRONG_KEY = "pk-wrong-guess-5e1d"
    QUERY_SECRET = "query-secret-b7c1"

    async def test_json_access_lines_with_request_ids_and_no_keys(self) -> None:
        fake = FakeOpenAI()
        upstream = fake.start(self)
        proc, port = await start_twistd(
            self,
            {
                "LOG_FORMAT": "json",
                "UPSTREAM": upstream,
                "PROXY_KEY": self.PROXY_KEY,
                "OPENAI_KEY": self.SERVER_KEY,
                "TIMEOUT": "300",
            },
        )
        base = f"http://127.0.0.1:{port}"
        http = client(self)
        ids: list[str] = []

        async def call(
            method: str, path: str, token: str | None, status: int, body: Any = None
        ) -> bytes:
            headers = {} if token is None else {"Authorization": f"Bearer {token}"}
            data = None
            if body is not None:
                headers["Content-Type"] = "application/json"
                data = json.dumps(body).encode()
            response = await http.request(
                method, base + path, data=data, headers=headers
            )
            content: bytes = await response.content()
            self.assertEqual(response.code, status, (path, content))
            ids.append(
                response.headers.getRawHeaders(b"x-proxy-request-id")[0].decode()
            )
            return content

        server_auth = f"Bearer {self.SERVER_KEY}".encode()
        # Success; the query string is not logged.
        await call(
            "GET", f"/v1/models?api_key={self.QUERY_SECRET}", self.PROXY_KEY, 200
        )
        self.assertEqual(fake.received[-1].header(b"authorization"), server_auth)
        await call("GET", "/v1/models", self.WRONG_KEY, 403)
        await call("GET", "/v1/models", None, 401)
        # A stream, the client sending a key of its own (the server's is used).
        streamed = await call(
            "POST",
            "/v1/chat/completions",
            f"{self.CLIENT_KEY}:{self.PROXY_KEY}",
            200,
            {
                "model": "m",
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        self.assertTrue(streamed.endswith(b"data: [DONE]\n\n"))
        self.assertEqual(fake.received[-1].header(b"authorization"), server_auth)
        # An upstream error passed through, and one the proxy answers itself.
        fake.script = Script(
            status=500,
            body=b'{"error": {"message": "boom", "type": "server_error", "code": null}}',
        )
        await call("POST", "/v1/chat/completions", self.PROXY_KEY, 500, {"model": "m"})
        fake.script = Script(stall=True)
        await call("GET", "/v1/models", self.PROXY_KEY, 504)

        proc.terminate()
        reason, _ = await proc.ended
        proc.assert_exited_cleanly(self, reason)

        events = [json.loads(line) for line in proc.lines]  # every line is JSON
        access = [e for e in events if e.get("log_namespace") == "openai_proxy.access"]
        self.assertEqual(
            [(e["method"], e["path"], e["status"]) for e in access],
            [
                ("GET", "/v1/models", 200),
                ("GET", "/v1/models", 403),
                ("GET", "/v1/models", 401),
                ("POST", "/v1/chat/completions", 200),
                ("POST", "/v1/chat/completions", 500),
                ("GET", "/v1/models", 504),
            ],
        )
        self.assertEqual([e["request_id"] for e in access], ids)
        self.assertEqual(len(set(ids)), len(ids))
        host = upstream.removeprefix("http://")
        self.assertEqual(
            [e["upstream"] for e in access], [host, "-", "-", host, host, host]
        )
        for e in access:
            self.assertGreaterEqual(set(e), {"bytes_out", "duration_ms", "log_text"})
        self.assertTrue(
            any(
                e.get("log_namespace") == "openai_proxy.forward"
                and "failed" in e.get("log_text", "")
                for e in events
            ),
            "no line tells of the upstream timeout",
        )

        output = proc.out + proc.err
        for secret in (
            self.PROXY_KEY,
            self.SERVER_KEY,
            self.CLIENT_KEY,
            self.WRONG_KEY,
            self.QUERY_SECRET,
        ):
            self.assertNotIn(secret.encode(), output, secret)


class DrainTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.fake = FakeOpenAI()
        self.upstream = self.fake.start(self)

    async def start_stream(self, port: int) -> Conn:
        stream = await connect(self, port)
        stream.send(
            post(
                "/v1/chat/completions",
                b'{"stream": true}',
                "Authorization: Bearer sk-drain-client",
                "Content-Type: application/json",
            )
        )
        await stream.until(b'"role"')  # under way
        return stream

    async def kept_alive(self, port: int) -> Conn:
        """A connection the proxy has accepted and served once, left open."""
        conn = await connect(self, port)
        conn.send(get("/healthz"))
        await conn.until(b'{"status": "ok"}')
        conn.data = b""
        return conn

    async def test_sigterm_drains_stream_in_flight_then_exits(self) -> None:
        grace = 5.0
        events = chat_stream(
            ["one ", "two ", "three ", "four ", "five"]
        )  # 8 events, 1.4 s
        self.fake.script = Script(events=events, interval=0.2)
        proc, port = await start_twistd(
            self, {"UPSTREAM": self.upstream, "GRACE": str(grace)}
        )
        health, ready = await self.kept_alive(port), await self.kept_alive(port)
        stream = await self.start_stream(port)

        sent = proc.terminate()
        # Twisted logs "(TCP Port N Closed)" just before it closes the socket,
        # and stops the factory just after.
        await proc.logged(rb"Stopping factory <openai_proxy\.http\.server\.ProxySite")
        # No new connections...
        with self.assertRaises(ConnectionRefusedError):
            await connect(self, port)
        # ...but connections already open are still answered: not healthy.
        health.send(get("/healthz"))
        ready.send(get("/readyz"))
        for conn, path in ((health, "/healthz"), (ready, "/readyz")):
            status, headers, body, _ = split_response(await conn.closed)
            self.assertEqual(
                (status, json.loads(body), headers.get("connection")),
                (503, {"status": "draining"}, "close"),
                path,
            )
        self.assertFalse(stream.closed.called, "the stream ended before the probes")

        # The stream runs to its end, then the process exits by itself.
        status, headers, body, complete = split_response(await stream.closed)
        self.assertEqual((status, body, complete), (200, b"".join(events), True))
        reason, ended = await proc.ended
        proc.assert_exited_cleanly(self, reason)
        self.assertLess(ended - sent, grace)

    async def test_grace_over_cuts_the_stream_and_exits(self) -> None:
        grace = 1.0
        events = chat_stream([f"word{i} " for i in range(20)])  # 23 events, 4.4 s
        self.fake.script = Script(events=events, interval=0.2)
        proc, port = await start_twistd(
            self, {"UPSTREAM": self.upstream, "GRACE": str(grace)}
        )
        stream = await self.start_stream(port)

        sent = proc.terminate()
        raw = await stream.closed
        cut = time.monotonic()
        reason, ended = await proc.ended
        status, _, body, complete = split_response(raw)
        self.assertEqual(status, 200)
        self.assertFalse(complete)
        self.assertNotIn(b"[DONE]", body)
        self.assertTrue(b"".join(events).startswith(body[: body.rfind(b"\n\n") + 2]))
        self.assertGreaterEqual(cut - sent, grace * 0.9)  # the grace was given...
        self.assertLess(ended - sent, grace + 1)  # ...and no more
        proc.assert_exited_cleanly(self, reason)
        await self.fake.closed[-1]  # the upstream stream was closed too
