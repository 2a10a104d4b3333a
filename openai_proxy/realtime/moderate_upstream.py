"""
The upstream's side of a moderated session: each response's events held
until the text they carry has passed, in order, and a response whose text
was stopped ended for the client and cancelled upstream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from openai_proxy.moderation import Plan, StreamModerator
from openai_proxy.realtime.filters import Message, Peer
from openai_proxy.realtime.held import HeldBytes
from openai_proxy.realtime.messages import (
    PARSE_ON_REACTOR,
    may_be,
    parse,
    to_message,
)
from openai_proxy.realtime.outputs import (
    REALTIME_END,
    RESPONSES_ENDS,
    ParsedEvent,
    ResponseShape,
    error_event,
    event_id,
)

#: The upstream event that carries the user's transcribed speech.
TRANSCRIPT = "conversation.item.input_audio_transcription.completed"

#: How many of the proxy's latest cancels are remembered, to recognise
#: the upstream's answer to one that found nothing to cancel.
_CANCELS_KEPT = 16

#: What the client is told when its words were stopped.
REFUSED_INPUT = "the request was refused by content moderation"


class _Response:
    """One response of the session, read and judged by its own moderator."""

    def __init__(
        self, side: UpstreamSide, response_id: str, plan: Plan, key: str
    ) -> None:
        self.id = response_id
        self.shape = ResponseShape(side.responses)
        self.fed: deque[ParsedEvent] = deque()
        self.late: list[Message] = []  # after its last event, while it is judged
        self.held = 0
        self.ending = False
        self.stopped = False
        self._side = side
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
        if not raw:  # the shape's refusal: its events are in shape.stopped
            self._side.stop(self, self.shape.stopped or [])
            return
        event = self.fed.popleft()
        self.held -= len(raw)
        self.shape.sent(event.payload)
        self._side.client.send(Message(raw, True))
        # Only once sent: a resume may hand over the next message at once.
        self._side.held.release(len(raw))

    def _stop_upstream(self) -> None:
        self._side.cancel(self)


class UpstreamSide:
    """
    The messages the upstream sends, on their way to the client (see
    L{openai_proxy.realtime.moderate.ModerationFilter}).

    @param fail: called when reading a message failed unexpectedly.
    @param on_block: called for each response cut off.
    """

    def __init__(
        self,
        client: Peer,
        upstream: Peer,
        plan: Plan,
        upstream_key: str,
        *,
        responses: bool,
        max_held: int,
        fail: Callable[[Failure], None],
        on_block: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.responses = responses
        self._plan = plan
        self._key = upstream_key
        self._fail = fail
        self._on_block = on_block
        self._open: dict[str, _Response] = {}
        self._stopped: set[str] = set()  # responses stopped: later events dropped
        self._owners: dict[Any, str] = {}  # output item id -> its response
        self._lanes: dict[Any, str] = {}  # stream_id -> its response (Responses)
        # Event ids of our latest response.cancel events (most are never
        # answered: only those that found nothing to cancel are).
        self._cancels: deque[str] = deque(maxlen=_CANCELS_KEPT)
        self._incoming: deque[Message] = deque()
        self._parsing = False
        self._pumping = False
        #: The bytes held from the upstream (its reading paused over the bound).
        self.held = HeldBytes(upstream, max_held)
        self._closed = False

    def take(self, message: Message) -> None:
        """The upstream sent C{message}."""
        if self._closed:
            return
        self._incoming.append(message)
        self.held.hold(len(message.data))
        self._pump()

    def _pump(self) -> None:
        if self._pumping:
            # Called back from within the loop (a resume that delivered a
            # message at once): the loop takes it, in its turn.
            return
        self._pumping = True
        try:
            while self._incoming and not self._parsing and not self._closed:
                self._take_next()
        finally:
            self._pumping = False

    def _take_next(self) -> None:
        # A message stays counted until it has gone, so that one a response
        # holds on to does not resume the upstream meanwhile.
        message = self._incoming.popleft()
        if not message.text or not self._reads(message.data):
            self.client.send(message)
        elif len(message.data) >= PARSE_ON_REACTOR:
            self._parsing = True
            deferToThread(parse, message.data).addCallbacks(
                self._parsed, self._fail, (message,)
            )
            return
        elif self._route(message, parse(message.data)):
            return
        self.held.release(len(message.data))

    def _reads(self, data: bytes) -> bool:
        # Whether a message must be parsed: always when output is judged;
        # else only a transcript, or an answer to one of our cancels.
        return (
            self._plan.output
            or may_be(data, (TRANSCRIPT,))
            or (bool(self._cancels) and may_be(data, ("error",)))
        )

    def _parsed(self, payload: dict[str, Any] | None, message: Message) -> None:
        self._parsing = False
        if self._closed:
            return
        self._pumping = True  # what comes meanwhile waits for this one
        try:
            if not self._route(message, payload):
                self.held.release(len(message.data))
        finally:
            self._pumping = False
        self._pump()

    def _route(self, message: Message, payload: dict[str, Any] | None) -> bool:
        # Send, drop or hold the message; whether a response now holds it
        # (and will count it as gone).
        if payload is None:
            self.client.send(message)  # not an event: nothing to judge
            return False
        kind = payload.get("type")
        if kind == TRANSCRIPT and self._plan.input:
            self._judge_transcript(message, payload)
            return False
        if kind == "error" and self._answers_our_cancel(payload):
            return False
        response_id = self._response_of(kind, payload) if self._plan.output else None
        if response_id is None:
            self.client.send(message)
        elif response_id not in self._stopped:
            return self._feed(response_id, message, payload)
        return False  # else the rest of a stopped response: never sent

    def _answers_our_cancel(self, payload: dict[str, Any]) -> bool:
        # A cancel that crossed the response's end is answered with an
        # error naming our event: the client never asked, so never hears.
        error = payload.get("error")
        asked = error.get("event_id") if isinstance(error, dict) else None
        if isinstance(asked, str) and asked in self._cancels:
            self._cancels.remove(asked)
            return True
        return False

    def _response_of(self, kind: object, payload: dict[str, Any]) -> str | None:
        if not isinstance(kind, str):
            return None
        if kind.startswith("conversation.item."):
            # Only events that carry an item can carry its text.
            item = payload.get("item")
            return self._owners.get(item.get("id")) if isinstance(item, dict) else None
        if not kind.startswith("response."):
            return None
        response = payload.get("response")
        found: object = None
        if isinstance(response, dict):
            found = response.get("id")
        elif not self.responses:
            found = payload.get("response_id")
        if self.responses:
            # Responses events name no response: one runs at a time per
            # stream_id (absent: the connection's one lane).
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
            if not response.stopped and not self._closed:
                self.client.send(message)
            self.held.release(len(message.data))
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
        held, response.held = response.held, 0
        response.fed.clear()
        if not self._closed:
            for event in events:
                self.client.send(to_message(event))
            if self._on_block is not None:
                self._on_block()
        self.held.release(held)

    def cancel(self, response: _Response | None) -> None:
        """
        Ask the upstream to stop generating C{response} (L{None}: whatever
        it is generating), unless it has already ended.  Realtime only: the
        Responses protocol has no such event.
        """
        if self.responses or self._closed or (response is not None and response.ending):
            return
        cancel_id = event_id()
        self._cancels.append(cancel_id)
        cancel = {"type": "response.cancel", "event_id": cancel_id}
        if response is not None:
            cancel["response_id"] = response.id
        self.upstream.send(to_message(cancel))

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
            # The words stay out of the conversation, and whatever the model
            # was saying may answer them.
            item_id = payload.get("item_id")
            if item_id is not None:
                self.upstream.send(
                    to_message({"type": "conversation.item.delete", "item_id": item_id})
                )
            self.client.send(to_message(error_event(REFUSED_INPUT, False, 0)))
            responses = list(self._open.values())
            for response in responses:
                self.stop(response, response.shape.ending(None, "", REFUSED_INPUT))
                response.moderator.abandon()
                self.cancel(response)
            if not responses:
                # One may be under way that this side does not follow (its
                # output is not moderated, or its first event is still to
                # come); the upstream's error when there is none is ours.
                self.cancel(None)

        self._plan.stops(transcript, self._key).addCallback(judged)

    def close(self) -> None:
        """The session ended: drop what is held, send nothing more."""
        self._closed = True
        self.held.stop()
        for response in list(self._open.values()):
            response.moderator.abandon()
        self._open.clear()
        self._incoming.clear()
