"""
Token usage: counting the tokens of a reply as it passes (the C{usage} of a
JSON reply; a stream's usage chunk, removed again when the proxy asked for
it), and estimating them when the upstream reports none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypeGuard

from openai_proxy.http.sse import SSEEvent, SSEParser
from openai_proxy.keys.jsonscan import MemberScanner
from openai_proxy.keys.limits import Usage

_PARSE_WHOLE = 65_536  # JSON replies up to this size are parsed whole
#: The estimate of a token, in bytes of a request body or characters of
#: output, for a reply whose usage the upstream did not report.
BYTES_PER_TOKEN = 4
_DELTA_DEPTH = 4  # how deep output text is looked for in a chat delta
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')


def usage_of(obj: Any) -> Usage | None:
    """
    The usage a stream event reports: its own top-level C{usage} (chat,
    completions) or its C{response}'s (Responses API events such as
    C{response.completed}); never a C{usage} nested anywhere else.
    """
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if usage is None and isinstance(obj.get("response"), dict):
        usage = obj["response"].get("usage")
    return _counts(usage)


def _counts(usage: Any) -> Usage | None:
    # Chat, completions and embeddings name them prompt/completion tokens;
    # the Responses API input/output tokens.
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if _is_count(prompt) and _is_count(completion):
        return Usage(prompt, completion)
    return None


def _is_count(value: object) -> TypeGuard[int]:
    return type(value) is int and value >= 0


def estimate(request_bytes: int, output_chars: int) -> Usage:
    """
    The tokens charged for a reply whose usage was not reported: the
    request body's size and the output's length, at L{BYTES_PER_TOKEN}
    bytes (or characters) per token, rounded up.
    """
    return Usage(
        -(-request_bytes // BYTES_PER_TOKEN), -(-output_chars // BYTES_PER_TOKEN)
    )


class Meter:
    """
    Passes a reply body on to C{sink} and finds its usage on the way.

    A JSON reply goes through unchanged; its usage is its top-level
    C{usage} member.  A stream goes through event by event (never held
    back longer than one event); its usage is the last one an event
    reports, and with C{strip} the usage chunk the proxy asked for is
    dropped and the C{"usage":null} it made the upstream add to every
    other chunk is removed.

    When the reply ends without usage it can be sure of (a stream cut
    short by either side or sent without usage, a JSON reply that ends
    before its end), L{usage} is an L{estimate}: the request body's size
    (C{request_bytes}) and the text of the stream's deltas, or the bytes
    of a cut JSON reply.
    """

    def __init__(
        self,
        sink: Callable[[bytes], None],
        *,
        sse: bool,
        strip: bool,
        request_bytes: int = 0,
    ):
        self._sink = sink
        self._sse = sse
        self._strip = strip and sse
        self._parser = SSEParser() if sse else None
        self._request_bytes = request_bytes
        self._chunks: list[bytes] = []
        self._size = 0
        self._scanner: MemberScanner | None = None
        self._output_chars = 0
        self._ended = False
        self.usage: Usage | None = None
        #: Whether L{usage} is an estimate rather than the upstream's count.
        self.estimated = False

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
        """
        The body ended (whole or not): pass on what is pending, settle the
        usage.  Later calls do nothing.
        """
        if self._ended:
            return
        self._ended = True
        if self._parser is not None:
            for event in self._parser.finish():
                self._event(event)
            if self.usage is None:
                self._estimate(self._output_chars)
            return
        if self._scanner is None:
            body = b"".join(self._chunks)
            self._chunks = []
            try:
                reply = json.loads(body)
            except (ValueError, RecursionError):
                # Cut short (or not JSON): a usage member read whole still counts.
                self._scanner = MemberScanner("usage")
                self._scanner.feed(body)
            else:
                if isinstance(reply, dict):
                    self.usage = _counts(reply.get("usage"))
                return
        usage = _counts(self._scanner.value())
        if usage is not None:
            self.usage = usage
        elif self._scanner.overflowed or not (
            self._scanner.complete or self._scanner.not_object
        ):
            self._estimate(self._size)

    def _estimate(self, output_chars: int) -> None:
        usage = estimate(self._request_bytes, output_chars)
        if usage.prompt or usage.completion:
            self.usage = usage
            self.estimated = True

    def _keep(self, data: bytes) -> None:
        self._size += len(data)
        if self._scanner is not None:
            self._scanner.feed(data)
            return
        self._chunks.append(data)
        if self._size > _PARSE_WHOLE:
            # Too big to parse on the reactor: read as it passes instead,
            # keeping only the usage member.
            self._scanner = MemberScanner("usage")
            for chunk in self._chunks:
                self._scanner.feed(chunk)
            self._chunks = []

    def _event(self, event: SSEEvent) -> None:
        raw = event.raw
        obj = event.json() if event.data and event.data != "[DONE]" else None
        if obj is not None:
            usage = usage_of(obj)
            if usage is not None:
                self.usage = usage
                if self._strip and _is_usage_chunk(obj):
                    return
            else:
                self._output_chars += _output_chars(obj)
            if self._strip and b'"usage"' in raw:
                raw = _USAGE_NULL.sub(b"", raw)
        if self._strip:
            self._sink(raw)


def _is_usage_chunk(obj: Any) -> bool:
    # The extra chunk include_usage adds: usage set, no choices.
    return isinstance(obj, dict) and obj.get("choices") == []


def _output_chars(obj: Any) -> int:
    # The model's output in one event: Responses API (and transcription)
    # events carry it in a string "delta" (audio deltas, base64, are not
    # text); chat chunks in each choice's "delta", completions in "text".
    if not isinstance(obj, dict):
        return 0
    kind = obj.get("type")
    if isinstance(kind, str):
        delta = obj.get("delta")
        if isinstance(delta, str) and kind.endswith(".delta"):
            return 0 if kind.endswith("audio.delta") else len(delta)
        return 0
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return 0
    chars = 0
    for choice in choices:
        if isinstance(choice, dict):
            chars += _text_in(choice.get("delta")) + _text_in(choice.get("text"))
    return chars


def _text_in(value: Any, depth: int = 0) -> int:
    # Every string in a chat delta but its role: content, refusal, tool
    # call names and arguments (the deepest, at delta.tool_calls[].function
    # .arguments; nothing deeper is looked at).
    if isinstance(value, str):
        return len(value)
    if depth == _DELTA_DEPTH:
        return 0
    if isinstance(value, dict):
        return sum(_text_in(v, depth + 1) for k, v in value.items() if k != "role")
    if isinstance(value, list):
        return sum(_text_in(v, depth + 1) for v in value)
    return 0
