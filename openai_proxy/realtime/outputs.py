"""
What the model says in a WebSocket session, as moderation reads it: which
events of a response carry its text, when a part of it is finished, and the
events that end a response whose output was stopped.

One L{ResponseShape} reads one response (a Realtime C{response.created} up
to its C{response.done}, or a Responses-over-WebSocket C{response.created}
up to C{response.completed}/C{incomplete}/C{failed}); it is the
L{openai_proxy.moderation.chunks.StreamShape} that a
L{openai_proxy.moderation.StreamModerator} is built with, so sentences are
cut and judged exactly as for a streamed HTTP reply.

A text part is named by its key: C{(item_id, content_index)}.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field
from typing import Any

from openai_proxy.http.sse import SSEEvent
from openai_proxy.moderation.chunks import EventText, Key, StreamShape

#: Deltas of the model's prose: GA Realtime, beta Realtime, and Responses
#: (whose C{response.output_text.delta} has the GA name).  Function-call
#: arguments (C{response.function_call_arguments.delta}) are not prose for
#: a listener and are not judged, as on the HTTP path.
TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.output_audio_transcript.delta",
        "response.text.delta",
        "response.audio_transcript.delta",
    }
)

#: Events after which a text part gets no more text.
_PART_DONE = frozenset(
    {
        "response.output_text.done",
        "response.output_audio_transcript.done",
        "response.text.done",
        "response.audio_transcript.done",
        "response.content_part.done",
    }
)

#: Events only beta Realtime sessions send (GA renamed them).
_BETA_ONLY = frozenset(
    {
        "response.text.delta",
        "response.audio_transcript.delta",
        "response.audio.delta",
    }
)

#: The last event of a Realtime response.
REALTIME_END = "response.done"

#: The last event of a Responses-over-WebSocket response.
RESPONSES_ENDS = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)

#: Content part fields that hold text (or a transcript) of the output.
_TEXT_FIELDS = ("text", "transcript")


@dataclass(frozen=True)
class ParsedEvent(SSEEvent):
    """
    One WebSocket message as a L{StreamModerator} event: C{raw} is the
    message as it came, C{payload} its JSON object (already parsed, so it is
    never parsed twice).
    """

    payload: dict[str, Any] = field(default_factory=dict)

    def json(self) -> object:
        """The payload (see L{SSEEvent.json})."""
        return self.payload


#: A text part: C{(item_id, content_index)}.
PartKey = tuple[Any, Any]


def key_of(payload: dict[str, Any]) -> PartKey:
    """The text part an event is about."""
    item = payload.get("item_id")
    return (
        item if item is not None else payload.get("output_index"),
        payload.get("content_index"),
    )


def event_id() -> str:
    """A fresh C{event_id} for an event the proxy makes."""
    return "event_proxy_" + uuid.uuid4().hex[:20]


def error_event(
    message: str, responses: bool, sequence: int, code: str = "content_filter"
) -> dict[str, Any]:
    """
    An C{error} event of type C{invalid_request_error} (C{code}, by default
    C{content_filter}: moderation stopped something), in the Realtime shape
    or the Responses-over-WebSocket one (numbered C{sequence}).
    """
    if responses:
        return {
            "type": "error",
            "sequence_number": sequence,
            "code": code,
            "message": message,
            "param": None,
        }
    return {
        "type": "error",
        "event_id": event_id(),
        "error": {
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": None,
            "event_id": None,
        },
    }


class ResponseShape(StreamShape):
    """
    Reads the events of one response (see the module docstring) and
    remembers what its ending needs: the response object, its items and
    parts, and the text the client has been sent of each part.

    @ivar stopped: the events L{refusal} decided on, once it was called.
    """

    def __init__(self, responses: bool) -> None:
        self._responses = responses
        self._response: dict[str, Any] = {}
        self._items: dict[Any, dict[str, Any]] = {}
        self._parts: dict[PartKey, dict[str, Any]] = {}
        self._templates: dict[PartKey, dict[str, Any]] = {}
        self._sent: dict[PartKey, str] = {}
        self._sequence = -1
        self._beta = False
        self.stopped: list[dict[str, Any]] | None = None

    def inspect(self, event: SSEEvent) -> EventText:
        """See L{StreamShape.inspect}."""
        found = EventText()
        payload = event.json()
        if not isinstance(payload, dict):
            return found
        kind = payload.get("type")
        sequence = payload.get("sequence_number")
        if isinstance(sequence, int) and sequence > self._sequence:
            self._sequence = sequence
        response = payload.get("response")
        if kind == "response.created" and isinstance(response, dict):
            self._response = response
        elif kind == "response.output_item.added":
            item = payload.get("item")
            if isinstance(item, dict):
                self._items[item.get("id", payload.get("output_index"))] = dict(item)
        elif kind == "response.content_part.added":
            part = payload.get("part")
            if isinstance(part, dict):
                self._parts[key_of(payload)] = dict(part)
        if kind in _BETA_ONLY:
            self._beta = True
        if kind in TEXT_DELTAS:
            key = key_of(payload)
            delta = payload.get("delta")
            self._templates.setdefault(key, payload)
            if isinstance(delta, str) and delta:
                found.texts.append((key, delta))
        elif kind in _PART_DONE:
            found.finished.append(key_of(payload))
        elif kind == "response.output_item.done":
            item = payload.get("item")
            item_id = item.get("id") if isinstance(item, dict) else None
            found.finished.extend(k for k in self._templates if k[0] == item_id)
        elif kind == REALTIME_END or kind in RESPONSES_ENDS:
            found.all_finished = True
        return found

    def sent(self, payload: dict[str, Any]) -> None:
        """The event C{payload} of this response went to the client."""
        if payload.get("type") in TEXT_DELTAS:
            delta = payload.get("delta")
            if isinstance(delta, str):
                key = key_of(payload)
                self._sent[key] = self._sent.get(key, "") + delta

    def refusal(self, key: Key, passed: str, refusal_text: str) -> bytes:
        """
        See L{StreamShape.refusal}: the events are kept in L{stopped} (a
        session sends messages, not bytes), and nothing is returned.
        """
        self.stopped = self.ending(key, passed, refusal_text)
        return b""

    def ending(
        self, key: Key | None, passed: str, message: str
    ) -> list[dict[str, Any]]:
        """
        The events that end this response when its output is stopped: the
        text of part C{key} judged fine but not yet sent (C{passed}), an
        C{error} (code C{content_filter}, C{message}), then a Realtime
        C{response.done} with C{status: "cancelled"} or a Responses
        C{response.incomplete}, whose output holds only the text the client
        was sent.
        """
        events: list[dict[str, Any]] = []
        if passed and key is not None and key in self._templates:
            delta = {**self._templates[key], "delta": passed}
            if "logprobs" in delta:
                delta["logprobs"] = []  # the first delta's were of its own text
            events.append(self._stamped(delta))
            self.sent(delta)
        events.append(error_event(message, self._responses, self._next_sequence()))
        response = {**self._response, "output": self._output()}
        if self._responses:
            response["status"] = "incomplete"
            response["incomplete_details"] = {"reason": "content_filter"}
            events.append(
                {
                    "type": "response.incomplete",
                    "sequence_number": self._next_sequence(),
                    "response": response,
                }
            )
        else:
            response["status"] = "cancelled"
            response["status_details"] = {
                "type": "cancelled",
                "reason": "content_filter",
            }
            # The upstream's usage comes in its own response.done, which
            # the client never gets: counting happens before this filter.
            response["usage"] = None
            events.append(
                {"type": REALTIME_END, "event_id": event_id(), "response": response}
            )
        return events

    def _field_of(self, key: PartKey) -> str:
        template = self._templates.get(key, {})
        return "transcript" if "transcript" in str(template.get("type")) else "text"

    def _stamped(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self._responses:
            return {**payload, "sequence_number": self._next_sequence()}
        return {**payload, "event_id": event_id()}

    def _next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def _output(self) -> list[dict[str, Any]]:
        # The items as they were announced, each part holding what the
        # client was sent of it and nothing more (no audio, no later text).
        output = []
        for item_id, announced in list(self._items.items()):
            item = copy.deepcopy(announced)
            item["status"] = "incomplete"
            parts = sorted(
                (
                    (k[1], part)
                    for k, part in list(self._parts.items())
                    if k[0] == item_id and isinstance(k[1], int)
                ),
                key=lambda found: found[0],
            )
            if parts or "content" in item:
                content = []
                for index, announced_part in parts:
                    part = copy.deepcopy(announced_part)
                    part.pop("audio", None)
                    if not self._responses and not self._beta:
                        # GA names a part "text"/"audio" in part events,
                        # "output_text"/"output_audio" within an item.
                        if part.get("type") in ("text", "audio"):
                            part["type"] = "output_" + part["type"]
                    text = self._sent.get((item_id, index))
                    for name in _TEXT_FIELDS:
                        if name in part:
                            part[name] = text or ""
                    if text and not any(name in part for name in _TEXT_FIELDS):
                        part[self._field_of((item_id, index))] = text
                    content.append(part)
                item["content"] = content
            output.append(item)
        return output
