"""
Prometheus metrics: the C{openai_proxy_*} series and the resource that serves
them.

Each L{Metrics} owns its own L{CollectorRegistry} (never the global one), so
two instances, e.g. in two tests, never see each other's numbers.  Every label
value comes from a small fixed set defined here, never from what a client
sent, so a hostile client cannot blow up the series count.

The relay records through a handful of calls::

    handle = metrics.request_started(request.method, route_family(request.path))
    handle.upstream_headers(seconds)      # once the upstream answered
    handle.stream_started()               # if the response is an SSE stream
    handle.finished(status, bytes_in, bytes_out, hung_up=False)
    metrics.upstream_error("timeout")
    metrics.moderation_call("tencent", "pass", seconds)
    metrics.stream_blocked()
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable
from typing import Any, Final, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from twisted.application.service import Service
from twisted.application.strports import service as strports_service
from twisted.internet.interfaces import IProtocolFactory, IReactorCore
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

#: Every value L{route_family} can return.
ROUTE_FAMILIES: Final = frozenset(
    {
        "chat",
        "completions",
        "responses",
        "embeddings",
        "audio",
        "files",
        "models",
        "other",
    }
)
#: Method labels: these methods as themselves, anything else as C{OTHER}.
METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
#: The kinds L{Metrics.upstream_error} accepts.
UPSTREAM_ERROR_KINDS: Final = ("unreachable", "timeout", "reset", "egress_proxy")
#: The results L{Metrics.moderation_call} accepts.
MODERATION_RESULTS: Final = ("pass", "review", "block", "error")
#: At most this many named keys get a label of their own; others are C{other}.
MAX_KEY_LABELS: Final = 1000
#: Moderation backend labels; any other backend name is recorded as C{other}.
MODERATION_BACKENDS: Final = ("tencent", "openai", "keywords", "other")

# Upstream headers and moderation answer in well under a minute; a whole
# request may be a completion stream that runs for minutes.
_HEADER_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_MODERATION_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_FAMILY_BY_SEGMENT: Final = {
    family.encode("ascii"): family for family in ROUTE_FAMILIES if family != "other"
}
_METHOD_BY_BYTES: Final = {m.encode("ascii"): m for m in METHODS}


def route_family(path: bytes) -> str:
    """
    Name the API family a request path belongs to, for use as a label.

    The family is the path segment after the first C{v1} segment, so a route
    prefix (C{b"/fk/v1/chat/completions"}) does not matter; a query string is
    ignored.  Always returns a member of L{ROUTE_FAMILIES}: anything that is
    not a known family is C{"other"}.
    """
    segments = path.split(b"?", 1)[0].split(b"/")
    try:
        index = segments.index(b"v1")
    except ValueError:
        return "other"
    if index + 1 >= len(segments):
        return "other"
    return _FAMILY_BY_SEGMENT.get(segments[index + 1], "other")


def method_label(method: bytes | str) -> str:
    """Return C{method} if it is one of L{METHODS} (exact case), else C{"OTHER"}."""
    if isinstance(method, bytes):
        return _METHOD_BY_BYTES.get(method, "OTHER")
    return method if method in METHODS else "OTHER"


def _status_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else "other"


class RequestHandle:
    """
    The metrics of one client request, from L{Metrics.request_started} to
    L{finished}.  L{finished} counts once; later calls do nothing, so every
    exit path of the relay may call it.
    """

    __slots__ = ("_metrics", "_method", "_family", "_started", "_streaming", "_done")

    def __init__(
        self, metrics: Metrics, method: str, family: str, started: float
    ) -> None:
        self._metrics = metrics
        self._method = method
        self._family = family
        self._started = started
        self._streaming = False
        self._done = False

    def upstream_headers(self, seconds: float) -> None:
        """Record that the upstream took C{seconds} to send its response headers."""
        self._metrics._upstream_headers[self._family].observe(seconds)

    def stream_started(self) -> None:
        """Count this request among the active streams until it finishes."""
        if not self._streaming and not self._done:
            self._streaming = True
            self._metrics._active_streams.inc()

    def finished(
        self, status: int, bytes_in: int, bytes_out: int, hung_up: bool = False
    ) -> None:
        """
        Record the end of the request: its response C{status} (what the client
        was sent, or would have been), the body bytes received from the client
        (C{bytes_in}) and sent to it (C{bytes_out}), and whether the client
        hung up before the response was complete.
        """
        if self._done:
            return
        self._done = True
        m = self._metrics
        m._active_requests.dec()
        if self._streaming:
            m._active_streams.dec()
        m._duration[self._family].observe(m._clock() - self._started)
        m._requests_child(self._method, self._family, _status_label(status)).inc()
        if bytes_in > 0:
            m._bytes_in[self._family].inc(bytes_in)
        if bytes_out > 0:
            m._bytes_out[self._family].inc(bytes_out)
        if hung_up:
            m._hangups.inc()


_shared_directory: str | None = None


def share_between_processes(directory: str) -> None:
    """
    Keep every series in files under C{directory}, shared by all the worker
    processes of one daemon, so that a scrape served by any of them reports
    the sum over all.  Call it in each process before making L{Metrics};
    children inherit the setting through the environment.
    """
    global _shared_directory
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()
    _shared_directory = directory


def forget_process(pid: int) -> None:
    """A worker process ended: drop its share of the gauges (its counts stay)."""
    if _shared_directory is not None:
        mark_process_dead(pid, _shared_directory)


class Metrics:
    """
    The proxy's Prometheus series, in a registry of their own.

    @ivar registry: the L{CollectorRegistry} holding every series.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        """
        @param clock: returns seconds on a monotonic scale; the request
            duration is measured with it.
        """
        self._clock = clock
        self.registry = registry = CollectorRegistry(auto_describe=True)
        families = sorted(ROUTE_FAMILIES)

        self._requests = Counter(
            "openai_proxy_requests",
            "Client requests finished, by method, route family and response status.",
            ("method", "route", "status"),
            registry=registry,
        )
        self._requests_children: dict[tuple[str, str, str], Any] = {}
        upstream_headers = Histogram(
            "openai_proxy_upstream_headers_seconds",
            "Time from sending a request upstream to its response headers.",
            ("route",),
            buckets=_HEADER_BUCKETS,
            registry=registry,
        )
        duration = Histogram(
            "openai_proxy_request_duration_seconds",
            "Time from receiving a client request to its end.",
            ("route",),
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        # "livesum": with several worker processes, the sum over the live ones.
        self._active_requests = Gauge(
            "openai_proxy_active_requests",
            "Client requests in flight.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._active_streams = Gauge(
            "openai_proxy_active_streams",
            "Streamed (SSE) responses in flight.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        bytes_in = Counter(
            "openai_proxy_received_bytes",
            "Request body bytes received from clients.",
            ("route",),
            registry=registry,
        )
        bytes_out = Counter(
            "openai_proxy_sent_bytes",
            "Response body bytes sent to clients.",
            ("route",),
            registry=registry,
        )
        upstream_errors = Counter(
            "openai_proxy_upstream_errors",
            "Upstream requests that failed without a response, by kind.",
            ("kind",),
            registry=registry,
        )
        self._hangups = Counter(
            "openai_proxy_client_hangups",
            "Client requests whose client went away before the response ended.",
            registry=registry,
        )
        moderation_calls = Counter(
            "openai_proxy_moderation_calls",
            "Moderation backend calls, by backend and result.",
            ("backend", "result"),
            registry=registry,
        )
        moderation_seconds = Histogram(
            "openai_proxy_moderation_seconds",
            "Time one moderation backend call took.",
            ("backend",),
            buckets=_MODERATION_BUCKETS,
            registry=registry,
        )
        self._blocked_streams = Counter(
            "openai_proxy_blocked_streams",
            "Streamed responses cut off by moderation.",
            registry=registry,
        )
        self._tokens = Counter(
            "openai_proxy_tokens",
            "Tokens the upstream reported for named keys, by key name and kind.",
            ("key", "kind"),
            registry=registry,
        )
        self._rate_limited = Counter(
            "openai_proxy_rate_limited",
            "Requests refused with 429 by a named key's limit, by key name and limit.",
            ("key", "limit"),
            registry=registry,
        )
        self._limits_errors = Counter(
            "openai_proxy_limits_errors",
            "Requests whose limits could not be checked (the store was down).",
            registry=registry,
        )
        self._key_requests = Counter(
            "openai_proxy_upstream_key_requests",
            "Requests sent upstream with each server-held key, by its index.",
            ("index",),
            registry=registry,
        )
        self._key_failures = Counter(
            "openai_proxy_upstream_key_failures",
            "Upstream answers that made a request fail over, by key index.",
            ("index",),
            registry=registry,
        )
        self._key_benched = Counter(
            "openai_proxy_upstream_key_benched",
            "Times each server-held key was benched, by key index.",
            ("index",),
            registry=registry,
        )
        self._upstream_requests = Counter(
            "openai_proxy_upstream_requests",
            "Requests sent to each upstream of UPSTREAMS_FILE, by its name.",
            ("upstream",),
            registry=registry,
        )
        self._upstream_failovers = Counter(
            "openai_proxy_upstream_failovers",
            "Requests that moved on from an upstream of UPSTREAMS_FILE to the "
            "next one serving their model, by the name of the one left.",
            ("upstream",),
            registry=registry,
        )
        self._upstream_benched = Counter(
            "openai_proxy_upstream_benched",
            "Times a key of an upstream of UPSTREAMS_FILE was benched, by the "
            "upstream's name and the key's index.",
            ("upstream", "index"),
            registry=registry,
        )
        self._upstream_children: dict[str, tuple[Any, Any]] = {}
        self._ws_sessions = Gauge(
            "openai_proxy_websocket_sessions",
            "WebSocket sessions open.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        ws_messages = Counter(
            "openai_proxy_websocket_messages",
            "WebSocket messages relayed, by direction (upstream: from the client).",
            ("direction",),
            registry=registry,
        )
        ws_bytes = Counter(
            "openai_proxy_websocket_bytes",
            "WebSocket message payload bytes relayed, by direction.",
            ("direction",),
            registry=registry,
        )
        self._ws_closes = Counter(
            "openai_proxy_websocket_closes",
            "WebSocket sessions ended, by close code (1006: dropped without one).",
            ("code",),
            registry=registry,
        )
        self._ws_messages = (
            ws_messages.labels("upstream"),
            ws_messages.labels("client"),
        )
        self._ws_bytes = (ws_bytes.labels("upstream"), ws_bytes.labels("client"))
        self._key_names: set[str] = set()
        self._token_children: dict[str, tuple[Any, Any]] = {}

        # Binding label children once keeps label validation and the
        # metric's lock off the per-request path; it also makes every series
        # visible (at zero) from the first scrape.
        self._upstream_headers = {f: upstream_headers.labels(f) for f in families}
        self._duration = {f: duration.labels(f) for f in families}
        self._bytes_in = {f: bytes_in.labels(f) for f in families}
        self._bytes_out = {f: bytes_out.labels(f) for f in families}
        self._upstream_errors = {
            k: upstream_errors.labels(k) for k in UPSTREAM_ERROR_KINDS
        }
        self._moderation_calls = {
            (b, r): moderation_calls.labels(b, r)
            for b in MODERATION_BACKENDS
            for r in MODERATION_RESULTS
        }
        self._moderation_seconds = {
            b: moderation_seconds.labels(b) for b in MODERATION_BACKENDS
        }

    def request_started(self, method: bytes | str, family: str) -> RequestHandle:
        """
        Count a client request as active and start timing it.

        @param method: the request method as sent; mapped by L{method_label}.
        @param family: the request's L{route_family}.
        @raise ValueError: if C{family} is not in L{ROUTE_FAMILIES}.
        @return: the handle to record the rest of the request on; its
            L{RequestHandle.finished} must be called exactly once at the end.
        """
        if family not in ROUTE_FAMILIES:
            raise ValueError(f"unknown route family {family!r}")
        self._active_requests.inc()
        return RequestHandle(self, method_label(method), family, self._clock())

    def refused(self, method: bytes, path: bytes, status: int) -> None:
        """
        Count a request the server refused before it reached the proxy's
        resource (a bad key, an oversized or slow head, a body too large):
        it is in C{openai_proxy_requests_total} like any other, but not in
        the duration or byte series, as it never ran.
        """
        family = route_family(path) if path else "other"
        self._requests_child(method_label(method), family, _status_label(status)).inc()

    def upstream_error(self, kind: str) -> None:
        """
        Count an upstream request that failed without a response.

        @param kind: one of L{UPSTREAM_ERROR_KINDS}: C{unreachable} (could not
            connect), C{timeout} (no headers in time, or the body went idle),
            C{reset} (reached, but the connection broke before or during the
            response, or its head could not be read), C{egress_proxy} (the
            egress proxy could not be reached, refused the credentials or
            the tunnel).
        @raise ValueError: for any other kind.
        """
        try:
            child = self._upstream_errors[kind]
        except KeyError:
            raise ValueError(f"unknown upstream error kind {kind!r}") from None
        child.inc()

    def moderation_call(self, backend: str, result: str, seconds: float) -> None:
        """
        Count one moderation call and record how long it took.

        @param backend: the backend's name; names outside
            L{MODERATION_BACKENDS} are recorded as C{other}.
        @param result: one of L{MODERATION_RESULTS}.
        @raise ValueError: for any other result.
        """
        if backend not in self._moderation_seconds:
            backend = "other"
        try:
            child = self._moderation_calls[backend, result]
        except KeyError:
            raise ValueError(f"unknown moderation result {result!r}") from None
        child.inc()
        self._moderation_seconds[backend].observe(seconds)

    def stream_blocked(self) -> None:
        """Count a streamed response that moderation cut off."""
        self._blocked_streams.inc()

    def _key_label(self, name: str) -> str:
        # Names come from the keys file, not from clients; still, reloads
        # could add names without end, so the label set is capped.
        if name in self._key_names:
            return name
        if len(self._key_names) < MAX_KEY_LABELS:
            self._key_names.add(name)
            return name
        return "other"

    def tokens(self, key: str, prompt: int, completion: int) -> None:
        """Count the tokens one reply used on the named key C{key}."""
        # The two series of a key, looked up once (labels() takes a lock).
        children = self._token_children.get(key)
        if children is None:
            label = self._key_label(key)
            children = (
                self._tokens.labels(label, "prompt"),
                self._tokens.labels(label, "completion"),
            )
            if label == key:  # as bounded as the label set
                self._token_children[key] = children
        if prompt > 0:
            children[0].inc(prompt)
        if completion > 0:
            children[1].inc(completion)

    def websocket_opened(self) -> None:
        """Count a WebSocket session as open."""
        self._ws_sessions.inc()

    def websocket_messages(self, to_upstream: bool, messages: int, size: int) -> None:
        """Count C{messages} relayed towards the upstream (else the client)."""
        index = 0 if to_upstream else 1
        self._ws_messages[index].inc(messages)
        self._ws_bytes[index].inc(size)

    def websocket_closed(self, code: int | None) -> None:
        """Count a WebSocket session as ended with C{code}."""
        self._ws_sessions.dec()
        label = str(code) if code is not None and 1000 <= code <= 4999 else "other"
        if code is None or code == 1005:
            label = "1005"
        self._ws_closes.labels(label).inc()

    def rate_limited(self, key: str, limit: str) -> None:
        """Count a request on the named key C{key} refused by C{limit}."""
        self._rate_limited.labels(self._key_label(key), limit).inc()

    def limits_error(self) -> None:
        """Count a request whose limits could not be checked."""
        self._limits_errors.inc()

    def upstream_key_used(self, index: int) -> None:
        """Count a request sent upstream with server key number C{index}."""
        self._key_requests.labels(str(index)).inc()

    def upstream_key_failed(self, index: int) -> None:
        """Count an answer on server key C{index} that made its request fail over."""
        self._key_failures.labels(str(index)).inc()

    def upstream_key_benched(self, index: int) -> None:
        """Count server key C{index} being benched."""
        self._key_benched.labels(str(index)).inc()

    def _upstream_child(self, upstream: str) -> tuple[Any, Any]:
        # Bound once per name: labels() costs more than the count itself.
        children = self._upstream_children.get(upstream)
        if children is None:
            children = self._upstream_children[upstream] = (
                self._upstream_requests.labels(upstream),
                self._upstream_failovers.labels(upstream),
            )
        return children

    def upstream_request(self, upstream: str) -> None:
        """Count a request sent to the upstream named C{upstream}."""
        self._upstream_child(upstream)[0].inc()

    def upstream_failover(self, upstream: str) -> None:
        """Count a request moving on from the upstream named C{upstream}."""
        self._upstream_child(upstream)[1].inc()

    def upstream_benched(self, upstream: str, index: int) -> None:
        """Count key C{index} of the upstream named C{upstream} being benched."""
        self._upstream_benched.labels(upstream, str(index)).inc()

    def resource(self, key: str | None = None) -> IResource:
        """
        Return a leaf resource serving this registry in the Prometheus text
        format (OpenMetrics when the scraper asks for it).

        @param key: when given, every request must carry
            C{Authorization: Bearer <key>}; others get a 401 with an
            OpenAI-style JSON error.
        """
        # Imported here: prometheus_client.twisted imports the global reactor,
        # which must not happen before twistd or trial has chosen one.
        from prometheus_client.twisted import MetricsResource

        # It is untyped: a lambda building a WSGIResource (served in the
        # reactor's thread pool).
        inner = cast(IResource, MetricsResource(self._served_registry()))
        if key is None:
            return inner
        return cast(IResource, _BearerProtected(inner, key))

    def _served_registry(self) -> CollectorRegistry:
        if _shared_directory is None:
            return self.registry
        # Every worker's series, merged from their files at each scrape.
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=_shared_directory)
        return merged

    def _requests_child(self, method: str, family: str, status: str) -> Any:
        key = (method, family, status)
        child = self._requests_children.get(key)
        if child is None:
            child = self._requests_children[key] = self._requests.labels(*key)
        return child


class _BearerProtected(Resource):
    """A leaf resource that lets through only requests bearing the key."""

    isLeaf = True

    def __init__(self, inner: IResource, key: str) -> None:
        super().__init__()
        self._render_inner = cast(Callable[[Request], "bytes | int"], inner.render)
        self._expected = _digest(b"bearer " + key.encode("utf-8"))

    def render(self, request: Request) -> bytes | int:
        header = request.getHeader(b"authorization") or b""
        # Lower-case only the scheme: the key itself is case-sensitive.
        scheme, _, token = header.partition(b" ")
        presented = scheme.lower() + b" " + token.strip()
        if hmac.compare_digest(_digest(presented), self._expected):
            return self._render_inner(request)
        request.setResponseCode(401)
        _set_header(request, b"content-type", b"application/json")
        _set_header(request, b"www-authenticate", b'Bearer realm="metrics"')
        return _UNAUTHORIZED_BODY


def _set_header(request: Request, name: bytes, value: bytes) -> None:
    request.responseHeaders.setRawHeaders(name, [value])


def _digest(value: bytes) -> bytes:
    # Comparing fixed-length digests keeps even the key's length out of the
    # timing of the comparison.
    return hashlib.sha256(value).digest()


_UNAUTHORIZED_BODY: Final = json.dumps(
    {
        "error": {
            "message": "Send Authorization: Bearer <METRICS_KEY> to read metrics.",
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        }
    }
).encode("utf-8")


class _QuietSite(Site):
    """A site that writes no access-log line: a scrape every few seconds
    would bury the proxy's own traffic in the log."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def make_metrics_service(
    listen_description: str, resource: IResource, reactor: IReactorCore | None = None
) -> Service:
    """
    Return a service listening on C{listen_description} (a strports
    description such as C{"tcp:9100:interface=127.0.0.1"}) that serves
    C{resource} at C{/metrics}; every other path is a 404.
    """
    root = Resource()
    root.putChild(b"metrics", resource)
    site = _QuietSite(root)
    factory = cast(IProtocolFactory, site)
    return strports_service(listen_description, factory, reactor=reactor)
