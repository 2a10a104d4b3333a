"""Tests for L{openai_proxy.telemetry.metrics}: the series, their labels, and serving them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import treq
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import IResource
from twisted.web.server import Site

from openai_proxy.telemetry.metrics import (
    METHODS,
    ROUTE_FAMILIES,
    Metrics,
    make_metrics_service,
    method_label,
    route_family,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class _FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


class _LoopbackMixin(TestCase):
    """Serves a resource on 127.0.0.1 and fetches it with treq."""

    def serve(self, resource: IResource) -> str:
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/metrics"

    async def fetch(self, url: str, **headers: str) -> tuple[int, bytes, str]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        response = await treq.get(url, headers=headers or None, pool=pool)
        body = await treq.content(response)
        content_type = response.headers.getRawHeaders("content-type", [""])[0]
        return response.code, body, content_type


class MetricsScrapeTests(_LoopbackMixin):
    """What the recording API does to the series, as a scraper sees them."""

    def setUp(self) -> None:
        self.clock = _FakeClock()
        self.metrics = Metrics(clock=self.clock)
        self.url = self.serve(self.metrics.resource())

    async def scrape(self) -> Samples:
        code, body, _ = await self.fetch(self.url)
        self.assertEqual(code, 200)
        return _samples(body.decode("utf-8"))

    async def test_finished_request_counted_with_its_labels(self) -> None:
        handle = self.metrics.request_started(b"POST", "chat")
        handle.upstream_headers(0.2)
        self.clock.now += 1.5
        handle.finished(200, bytes_in=10, bytes_out=2048)
        s = await self.scrape()
        self.assertEqual(
            _value(
                s,
                "openai_proxy_requests_total",
                method="POST",
                route="chat",
                status="200",
            ),
            1,
        )
        self.assertEqual(
            _value(s, "openai_proxy_upstream_headers_seconds_count", route="chat"), 1
        )
        self.assertAlmostEqual(
            _value(s, "openai_proxy_upstream_headers_seconds_sum", route="chat"), 0.2
        )
        self.assertAlmostEqual(
            _value(s, "openai_proxy_request_duration_seconds_sum", route="chat"), 1.5
        )
        self.assertEqual(
            _value(s, "openai_proxy_received_bytes_total", route="chat"), 10
        )
        self.assertEqual(_value(s, "openai_proxy_sent_bytes_total", route="chat"), 2048)
        self.assertEqual(_value(s, "openai_proxy_active_requests"), 0)
        self.assertEqual(_value(s, "openai_proxy_client_hangups_total"), 0)

    async def test_active_gauges_count_requests_and_streams_in_flight(self) -> None:
        plain = self.metrics.request_started("GET", "models")
        streaming = self.metrics.request_started("POST", "chat")
        streaming.stream_started()
        during = await self.scrape()
        plain.finished(200, 0, 10)
        streaming.finished(200, 5, 10)
        after = await self.scrape()
        self.assertEqual(_value(during, "openai_proxy_active_requests"), 2)
        self.assertEqual(_value(during, "openai_proxy_active_streams"), 1)
        self.assertEqual(_value(after, "openai_proxy_active_requests"), 0)
        self.assertEqual(_value(after, "openai_proxy_active_streams"), 0)

    async def test_finishing_twice_counts_once(self) -> None:
        handle = self.metrics.request_started("POST", "embeddings")
        handle.stream_started()
        handle.finished(502, 1, 1)
        handle.finished(200, 1, 1, hung_up=True)
        s = await self.scrape()
        labels = {"method": "POST", "route": "embeddings"}
        self.assertEqual(
            _value(s, "openai_proxy_requests_total", status="502", **labels), 1
        )
        self.assertNotIn(
            (
                "openai_proxy_requests_total",
                frozenset({**labels, "status": "200"}.items()),
            ),
            s,
        )
        self.assertEqual(_value(s, "openai_proxy_active_requests"), 0)
        self.assertEqual(_value(s, "openai_proxy_active_streams"), 0)
        self.assertEqual(_value(s, "openai_proxy_client_hangups_total"), 0)

    async def test_hang_up_counted(self) -> None:
        self.metrics.request_started("POST", "chat").finished(499, 3, 0, hung_up=True)
        s = await self.scrape()
        self.assertEqual(_value(s, "openai_proxy_client_hangups_total"), 1)

    async def test_unknown_method_and_odd_status_use_fixed_labels(self) -> None:
        self.metrics.request_started(b"BREW", "other").finished(1000, 0, 0)
        s = await self.scrape()
        self.assertEqual(
            _value(
                s,
                "openai_proxy_requests_total",
                method="OTHER",
                route="other",
                status="other",
            ),
            1,
        )

    async def test_upstream_errors_blocked_streams_and_moderation(self) -> None:
        self.metrics.upstream_error("timeout")
        self.metrics.upstream_error("timeout")
        self.metrics.upstream_error("reset")
        self.metrics.stream_blocked()
        self.metrics.moderation_call("tencent", "block", 0.3)
        self.metrics.moderation_call("someday-backend", "pass", 0.1)
        s = await self.scrape()
        self.assertEqual(
            _value(s, "openai_proxy_upstream_errors_total", kind="timeout"), 2
        )
        self.assertEqual(
            _value(s, "openai_proxy_upstream_errors_total", kind="reset"), 1
        )
        self.assertEqual(
            _value(s, "openai_proxy_upstream_errors_total", kind="unreachable"), 0
        )
        self.assertEqual(_value(s, "openai_proxy_blocked_streams_total"), 1)
        self.assertEqual(
            _value(
                s,
                "openai_proxy_moderation_calls_total",
                backend="tencent",
                result="block",
            ),
            1,
        )
        self.assertEqual(
            _value(
                s, "openai_proxy_moderation_calls_total", backend="other", result="pass"
            ),
            1,
        )
        self.assertAlmostEqual(
            _value(s, "openai_proxy_moderation_seconds_sum", backend="tencent"), 0.3
        )

    async def test_every_series_exported_before_any_traffic(self) -> None:
        names = {name for name, _ in await self.scrape()}
        for expected in [
            "openai_proxy_upstream_headers_seconds_count",
            "openai_proxy_request_duration_seconds_count",
            "openai_proxy_active_requests",
            "openai_proxy_active_streams",
            "openai_proxy_received_bytes_total",
            "openai_proxy_sent_bytes_total",
            "openai_proxy_upstream_errors_total",
            "openai_proxy_client_hangups_total",
            "openai_proxy_moderation_calls_total",
            "openai_proxy_moderation_seconds_count",
            "openai_proxy_blocked_streams_total",
        ]:
            self.assertIn(expected, names)
        self.assertTrue(all(name.startswith("openai_proxy_") for name in names))

    async def test_instances_do_not_share_series(self) -> None:
        Metrics().stream_blocked()
        s = await self.scrape()
        self.assertEqual(_value(s, "openai_proxy_blocked_streams_total"), 0)


class RecordingValidationTests(TestCase):
    """Label values outside the fixed sets are refused, not exported."""

    def test_unknown_family_refused(self) -> None:
        self.assertRaises(ValueError, Metrics().request_started, "GET", "v1/anything")

    def test_unknown_upstream_error_kind_refused(self) -> None:
        self.assertRaises(ValueError, Metrics().upstream_error, "gremlins")

    def test_unknown_moderation_result_refused(self) -> None:
        self.assertRaises(
            ValueError, Metrics().moderation_call, "tencent", "maybe", 0.1
        )


class MetricsKeyTests(_LoopbackMixin):
    """With a METRICS_KEY, only a matching bearer token reads the metrics."""

    def setUp(self) -> None:
        self.url = self.serve(Metrics().resource(key="metrics-secret"))

    async def assertRefused(self, **headers: str) -> None:
        code, body, content_type = await self.fetch(self.url, **headers)
        self.assertEqual(code, 401)
        self.assertEqual(content_type, "application/json")
        error = json.loads(body)["error"]
        self.assertEqual(set(error), {"message", "type", "code"})
        self.assertNotIn(b"openai_proxy_", body)

    async def test_no_authorization_refused(self) -> None:
        await self.assertRefused()

    async def test_wrong_key_refused(self) -> None:
        await self.assertRefused(Authorization="Bearer metrics-secreT")

    async def test_key_without_bearer_scheme_refused(self) -> None:
        await self.assertRefused(Authorization="metrics-secret")

    async def test_matching_key_reads_metrics(self) -> None:
        code, body, _ = await self.fetch(
            self.url, Authorization="bearer metrics-secret"
        )
        self.assertEqual(code, 200)
        self.assertIn(b"openai_proxy_requests", body)


class MetricsServiceTests(_LoopbackMixin):
    """L{make_metrics_service} serves the resource at /metrics on its own port."""

    async def test_serves_metrics_path_only(self) -> None:
        service = make_metrics_service(
            "tcp:0:interface=127.0.0.1", Metrics().resource(), reactor
        )
        service.startService()
        self.addCleanup(service.stopService)
        # The service does not expose its port publicly; its Deferred does.
        listening: Deferred[object] = service._waitingForPort  # type: ignore[attr-defined]
        port = (await listening).getHost().port  # type: ignore[attr-defined]
        base = f"http://127.0.0.1:{port}"
        code, body, _ = await self.fetch(base + "/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b"openai_proxy_active_requests", body)
        code, _, _ = await self.fetch(base + "/")
        self.assertEqual(code, 404)


def _paths() -> Iterator[tuple[bytes, str]]:
    for family in ROUTE_FAMILIES - {"other"}:
        yield f"/v1/{family}".encode(), family
    yield b"/v1/chat/completions", "chat"
    yield b"/v1/completions?stream=true", "completions"
    yield b"/fk/v1/embeddings", "embeddings"
    yield b"/v1/audio/transcriptions", "audio"
    yield b"/v1/files/file-abc/content", "files"
    yield b"/v1/models/gpt-4o", "models"
    yield b"/v1/responses/resp_1/cancel", "responses"
    yield b"/healthz", "other"
    yield b"/", "other"
    yield b"", "other"
    yield b"/v1", "other"
    yield b"/v1/", "other"
    yield b"/v1/threads/abc/runs", "other"
    yield b"/v2/chat/completions", "other"
    yield b"/v1/Chat/completions", "other"
    yield b"/chat/completions", "other"


class RouteFamilyTests(TestCase):
    """L{route_family} and L{method_label} only ever name a fixed set."""

    def test_known_paths(self) -> None:
        for path, family in _paths():
            self.assertEqual((path, route_family(path)), (path, family))

    @given(st.binary())
    def test_any_bytes_map_into_the_fixed_set(self, path: bytes) -> None:
        self.assertIn(route_family(path), ROUTE_FAMILIES)

    @given(st.binary(max_size=40), st.binary(max_size=40))
    def test_any_prefix_and_suffix_map_into_the_fixed_set(
        self, prefix: bytes, rest: bytes
    ) -> None:
        self.assertIn(route_family(prefix + b"/v1/" + rest), ROUTE_FAMILIES)

    @given(st.one_of(st.binary(max_size=12), st.text(max_size=12)))
    def test_any_method_maps_into_the_fixed_set(self, method: bytes | str) -> None:
        self.assertIn(method_label(method), METHODS | {"OTHER"})

    def test_standard_methods_kept(self) -> None:
        for method in METHODS:
            self.assertEqual(method_label(method.encode()), method)
            self.assertEqual(method_label(method), method)
        self.assertEqual(method_label(b"get"), "OTHER")
