"""
Request bodies: what goes upstream, and the JSON object the proxy must read
(to remove its own fields, or to moderate).

Memory stays bounded: twisted.web keeps bodies under 100,000 bytes in
memory and spools larger ones to a temporary file, from which they are
streamed upstream.  Only a JSON body that must be parsed is read whole, and
only up to C{max_parsed} bytes (above that, a path that is moderated
refuses it with 413); parsing one larger than L{_PARSE_ON_REACTOR} happens
in a thread so other clients are not held up.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import IO, Any, TypeVar

from twisted.internet.threads import deferToThread
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer

from openai_proxy.errors import ProxyError
from openai_proxy.exchange import Exchange
from openai_proxy.moderation import Moderation
from openai_proxy.relay import BytesProducer

#: Request fields the Node project used for moderation; the upstream rejects
#: unknown fields, so they never go there.
LOCAL_FIELDS = ("moderation", "moderation_level")
_MARKER = b'"moderation'
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


async def request_body(
    exchange: Exchange,
    moderation: Moderation,
    *,
    log_bodies: bool,
    max_parsed: int = 10_485_760,
) -> tuple[IBodyProducer | None, dict[str, Any] | None]:
    """
    The body to send upstream for C{exchange}'s request, and the request's
    JSON object when it had to be read (to remove the local fields, or for
    moderation).  Records the body's size (and, with C{log_bodies}, its
    start) on the exchange.

    @raise ProxyError: 413 when a JSON body that must be parsed for
        moderation is over C{max_parsed} bytes.
    """
    request = exchange.request
    content = request.content
    if content is None:
        return None, None
    size = exchange.bytes_in = content.seek(0, 2)
    content.seek(0)
    if log_bodies and size:
        exchange.logged_body = content.read(_LOGGED_BODY).decode("utf-8", "replace")
        content.seek(0)
    if size == 0:
        has_body = request.getHeader(b"content-length") is not None or (
            request.getHeader(b"transfer-encoding") is not None
        )
        return (BytesProducer(b"") if has_body else None), None
    ctype = (request.getHeader(b"content-type") or b"").lower()
    if not ctype.startswith(b"application/json"):
        return _as_is(content, size), None
    path = request.path
    if not moderation.reads(path):
        if size < _SPOOLED_BODY:
            raw = content.read()
            if _MARKER not in raw:
                return BytesProducer(raw), None
        elif not await _in_thread(exchange, _holds_marker, content):
            content.seek(0)
            return FileBodyProducer(content), None
        content.seek(0)
    if size > max_parsed:
        if moderation.moderates(path):
            raise moderated_body_too_large(max_parsed)
        # Not moderated here: too large to rewrite, so sent as it came.
        return _as_is(content, size), None
    if size <= _PARSE_ON_REACTOR:
        return _parsed(content.read())
    raw_body, fields = await _in_thread(exchange, lambda: _parsed_raw(content.read()))
    return BytesProducer(raw_body), fields


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


def _holds_marker(content: IO[bytes]) -> bool:
    # Searched a piece at a time (overlapping by the marker's length), so a
    # spooled body is never held whole.
    tail = b""
    while True:
        piece = content.read(_SCAN_PIECE)
        if not piece:
            return False
        if _MARKER in tail + piece:
            return True
        tail = piece[-len(_MARKER) :]


def _parsed(raw: bytes) -> tuple[IBodyProducer, dict[str, Any] | None]:
    body, fields = _parsed_raw(raw)
    return BytesProducer(body), fields


def _parsed_raw(raw: bytes) -> tuple[bytes, dict[str, Any] | None]:
    try:
        fields = json.loads(raw)
    except ValueError:
        # Not ours to judge: the upstream answers malformed JSON itself.
        return raw, None
    if not isinstance(fields, dict):
        return raw, None
    if any(name in fields for name in LOCAL_FIELDS):
        stripped = {k: v for k, v in fields.items() if k not in LOCAL_FIELDS}
        raw = json.dumps(stripped, ensure_ascii=False, separators=(",", ":")).encode()
    return raw, fields
