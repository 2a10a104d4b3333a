"""
Forwarding one request: key check, body, the upstream call through treq
(with failover between server keys), then the response handed to the
L{Responder}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from openai_proxy.bodies import ClientGone, request_body
from openai_proxy.config import Config
from openai_proxy.exchange import ERROR_KINDS, Exchange, upstream_error
from openai_proxy.http import errors
from openai_proxy.http.errors import ProxyError
from openai_proxy.http.headers import REQUEST_DROPPED, copy_headers
from openai_proxy.keys.accounting import Account, Accounting
from openai_proxy.keys.allowlist import check_path, check_query
from openai_proxy.keys.auth import Grant, KeyPolicy
from openai_proxy.moderation import Moderation
from openai_proxy.respond import Responder
from openai_proxy.telemetry.metrics import Metrics
from openai_proxy.upstream import hop
from openai_proxy.upstream.client import RelayClient, Upstreams
from openai_proxy.upstream.errorbody import ReadResponse
from openai_proxy.upstream.failover import abandon, judge, might_retry, replayable

_log = Logger()

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
        self._max_parsed = config.max_moderated_body
        self._log_bodies = config.log_bodies
        self._moderation = moderation
        self._metrics = metrics
        self._responder = Responder(config, reactor, metrics)

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
        every outcome ends C{exchange}'s response (or finds its client gone),
        and settles its admission exactly once.
        """
        try:
            await self._forward(exchange)
        finally:
            # Whatever happened after the admission (an unexpected error
            # too), its slot is freed and its tokens are charged.
            if exchange.account is not None:
                exchange.account.close()

    async def _forward(self, exchange: Exchange) -> None:
        request = exchange.request
        account: Account | None = None
        try:
            # Checked already when the headers came in (ProxySite.screen).
            grant: Grant | None = getattr(request, "grant", None)
            if grant is None:
                grant = self._keys.authorize(request.getHeader(b"authorization"))
            key = grant.upstream_key
            if grant.named is not None:
                check_path(grant.named, request.method, request.path)
                check_query(grant.named, request.uri)
            # The body is read (and a named key's models checked) before the
            # account is opened: a refused body takes no slot.
            body, fields, injected = await request_body(
                exchange,
                self._moderation,
                log_bodies=self._log_bodies,
                max_parsed=self._max_parsed,
                key=grant.named,
                inject_usage=self._accounting is not None
                and self._accounting.inject_usage,
            )
            if grant.named is not None and self._accounting is not None:
                account = exchange.account = await self._accounting.open(
                    request, grant.named, injected
                )
                if exchange.gone:
                    return  # left while Redis decided
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
            exchange.fail(e)
            return
        except ClientGone:
            return
        if response is not None:
            await self._responder.respond(exchange, response, plan, key, account)

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
        byte reached the client: judge its answer by its status and the
        start of its error body (read under the idle C{TIMEOUT}), bench the
        key when the answer says so, and try once more on the next key that
        is not benched.  Returns the answer to relay (the last one, when no
        other key was tried: its body whole), or L{None} if the client left.
        With a single server key the answer is returned unread.
        """
        pool = self._keys.pool
        if len(pool.keys) < 2:
            # Nothing to fail over to: the answer is relayed as it streams.
            return response
        retried = False
        while True:
            read = ReadResponse(response, self._reactor, self._timeout)
            exchange.relay = read.relay  # (a client that leaves stops the read)
            await read.ready
            exchange.relay = None
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
            if exchange.gone:
                read.discard()
                return None
            following = pool.other(index) if verdict.retry else None
            if retried or following is None:
                return read
            read.discard()
            # The upstream may have answered before reading the whole body:
            # that attempt stops sending it before the next one starts.
            abandon(body)
            body = replayable(exchange.request, body)
            retried, index = True, following
            next_response = await self._send(
                exchange, pool.keys[index], body, uncompressed
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
            raise errors.ABSOLUTE_URI() from None
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
