"""
Token usage: counting the tokens of a reply as it passes (the C{usage} of a
JSON reply; a stream's usage chunk, removed again when the proxy asked for
it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from openai_proxy.http.sse import SSEEvent, SSEParser
from openai_proxy.keys.limits import Usage

_WHOLE_BODY = 1_048_576  # JSON replies up to this size are kept whole
_TAIL = 16_384  # of larger ones, usage is looked for in this much of the end
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')
_TOKEN_FIELD = re.compile(
    rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens)"\s*:\s*(\d+)'
)


def usage_of(obj: Any) -> Usage | None:
    """The usage an API object reports (chat, completions, embeddings, responses)."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if usage is None and isinstance(obj.get("response"), dict):
        usage = obj["response"].get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt, completion)


class Meter:
    """
    Passes a reply body on to C{sink} and finds its usage on the way.

    A JSON reply goes through unchanged.  A stream goes through event by
    event (never held back longer than one event); with C{strip} the usage
    chunk the proxy asked for is dropped and the C{"usage":null} it made the
    upstream add to every other chunk is removed.
    """

    def __init__(self, sink: Callable[[bytes], None], *, sse: bool, strip: bool):
        self._sink = sink
        self._sse = sse
        self._strip = strip and sse
        self._parser = SSEParser() if sse else None
        self._chunks: list[bytes] = []
        self._size = 0
        self.usage: Usage | None = None

    def feed(self, data: bytes) -> None:
        """Take the next piece of the body."""
        if not self._strip:
            self._sink(data)
        if self._parser is None:
            self._keep(data)
            return
        for event in self._parser.feed(data):
            self._event(event)

    def end(self) -> None:
        """The body ended: pass on what is pending and settle the usage."""
        if self._parser is not None:
            for event in self._parser.finish():
                self._event(event)
            return
        # JSON escapes the quotes of every string value, so the last bare
        # "usage" is the reply's own field: its numbers need no full parse.
        body = b"".join(self._chunks)
        at = body.rfind(b'"usage"')
        self.usage = _usage_in_tail(body[at:]) if at >= 0 else None

    def _keep(self, data: bytes) -> None:
        self._size += len(data)
        self._chunks.append(data)
        if self._size > _WHOLE_BODY:
            tail = b"".join(self._chunks)[-_TAIL:]
            self._chunks = [tail]

    def _event(self, event: SSEEvent) -> None:
        raw = event.raw
        if b'"usage"' in raw:
            if self._strip:
                raw = _USAGE_NULL.sub(b"", raw)
            if b'"usage"' in raw:
                obj = event.json()
                usage = usage_of(obj)
                if usage is not None:
                    self.usage = usage
                    if self._strip and _is_usage_chunk(obj):
                        return
        if self._strip:
            self._sink(raw)


def _is_usage_chunk(obj: Any) -> bool:
    # The extra chunk include_usage adds: usage set, no choices.
    return isinstance(obj, dict) and obj.get("choices") == []


def _usage_in_tail(tail: bytes) -> Usage | None:
    # One pass; of a field named twice, the last one counts.
    found: dict[bytes, bytes] = dict(_TOKEN_FIELD.findall(tail))
    if not found:
        return None
    prompt = found.get(b"prompt_tokens", found.get(b"input_tokens", b"0"))
    completion = found.get(b"completion_tokens", found.get(b"output_tokens", b"0"))
    return Usage(int(prompt), int(completion))
