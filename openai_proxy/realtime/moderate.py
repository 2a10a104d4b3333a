"""
Moderation of a WebSocket session (Realtime, Responses over WebSocket): the
model's output text judged sentence by sentence as it streams, and with
C{MODERATE_INPUT=on} the client's text too, with the backends, levels and
settings of HTTP moderation.

The relay decides from the handshake, then puts a L{ModerationFilter} in
the session's chain of filters::

    plan, query = session_moderation(moderation, request_query)
    # `query` (without moderation, moderation_level) is what goes upstream;
    # RequestRefused (400) is answered like any ProxyError.
    if plan is not None:
        chain = ModerationFilter(client, upstream, plan, upstream_key,
                                 responses=path_is_v1_responses,
                                 on_block=metrics.stream_blocked)

A filter that counts usage from the upstream's C{response.done} must sit
nearer the upstream than this one: a blocked response's own
C{response.done} never gets past it.  The upstream side lives in
L{openai_proxy.realtime.moderate_upstream}, the client's in
L{openai_proxy.realtime.moderate_client}, what the events hold in
L{openai_proxy.realtime.outputs}.

What the client gets of a blocked response: its events up to the event
holding the stopped sentence (the text before that sentence is sent as one
more delta), then an C{error} event (C{invalid_request_error},
C{content_filter}, C{REFUSAL_TEXT} as its message) and a C{response.done}
with C{status: "cancelled"} (Responses over WebSocket: C{response.incomplete},
reason C{content_filter}) whose output holds only the text sent; the proxy
sends C{response.cancel} upstream (Realtime) and drops every later event of
that response.  The session stays open.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote_plus

from twisted.logger import Logger
from twisted.python.failure import Failure

from openai_proxy.moderation import Moderation, Plan
from openai_proxy.realtime.filters import Message, Peer
from openai_proxy.realtime.moderate_client import ClientSide
from openai_proxy.realtime.moderate_upstream import UpstreamSide
from openai_proxy.realtime.relay import ModerationHook, SessionAsk
from openai_proxy.realtime.session import FilterFactory

#: The handshake's query parameters that ask for moderation; they never go
#: upstream.
QUERY_FIELDS = ("moderation", "moderation_level")

#: Bytes of messages one direction may hold (waiting to be judged, or
#: behind a message that is) before the filter stops reading that side.
MAX_HELD = 1_048_576

_log = Logger()


def session_moderation(
    moderation: Moderation, query: bytes
) -> tuple[Plan | None, bytes]:
    """
    Decide from the handshake's C{query} (the part after C{?}, raw) whether
    the session is moderated: under C{MODERATION=always}, when the client
    asks with C{moderation=true} (optionally C{moderation_level=low|high}),
    or when C{MODERATE_INPUT=on} judges its input.

    Returns the L{Plan} (L{None}: no L{ModerationFilter}) and the query with
    C{moderation} and C{moderation_level} removed (every other parameter
    kept byte for byte), which is what goes upstream.

    @raise openai_proxy.moderation.RequestRefused: 400 as for HTTP
        (C{invalid_moderation}, C{invalid_moderation_level},
        C{moderation_unavailable}).
    """
    kept: list[bytes] = []
    asked: dict[str, object] = {}
    for piece in query.split(b"&"):
        name, _, value = piece.partition(b"=")
        decoded = unquote_plus(name.decode("utf-8", "replace"))
        if decoded in QUERY_FIELDS:
            asked[decoded] = unquote_plus(value.decode("utf-8", "replace"))
        elif piece:
            kept.append(piece)
    return moderation.session_plan(asked), b"&".join(kept)


def moderation_hook(
    moderation: Moderation, on_block: Callable[[], None] | None = None
) -> ModerationHook:
    """
    The relay's L{ModerationHook}: for each handshake, a factory of the
    L{ModerationFilter} its session is moderated with, or L{None}.

    @raise openai_proxy.moderation.RequestRefused: as L{session_moderation}.
    """

    def hook(ask: SessionAsk) -> FilterFactory | None:
        asked: dict[str, object] = {
            name: value
            for name, value in (
                ("moderation", ask.moderation),
                ("moderation_level", ask.level),
            )
            if value is not None
        }
        plan = moderation.session_plan(asked)
        if plan is None:
            return None
        moderated: Plan = plan
        responses = ask.path.rstrip(b"/").endswith(b"/responses")
        return lambda client, upstream: ModerationFilter(
            client,
            upstream,
            moderated,
            ask.upstream_key,
            responses=responses,
            on_block=on_block,
        )

    return hook


class ModerationFilter:
    """
    A L{openai_proxy.realtime.filters.SessionFilter} that moderates a
    session per C{plan} (from L{session_moderation}).

    Output (C{plan.output}): the text of C{response.output_text.delta} and
    C{response.output_audio_transcript.delta} (beta: C{response.text.delta},
    C{response.audio_transcript.delta}) is cut into sentences and judged as a
    streamed HTTP reply is (L{openai_proxy.moderation.StreamModerator}:
    checks pipelined, answers in any order).  A delta goes to the client only
    once every sentence it completes has passed; the events of its response
    that follow it wait behind it, in order; events tied to no response pass
    at once.  A stopped sentence ends its response as the module docstring
    says.  Function-call arguments are not judged (as on the HTTP path).

    Input (C{plan.input}): the text of C{conversation.item.create},
    C{session.update} instructions and C{response.create} (its instructions
    and input) is judged before it goes upstream, in order; a stopped one is
    dropped and the client gets an C{error} (C{content_filter}).  A user's
    transcribed speech (C{conversation.item.input_audio_transcription
    .completed}) that is stopped is not shown to the client, its item is
    deleted upstream, and the responses in progress are cancelled.

    More than C{max_held} bytes held in one direction pauses that side until
    it is under again.  A backend failure counts per C{MODERATION_ON_ERROR}.
    Messages of L{openai_proxy.realtime.messages.PARSE_ON_REACTOR} bytes or
    more are parsed in a thread; backend calls never block the reactor.

    @param upstream_key: the key moderation calls are made with (the
        C{openai} backend's).
    @param responses: the session is Responses over WebSocket (else
        Realtime): responses are told apart by C{stream_id}, and there is
        no C{response.cancel} to send.
    @param on_block: called for each response cut off (e.g.
        C{metrics.stream_blocked}).
    """

    def __init__(
        self,
        client: Peer,
        upstream: Peer,
        plan: Plan,
        upstream_key: str,
        *,
        responses: bool = False,
        max_held: int = MAX_HELD,
        on_block: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self._upstream = upstream
        self._from_upstream = UpstreamSide(
            client,
            upstream,
            plan,
            upstream_key,
            responses=responses,
            max_held=max_held,
            fail=self._fail,
            on_block=on_block,
        )
        self._from_client = (
            ClientSide(
                client,
                upstream,
                plan,
                upstream_key,
                responses=responses,
                max_held=max_held,
                fail=self._fail,
            )
            if plan.input
            else None
        )

    def from_client(self, message: Message) -> None:
        """See L{SessionFilter.from_client}."""
        if self._from_client is None:
            self._upstream.send(message)
        else:
            self._from_client.take(message)

    def from_upstream(self, message: Message) -> None:
        """See L{SessionFilter.from_upstream}."""
        self._from_upstream.take(message)

    def closed(self) -> None:
        """See L{SessionFilter.closed}: drop what is held, judge no more."""
        self._from_upstream.close()
        if self._from_client is not None:
            self._from_client.close()

    def _fail(self, failure: Failure) -> None:
        _log.failure("moderating a session message failed", failure)
        self._client.close(1011, "internal error")
