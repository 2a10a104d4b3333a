"""
Reading and writing the JSON events of a WebSocket session, for the filters
that must look into them.
"""

from __future__ import annotations

import json
from typing import Any

from openai_proxy.realtime.filters import Message

#: A message this large (bytes) is parsed in a thread, as a JSON body is.
PARSE_ON_REACTOR = 65_536


class AmbiguousEvent(ValueError):
    """An event names one field twice: parsers may disagree on its value."""


def parse(data: bytes, *, unique: bool = False) -> dict[str, Any] | None:
    """
    The event in C{data}: its JSON object, or L{None} when it is not one
    (not JSON, or nested too deep to read).

    @param unique: refuse a field named twice in one object
        (L{AmbiguousEvent}), for text that is judged: the upstream may read
        the other value.
    """
    try:
        # A text message is UTF-8: decoding it here spares json the
        # guessing of an encoding (a third of its time on small events).
        text = data.decode("utf-8")
        payload = json.loads(text, object_pairs_hook=_unique if unique else None)
    except AmbiguousEvent:
        raise
    except (ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise AmbiguousEvent("a field is named twice")
    return found


def may_be(data: bytes, kinds: tuple[str, ...]) -> bool:
    """
    Whether a message may be an event of one of these types, without
    parsing it (audio chunks are most messages): the type's name must be
    in it, unless JSON escapes could spell it otherwise.
    """
    return b"\\" in data or any(kind.encode() in data for kind in kinds)


def to_message(payload: dict[str, Any]) -> Message:
    """An event the proxy makes, as a text message (compact UTF-8 JSON)."""
    return Message(
        json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(), True
    )
