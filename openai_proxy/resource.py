"""
The relay: a C{twisted.web} resource that forwards any request to the
configured upstream and streams the response back as it arrives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from openai_proxy import errors
from openai_proxy.access import log_request
from openai_proxy.auth import KeyPolicy
from openai_proxy.config import Config
from openai_proxy.cors import CORS
from openai_proxy.drain import DrainService, Readiness
from openai_proxy.errors import ProxyError, write_error
from openai_proxy.headers import REQUEST_DROPPED, RESPONSE_DROPPED, copy_headers
from openai_proxy.logs import new_request_id
from openai_proxy.metrics import Metrics, RequestHandle, route_family
from openai_proxy.moderation import Moderation, Plan, StreamModerator
from openai_proxy.relay import BodyRelay, BytesProducer, UpstreamTimeout
from openai_proxy.sse import format_event
from openai_proxy.upstream import Upstreams

_log = Logger()

#: Request fields the Node project used for moderation; the upstream rejects
#: unknown fields, so they never go there.
_LOCAL_FIELDS = ("moderation", "moderation_level")
_HEALTHY = b'{"status": "ok"}'
_DRAINING = b'{"status": "draining"}'
_STARTING = b'{"status": "starting"}'
_SSE = b"text/event-stream"
_SPOOLED_BODY = 100_000  # twisted.web keeps smaller bodies in a BytesIO
_LOGGED_BODY = 4096  # with LOG_BODIES, this much of each request body is logged


class _Exchange:
    """
    One client request in flight, and what must happen if its client hangs
    up: cancel the upstream request, or close the upstream connection.
    """

    def __init__(
        self, request: Request, metrics: RequestHandle, started: float
    ) -> None:
        self.request = request
        self.metrics = metrics
        self.started = started
        self.bytes_in = 0
        self.logged_body: str | None = None
        self.gone = False
        self.ended = False
        self.pending: Deferred[Any] | None = None
        self.relay: BodyRelay | None = None
        self.moderator: StreamModerator | None = None
        self.upstream_host: str | None = None
        request.notifyFinish().addErrback(self._client_left)

    def _client_left(self, reason: Failure) -> None:
        self.gone = True
        if self.pending is not None:
            self.pending.cancel()
        if self.moderator is not None:
            self.moderator.abandon()
        if self.relay is not None:
            self.relay.forget_consumer()
            self.relay.stop()

    def write(self, data: bytes) -> None:
        if not self.gone:
            self.request.write(data)

    def _closing(self) -> bool:
        # True once: the response may be ended by exactly one of these.
        if self.relay is not None:
            self.relay.release()
        if self.gone or self.ended:
            return False
        self.ended = True
        return True

    def finish(self) -> None:
        if self._closing():
            self.request.finish()

    def fail(self, error: ProxyError) -> None:
        if self._closing():
            write_error(self.request, error)

    def abort(self) -> None:
        if self._closing():
            self.request.loseConnection()


def upstream_error(failure: Failure) -> ProxyError:
    """The error a client gets when the upstream request failed before headers."""
    if isinstance(failure.value, ResponseNeverReceived):
        reasons = failure.value.reasons
        if any(r.check(CancelledError) for r in reasons):
            return errors.UPSTREAM_TIMEOUT
        return errors.UPSTREAM_FAILED
    if failure.check(CancelledError, ConnectingCancelledError, TimeoutError):
        return errors.UPSTREAM_TIMEOUT
    return errors.UPSTREAM_UNREACHABLE


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
        client: HTTPClient,
        *,
        moderation: Moderation,
        metrics: Metrics,
        drain: DrainService,
        readiness: Readiness,
        metrics_resource: IResource | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._client = client
        self._keys = KeyPolicy(config.proxy_keys, config.openai_keys)
        self._upstreams = Upstreams(config.upstream, config.routes)
        self._cors = CORS(config.cors_origins)
        self._timeout = config.timeout
        self._log_bodies = config.log_bodies
        self._moderation = moderation
        self._metrics = metrics
        self._drain = drain
        self._readiness = readiness
        self._metrics_resource = metrics_resource

    def render(self, request: Request) -> bytes | int:
        self._drain.track(request)
        request.setHeader(b"x-proxy-request-id", new_request_id().encode("ascii"))
        self._cors.apply(request)
        handle = self._metrics.request_started(
            request.method, route_family(request.path)
        )
        exchange = _Exchange(request, handle, self._reactor.seconds())
        request.notifyFinish().addBoth(self._finished, exchange)
        if not request.uri.startswith(b"/"):
            write_error(request, errors.ABSOLUTE_URI)
            return NOT_DONE_YET
        if request.method == b"OPTIONS":
            return self._cors.preflight(request)
        if request.path == b"/healthz":
            return self._status(request, not self._drain.draining)
        if request.path == b"/readyz":
            return self._status(
                request, self._readiness.is_ready and not self._drain.draining
            )
        if request.path == b"/metrics" and self._metrics_resource is not None:
            result: bytes | int = self._metrics_resource.render(request)
            return result
        Deferred.fromCoroutine(self._relay(exchange)).addErrback(
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

    async def _relay(self, exchange: _Exchange) -> None:
        request = exchange.request
        try:
            key = self._keys.upstream_key(request.getHeader(b"authorization"))
            body, fields = self._body(exchange)
            plan = None
            if request.method == b"POST":
                plan = self._moderation.plan(request.path, fields)
                if fields is not None:
                    await self._moderation.check_input(request.path, fields, key)
            response = await self._send(exchange, key, body)
        except ProxyError as e:  # moderation's refusals included
            exchange.fail(e)
            return
        if response is None:
            return
        await self._respond(exchange, response, plan, key)

    def _body(
        self, exchange: _Exchange
    ) -> tuple[IBodyProducer | None, dict[str, Any] | None]:
        """
        The body to send upstream, and the request's JSON object when it had
        to be read (to remove the local fields, or for moderation).
        """
        request = exchange.request
        content = request.content
        if content is None:
            return None, None
        size = exchange.bytes_in = content.seek(0, 2)
        content.seek(0)
        if self._log_bodies and size:
            exchange.logged_body = content.read(_LOGGED_BODY).decode("utf-8", "replace")
            content.seek(0)
        if size == 0:
            has_body = request.getHeader(b"content-length") is not None or (
                request.getHeader(b"transfer-encoding") is not None
            )
            return (BytesProducer(b"") if has_body else None), None
        ctype = (request.getHeader(b"content-type") or b"").lower()
        if not ctype.startswith(b"application/json"):
            if size < _SPOOLED_BODY:
                return BytesProducer(content.read()), None
            return FileBodyProducer(content), None
        raw = content.read()
        if b'"moderation' not in raw and not self._moderation.reads(request.path):
            return BytesProducer(raw), None
        try:
            fields = json.loads(raw)
        except ValueError:
            # Not ours to judge: the upstream answers malformed JSON itself.
            return BytesProducer(raw), None
        if not isinstance(fields, dict):
            return BytesProducer(raw), None
        if any(name in fields for name in _LOCAL_FIELDS):
            stripped = {k: v for k, v in fields.items() if k not in _LOCAL_FIELDS}
            raw = json.dumps(
                stripped, ensure_ascii=False, separators=(",", ":")
            ).encode()
        return BytesProducer(raw), fields

    async def _send(
        self, exchange: _Exchange, key: str, body: IBodyProducer | None
    ) -> IResponse | None:
        request = exchange.request
        if exchange.gone:
            return None  # left while its input was being moderated
        base = self._upstreams.base_for(key)
        exchange.upstream_host = self._upstreams.host_of(base)
        headers = Headers()
        copy_headers(request.requestHeaders, REQUEST_DROPPED, headers)
        headers.setRawHeaders(b"authorization", [b"Bearer " + key.encode("ascii")])
        try:
            url = Upstreams.url(base, request.uri).decode("ascii")
        except (ValueError, UnicodeDecodeError):
            raise errors.ABSOLUTE_URI from None
        d: Deferred[Any] = self._client.request(
            request.method.decode("ascii"),
            url,
            headers=headers,
            data=body,
            allow_redirects=False,
            unbuffered=True,
            timeout=self._timeout,
        )
        exchange.pending = d
        sent = self._reactor.seconds()
        try:
            response: IResponse = await d
        except Exception:
            if exchange.gone:
                return None
            failure = Failure()
            error = upstream_error(failure)
            self._metrics.upstream_error(_ERROR_KINDS[error.code])
            _log.info(
                "upstream {host} failed: {error}",
                host=exchange.upstream_host,
                error=failure.getErrorMessage(),
            )
            raise error from None
        finally:
            exchange.pending = None
        exchange.metrics.upstream_headers(self._reactor.seconds() - sent)
        return response

    async def _respond(
        self, exchange: _Exchange, response: IResponse, plan: Plan | None, key: str
    ) -> None:
        request = exchange.request
        request.setResponseCode(response.code, response.phrase)
        copy_headers(response.headers, RESPONSE_DROPPED, request.responseHeaders)
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0].lower()
        sse = ctype.startswith(_SSE)
        if sse:
            request.setHeader(b"cache-control", b"no-cache")
            request.setHeader(b"x-accel-buffering", b"no")
            exchange.metrics.stream_started()
        # What the upstream sent decides how it is moderated, not what the
        # request asked for: a reply is never relayed unchecked by surprise.
        if plan is not None and response.code == 200 and sse:
            await self._relay_moderated_stream(exchange, response, plan, key)
        elif plan is not None and response.code == 200 and b"json" in ctype:
            await self._relay_moderated_body(exchange, response, plan, key)
        else:
            if response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
                request.setHeader(b"content-length", b"%d" % response.length)
            broken = await self._deliver(exchange, response, exchange.write)
            if broken is not None:
                self._broken_body(exchange, broken, sse)
        exchange.finish()

    async def _deliver(
        self, exchange: _Exchange, response: IResponse, sink: Callable[[bytes], None]
    ) -> Failure | None:
        """
        Deliver the response body to C{sink} as it arrives; return L{None}
        when it ended normally, else why it did not.
        """
        relay = BodyRelay(sink, exchange.request, self._reactor, self._timeout)
        exchange.relay = relay
        response.deliverBody(relay)
        try:
            await relay.done
        except Exception:
            return Failure()
        return None

    def _broken_body(self, exchange: _Exchange, failure: Failure, sse: bool) -> None:
        """Tell the client, as well as its response still allows, that the body broke off."""
        if exchange.gone:
            return
        request = exchange.request
        timed_out = failure.check(UpstreamTimeout) is not None
        error = errors.UPSTREAM_TIMEOUT if timed_out else errors.UPSTREAM_FAILED
        self._metrics.upstream_error(_ERROR_KINDS[error.code])
        _log.info(
            "upstream {host} body ended early: {why}",
            host=exchange.upstream_host,
            why="idle timeout" if timed_out else failure.getErrorMessage(),
        )
        if not request.startedWriting:
            exchange.fail(error)
        elif sse:
            # The SDKs raise an APIError on an "error" event: the reader
            # learns that the answer is cut short, not just that it ended.
            exchange.write(format_event(error.body().decode("utf-8"), "error"))
        else:
            # Mid-body, only a closed connection says "incomplete".
            exchange.abort()

    async def _relay_moderated_stream(
        self, exchange: _Exchange, response: IResponse, plan: Plan, key: str
    ) -> None:
        def stop_upstream() -> None:
            if exchange.relay is not None:
                exchange.relay.stop()

        moderator = plan.stream_moderator(exchange.write, stop_upstream, key)
        exchange.moderator = moderator
        broken = await self._deliver(exchange, response, moderator.feed)
        await moderator.end()
        if moderator.blocked:
            self._metrics.stream_blocked()
        elif broken is not None:
            self._broken_body(exchange, broken, True)

    async def _relay_moderated_body(
        self, exchange: _Exchange, response: IResponse, plan: Plan, key: str
    ) -> None:
        chunks: list[bytes] = []
        broken = await self._deliver(exchange, response, chunks.append)
        if broken is not None:
            self._broken_body(exchange, broken, False)
            return
        body, blocked = await plan.moderate_body(b"".join(chunks), key)
        request = exchange.request
        request.setHeader(b"x-moderation", b"blocked" if blocked else b"pass")
        request.setHeader(b"content-length", b"%d" % len(body))
        exchange.write(body)

    def _crashed(self, failure: Failure, exchange: _Exchange) -> None:
        _log.failure("relay failed unexpectedly", failure)
        exchange.fail(
            ProxyError(
                500,
                "The proxy failed to handle this request.",
                "proxy_error",
                "api_error",
            )
        )

    def _finished(self, result: object, exchange: _Exchange) -> None:
        request = exchange.request
        hung_up = isinstance(result, Failure)
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


_ERROR_KINDS = {
    errors.UPSTREAM_TIMEOUT.code: "timeout",
    errors.UPSTREAM_UNREACHABLE.code: "unreachable",
    errors.UPSTREAM_FAILED.code: "reset",
}
