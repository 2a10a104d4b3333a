"""
Forwarding one request: key check, body, the upstream call through treq,
and the response relayed (and moderated, when asked) as it arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import GzipDecoder
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse

from openai_proxy import errors
from openai_proxy.auth import KeyPolicy
from openai_proxy.bodies import request_body
from openai_proxy.config import Config
from openai_proxy.errors import ProxyError
from openai_proxy.exchange import ERROR_KINDS, Exchange, upstream_error
from openai_proxy.headers import REQUEST_DROPPED, RESPONSE_DROPPED, copy_headers
from openai_proxy.metrics import Metrics
from openai_proxy.moderation import Moderation, Plan
from openai_proxy.relay import BodyRelay, UpstreamTimeout
from openai_proxy.sse import format_event
from openai_proxy.upstream import RelayClient, Upstreams

_log = Logger()
_SSE = b"text/event-stream"
# A body the proxy reads reaches the client decoded, in its own framing.
_READ_RESPONSE_DROPPED = RESPONSE_DROPPED | {b"content-encoding"}


class Forwarder:
    """
    Sends requests upstream through one treq client, to the upstream their
    key routes them to, and relays each response back as it arrives.
    """

    def __init__(
        self,
        config: Config,
        reactor: IReactorTime,
        client: RelayClient,
        *,
        moderation: Moderation,
        metrics: Metrics,
    ) -> None:
        self._reactor = reactor
        self._client = client
        self._keys = KeyPolicy(config.proxy_keys, config.openai_keys)
        self._upstreams = Upstreams(config.upstream, config.routes)
        self._timeout = config.timeout
        self._log_bodies = config.log_bodies
        self._moderation = moderation
        self._metrics = metrics

    async def forward(self, exchange: Exchange) -> None:
        """
        Check the request's key, send it upstream and relay the answer;
        every outcome ends C{exchange}'s response (or finds its client gone).
        """
        request = exchange.request
        try:
            key = self._keys.upstream_key(request.getHeader(b"authorization"))
            body, fields = request_body(
                exchange, self._moderation, log_bodies=self._log_bodies
            )
            plan = None
            if request.method == b"POST":
                plan = self._moderation.plan(request.path, fields)
                if fields is not None:
                    await self._moderation.check_input(request.path, fields, key)
            response = await self._send(exchange, key, body, plan is not None)
        except ProxyError as e:  # moderation's refusals included
            exchange.fail(e)
            return
        if response is None:
            return
        await self._respond(exchange, response, plan, key)

    async def _send(
        self, exchange: Exchange, key: str, body: IBodyProducer | None, read: bool
    ) -> IResponse | None:
        """
        Send the request upstream; fire with the response at its headers, or
        with L{None} if the client left.  C{read}: the proxy will read the
        response body (to moderate it), so asks for it uncompressed.
        """
        request = exchange.request
        if exchange.gone:
            return None  # left while its input was being moderated
        base = self._upstreams.base_for(key)
        exchange.upstream_host = self._upstreams.host_of(base)
        headers = Headers()
        copy_headers(request.requestHeaders, REQUEST_DROPPED, headers)
        headers.setRawHeaders(b"authorization", [b"Bearer " + key.encode("ascii")])
        if read:
            headers.setRawHeaders(b"accept-encoding", [b"identity"])
        # Set here, once per upstream, Agent would compute it (and copy all
        # the headers to add it) on every request.
        headers.setRawHeaders(b"host", [self._upstreams.host_header(base)])
        try:
            url = Upstreams.url(base, request.uri)
        except ValueError:
            raise errors.ABSOLUTE_URI from None
        d: Deferred[Any] = self._client.relay(
            request.method, url, headers, body, self._timeout
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
            self._metrics.upstream_error(ERROR_KINDS[error.code])
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
        self, exchange: Exchange, response: IResponse, plan: Plan | None, key: str
    ) -> None:
        request = exchange.request
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0].lower()
        sse = ctype.startswith(_SSE)
        # What the upstream sent decides how it is moderated, not what the
        # request asked for: a reply is never relayed unchecked by surprise.
        moderated = plan is not None and response.code == 200
        read = moderated and (sse or b"json" in ctype)
        encodings = response.headers.getRawHeaders(b"content-encoding")
        if read and encodings:
            # Asked for identity, the upstream compressed anyway.
            if [e.strip().lower() for e in encodings] not in ([b"gzip"], [b"x-gzip"]):
                _discard(response)
                exchange.fail(errors.UPSTREAM_FAILED)
                return
            response = GzipDecoder(response)
        request.setResponseCode(response.code, response.phrase)
        copy_headers(
            response.headers,
            _READ_RESPONSE_DROPPED if read else RESPONSE_DROPPED,
            request.responseHeaders,
        )
        if sse:
            request.setHeader(b"cache-control", b"no-cache")
            request.setHeader(b"x-accel-buffering", b"no")
            exchange.metrics.stream_started()
        if read and sse:
            assert plan is not None
            await self._relay_moderated_stream(exchange, response, plan, key)
        elif read:
            assert plan is not None
            await self._relay_moderated_body(exchange, response, plan, key)
        else:
            # Relayed as sent: a compressed body keeps its Content-Encoding
            # and its length.
            if response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
                request.setHeader(b"content-length", b"%d" % response.length)
            broken = await self._deliver(exchange, response, exchange.write)
            if broken is not None:
                self._broken_body(exchange, broken, sse)
        exchange.finish()

    async def _deliver(
        self, exchange: Exchange, response: IResponse, sink: Callable[[bytes], None]
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

    def _broken_body(self, exchange: Exchange, failure: Failure, sse: bool) -> None:
        """Tell the client, as well as its response still allows, that the body broke off."""
        if exchange.gone:
            return
        request = exchange.request
        timed_out = failure.check(UpstreamTimeout) is not None
        error = errors.UPSTREAM_TIMEOUT if timed_out else errors.UPSTREAM_FAILED
        self._metrics.upstream_error(ERROR_KINDS[error.code])
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
        self, exchange: Exchange, response: IResponse, plan: Plan, key: str
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
        self, exchange: Exchange, response: IResponse, plan: Plan, key: str
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


class _Discard(Protocol):
    """Takes a response body only to close the connection it would come on."""

    def connectionMade(self) -> None:
        # The transport of a response body is an IPushProducer too.
        IPushProducer(self.transport).stopProducing()


def _discard(response: IResponse) -> None:
    response.deliverBody(_Discard())
