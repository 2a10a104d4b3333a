"""
Token usage: reading a request for what a named key may not do (its model)
and whether to ask the upstream for usage, and counting the tokens of a
reply as it passes (the C{usage} of a JSON reply; a stream's usage chunk,
removed again when the proxy asked for it).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from typing import IO, Any

from twisted.web.server import Request

from openai_proxy.formfield import boundary_of, form_fields
from openai_proxy.keys import NamedKey, model_not_allowed
from openai_proxy.limits import Usage
from openai_proxy.sse import SSEEvent, SSEParser

_STREAMED_PATHS = (b"/chat/completions", b"/completions")
_WHOLE_BODY = 1_048_576  # JSON replies up to this size are kept whole
_TAIL = 16_384  # of larger ones, usage is looked for in this much of the end
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')
_TOKEN_FIELD = re.compile(
    rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens)"\s*:\s*(\d+)'
)


def inspect_request(request: Request, key: NamedKey, inject: bool) -> bool:
    """
    Read the JSON request body (or a multipart form's C{model} field) when
    C{key} restricts models, or when a streamed completion may need
    C{stream_options.include_usage} added (with C{inject}); add it then,
    rewriting the request's body.  Returns whether it was added (the client
    did not ask for usage, so it must not see it).

    @raise ProxyError: 403 C{model_not_allowed} for a model C{key} may not use.
    """
    content = request.content
    if content is None or request.method != b"POST":
        return False
    may_inject = inject and request.path.endswith(_STREAMED_PATHS)
    if not key.models and not may_inject:
        return False
    raw_ctype = request.getHeader(b"content-type") or b""
    ctype = raw_ctype.lower()
    boundary = boundary_of(raw_ctype) if key.models else None
    if boundary is not None:
        _check_form_model(content, boundary, key)
        return False
    is_json = ctype.startswith(b"application/json")
    if not is_json:
        # A restricted key's JSON is checked whatever type it claims: the
        # upstream may read it as JSON all the same.
        if not key.models or not _looks_like_json(content):
            return False
    content.seek(0)
    raw = content.read()
    content.seek(0)
    if not key.models and b'"stream"' not in raw:
        return False
    try:
        if key.models and raw.count(b'"model"') > 1:
            fields, models = _with_every_model(raw)
        else:
            fields = json.loads(raw)
            models = [fields.get("model")] if isinstance(fields, dict) else []
    except ValueError:
        return False  # the upstream answers malformed JSON itself
    if not isinstance(fields, dict):
        return False
    for model in models:
        if isinstance(model, str) and not key.allows_model(model):
            raise model_not_allowed(key, model)
    if not is_json or not may_inject or fields.get("stream") is not True:
        return False
    options = fields.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    if options is not None and not isinstance(options, dict):
        return False
    fields["stream_options"] = {**(options or {}), "include_usage": True}
    body = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
    request.content = io.BytesIO(body)
    return True


def _looks_like_json(content: IO[bytes]) -> bool:
    content.seek(0)
    start = content.read(64)
    content.seek(0)
    return start.lstrip().startswith(b"{")


def _with_every_model(raw: bytes) -> tuple[Any, list[Any]]:
    # "model" twice at the top level: parsers keep the first or the last,
    # so every one must be allowed.  The outermost object is built last.
    objects: list[list[tuple[str, Any]]] = []

    def keep(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        objects.append(pairs)
        return dict(pairs)

    fields = json.loads(raw, object_pairs_hook=keep)
    top = objects[-1] if objects and isinstance(fields, dict) else []
    return fields, [value for name, value in top if name == "model"]


def _check_form_model(content: IO[bytes], boundary: bytes, key: NamedKey) -> None:
    # An upload (audio transcription, say) names its model in a form field;
    # should it name one twice, both must be allowed.
    content.seek(0)
    try:
        fields = form_fields(content, boundary, b"model")
    finally:
        content.seek(0)
    for field in fields:
        model = field.decode("utf-8", "replace").strip()
        if not key.allows_model(model):
            raise model_not_allowed(key, model)


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
