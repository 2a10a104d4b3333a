"""
The proxy's one resource: answers its own paths (C{OPTIONS}, health,
readiness, metrics) and hands every other request to the L{Forwarder}; logs
and counts each request when it ends.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from openai_proxy.admin.usagepage import UsagePage
from openai_proxy.config import Config
from openai_proxy.exchange import Exchange
from openai_proxy.forward import Forwarder
from openai_proxy.http import errors
from openai_proxy.http.cors import CORS
from openai_proxy.http.errors import ProxyError, write_error
from openai_proxy.http.upgrade import wants_websocket
from openai_proxy.keys.accounting import Accounting
from openai_proxy.keys.allowlist import check_path
from openai_proxy.keys.auth import Grant, KeyPolicy
from openai_proxy.moderation import Moderation
from openai_proxy.ops.drain import DrainService, Readiness
from openai_proxy.realtime.relay import ModerationHook, RealtimeRelay
from openai_proxy.telemetry.access import log_request
from openai_proxy.telemetry.logs import new_request_id
from openai_proxy.telemetry.metrics import Metrics, route_family
from openai_proxy.upstream.channels import Upstream
from openai_proxy.upstream.choose import UpstreamRegistry
from openai_proxy.upstream.client import RelayClient, Upstreams

_log = Logger()

_HEALTHY = b'{"status": "ok"}'
_DRAINING = b'{"status": "draining"}'
_STARTING = b'{"status": "starting"}'


class ProxyResource(Resource):
    """
    Forwards every request below it to an upstream chosen by key, relaying
    the response as it arrives.  Answers C{OPTIONS}, C{/healthz}, C{/readyz}
    and (unless served elsewhere) C{/metrics} itself.
    """

    isLeaf = True

    def __init__(
        self,
        config: Config,
        reactor: IReactorTime,
        client: RelayClient,
        *,
        moderation: Moderation,
        metrics: Metrics,
        drain: DrainService,
        readiness: Readiness,
        metrics_resource: IResource | None = None,
        keys: KeyPolicy | None = None,
        accounting: Accounting | None = None,
        usage_page: UsagePage | None = None,
        upstreams: UpstreamRegistry | None = None,
        client_for: Callable[[Upstream], RelayClient] | None = None,
        store_up: Callable[[], bool] | None = None,
        deny_without_store: bool = False,
        realtime_moderation: ModerationHook | None = None,
        tls_policy: IPolicyForHTTPS | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._forwarder = Forwarder(
            config,
            reactor,
            client,
            moderation=moderation,
            metrics=metrics,
            keys=keys,
            accounting=accounting,
            upstreams=upstreams,
            client_for=client_for,
        )
        self._realtime = RealtimeRelay(
            reactor,
            keys or KeyPolicy(config.proxy_keys, config.openai_keys),
            Upstreams(config.upstream, config.routes),
            metrics,
            accounting=accounting,
            timeout=config.timeout,
            send_timeout=config.send_timeout,
            ping_interval=config.ws_ping_interval,
            max_message=config.ws_max_message,
            track=drain.track_session,
            draining=lambda: drain.draining,
            moderation=realtime_moderation,
            policy=tls_policy,
            egress=config.egress,
        )
        self._usage_page = usage_page
        self._store_up = store_up
        self._deny_without_store = deny_without_store
        self._cors = CORS(config.cors_origins)
        self._metrics = metrics
        self._drain = drain
        self._readiness = readiness
        self._metrics_resource = metrics_resource

    def authorize(
        self, method: bytes, path: bytes, authorization: bytes | None
    ) -> Grant | None:
        """
        The early key check (see L{openai_proxy.http.server.Authorize}): L{None}
        for the paths this resource answers itself, else what
        C{authorization} grants.

        @raise ProxyError: 401 or 403 when the key is missing or wrong, 400
            or 403 for a path a named key may not reach.
        """
        # Keep in step with render: these are the requests it answers
        # without forwarding (each checks its own key, if any).
        if (
            method == b"OPTIONS"
            or not path.startswith(b"/")
            or path in (b"/healthz", b"/readyz")
            or (path == b"/metrics" and self._metrics_resource is not None)
            or (path == b"/usage" and self._usage_page is not None)
        ):
            return None
        grant = self._forwarder.authorize(authorization)
        if grant.named is not None:
            check_path(grant.named, method, path)
        return grant

    def render(self, request: Request) -> bytes | int:
        if wants_websocket(request.requestHeaders) and request.uri.startswith(b"/"):
            # A session is tracked, counted and logged by the relay.
            return self._realtime.render(request)
        self._drain.track(request)
        request.setHeader(b"x-proxy-request-id", new_request_id().encode("ascii"))
        # Metrics are for the operator's scraper, never for a web page's script.
        if not (request.path == b"/metrics" and self._metrics_resource is not None):
            self._cors.apply(request)
        handle = self._metrics.request_started(
            request.method, route_family(request.path)
        )
        exchange = Exchange(request, handle, self._reactor.seconds())
        request.notifyFinish().addBoth(self._finished, exchange)
        if not request.uri.startswith(b"/"):
            write_error(request, errors.ABSOLUTE_URI())
            return NOT_DONE_YET
        early: ProxyError | None = getattr(request, "early_error", None)
        if early is not None:  # found by the site when the headers came in
            write_error(request, early)
            return NOT_DONE_YET
        if request.method == b"OPTIONS":
            return self._cors.preflight(request)
        if request.path == b"/healthz":
            return self._status(request, not self._drain.draining)
        if request.path == b"/readyz":
            return self._ready(request)
        if request.path == b"/metrics" and self._metrics_resource is not None:
            result: bytes | int = self._metrics_resource.render(request)
            return result
        if request.path == b"/usage" and self._usage_page is not None:
            d = Deferred.fromCoroutine(self._usage_page.render(request))
            d.addErrback(self._crashed, exchange)
            return NOT_DONE_YET
        Deferred.fromCoroutine(self._forwarder.forward(exchange)).addErrback(
            self._crashed, exchange
        )
        return NOT_DONE_YET

    def _status(self, request: Request, ok: bool) -> bytes:
        request.setHeader(b"content-type", errors.JSON_CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        if ok:
            return _HEALTHY
        request.setResponseCode(503)
        return _DRAINING if self._drain.draining else _STARTING

    def _ready(self, request: Request) -> bytes:
        ready = self._readiness.is_ready and not self._drain.draining
        if self._store_up is None:
            return self._status(request, ready)
        # With REDIS_URL, say whether Redis answers; without it, a proxy that
        # must deny named keys is not ready for them.
        up = self._store_up()
        ok = ready and (up or not self._deny_without_store)
        self._status(request, ok)
        status = "ok" if ok else ("draining" if self._drain.draining else "starting")
        if ready and not ok:
            status = "unavailable"
        return json.dumps({"status": status, "redis": "up" if up else "down"}).encode(
            "utf-8"
        )

    def _crashed(self, failure: Failure, exchange: Exchange) -> None:
        _log.failure("relay failed unexpectedly", failure)
        exchange.fail(
            ProxyError(
                500,
                "The proxy failed to handle this request.",
                "proxy_error",
                "api_error",
            )
        )

    def _finished(self, result: object, exchange: Exchange) -> None:
        request = exchange.request
        # A connection the proxy closed because the upstream broke off is
        # logged with the status it sent, not as the client's hang-up.
        hung_up = isinstance(result, Failure) and not exchange.upstream_fault
        # 499: nginx's "client closed request", for a response never completed.
        status = 499 if hung_up else request.code
        exchange.metrics.finished(
            status, exchange.bytes_in, request.sentLength, hung_up
        )
        request_id = request.responseHeaders.getRawHeaders(
            b"x-proxy-request-id", [b"-"]
        )[0]
        log_request(
            method=request.method,
            path=request.path,
            status=status,
            bytes_out=request.sentLength,
            duration=self._reactor.seconds() - exchange.started,
            upstream=exchange.upstream_host,
            request_id=request_id.decode("ascii"),
            body=exchange.logged_body,
        )
