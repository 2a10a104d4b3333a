"""
Request bodies: what goes upstream, and the JSON object the proxy must read
(to remove its own fields, or to moderate).

Memory stays bounded: twisted.web keeps bodies under 100,000 bytes in
memory and spools larger ones to a temporary file, from which they are
streamed upstream.  Only a JSON body that must be parsed is read whole, and
only up to C{max_parsed} bytes (above that, a path that is moderated
refuses it with 413) unless a named key's model check needs it; it is
parsed once for every reader (moderation, the local fields, the model
check, usage), in a thread when larger than L{_PARSE_ON_REACTOR} so other
clients are not held up, and a body sent as it came is sent from where
twisted.web holds it, not from a second copy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, NamedTuple, TypeVar

from twisted.internet.threads import deferToThread
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer

from openai_proxy.exchange import Exchange
from openai_proxy.http.errors import ProxyError
from openai_proxy.keys.allowlist import (
    JSONBody,
    JSONUnreadable,
    check_encoding,
    check_form,
    check_json,
    form_models,
    json_too_deep,
    named_models,
    parse_json,
    unreadable_body,
)
from openai_proxy.keys.named import NamedKey
from openai_proxy.moderation import Moderation
from openai_proxy.upstream.relay import BytesProducer

#: Request fields the Node project used for moderation; the upstream rejects
#: unknown fields, so they never go there.
LOCAL_FIELDS = ("moderation", "moderation_level")
_MARKER = b'"moderation'
_STREAM = b'"stream"'
#: Completions whose stream may be asked to report usage.
STREAMED_PATHS = (b"/chat/completions", b"/completions")
_SPOOLED_BODY = 100_000  # twisted.web keeps smaller bodies in a BytesIO
_LOGGED_BODY = 4096  # with LOG_BODIES, this much of each request body is logged
_PARSE_ON_REACTOR = 65_536  # larger JSON bodies are parsed in a thread
_SCAN_PIECE = 1_048_576  # a spooled body is searched this much at a time
_T = TypeVar("_T")


def moderated_body_too_large(limit: int) -> ProxyError:
    """The 413 for a JSON body on a moderated path over C{limit} bytes."""
    return ProxyError(
        413,
        f"JSON bodies sent for moderation are limited to {limit} bytes on this "
        "proxy (MAX_MODERATED_BODY).",
        "request_too_large",
    )


class RequestBody(NamedTuple):
    """What L{request_body} found."""

    #: What goes upstream (L{None}: no body).
    producer: IBodyProducer | None
    #: The request's JSON object, when moderation needs it.
    fields: dict[str, Any] | None
    #: Whether C{stream_options.include_usage} was added for the proxy's
    #: own count (the client did not ask for usage, so must not see it).
    injected: bool
    #: The models the body names, when asked for (C{want_model}).
    models: tuple[str, ...] = ()


async def request_body(
    exchange: Exchange,
    moderation: Moderation,
    *,
    log_bodies: bool,
    max_parsed: int = 10_485_760,
    key: NamedKey | None = None,
    inject_usage: bool = False,
    want_model: bool = False,
) -> RequestBody:
    """
    The body to send upstream for C{exchange}'s request, and the request's
    JSON object when it had to be read (to remove the local fields, or for
    moderation).  Records the body's size (and, with C{log_bodies}, its
    start) on the exchange.

    On a named C{key}, the body is checked as L{openai_proxy.keys.allowlist} says
    (when the key has C{models}), and with C{inject_usage} a streamed
    completion is made to report its usage.  With C{want_model}, the models
    the body names are read (any JSON body, whatever its type says, or a
    form's C{model} field) to choose the upstream.  The JSON is parsed once
    for all of this, in a thread when over 64 KiB.

    @raise ProxyError: 413 when a JSON body that must be parsed for
        moderation is over C{max_parsed} bytes; 400 for JSON nested too
        deeply to parse; 400 or 403 from the key's checks.
    """
    request = exchange.request
    content = request.content
    if content is None:
        return RequestBody(None, None, False)
    size = exchange.bytes_in = content.seek(0, 2)
    content.seek(0)
    if log_bodies and size:
        exchange.logged_body = content.read(_LOGGED_BODY).decode("utf-8", "replace")
        content.seek(0)
    if size == 0:
        if key is not None and key.models and request.method == b"POST":
            # No body leaves the model to the upstream's default.
            check_json(key, request.path, JSONBody({}))
        has_body = request.getHeader(b"content-length") is not None or (
            request.getHeader(b"transfer-encoding") is not None
        )
        return RequestBody(BytesProducer(b"") if has_body else None, None, False)
    path = request.path
    post = request.method == b"POST"
    raw_ctype = request.getHeader(b"content-type") or b""
    ctype = raw_ctype.lower()
    is_json = ctype.startswith(b"application/json")
    checked = key if key is not None and key.models and post else None
    multipart = ctype.lstrip().startswith(b"multipart/")
    # A compressed body cannot name a model the proxy can read.
    want_model = want_model and not _encoded(request.getHeader(b"content-encoding"))
    if checked is not None:
        check_encoding(request.getHeader(b"content-encoding"))
        if multipart:
            models = await _maybe_in_thread(
                exchange, size, check_form, checked, path, content, raw_ctype
            )
            content.seek(0)
            return RequestBody(_as_is(content, size), None, False, models)
        # Any other type is read as JSON: the upstream may read it so.
    elif want_model and multipart:
        models = await _maybe_in_thread(exchange, size, form_models, content, raw_ctype)
        content.seek(0)
        return RequestBody(_as_is(content, size), None, False, models)
    elif not is_json and (not want_model or size > max_parsed):
        # Read for its model whatever its type says, but not past the size
        # the proxy parses for itself.
        return RequestBody(_as_is(content, size), None, False)
    # A body checked only because a restricted key sent it under another
    # type is checked, and otherwise left as it came.
    read = _Read(
        checked=checked,
        path=path,
        wants_fields=is_json and moderation.reads(path),
        may_inject=(
            inject_usage
            and key is not None
            and post
            and is_json
            and path.endswith(STREAMED_PATHS)
        ),
        strip=is_json and size <= max_parsed,
        want_model=want_model,
    )
    if checked is not None and size > max_parsed and read.wants_fields:
        if moderation.moderates(path):
            raise moderated_body_too_large(max_parsed)
        read.wants_fields = False
    if checked is None and not want_model:
        markers = (_MARKER, _STREAM) if read.may_inject else (_MARKER,)
        found = await _found(exchange, content, size, markers)
        content.seek(0)
        read.wants_fields = read.wants_fields or _MARKER in found
        read.may_inject = _STREAM in found
        if size > max_parsed and read.wants_fields:
            if moderation.moderates(path):
                raise moderated_body_too_large(max_parsed)
            # Not moderated here: too large to rewrite, so sent as it came.
            read.wants_fields = False
        if not read.wants_fields and not read.may_inject:
            return RequestBody(_as_is(content, size), None, False)
    if want_model and size > max_parsed and read.wants_fields:
        if moderation.moderates(path):
            raise moderated_body_too_large(max_parsed)
        read.wants_fields = False
    rewritten, fields, injected, models = await _maybe_in_thread(
        exchange, size, read.parse, content
    )
    if rewritten is not None:
        return RequestBody(BytesProducer(rewritten), fields, injected, models)
    content.seek(0)
    return RequestBody(_as_is(content, size), fields, injected, models)


def _encoded(encoding: bytes | None) -> bool:
    return encoding is not None and encoding.strip().lower() not in (b"", b"identity")


async def _maybe_in_thread(
    exchange: Exchange, size: int, f: Callable[..., _T], *args: Any
) -> _T:
    if size <= _PARSE_ON_REACTOR:
        return f(*args)
    return await _in_thread(exchange, f, *args)


async def _found(
    exchange: Exchange, content: IO[bytes], size: int, markers: tuple[bytes, ...]
) -> set[bytes]:
    # Which of the markers the body holds: a small body is searched at once,
    # a spooled one in a thread, a piece at a time.
    if size < _SPOOLED_BODY:
        raw = content.read()
        return {marker for marker in markers if marker in raw}
    return await _in_thread(exchange, _holds, content, markers)


@dataclass
class _Read:
    """What reading one JSON body must do (see L{parse})."""

    #: The key whose models are checked, if any.
    checked: NamedKey | None
    path: bytes
    #: Whether moderation needs the parsed object.
    wants_fields: bool
    #: Whether C{stream_options.include_usage} may be added.
    may_inject: bool
    #: Whether the local fields may be removed (the body is not too large).
    strip: bool
    #: Whether the models the body names are wanted (to choose the upstream).
    want_model: bool = False

    def parse(
        self, content: IO[bytes]
    ) -> tuple[bytes | None, dict[str, Any] | None, bool, tuple[str, ...]]:
        """
        Read C{content} whole and parse it (blocking): the body rewritten
        (L{None}: sent as it came), the object when moderation needs it,
        whether usage was asked for, and the models it names (when wanted).
        """
        content.seek(0)
        models: tuple[str, ...] = ()
        try:
            # Read here, not held here: parse_json lets a large body go
            # while it parses.
            if self.checked is None and self.want_model:
                body, models = _for_model(content.read())
            else:
                body = parse_json(content.read(), strict=self.checked is not None)
        except JSONUnreadable as e:
            if e.too_deep:
                raise json_too_deep() from None
            if self.checked is not None:
                raise unreadable_body(e.why) from None
            # Not ours to judge: the upstream answers malformed JSON itself.
            return None, None, False, ()
        if self.checked is not None:
            check_json(self.checked, self.path, body)
            if self.want_model:
                models = named_models(body)
        fields = body.value
        if not isinstance(fields, dict):
            return None, None, False, models
        local = self.strip and any(name in fields for name in LOCAL_FIELDS)
        inject = self.may_inject and _wants_usage(fields)
        wanted = fields if self.wants_fields or local else None
        if not local and not inject:
            return None, wanted, False, models
        out = {k: v for k, v in fields.items() if k not in LOCAL_FIELDS}
        if inject:
            options = fields.get("stream_options") or {}
            out["stream_options"] = {**options, "include_usage": True}
        return dumps(out), wanted, inject, models


def _for_model(raw: bytes) -> tuple[JSONBody, tuple[str, ...]]:
    """
    C{raw} parsed, and the models it names (to choose the upstream).  The
    common body names its model once and plainly, and is read with the
    plain parser; any other (a model named twice or nested, a member name
    escaped) as the allow-list reads it.

    @raise JSONUnreadable: when it cannot be parsed at all.
    """
    if raw.count(b'"model"') == 1 and b"\\u" not in raw:
        body = parse_json(raw, strict=False)
        model = body.value.get("model") if isinstance(body.value, dict) else None
        if isinstance(model, str):
            return body, (model,)
    try:
        body = parse_json(raw, strict=True)
    except JSONUnreadable as e:
        if e.too_deep:
            raise
        # Not UTF-8, a BOM, not an object: no model the proxy reads surely,
        # but the rest is read as before (for moderation, say).
        return parse_json(raw, strict=False), ()
    return body, named_models(body)


def _wants_usage(fields: dict[str, Any]) -> bool:
    # A stream the client did not ask usage of, whose options can take it.
    if fields.get("stream") is not True:
        return False
    options = fields.get("stream_options")
    if options is None:
        return True
    return isinstance(options, dict) and options.get("include_usage") is not True


def dumps(value: Any) -> bytes:
    """
    Serialise a request's JSON value again, as compact UTF-8; a lone
    surrogate the client sent escaped (C{"\\ud83d"}, a cut emoji) is
    escaped again, as the client sent it, where UTF-8 cannot hold it.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


async def _in_thread(exchange: Exchange, f: Callable[..., _T], *args: Any) -> _T:
    try:
        result: _T = await deferToThread(f, *args)
    except (ValueError, OSError):
        if exchange.gone:
            # The client left and twisted.web closed the body under the
            # thread: nothing will be sent (the forwarder sees it gone).
            raise ClientGone() from None
        raise
    return result


class ClientGone(Exception):
    """The client left while its body was being read in a thread."""


def _as_is(content: IO[bytes], size: int) -> IBodyProducer:
    if size < _SPOOLED_BODY:
        return BytesProducer(content.read())
    return FileBodyProducer(content)


def _holds(content: IO[bytes], markers: tuple[bytes, ...]) -> set[bytes]:
    # Searched a piece at a time (overlapping by the longest marker's
    # length), so a spooled body is never held whole.
    found: set[bytes] = set()
    overlap = max(len(marker) for marker in markers)
    tail = b""
    while len(found) < len(markers):
        piece = content.read(_SCAN_PIECE)
        if not piece:
            break
        window = tail + piece
        found.update(marker for marker in markers if marker in window)
        tail = piece[-overlap:]
    return found
