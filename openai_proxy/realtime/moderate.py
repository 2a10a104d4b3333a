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
                                 responses=path_is_v1_responses)

Put it on the client's side of any filter that counts usage from the
upstream's C{response.done}: a blocked response's own C{response.done}
never reaches the client.

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

import json
from collections import deque
from typing import Any
from urllib.parse import unquote_plus

from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from openai_proxy.moderation import Moderation, Plan, StreamModerator
from openai_proxy.moderation.inputs import input_text
from openai_proxy.realtime.filters import Message, Peer
from openai_proxy.realtime.outputs import (
    REALTIME_END,
    RESPONSES_ENDS,
    ParsedEvent,
    ResponseShape,
    content_filter_error,
)

#: The handshake's query parameters that ask for moderation; they never go
#: upstream.
QUERY_FIELDS = ("moderation", "moderation_level")

#: Bytes of messages one direction may hold (waiting to be judged, or
#: behind a message that is) before the filter stops reading that side.
MAX_HELD = 1_048_576

#: A message this large (bytes) is parsed in a thread.
PARSE_ON_REACTOR = 65_536

#: Client events whose text C{MODERATE_INPUT} judges.
_CLIENT_INPUTS = ("conversation.item.create", "session.update", "response.create")

#: The upstream event that carries the user's transcribed speech.
_TRANSCRIPT = "conversation.item.input_audio_transcription.completed"

_REFUSED_INPUT = "the request was refused by content moderation"

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


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _may_be(data: bytes, kinds: tuple[str, ...]) -> bool:
    # Whether a message may be one of these event types, without parsing it
    # (audio chunks are most messages): the type's name must be in it,
    # unless JSON escapes could spell it otherwise.
    return b"\\" in data or any(kind.encode() in data for kind in kinds)


class _Response:
    """One response of the session under moderation."""

    def __init__(
        self, session: ModerationFilter, response_id: str, plan: Plan, key: str
    ) -> None:
        self.id = response_id
        self.shape = ResponseShape(session.responses)
        self.fed: deque[ParsedEvent] = deque()
        self.late: list[Message] = []  # after its last event, while it is judged
        self.held = 0
        self.ending = False
        self.stopped = False
        self._session = session
        self.moderator: StreamModerator = plan.stream_moderator(
            self._write, self._stop_upstream, key, shape=self.shape
        )

    def feed(self, message: Message, payload: dict[str, Any]) -> bool:
        """
        Take the next event of this response; whether it is kept (its bytes
        then stay counted as held until it is written or dropped).
        """
        if self.moderator.blocked:
            return False  # after the stopped sentence: never sent
        event = ParsedEvent(raw=message.data, payload=payload)
        self.fed.append(event)
        self.held += len(message.data)
        self.moderator.feed_events([event])
        return True

    def _write(self, raw: bytes) -> None:
        if not raw:
            self._session.stop(self, self.shape.stopped or [])
            return
        event = self.fed.popleft()
        self.held -= len(raw)
        self._session.unhold(len(raw))
        self.shape.sent(event.payload)
        self._session.client.send(Message(raw, True))

    def _stop_upstream(self) -> None:
        self._session.cancel(self.id)


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
    says.

    Input (C{plan.input}): the text of C{conversation.item.create},
    C{session.update} instructions and C{response.create} (its instructions
    and input) is judged before it goes upstream, in order; a stopped one is
    dropped and the client gets an C{error} (C{content_filter}).  A user's
    transcribed speech (C{conversation.item.input_audio_transcription
    .completed}) that is stopped is not shown to the client, its item is
    deleted upstream, and the responses in progress are cancelled.

    More than C{max_held} bytes held in one direction pauses that side until
    it is under again.  A backend failure counts per C{MODERATION_ON_ERROR}.

    @param upstream_key: the key moderation calls are made with (the
        C{openai} backend's).
    @param responses: the session is Responses over WebSocket (else
        Realtime): responses are told apart by C{stream_id}, and there is
        no C{response.cancel} to send.
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
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.responses = responses
        self._plan = plan
        self._key = upstream_key
        self._max_held = max_held
        self._open: dict[str, _Response] = {}
        self._stopped: set[str] = set()  # responses stopped: later events dropped
        self._owners: dict[Any, str] = {}  # output item id -> its response
        self._lanes: dict[Any, str] = {}  # stream_id -> its response (Responses)
        self._incoming: deque[Message] = deque()
        self._parsing = False
        self._held = 0
        self._paused = False
        self._requests: deque[Message] = deque()
        self._judging = False
        self._requests_held = 0
        self._client_paused = False
        self._closed = False

    # The upstream's messages, towards the client.

    def from_upstream(self, message: Message) -> None:
        """See L{SessionFilter.from_upstream}."""
        if self._closed:
            return
        self._incoming.append(message)
        self.hold(len(message.data))
        self._pump_upstream()

    def _pump_upstream(self) -> None:
        while self._incoming and not self._parsing and not self._closed:
            # A message stays counted until it has gone, so that one a
            # response holds on to does not resume the upstream meanwhile.
            message = self._incoming.popleft()
            if not message.text or not (
                self._plan.output or _may_be(message.data, (_TRANSCRIPT,))
            ):
                self.client.send(message)
            elif len(message.data) >= PARSE_ON_REACTOR:
                self._parsing = True
                deferToThread(_parse, message.data).addCallbacks(
                    self._parsed, self._parse_failed, (message,)
                )
                return
            elif self._route(message, _parse(message.data)):
                continue
            self.unhold(len(message.data))

    def _parsed(self, payload: dict[str, Any] | None, message: Message) -> None:
        self._parsing = False
        if not self._closed:
            if not self._route(message, payload):
                self.unhold(len(message.data))
            self._pump_upstream()

    def _parse_failed(self, failure: Failure) -> None:
        _log.failure("parsing a session message failed", failure)
        self.client.close(1011, "internal error")

    def _route(self, message: Message, payload: dict[str, Any] | None) -> bool:
        # Send, drop or hold the message; whether a response now holds it
        # (and will count it as gone).
        if payload is None:
            self.client.send(message)  # not an event: nothing to judge
            return False
        kind = payload.get("type")
        if kind == _TRANSCRIPT and self._plan.input:
            self._judge_transcript(message, payload)
            return False
        response_id = self._response_of(kind, payload) if self._plan.output else None
        if response_id is None:
            self.client.send(message)
        elif response_id not in self._stopped:
            return self._feed(response_id, message, payload)
        return False  # else the rest of a stopped response: never sent

    def _response_of(self, kind: object, payload: dict[str, Any]) -> str | None:
        if not isinstance(kind, str):
            return None
        response = payload.get("response")
        if kind.startswith("conversation.item."):
            # Only events that carry an item can carry its text.
            item = payload.get("item")
            return self._owners.get(item.get("id")) if isinstance(item, dict) else None
        if not kind.startswith("response."):
            return None
        found: object = None
        if isinstance(response, dict):
            found = response.get("id")
        elif not self.responses:
            found = payload.get("response_id")
        if self.responses:
            lane = payload.get("stream_id")
            if kind == "response.created" and isinstance(found, str):
                self._lanes[lane] = found
            found = self._lanes.get(lane, found)
        if kind == "response.output_item.added" and isinstance(found, str):
            item = payload.get("item")
            if isinstance(item, dict) and item.get("id") is not None:
                self._owners[item["id"]] = found
        return found if isinstance(found, str) else None

    def _feed(
        self, response_id: str, message: Message, payload: dict[str, Any]
    ) -> bool:
        response = self._open.get(response_id)
        if response is None:
            response = self._open[response_id] = _Response(
                self, response_id, self._plan, self._key
            )
        if response.ending:
            # After its last event (e.g. a conversation.item.done): it goes
            # out once the response has, never before.
            response.late.append(message)
            return True
        held = response.feed(message, payload)
        kind = payload.get("type")
        if kind == REALTIME_END or kind in RESPONSES_ENDS:
            response.ending = True
            if self.responses:
                self._lanes.pop(payload.get("stream_id"), None)
            response.moderator.end().addCallback(lambda _: self._ended(response))
        return held

    def _ended(self, response: _Response) -> None:
        if self._open.get(response.id) is response:
            del self._open[response.id]
        late, response.late = response.late, []
        for message in late:
            self.unhold(len(message.data))
            if not response.stopped and not self._closed:
                self.client.send(message)
        if not response.stopped:
            for item, owner in list(self._owners.items()):
                if owner == response.id:
                    del self._owners[item]

    def stop(self, response: _Response, events: list[dict[str, Any]]) -> None:
        """
        End C{response} for the client with C{events} (see
        L{ResponseShape.ending}); drop all it holds and all that follows.
        """
        if response.stopped:
            return
        response.stopped = True
        self._stopped.add(response.id)
        self._open.pop(response.id, None)
        self.unhold(response.held)
        response.held = 0
        response.fed.clear()
        if not self._closed:
            for event in events:
                self.client.send(_message(event))

    def cancel(self, response_id: str) -> None:
        """Ask the upstream to stop generating C{response_id} (Realtime)."""
        if not self.responses and not self._closed:
            self.upstream.send(
                _message({"type": "response.cancel", "response_id": response_id})
            )

    def hold(self, size: int) -> None:
        """Count C{size} more bytes held from the upstream."""
        self._held += size
        if self._held > self._max_held and not self._paused and not self._closed:
            self._paused = True
            self.upstream.pause()

    def unhold(self, size: int) -> None:
        """Count C{size} bytes held from the upstream as gone."""
        self._held -= size
        if self._paused and self._held <= self._max_held and not self._closed:
            self._paused = False
            self.upstream.resume()

    def _judge_transcript(self, message: Message, payload: dict[str, Any]) -> None:
        transcript = payload.get("transcript")
        if not isinstance(transcript, str) or not transcript:
            self.client.send(message)
            return

        def judged(stopped: bool) -> None:
            if self._closed:
                return
            if not stopped:
                self.client.send(message)
                return
            item_id = payload.get("item_id")
            if item_id is not None:
                self.upstream.send(
                    _message({"type": "conversation.item.delete", "item_id": item_id})
                )
            self.client.send(_message(content_filter_error(_REFUSED_INPUT, False, 0)))
            for response in list(self._open.values()):
                # Whatever the model was saying may answer the stopped words.
                self.stop(response, response.shape.ending(None, "", _REFUSED_INPUT))
                response.moderator.abandon()
                self.cancel(response.id)

        self._plan.stops(transcript, self._key).addCallback(judged)

    # The client's messages, towards the upstream.

    def from_client(self, message: Message) -> None:
        """See L{SessionFilter.from_client}."""
        if self._closed:
            return
        if not self._plan.input:
            self.upstream.send(message)
            return
        self._requests.append(message)
        self._hold_request(len(message.data))
        self._pump_client()

    def _pump_client(self) -> None:
        while self._requests and not self._judging and not self._closed:
            message = self._requests[0]
            if not message.text or not _may_be(message.data, _CLIENT_INPUTS):
                self._forward(message)
                continue
            self._judging = True
            if len(message.data) >= PARSE_ON_REACTOR:
                deferToThread(_parse, message.data).addCallbacks(
                    self._judge_request, self._parse_failed, (message,)
                )
            else:
                self._judge_request(_parse(message.data), message)

    def _judge_request(self, payload: dict[str, Any] | None, message: Message) -> None:
        text = "" if payload is None else _request_text(payload, self.responses)
        if payload is None or not text:
            self._judging = False
            self._forward(message)
            self._pump_client()
            return
        self._plan.stops(text, self._key).addCallback(
            self._request_judged, message, payload
        )

    def _request_judged(
        self, stopped: bool, message: Message, payload: dict[str, Any]
    ) -> None:
        self._judging = False
        if self._closed:
            return
        if stopped:
            self._requests.popleft()
            self._unhold_request(len(message.data))
            refusal = content_filter_error(_REFUSED_INPUT, self.responses, 0)
            if not self.responses and isinstance(payload.get("event_id"), str):
                refusal["error"]["event_id"] = payload["event_id"]
            self.client.send(_message(refusal))
        else:
            self._forward(message)
        self._pump_client()

    def _forward(self, message: Message) -> None:
        self._requests.popleft()
        self._unhold_request(len(message.data))
        self.upstream.send(message)

    def _hold_request(self, size: int) -> None:
        self._requests_held += size
        if self._requests_held > self._max_held and not self._client_paused:
            self._client_paused = True
            self.client.pause()

    def _unhold_request(self, size: int) -> None:
        self._requests_held -= size
        if self._client_paused and self._requests_held <= self._max_held:
            self._client_paused = False
            self.client.resume()

    def closed(self) -> None:
        """See L{SessionFilter.closed}: drop what is held, judge no more."""
        self._closed = True
        for response in list(self._open.values()):
            response.moderator.abandon()
        self._open.clear()
        self._incoming.clear()
        self._requests.clear()


def _request_text(payload: dict[str, Any], responses: bool) -> str:
    # The client's words in one event (see ModerationFilter, Input).
    kind = payload.get("type")
    if kind == "conversation.item.create":
        return input_text("responses", {"input": [payload.get("item")]})
    if kind == "session.update":
        session = payload.get("session")
        instructions = (
            session.get("instructions") if isinstance(session, dict) else None
        )
        return instructions if isinstance(instructions, str) else ""
    if kind == "response.create":
        body = payload.get("response")
        return input_text("responses", body if isinstance(body, dict) else payload)
    return ""


def _message(payload: dict[str, Any]) -> Message:
    return Message(
        json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(), True
    )
