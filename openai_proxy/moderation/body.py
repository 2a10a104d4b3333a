"""Moderating a reply that is not streamed: one JSON body."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed

#: C{check(text)} fires with whether C{text} must be stopped; never errbacks.
Check = Callable[[str], "Deferred[bool]"]

# A text of the reply and what replaces it with the refusal when stopped.
_Slot = tuple[str, Callable[[str], None]]


def moderate_body(
    kind: str, body: bytes, check: Check, refusal_text: str
) -> Deferred[tuple[bytes, bool]]:
    """
    Judge the text of every choice of a C{kind} reply (C{chat},
    C{completions}, C{responses}), all at once.

    Fires with C{(body, False)} (the very same bytes) when nothing is
    stopped, or when the body is not a JSON object of the expected shape;
    otherwise with the re-serialised body in which each stopped choice's text
    is C{refusal_text} and its C{finish_reason} C{content_filter} (Responses:
    the stopped C{output_text} parts, and the response C{status: incomplete}
    with C{incomplete_details.reason: content_filter}), and C{True}.
    """
    try:
        reply = json.loads(body)
    except ValueError:
        return succeed((body, False))
    if not isinstance(reply, dict):
        return succeed((body, False))
    slots = _responses(reply) if kind == "responses" else _choices(kind, reply)
    if not slots:
        return succeed((body, False))
    d: Deferred[list[bool]] = gatherResults([check(text) for text, _ in slots])

    def rewrite(stopped: list[bool]) -> tuple[bytes, bool]:
        if not any(stopped):
            return body, False
        for (_, refuse), stop in zip(slots, stopped, strict=True):
            if stop:
                refuse(refusal_text)
        if kind == "responses":
            reply["status"] = "incomplete"
            reply["incomplete_details"] = {"reason": "content_filter"}
            if isinstance(reply.get("output_text"), str):
                reply["output_text"] = "".join(_output_texts(reply))
        return json.dumps(reply, ensure_ascii=False).encode("utf-8"), True

    return d.addCallback(rewrite)


def _choices(kind: str, reply: dict[str, Any]) -> list[_Slot]:
    slots: list[_Slot] = []
    choices = reply.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        holder = choice.get("message") if kind == "chat" else choice
        field = "content" if kind == "chat" else "text"
        if not isinstance(holder, dict):
            continue
        text = _text(holder.get(field))
        if text:
            slots.append((text, _refuser(choice, holder, field)))
    return slots


def _text(value: object) -> str | None:
    # Chat content is a string, or (some servers) a list of text parts.
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = [
            p["text"]
            for p in value
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
        return "".join(parts) or None
    return None


def _refuser(
    choice: dict[str, Any], holder: dict[str, Any], field: str
) -> Callable[[str], None]:
    def refuse(refusal_text: str) -> None:
        holder[field] = refusal_text
        choice["finish_reason"] = "content_filter"

    return refuse


def _output_parts(reply: dict[str, Any]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    output = reply.get("output")
    for item in output if isinstance(output, list) else []:
        content = item.get("content") if isinstance(item, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "output_text":
                parts.append(part)
    return parts


def _output_texts(reply: dict[str, Any]) -> list[str]:
    return [p["text"] for p in _output_parts(reply) if isinstance(p.get("text"), str)]


def _responses(reply: dict[str, Any]) -> list[_Slot]:
    slots: list[_Slot] = []
    for part in _output_parts(reply):
        text = part.get("text")
        if isinstance(text, str) and text:

            def refuse(refusal_text: str, part: dict[str, Any] = part) -> None:
                part["text"] = refusal_text
                part["annotations"] = []
                part.pop("logprobs", None)

            slots.append((text, refuse))
    return slots
