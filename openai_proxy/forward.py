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
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse

from openai_proxy import errors, hop
from openai_proxy.accounting import Account, Accounting
from openai_proxy.auth import Grant, KeyPolicy
from openai_proxy.bodies import ClientGone, request_body
from openai_proxy.config import Config
from openai_proxy.decoding import ENCODINGS, DecodedResponse, DecodeError
from openai_proxy.errors import ProxyError
from openai_proxy.exchange import ERROR_KINDS, Exchange, upstream_error
from openai_proxy.failover import (
    ReadResponse,
    judge,
    might_retry,
    read_error_body,
    replayable,
)
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

# So that headers the upstream's Connection header names can be dropped.
hop.install()


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
        keys: KeyPolicy | None = None,
        accounting: Accounting | None = None,
    ) -> None:
        self._reactor = reactor
        self._client = client
        self._keys = keys or KeyPolicy(config.proxy_keys, config.openai_keys)
        self._accounting = accounting
        self._cooldown = config.key_cooldown
        self._upstreams = Upstreams(config.upstream, config.routes)
        self._timeout = config.timeout
        self._send_timeout = config.send_timeout
        self._max_decoded = config.max_decoded_body
        self._max_parsed = config.max_moderated_body
        self._log_bodies = config.log_bodies
        self._moderation = moderation
        self._metrics = metrics

    def authorize(self, authorization: bytes | None) -> Grant:
        """
        What a request with this C{Authorization} value may do (checked
        when its headers arrive, before its body is read).

        @raise ProxyError: 401 or 403, as L{KeyPolicy.authorize}.
        """
        return self._keys.authorize(authorization)

    async def forward(self, exchange: Exchange) -> None:
        """
        Check the request's key, send it upstream and relay the answer;
        every outcome ends C{exchange}'s response (or finds its client gone).
        """
        request = exchange.request
        account: Account | None = None
        try:
            # Checked already when the headers came in (ProxySite.screen).
            grant: Grant | None = getattr(request, "grant", None)
            if grant is None:
                grant = self._keys.authorize(request.getHeader(b"authorization"))
            key = grant.upstream_key
            if grant.named is not None and self._accounting is not None:
                account = await self._accounting.open(request, grant.named)
            body, fields = await request_body(
                exchange,
                self._moderation,
                log_bodies=self._log_bodies,
                max_parsed=self._max_parsed,
            )
            plan = None
            if request.method == b"POST":
                plan = self._moderation.plan(request.path, fields)
                if fields is not None:
                    await self._moderation.check_input(request.path, fields, key)
            if grant.index is not None and len(self._keys.pool.keys) > 1:
                body = replayable(request, body)
            # A body the proxy reads (to moderate it, or to count its tokens)
            # is asked for uncompressed.
            uncompressed = plan is not None or account is not None
            response = await self._send(exchange, key, body, uncompressed)
            if response is not None and grant.index is not None:
                self._metrics.upstream_key_used(grant.index)
                if might_retry(response.code):
                    response = await self._fail_over(
                        exchange, grant.index, response, body, uncompressed
                    )
        except ProxyError as e:  # moderation's refusals included
            if account is not None:
                account.close()
            exchange.fail(e)
            return
        except ClientGone:
            if account is not None:
                account.close()
            return
        try:
            if response is not None:
                await self._respond(exchange, response, plan, key, account)
        finally:
            if account is not None:
                account.close()

    async def _fail_over(
        self,
        exchange: Exchange,
        index: int,
        response: IResponse,
        body: IBodyProducer | None,
        uncompressed: bool,
    ) -> IResponse | None:
        """
        The upstream refused the request on server key C{index} before any
        byte reached the client: bench the key when its answer says so, and
        try once more on the next key that is not benched.  Returns the
        answer to relay (the last one, when no other key was tried).
        """
        pool = self._keys.pool
        retried = False
        while True:
            read = ReadResponse(response, await read_error_body(response))
            verdict = judge(read.code, read.headers, read.body, self._cooldown)
            self._metrics.upstream_key_failed(index)
            if verdict.bench_seconds is not None:
                pool.bench(index, verdict.bench_seconds)
                self._metrics.upstream_key_benched(index)
                _log.warn(
                    "server key #{index} benched for {seconds:.0f} s after {status}",
                    index=index,
                    seconds=verdict.bench_seconds,
                    status=read.code,
                )
            following = pool.other(index) if verdict.retry else None
            if retried or following is None or exchange.gone:
                return read
            retried, index = True, following
            next_response = await self._send(
                exchange,
                pool.keys[index],
                replayable(exchange.request, body),
                uncompressed,
            )
            if next_response is None:
                return None
            self._metrics.upstream_key_used(index)
            if not might_retry(next_response.code):
                return next_response
            response = next_response

    async def _send(
        self, exchange: Exchange, key: str, body: IBodyProducer | None, read: bool
    ) -> IResponse | None:
        """
        Send the request upstream; fire with the response at its headers, or
        with L{None} if the client left.  C{read}: the proxy will read the
        response body (to moderate it or count its tokens), so asks for it
        uncompressed.
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
        self,
        exchange: Exchange,
        response: IResponse,
        plan: Plan | None,
        key: str,
        account: Account | None = None,
    ) -> None:
        request = exchange.request
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0].lower()
        sse = ctype.startswith(_SSE)
        # What the upstream sent decides how it is moderated, not what the
        # request asked for: a reply is never relayed unchecked by surprise.
        moderated = plan is not None and response.code == 200
        metered = account is not None and response.code == 200
        read = (moderated or metered) and (sse or b"json" in ctype)
        encodings = response.headers.getRawHeaders(b"content-encoding")
        if read and encodings:
            # Asked for identity, the upstream compressed anyway: decoded
            # strictly and within MAX_DECODED_BODY, or refused.
            if len(encodings) != 1 or b"," in encodings[0]:
                encoding = b"(several)"
            else:
                encoding = encodings[0].strip().lower()
            if encoding not in ENCODINGS:
                _discard(response)
                self._metrics.upstream_error(ERROR_KINDS[errors.UPSTREAM_FAILED.code])
                _log.info(
                    "upstream {host} sent an encoding it was not asked for: {encoding}",
                    host=exchange.upstream_host,
                    encoding=encoding.decode("ascii", "replace"),
                )
                exchange.fail(errors.UPSTREAM_FAILED)
                return
            response = DecodedResponse(response, encoding, self._max_decoded)
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
        if account is not None:
            account.decorate(request)
        if moderated and read and sse:
            assert plan is not None
            await self._relay_moderated_stream(exchange, response, plan, key, account)
        elif moderated and read:
            assert plan is not None
            await self._relay_moderated_body(exchange, response, plan, key, account)
        else:
            sink: Callable[[bytes], None] = exchange.write
            if account is not None and metered:
                sink = account.metered(sink, sse=sse)
            # Relayed as sent: a compressed body keeps its Content-Encoding
            # and its length (unless metering rewrites the stream).
            if (
                response.length is not UNKNOWN_LENGTH
                and request.method != b"HEAD"
                and not (metered and sse and account is not None and account.rewrites)
            ):
                request.setHeader(b"content-length", b"%d" % response.length)
            broken = await self._deliver(exchange, response, sink)
            if account is not None:
                account.end_of_body()
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
        relay = BodyRelay(
            sink,
            exchange.request,
            self._reactor,
            self._timeout,
            self._send_timeout,
            exchange.client_stalled,
        )
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
            # Mid-body, only a closed connection says "incomplete"; the
            # upstream's fault, not a client hang-up.
            exchange.abort(upstream_fault=True)

    async def _relay_moderated_stream(
        self,
        exchange: Exchange,
        response: IResponse,
        plan: Plan,
        key: str,
        account: Account | None,
    ) -> None:
        def stop_upstream() -> None:
            if exchange.relay is not None:
                exchange.relay.stop()

        moderator = plan.stream_moderator(exchange.write, stop_upstream, key)
        exchange.moderator = moderator
        sink: Callable[[bytes], None] = moderator.feed
        if account is not None:
            sink = account.metered(sink, sse=True)
        broken = await self._deliver(exchange, response, sink)
        if account is not None:
            account.end_of_body()
        await moderator.end()
        if moderator.blocked:
            self._metrics.stream_blocked()
        elif broken is not None:
            self._broken_body(exchange, broken, True)

    async def _relay_moderated_body(
        self,
        exchange: Exchange,
        response: IResponse,
        plan: Plan,
        key: str,
        account: Account | None,
    ) -> None:
        chunks: list[bytes] = []
        held = 0
        limit = self._max_decoded

        def collect(data: bytes) -> None:
            # Held whole until judged: never more than MAX_DECODED_BODY of it.
            nonlocal held
            held += len(data)
            if held <= limit:
                chunks.append(data)
            elif chunks or held - len(data) <= limit:
                chunks.clear()
                if exchange.relay is not None:
                    exchange.relay.stop()

        sink: Callable[[bytes], None] = collect
        if account is not None:
            sink = account.metered(sink, sse=False)
        broken = await self._deliver(exchange, response, sink)
        if account is not None:
            account.end_of_body()
        if held > limit:
            broken = Failure(
                DecodeError(f"the body is larger than {limit} bytes (MAX_DECODED_BODY)")
            )
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
