"""
Relaying an upstream response to the client: as sent, metered (its tokens
counted) or moderated, with what must happen when its body breaks off.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from openai_proxy.config import Config
from openai_proxy.exchange import ERROR_KINDS, Exchange
from openai_proxy.http import errors
from openai_proxy.http.headers import RESPONSE_DROPPED, copy_headers
from openai_proxy.http.sse import format_event
from openai_proxy.keys.accounting import Account
from openai_proxy.moderation import Plan
from openai_proxy.telemetry.metrics import Metrics
from openai_proxy.upstream.decoding import ENCODINGS, DecodedResponse, DecodeError
from openai_proxy.upstream.relay import BodyRelay, UpstreamTimeout

_log = Logger()
_SSE = b"text/event-stream"
# A body the proxy reads reaches the client decoded, in its own framing.
_READ_RESPONSE_DROPPED = RESPONSE_DROPPED | {b"content-encoding"}


class Responder:
    """
    Relays upstream responses to clients as they arrive, with backpressure
    and the idle and send timeouts, through the moderation and token
    metering a request calls for.
    """

    def __init__(self, config: Config, reactor: IReactorTime, metrics: Metrics) -> None:
        self._reactor = reactor
        self._metrics = metrics
        self._timeout = config.timeout
        self._send_timeout = config.send_timeout
        self._max_decoded = config.max_decoded_body

    async def respond(
        self,
        exchange: Exchange,
        response: IResponse,
        plan: Plan | None,
        key: str,
        account: Account | None = None,
    ) -> None:
        """
        Relay C{response} to C{exchange}'s client: as the upstream sent it;
        decoded and metered when C{account} counts its tokens; moderated
        when C{plan} says so and the reply is one that can be.  Ends the
        client's response, one way or another.
        """
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
                exchange.fail(errors.UPSTREAM_FAILED())
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
            # Relayed as sent: a compressed body keeps its Content-Encoding
            # and its length (unless metering rewrites the stream).
            if (
                response.length is not UNKNOWN_LENGTH
                and request.method != b"HEAD"
                and not (metered and sse and account is not None and account.rewrites)
            ):
                request.setHeader(b"content-length", b"%d" % response.length)
            broken = await self._deliver(
                exchange, response, exchange.write, account if metered else None, sse
            )
            if broken is not None:
                self._broken_body(exchange, broken, sse)
        exchange.finish()

    async def _deliver(
        self,
        exchange: Exchange,
        response: IResponse,
        sink: Callable[[bytes], None],
        account: Account | None = None,
        sse: bool = False,
    ) -> Failure | None:
        """
        Deliver the response body to C{sink} as it arrives, through
        C{account}'s token meter when one is given; return L{None} when it
        ended normally, else why it did not.
        """
        if account is not None:
            sink = account.metered(sink, sse=sse)
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
        broken = None
        try:
            await relay.done
        except Exception:
            broken = Failure()
        if account is not None:
            account.end_of_body()
        return broken

    def _broken_body(self, exchange: Exchange, failure: Failure, sse: bool) -> None:
        """Tell the client, as well as its response still allows, that the body broke off."""
        if exchange.gone:
            return
        request = exchange.request
        timed_out = failure.check(UpstreamTimeout) is not None
        error = (errors.UPSTREAM_TIMEOUT if timed_out else errors.UPSTREAM_FAILED)()
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
        broken = await self._deliver(exchange, response, moderator.feed, account, True)
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

        broken = await self._deliver(exchange, response, collect, account)
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
