"""Fakes for the realtime filter tests (no tests here): a recording Peer,
and the server events of Realtime (GA and beta) and Responses-over-WebSocket
turns, as the upstream sends them."""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet.defer import Deferred

from openai_proxy.realtime.filters import Message


class RecordingPeer:
    """A L{Peer} that records what a filter does to its side."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.closes: list[tuple[int, str]] = []
        self.pauses = 0
        self.resumes = 0
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def send(self, message: Message) -> None:
        self.sent.append(message)
        ready = [w for w in self._waiting if len(self.sent) >= w[0]]
        for waiter in ready:
            self._waiting.remove(waiter)
            waiter[1].callback(None)

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def pause(self) -> None:
        self.pauses += 1

    def resume(self) -> None:
        self.resumes += 1

    @property
    def paused(self) -> bool:
        return self.pauses > self.resumes

    def received(self, count: int) -> Deferred[None]:
        """Fires once C{count} messages in all have been sent to this side."""
        d: Deferred[None] = Deferred()
        if len(self.sent) >= count:
            d.callback(None)
        else:
            self._waiting.append((count, d))
        return d

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(m.data) for m in self.sent]

    @property
    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def carried(self, text: str) -> bool:
        """Whether any message sent to this side holds C{text}."""
        return any(text.encode() in m.data for m in self.sent)


def message(payload: dict[str, Any]) -> Message:
    return Message(json.dumps(payload).encode(), True)


_AUDIO = base64.b64encode(bytes(480)).decode()


class RealtimeTurn:
    """
    The server events of one Realtime response speaking (or writing) a
    text in the pieces given, as GA or beta names them.
    """

    def __init__(
        self, response_id: str, item_id: str, *, beta: bool = False, audio: bool = True
    ) -> None:
        self.id = response_id
        self.item = item_id
        self.beta = beta
        self.audio = audio
        self._event = 0

    def _ids(self) -> dict[str, Any]:
        self._event += 1
        return {"event_id": f"event_{self.id}_{self._event}"}

    def _part(self) -> dict[str, Any]:
        return {
            "response_id": self.id,
            "item_id": self.item,
            "output_index": 0,
            "content_index": 0,
        }

    @property
    def delta_type(self) -> str:
        if self.audio:
            if self.beta:
                return "response.audio_transcript.delta"
            return "response.output_audio_transcript.delta"
        return "response.text.delta" if self.beta else "response.output_text.delta"

    def start(self) -> list[Message]:
        # GA names a part "audio" or "text" in part events, "output_audio"
        # or "output_text" in an item; beta says "audio" or "text" in both.
        part_type = "audio" if self.audio else "text"
        text_field = "transcript" if self.audio else "text"
        return [
            message(
                {
                    **self._ids(),
                    "type": "response.created",
                    "response": {
                        "id": self.id,
                        "object": "realtime.response",
                        "status": "in_progress",
                        "output": [],
                    },
                }
            ),
            message(
                {
                    **self._ids(),
                    "type": "response.output_item.added",
                    "response_id": self.id,
                    "output_index": 0,
                    "item": {
                        "id": self.item,
                        "object": "realtime.item",
                        "type": "message",
                        "role": "assistant",
                        "status": "in_progress",
                        "content": [],
                    },
                }
            ),
            message(
                {
                    **self._ids(),
                    "type": "conversation.item.created"
                    if self.beta
                    else "conversation.item.added",
                    "item": {
                        "id": self.item,
                        "type": "message",
                        "role": "assistant",
                        "content": [],
                    },
                }
            ),
            message(
                {
                    **self._ids(),
                    "type": "response.content_part.added",
                    **self._part(),
                    "part": {"type": part_type, text_field: ""},
                }
            ),
        ]

    def delta(self, text: str) -> Message:
        return message(
            {**self._ids(), "type": self.delta_type, **self._part(), "delta": text}
        )

    def audio_delta(self) -> Message:
        kind = "response.audio.delta" if self.beta else "response.output_audio.delta"
        return message({**self._ids(), "type": kind, **self._part(), "delta": _AUDIO})

    def finish(self, text: str, status: str = "completed") -> list[Message]:
        """The events that end the turn, each holding the whole C{text}."""
        field = "transcript" if self.audio else "text"
        part_type = "audio" if self.audio else "text"
        part = {"type": part_type, field: text}
        content = dict(part) if self.beta else {**part, "type": "output_" + part_type}
        done_type = self.delta_type.replace(".delta", ".done")
        item = {
            "id": self.item,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [content],
        }
        # GA says an item is done in the conversation too; beta does not.
        item_done = (
            []
            if self.beta
            else [
                message({**self._ids(), "type": "conversation.item.done", "item": item})
            ]
        )
        return [
            message({**self._ids(), "type": done_type, **self._part(), field: text}),
            message(
                {
                    **self._ids(),
                    "type": "response.content_part.done",
                    **self._part(),
                    "part": part,
                }
            ),
            message(
                {
                    **self._ids(),
                    "type": "response.output_item.done",
                    "response_id": self.id,
                    "output_index": 0,
                    "item": item,
                }
            ),
            *item_done,
            message(
                {
                    **self._ids(),
                    "type": "response.done",
                    "response": {
                        "id": self.id,
                        "object": "realtime.response",
                        "status": status,
                        "output": [item],
                        "usage": {"total_tokens": 50, "output_tokens": 30},
                    },
                }
            ),
        ]


class ResponsesTurn:
    """The events of one Responses-over-WebSocket response."""

    def __init__(self, response_id: str, item_id: str) -> None:
        self.id = response_id
        self.item = item_id
        self._sequence = -1

    def _seq(self) -> dict[str, Any]:
        self._sequence += 1
        return {"sequence_number": self._sequence}

    def _part(self) -> dict[str, Any]:
        return {"item_id": self.item, "output_index": 0, "content_index": 0}

    def start(self) -> list[Message]:
        response = {**self._response(), "status": "in_progress", "output": []}
        return [
            message({"type": "response.created", **self._seq(), "response": response}),
            message(
                {
                    "type": "response.output_item.added",
                    **self._seq(),
                    "output_index": 0,
                    "item": {
                        "id": self.item,
                        "type": "message",
                        "role": "assistant",
                        "status": "in_progress",
                        "content": [],
                    },
                }
            ),
            message(
                {
                    "type": "response.content_part.added",
                    **self._seq(),
                    **self._part(),
                    "part": {"type": "output_text", "text": "", "annotations": []},
                }
            ),
        ]

    def delta(self, text: str) -> Message:
        return message(
            {
                "type": "response.output_text.delta",
                **self._seq(),
                **self._part(),
                "delta": text,
                "logprobs": [],
            }
        )

    def _response(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": 1767000000,
            "model": "gpt-5",
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
        }

    def finish(self, text: str) -> list[Message]:
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {
            "id": self.item,
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [part],
        }
        return [
            message(
                {
                    "type": "response.output_text.done",
                    **self._seq(),
                    **self._part(),
                    "text": text,
                    "logprobs": [],
                }
            ),
            message(
                {
                    "type": "response.content_part.done",
                    **self._seq(),
                    **self._part(),
                    "part": part,
                }
            ),
            message(
                {
                    "type": "response.output_item.done",
                    **self._seq(),
                    "output_index": 0,
                    "item": item,
                }
            ),
            message(
                {
                    "type": "response.completed",
                    **self._seq(),
                    "response": {
                        **self._response(),
                        "status": "completed",
                        "output": [item],
                    },
                }
            ),
        ]
