"""
The client's side of a session under C{MODERATE_INPUT}: the text it sends
judged before it goes upstream, every message kept in order behind it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from openai_proxy.moderation import Plan
from openai_proxy.moderation.inputs import input_text
from openai_proxy.realtime.filters import Message, Peer
from openai_proxy.realtime.held import HeldBytes
from openai_proxy.realtime.messages import (
    PARSE_ON_REACTOR,
    AmbiguousEvent,
    may_be,
    parse,
    to_message,
)
from openai_proxy.realtime.moderate_upstream import REFUSED_INPUT
from openai_proxy.realtime.outputs import error_event

#: Client events whose text is judged.
JUDGED = ("conversation.item.create", "session.update", "response.create")

_AMBIGUOUS = "an event whose text is moderated must not name a field twice"
_UNREADABLE = "an event whose text is moderated must be one JSON object"


def request_text(payload: dict[str, Any]) -> str:
    """
    The client's words in one event: a C{conversation.item.create} item's
    text, C{session.update} instructions, C{response.create} instructions
    and input (Realtime nests them in C{response}; Responses over WebSocket
    has them at the top, as a POST body).  C{""} for anything else.
    """
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


class ClientSide:
    """
    The messages the client sends, on their way upstream (see
    L{openai_proxy.realtime.moderate.ModerationFilter}).

    @param fail: called when reading a message failed unexpectedly.
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
    ) -> None:
        self._client = client
        self._upstream = upstream
        self._plan = plan
        self._key = upstream_key
        self._responses = responses
        self._fail = fail
        self._waiting: deque[Message] = deque()
        self._judging = False
        self._pumping = False
        self._held = HeldBytes(client, max_held)
        self._closed = False

    def take(self, message: Message) -> None:
        """The client sent C{message}."""
        if self._closed:
            return
        self._waiting.append(message)
        self._held.hold(len(message.data))
        self._pump()

    def _pump(self) -> None:
        if self._pumping:
            return  # called back from within the loop, which goes on
        self._pumping = True
        try:
            self._drain()
        finally:
            self._pumping = False

    def _drain(self) -> None:
        while self._waiting and not self._judging and not self._closed:
            message = self._waiting[0]
            if not message.text or not may_be(message.data, JUDGED):
                self._done(message, True)
                continue
            self._judging = True
            if len(message.data) >= PARSE_ON_REACTOR:
                d = deferToThread(parse, message.data, unique=True)
                d.addCallback(self._judge, message)
                d.addErrback(self._unreadable, message)
            else:
                try:
                    payload = parse(message.data, unique=True)
                except AmbiguousEvent:
                    self._refuse(message, None, _AMBIGUOUS, "invalid_event")
                    continue
                self._judge(payload, message)

    def _unreadable(self, failure: Failure, message: Message) -> None:
        if failure.check(AmbiguousEvent):
            self._refuse(message, None, _AMBIGUOUS, "invalid_event")
            self._pump()
        else:
            self._fail(failure)

    def _judge(self, payload: dict[str, Any] | None, message: Message) -> None:
        if payload is None:
            # It names a judged event but is not one object this proxy can
            # read: another parser might read one (trailing data, say).
            self._refuse(message, None, _UNREADABLE, "invalid_event")
            self._pump()
            return
        text = request_text(payload)
        if not text:
            self._done(message, True)
            self._pump()
            return
        self._plan.stops(text, self._key).addCallback(self._judged, message, payload)

    def _judged(self, stopped: bool, message: Message, payload: dict[str, Any]) -> None:
        if self._closed:
            return
        if stopped:
            self._refuse(message, payload, REFUSED_INPUT, "content_filter")
        else:
            self._done(message, True)
        self._pump()

    def _refuse(
        self,
        message: Message,
        payload: dict[str, Any] | None,
        text: str,
        code: str,
    ) -> None:
        self._done(message, False)
        error = error_event(text, self._responses, 0, code)
        if not self._responses:
            # The API's own errors name the client event they answer.
            asked = payload.get("event_id") if payload is not None else None
            if isinstance(asked, str):
                error["error"]["event_id"] = asked
        self._client.send(to_message(error))

    def _done(self, message: Message, forward: bool) -> None:
        self._judging = False
        self._waiting.popleft()
        if forward:
            self._upstream.send(message)
        self._held.release(len(message.data))

    def close(self) -> None:
        """The session ended: drop what is held, send nothing more."""
        self._closed = True
        self._held.stop()
        self._waiting.clear()
