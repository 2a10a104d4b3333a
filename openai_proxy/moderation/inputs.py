"""The text of a request that MODERATE_INPUT judges before it goes upstream."""

from __future__ import annotations

from typing import Any

#: Message roles whose text is the user's (or the operator's) words.
_ROLES = frozenset({"user", "system", "developer"})


def input_text(kind: str, body: dict[str, Any]) -> str:
    """
    The request's user/system text, parts joined by blank lines: chat
    C{messages[].content} (a string or C{text} parts), completions
    C{prompt} (a string or a list of strings), Responses C{instructions}
    and C{input} (a string, or message items with string or C{input_text}
    content).  C{""} when there is none.
    """
    texts: list[str] = []
    if kind == "chat":
        texts.extend(_messages(body.get("messages")))
    elif kind == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            texts.append(prompt)
        elif isinstance(prompt, list):
            texts.extend(p for p in prompt if isinstance(p, str))
    elif kind == "responses":
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            texts.append(instructions)
        given = body.get("input")
        if isinstance(given, str):
            texts.append(given)
        else:
            texts.extend(_messages(given))
    return "\n\n".join(t for t in texts if t)


def _messages(messages: object) -> list[str]:
    texts: list[str] = []
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        # Responses input items without a role are user messages only when
        # they are plain messages; tool outputs and the like are skipped.
        role = message.get("role", "user" if message.get("type") == "message" else None)
        if role not in _ROLES:
            continue
        texts.extend(_content(message.get("content")))
    return texts


def _content(content: object) -> list[str]:
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    for part in content if isinstance(content, list) else []:
        if (
            isinstance(part, dict)
            and part.get("type") in ("text", "input_text")
            and isinstance(part.get("text"), str)
        ):
            texts.append(part["text"])
    return texts
