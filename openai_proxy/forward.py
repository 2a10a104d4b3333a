"""
Forwarding one request: key check, body, the upstream call through treq
(with failover between server keys), then the response handed to the
L{Responder}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.server import Request

from openai_proxy.bodies import ClientGone, request_body
from openai_proxy.config import Config
from openai_proxy.exchange import ERROR_KINDS, Exchange, upstream_error
from openai_proxy.http import errors
from openai_proxy.http.errors import ProxyError
from openai_proxy.http.headers import REQUEST_DROPPED, copy_headers
from openai_proxy.keys.accounting import Account, Accounting
from openai_proxy.keys.allowlist import check_path, check_query, query_models
from openai_proxy.keys.auth import Grant, KeyPolicy
from openai_proxy.moderation import Moderation
from openai_proxy.respond import Responder
from openai_proxy.telemetry.metrics import Metrics
from openai_proxy.upstream import hop
from openai_proxy.upstream.channels import Upstream
from openai_proxy.upstream.choose import Channel, UpstreamRegistry
from openai_proxy.upstream.client import RelayClient, Upstreams
from openai_proxy.upstream.errorbody import ReadResponse
from openai_proxy.upstream.failover import (
    KeyPool,
    abandon,
    judge,
    might_retry,
    replayable,
)
from openai_proxy.upstream.models import ModelSource, list_models

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
        upstreams: UpstreamRegistry | None = None,
        client_for: Callable[[Upstream], RelayClient] | None = None,
    ) -> None:
        """
        @param upstreams: the upstreams chosen by model (C{UPSTREAMS_FILE}).
        @param client_for: the client for one of them (where its egress
            proxy is used); by default C{client}.
        """
        self._reactor = reactor
        self._client = client
        self._by_model = upstreams
        self._client_for = client_for or (lambda upstream: client)
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
            by_model = self._by_model
            if by_model is not None and not grant.client_key and _lists_models(request):
                await self._list_models(exchange, by_model, grant)
                return
            # The body is read (and a named key's models checked) before the
            # account is opened: a refused body takes no slot.
            body, fields, injected, models = await request_body(
                exchange,
                self._moderation,
                log_bodies=self._log_bodies,
                max_parsed=self._max_parsed,
                key=grant.named,
                inject_usage=self._accounting is not None
                and self._accounting.inject_usage,
                want_model=by_model is not None and bool(by_model.channels),
            )
            if by_model is not None and not models:
                models = query_models(request.uri)
            channels = [] if by_model is None else by_model.plan(models)
            if grant.client_key:
                # A client's own key only ever goes to UPSTREAM: its request
                # may go only to an upstream that is sent no key at all.
                channels = [c for c in channels if not c.pool.keys]
            if not channels and not key:
                raise _not_served(models)
            if grant.named is not None and self._accounting is not None:
                account = exchange.account = await self._accounting.open(
                    grant.named, injected=injected, request_bytes=exchange.bytes_in
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
            if channels:
                response = await self._send_by_model(
                    exchange, channels, body, uncompressed
                )
            else:
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

    async def _send_by_model(
        self,
        exchange: Exchange,
        channels: list[Channel],
        body: IBodyProducer | None,
        uncompressed: bool,
    ) -> IResponse | None:
        """
        Send the request to the first of C{channels}, failing over between
        its keys as between server keys; when it cannot be reached, or its
        last answer is one L{might_retry} names (its keys exhausted, 429,
        5xx), move on to the next with the body replayed.  Returns the
        answer to relay (the last one), or L{None} if the client left.
        """
        request = exchange.request
        body = replayable(request, body)
        last = len(channels) - 1
        for number, channel in enumerate(channels):
            if number:
                # An earlier attempt may still be sending the body.
                abandon(body)
                body = replayable(request, body)
            pool = channel.pool
            index = pool.pick() if pool.keys else None
            key = "" if index is None else pool.keys[index]
            self._metrics.upstream_request(channel.name)
            try:
                response = await self._send(
                    exchange, key, body, uncompressed, channel, number < last
                )
            except _Unreached:
                self._metrics.upstream_failover(channel.name)
                continue
            if (
                response is not None
                and index is not None
                and might_retry(response.code)
            ):
                response = await self._fail_over(
                    exchange, index, response, body, uncompressed, channel
                )
            if response is None:
                return None
            if number == last or not might_retry(response.code):
                return response
            if not isinstance(response, ReadResponse):
                response = ReadResponse(response, self._reactor, self._timeout)
                exchange.relay = response.relay
                await response.ready
                exchange.relay = None
            response.discard()
            if exchange.gone:
                return None
            self._metrics.upstream_failover(channel.name)
            _log.info(
                "upstream {name} answered {status}; trying the next one serving "
                "the model",
                name=channel.name,
                status=response.code,
            )
        raise AssertionError("the last upstream returns or raises")  # pragma: no cover

    async def _list_models(
        self, exchange: Exchange, upstreams: UpstreamRegistry, grant: Grant
    ) -> None:
        """
        Answer C{GET /v1/models} from every upstream of C{UPSTREAMS_FILE}
        (and C{UPSTREAM}, when the request has a key for it): the union of
        what each lists and serves, narrowed to a named key's C{models}.
        """
        sources = [
            ModelSource(
                c.name,
                self._client_for(c.upstream),
                c.base + b"/v1/models",
                _listing_headers(c.host_header, c.headers, c.auth, _any_key(c.pool)),
                c.serves,
            )
            for c in upstreams.channels
        ]
        if grant.upstream_key:
            # UPSTREAM (a server key, or an fk-style route) serves the rest.
            base = self._upstreams.base_for(grant.upstream_key)
            sources.append(
                ModelSource(
                    "UPSTREAM",
                    self._client,
                    base + b"/v1/models",
                    _listing_headers(
                        self._upstreams.host_header(base),
                        (),
                        _bearer,
                        grant.upstream_key,
                    ),
                )
            )
        listed = await list_models(sources, self._timeout, self._reactor)
        if grant.named is not None:
            named = grant.named
            listed = [m for m in listed if named.allows_model(str(m.get("id")))]
        if exchange.gone:
            return
        request = exchange.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        exchange.write(json.dumps({"object": "list", "data": listed}).encode())
        exchange.finish()

    async def _fail_over(
        self,
        exchange: Exchange,
        index: int,
        response: IResponse,
        body: IBodyProducer | None,
        uncompressed: bool,
        channel: Channel | None = None,
    ) -> IResponse | None:
        """
        The upstream refused the request on server key C{index} before any
        byte reached the client: judge its answer by its status and the
        start of its error body (read under the idle C{TIMEOUT}), bench the
        key when the answer says so, and try once more on the next key that
        is not benched.  Returns the answer to relay (the last one, when no
        other key was tried: its body whole), or L{None} if the client left.
        With a single server key the answer is returned unread.  With a
        C{channel}, its keys are the ones failed over between.
        """
        pool: KeyPool = self._keys.pool if channel is None else channel.pool
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
            if channel is None:
                self._metrics.upstream_key_failed(index)
            if verdict.bench_seconds is not None:
                pool.bench(index, verdict.bench_seconds)
                if channel is None:
                    self._metrics.upstream_key_benched(index)
                else:
                    self._metrics.upstream_benched(channel.name, index)
                _log.warn(
                    "{whose} key #{index} benched for {seconds:.0f} s after {status}",
                    whose="server" if channel is None else f"upstream {channel.name}'s",
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
                exchange, pool.keys[index], body, uncompressed, channel
            )
            if next_response is None:
                return None
            if channel is None:
                self._metrics.upstream_key_used(index)
            if not might_retry(next_response.code):
                return next_response
            response = next_response

    async def _send(
        self,
        exchange: Exchange,
        key: str,
        body: IBodyProducer | None,
        read: bool,
        channel: Channel | None = None,
        may_move: bool = False,
    ) -> IResponse | None:
        """
        Send the request upstream (to C{channel}, if given, else where its
        key routes it); fire with the response at its headers, or with
        L{None} if the client left.  C{read}: the proxy will read the
        response body (to moderate it or count its tokens), so asks for it
        uncompressed.

        @raise _Unreached: with C{may_move}, when the upstream could not be
            reached (the request never left), so another may be tried.
        """
        request = exchange.request
        if exchange.gone:
            return None  # left while its input was being moderated
        headers = Headers()
        copy_headers(request.requestHeaders, REQUEST_DROPPED, headers)
        client = self._client
        if channel is None:
            base = self._upstreams.base_for(key)
            exchange.upstream_host = self._upstreams.host_of(base)
            headers.setRawHeaders(b"authorization", [b"Bearer " + key.encode("ascii")])
            # Set here, once per upstream, Agent would compute it (and copy
            # all the headers to add it) on every request.
            headers.setRawHeaders(b"host", [self._upstreams.host_header(base)])
        else:
            base = channel.base
            exchange.upstream_host = channel.host
            client = self._client_for(channel.upstream)
            # A client of Azure's SDK sends its (proxy) key here.
            headers.removeHeader(b"api-key")
            for name, value in channel.headers:
                headers.setRawHeaders(name, [value])
            if key:
                name, value = channel.auth(key)
                headers.setRawHeaders(name, [value])
            headers.setRawHeaders(b"host", [channel.host_header])
        if read:
            headers.setRawHeaders(b"accept-encoding", [b"identity"])
        try:
            url = Upstreams.url(base, request.uri)
        except ValueError:
            raise errors.ABSOLUTE_URI() from None
        d: Deferred[Any] = client.relay(
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
            if may_move and not failure.check(ResponseFailed):
                raise _Unreached() from None
            raise error from None
        finally:
            exchange.pending = None
        exchange.metrics.upstream_headers(self._reactor.seconds() - sent)
        return response


class _Unreached(Exception):
    """An upstream of C{UPSTREAMS_FILE} could not be reached: try the next."""


def _lists_models(request: Request) -> bool:
    # The list itself, not one model (GET /v1/models/ID is relayed).
    return request.method == b"GET" and request.path in (b"/v1/models", b"/v1/models/")


def _not_served(models: tuple[str, ...]) -> ProxyError:
    # No upstream of UPSTREAMS_FILE serves the request, and it brought no key
    # that UPSTREAM could be sent.
    if models:
        return ProxyError(
            404,
            f"The model {models[0]!r} is not served by this proxy's upstreams.",
            "model_not_found",
            param="model",
        )
    return ProxyError(
        401,
        "This request names no model an upstream of this proxy serves, and no "
        "OpenAI key for the default upstream: use "
        "'Authorization: Bearer <openai-key>:<proxy-key>'.",
        "missing_api_key",
    )


def _bearer(key: str) -> tuple[bytes, bytes]:
    return b"authorization", b"Bearer " + key.encode("ascii")


def _any_key(pool: KeyPool) -> str:
    return pool.keys[pool.pick()] if pool.keys else ""


def _listing_headers(
    host: bytes,
    extra: tuple[tuple[bytes, bytes], ...],
    auth: Callable[[str], tuple[bytes, bytes]],
    key: str,
) -> Headers:
    # What GET /v1/models sends each upstream: none of the client's headers.
    headers = Headers({b"host": [host], b"accept-encoding": [b"identity"]})
    for name, value in extra:
        headers.setRawHeaders(name, [value])
    if key:
        name, value = auth(key)
        headers.setRawHeaders(name, [value])
    return headers
