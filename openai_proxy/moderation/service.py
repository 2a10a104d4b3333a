"""
L{Moderation}: the relay's single entry point, built once from the
settings; and L{Plan}, what it decides for one request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from openai_proxy.moderation.backends import Backend
from openai_proxy.moderation.backends.keywords import KeywordsBackend
from openai_proxy.moderation.backends.openai_api import (
    OpenAIBackend,
    OpenAIClientFactory,
)
from openai_proxy.moderation.backends.tencent import TencentBackend, TencentSettings
from openai_proxy.moderation.body import moderate_body
from openai_proxy.moderation.checker import MAX_PIECE, CallObserver, Checker
from openai_proxy.moderation.chunks import StreamShape, shape_for
from openai_proxy.moderation.config import ModerationConfig
from openai_proxy.moderation.errors import RequestRefused
from openai_proxy.moderation.inputs import input_text
from openai_proxy.moderation.policy import requested_level, wants_moderation
from openai_proxy.moderation.stream import StreamModerator

_log = Logger()

#: The replies that are moderated (POST only), by path without prefix.
KINDS = {
    b"/v1/chat/completions": "chat",
    b"/v1/completions": "completions",
    b"/v1/responses": "responses",
}


class Moderation(Service):
    """
    Moderation for the relay, per the settings.  A service: L{start} (or
    C{startService}) before use and L{stop} after, which start and stop the
    thread pool of a blocking backend.

    @param openai_client_factory: for the C{openai} backend (required by
        it): returns a treq C{HTTPClient} and the upstream base URL.
    @param backend: use this backend instead of the configured one (tests).
    @param on_call: told of every backend call (backend name, result,
        seconds), e.g. C{metrics.moderation_call}.
    @param tencent_proxy: the egress proxy URL (credentials and all) the
        C{tencent} backend reaches TMS through, or L{None} for a direct
        connection (the environment's proxy variables are not read again).
    """

    def __init__(
        self,
        config: ModerationConfig,
        reactor: Any,
        *,
        openai_client_factory: OpenAIClientFactory | None = None,
        backend: Backend | None = None,
        on_call: CallObserver | None = None,
        tencent_proxy: str | None = None,
    ) -> None:
        self.config = config
        if backend is None:
            backend = _build_backend(
                config, reactor, openai_client_factory, tencent_proxy
            )
        self._checker = (
            None
            if backend is None
            else Checker(
                backend,
                reactor,
                timeout=config.timeout,
                on_error=config.on_error,
                on_call=on_call,
            )
        )
        self._started = False

    def startService(self) -> None:
        """Start the backend (its threads)."""
        self.running = True  # what Service.startService does
        if self._checker is not None and not self._started:
            self._started = True
            self._checker.backend.start()

    def stopService(self) -> Deferred[None]:
        """Cancel the calls still waiting (they count as C{on_error}), then
        stop the backend; fires once its threads have ended."""
        self.running = False
        if self._checker is not None and self._started:
            self._started = False
            self._checker.cancel_all()
            return self._checker.backend.stop()
        return succeed(None)

    def start(self) -> None:
        """Same as C{startService}."""
        self.startService()

    def stop(self) -> Deferred[None]:
        """Same as C{stopService}."""
        return self.stopService()

    def plan(self, path: bytes, body: dict[str, Any] | None) -> Plan | None:
        """
        Decide how the reply to a POST to C{path} (no upstream prefix, no
        query) with JSON object C{body} (L{None} when not one) is moderated.

        Returns L{None} when it is not: not a completion path, C{MODERATION}
        is C{off} and the request does not ask, or C{request} and the
        request's C{"moderation"} does not ask (see
        L{openai_proxy.moderation.policy.requested_moderation}).

        @raise RequestRefused: 400 C{invalid_moderation} for a C{"moderation"}
            value that is neither yes nor no; 400 C{moderation_unavailable}
            when moderation is asked for (or C{always}) but no backend is
            configured or C{MODERATION=off}; 400 C{invalid_moderation_level}
            for a bad C{moderation_level}.
        """
        kind = _kind(path)
        if kind is None or not wants_moderation(self.config.mode, body):
            return None
        if self._checker is None or self.config.mode == "off":
            raise RequestRefused(
                400,
                "moderation was requested but is not available on this proxy",
                "moderation_unavailable",
            )
        level = requested_level(self.config.mode, self.config.level, body or {})
        stream = body is not None and body.get("stream") is True
        return Plan(kind, stream, level, self._checker, self.config)

    def session_plan(self, asked: dict[str, object]) -> Plan | None:
        """
        Decide how a WebSocket session (Realtime, Responses over WebSocket)
        is moderated, from what its handshake asks (C{asked}: the
        C{moderation} and C{moderation_level} of its query, as strings).

        Returns L{None} when nothing of it is; else a L{Plan} of kind
        C{"realtime"} whose C{output} says whether the model's output is
        judged (C{MODERATION=always}, or asked for) and C{input} whether the
        client's text is (C{MODERATE_INPUT=on}).

        @raise RequestRefused: as L{plan} does, for the same reasons.
        """
        output = wants_moderation(self.config.mode, asked)
        judged_input = self.config.moderate_input and self.config.mode != "off"
        if not output and not judged_input:
            return None
        if output and (self._checker is None or self.config.mode == "off"):
            raise RequestRefused(
                400,
                "moderation was requested but is not available on this proxy",
                "moderation_unavailable",
            )
        if self._checker is None:
            return None  # settings refuse MODERATE_INPUT without a backend
        level = requested_level(self.config.mode, self.config.level, asked)
        return Plan(
            "realtime",
            True,
            level,
            self._checker,
            self.config,
            output=output,
            input=judged_input,
        )

    def probe(self, upstream_key: str) -> Deferred[None]:
        """
        Ask the backend about a harmless text, so that C{on_call} learns
        whether it can be reached; fires with L{None} either way.
        """
        if self._checker is None:
            return succeed(None)
        d = self._checker.verdict("ping", upstream_key)
        return d.addBoth(lambda _: None)

    def moderates(self, path: bytes) -> bool:
        """
        Whether requests to C{path} may be moderated on this proxy: a
        completion path, with a backend configured and C{MODERATION} not off.
        """
        return (
            _kind(path) is not None
            and self._checker is not None
            and self.config.mode != "off"
        )

    def reads(self, path: bytes) -> bool:
        """
        Whether a JSON request to C{path} must be parsed for moderation even
        when it names no C{moderation} field (under C{always}, or when input
        is moderated).
        """
        return _kind(path) is not None and (
            self.config.mode == "always"
            or (self.config.moderate_input and self.config.mode != "off")
        )

    def check_input(
        self, path: bytes, body: dict[str, Any], upstream_key: str
    ) -> Deferred[None]:
        """
        With C{MODERATE_INPUT} on, judge the user/system text of a POST to a
        completion C{path}, whether or not its reply is moderated; fire with
        L{None} when it may go upstream, errback with L{RequestRefused} (400
        C{content_filter}) when stopped.  Otherwise fire with L{None} at once.

        @raise RequestRefused: for a bad C{moderation_level}.
        """
        kind = _kind(path)
        if (
            kind is None
            or not self.config.moderate_input
            or self.config.mode == "off"
            or self._checker is None
        ):
            return succeed(None)
        text = input_text(kind, body)
        if not text:
            return succeed(None)
        level = requested_level(self.config.mode, self.config.level, body)

        def decide(stopped: bool) -> Deferred[None]:
            if stopped:
                return fail(
                    RequestRefused(
                        400,
                        "the request was refused by content moderation",
                        "content_filter",
                    )
                )
            return succeed(None)

        return self._checker.stops(text, level, upstream_key).addCallback(decide)


def _kind(path: bytes) -> str | None:
    return KINDS.get(path.rstrip(b"/") if path != b"/" else path)


class Plan:
    """
    How one request's reply is moderated.

    @ivar kind: C{"chat"}, C{"completions"} or C{"responses"}.
    @ivar stream: whether the request asked for a stream (C{"stream": true}).
    @ivar level: the moderation level in force (C{"low"} or C{"high"}).
    @ivar output: whether the model's output is judged (always, but for a
        WebSocket session whose input alone is).
    @ivar input: for a WebSocket session, whether the client's text is
        judged too (HTTP judges input with L{Moderation.check_input}).
    @ivar refusal_text: C{REFUSAL_TEXT}, what replaces blocked output.
    """

    def __init__(
        self,
        kind: str,
        stream: bool,
        level: str,
        checker: Checker,
        config: ModerationConfig,
        *,
        output: bool = True,
        input: bool = False,
    ) -> None:
        self.kind = kind
        self.stream = stream
        self.level = level
        self.output = output
        self.input = input
        self.refusal_text = config.refusal_text
        self._checker = checker
        self._refusal = config.refusal_text
        self._config = config

    def stops(self, text: str, upstream_key: str) -> Deferred[bool]:
        """Fire with whether C{text} must not reach the client (never errbacks)."""
        return self._checker.stops(text, self.level, upstream_key)

    def stream_moderator(
        self,
        write: Callable[[bytes], None],
        stop_upstream: Callable[[], None],
        upstream_key: str,
        shape: StreamShape | None = None,
    ) -> StreamModerator:
        """
        A L{StreamModerator} for the streamed reply to this request (read
        with C{shape}, by default the one of this plan's kind).
        """
        return StreamModerator(
            shape_for(self.kind) if shape is None else shape,
            lambda text: self.stops(text, upstream_key),
            write,
            stop_upstream,
            self._refusal,
            max_calls=self._config.max_calls,
            max_event_calls=self._config.max_event_calls,
            over_cap_stops=self._config.on_error == "block",
        )

    def moderate_body(
        self, body: bytes, upstream_key: str
    ) -> Deferred[tuple[bytes, bool]]:
        """
        Judge a reply that is not streamed; fire with C{(body, blocked)}
        (see L{openai_proxy.moderation.body.moderate_body}).
        """
        budget = [self._config.max_calls]

        def check(text: str) -> Deferred[bool]:
            # MODERATION_MAX_CALLS holds for a whole reply here too; past
            # it, a text counts as a failed call (MODERATION_ON_ERROR).
            calls = max(1, -(-len(text) // MAX_PIECE))
            if calls > budget[0]:
                budget[0] = 0
                _log.warn(
                    "moderation call cap reached for a reply; the rest counts as "
                    "a moderation error ({verdict})",
                    verdict=self._config.on_error,
                )
                return succeed(self._config.on_error == "block")
            budget[0] -= calls
            return self.stops(text, upstream_key)

        return moderate_body(self.kind, body, check, self._refusal)


def _build_backend(
    config: ModerationConfig,
    reactor: Any,
    openai_client_factory: OpenAIClientFactory | None,
    tencent_proxy: str | None = None,
) -> Backend | None:
    if config.backend == "keywords":
        assert config.keywords_file is not None
        return KeywordsBackend.from_file(config.keywords_file)
    if config.backend == "tencent":
        assert config.tencent_secret_id and config.tencent_secret_key
        settings = TencentSettings(
            secret_id=config.tencent_secret_id,
            secret_key=config.tencent_secret_key,
            region=config.tencent_region,
            endpoint=config.tencent_endpoint,
            biztype=config.tencent_biztype,
            timeout=config.timeout,
            proxy=tencent_proxy,
        )
        return TencentBackend(settings, reactor, config.threads)
    if config.backend == "openai":
        if openai_client_factory is None:
            raise ValueError(
                "the openai moderation backend needs openai_client_factory"
            )
        return OpenAIBackend(openai_client_factory)
    return None
