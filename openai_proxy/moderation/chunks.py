"""
The three streamed reply shapes: where the text of each choice is in an
event, when a choice is finished, and the events that end a blocked stream.

A choice is named by a I{key}: the choice C{index} for chat and completions,
C{(output_index, content_index)} for the Responses API.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from openai_proxy.http.sse import SSEEvent, format_event, format_json_event

Key = Hashable

#: The chunk fields a refusal copies from the upstream's chunks.
_CHUNK_FIELDS = ("id", "object", "created", "model", "system_fingerprint")


@dataclass
class EventText:
    """
    What one event carries: C{texts} (key, text) in order, the keys whose
    text is complete after it (C{finished}), or C{all_finished}.
    """

    texts: list[tuple[Key, str]] = field(default_factory=list)
    finished: list[Key] = field(default_factory=list)
    all_finished: bool = False


class StreamShape:
    """Reads the events of one streamed reply; builds its refusal events."""

    def inspect(self, event: SSEEvent) -> EventText:
        """Return the text C{event} carries (and remember what a refusal
        will need, e.g. the chunk C{id})."""
        raise NotImplementedError

    def refusal(self, key: Key, passed: str, refusal_text: str) -> bytes:
        """
        The bytes that end the stream when choice C{key} is blocked:
        C{passed} (text judged fine but not yet sent, if any), the refusal,
        and the end of the stream.
        """
        raise NotImplementedError


class ChoicesShape(StreamShape):
    """
    Chat (C{choices[i].delta.content}) and legacy completions
    (C{choices[i].text}) chunks, ended by C{data: [DONE]}.
    """

    def __init__(self, kind: str) -> None:
        self._chat = kind == "chat"
        self._meta: dict[str, Any] = {
            "object": "chat.completion.chunk" if self._chat else "text_completion"
        }
        self._seen_meta = False

    def inspect(self, event: SSEEvent) -> EventText:
        """See L{StreamShape.inspect}."""
        found = EventText()
        if event.data is not None and event.data.strip() == "[DONE]":
            found.all_finished = True
            return found
        chunk = event.json()
        if not isinstance(chunk, dict):
            return found
        if not self._seen_meta and "id" in chunk:
            self._seen_meta = True
            self._meta.update({k: chunk[k] for k in _CHUNK_FIELDS if k in chunk})
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return found
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", position)
            if not isinstance(index, int):
                continue
            text = self._text(choice)
            if text:
                found.texts.append((index, text))
            if choice.get("finish_reason") is not None:
                found.finished.append(index)
        return found

    def _text(self, choice: dict[str, Any]) -> str | None:
        if self._chat:
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
        else:
            text = choice.get("text")
        return text if isinstance(text, str) else None

    def refusal(self, key: Key, passed: str, refusal_text: str) -> bytes:
        """See L{StreamShape.refusal}: C{[DONE]} ends it."""
        out = b""
        if passed:
            out += format_json_event(self._chunk(key, passed, None))
        out += format_json_event(self._chunk(key, refusal_text, None))
        out += format_json_event(self._chunk(key, "", "content_filter"))
        return out + format_event("[DONE]")

    def _chunk(self, key: Key, text: str, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": key}
        if self._chat:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["text"] = text
            choice["logprobs"] = None
        choice["finish_reason"] = finish
        return {**self._meta, "choices": [choice]}


class ResponsesShape(StreamShape):
    """
    Responses API events: text in C{response.output_text.delta} events,
    a blocked stream ends with C{response.incomplete} (there is no
    C{[DONE]}).
    """

    _ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})

    def __init__(self) -> None:
        self._response: dict[str, Any] = {"object": "response"}
        self._sequence = -1
        self._item_ids: dict[Key, Any] = {}

    def inspect(self, event: SSEEvent) -> EventText:
        """See L{StreamShape.inspect}."""
        found = EventText()
        payload = event.json()
        if not isinstance(payload, dict):
            if event.data is not None and event.data.strip() == "[DONE]":
                found.all_finished = True
            return found
        sequence = payload.get("sequence_number")
        if isinstance(sequence, int) and sequence > self._sequence:
            self._sequence = sequence
        response = payload.get("response")
        if isinstance(response, dict):
            self._response = response
        kind = payload.get("type", event.event)
        if kind == "response.output_text.delta":
            key = (payload.get("output_index"), payload.get("content_index"))
            self._item_ids.setdefault(key, payload.get("item_id"))
            delta = payload.get("delta")
            if isinstance(delta, str) and delta:
                found.texts.append((key, delta))
        elif kind == "response.output_text.done":
            found.finished.append(
                (payload.get("output_index"), payload.get("content_index"))
            )
        elif kind in self._ENDS:
            found.all_finished = True
        return found

    def refusal(self, key: Key, passed: str, refusal_text: str) -> bytes:
        """See L{StreamShape.refusal}: C{response.incomplete} ends it."""
        out = b""
        if passed:
            out += self._delta(key, passed)
        out += self._delta(key, refusal_text)
        self._sequence += 1
        response = {
            **self._response,
            "status": "incomplete",
            "incomplete_details": {"reason": "content_filter"},
        }
        return out + format_json_event(
            {
                "type": "response.incomplete",
                "sequence_number": self._sequence,
                "response": response,
            },
            "response.incomplete",
        )

    def _delta(self, key: Key, text: str) -> bytes:
        self._sequence += 1
        output_index, content_index = key if isinstance(key, tuple) else (0, 0)
        payload = {
            "type": "response.output_text.delta",
            "sequence_number": self._sequence,
            "item_id": self._item_ids.get(key),
            "output_index": output_index,
            "content_index": content_index,
            "delta": text,
            "logprobs": [],
        }
        return format_json_event(payload, "response.output_text.delta")


def shape_for(kind: str) -> StreamShape:
    """The L{StreamShape} for a plan kind (C{chat}, C{completions},
    C{responses})."""
    return ResponsesShape() if kind == "responses" else ChoicesShape(kind)
