"""
Request bodies: what goes upstream, and the JSON object the proxy must read
(to remove its own fields, or to moderate).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer

from openai_proxy.exchange import Exchange
from openai_proxy.moderation import Moderation
from openai_proxy.relay import BytesProducer

#: Request fields the Node project used for moderation; the upstream rejects
#: unknown fields, so they never go there.
LOCAL_FIELDS = ("moderation", "moderation_level")
_SPOOLED_BODY = 100_000  # twisted.web keeps smaller bodies in a BytesIO
_LOGGED_BODY = 4096  # with LOG_BODIES, this much of each request body is logged


def request_body(
    exchange: Exchange, moderation: Moderation, *, log_bodies: bool
) -> tuple[IBodyProducer | None, dict[str, Any] | None]:
    """
    The body to send upstream for C{exchange}'s request, and the request's
    JSON object when it had to be read (to remove the local fields, or for
    moderation).  Records the body's size (and, with C{log_bodies}, its
    start) on the exchange.
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
        if size < _SPOOLED_BODY:
            return BytesProducer(content.read()), None
        return FileBodyProducer(content), None
    raw = content.read()
    if b'"moderation' not in raw and not moderation.reads(request.path):
        return BytesProducer(raw), None
    try:
        fields = json.loads(raw)
    except ValueError:
        # Not ours to judge: the upstream answers malformed JSON itself.
        return BytesProducer(raw), None
    if not isinstance(fields, dict):
        return BytesProducer(raw), None
    if any(name in fields for name in LOCAL_FIELDS):
        stripped = {k: v for k, v in fields.items() if k not in LOCAL_FIELDS}
        raw = json.dumps(stripped, ensure_ascii=False, separators=(",", ":")).encode()
    return BytesProducer(raw), fields
