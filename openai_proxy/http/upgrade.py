"""
Recognising a WebSocket upgrade request (RFC 6455) and the key a browser
sends in it: browsers cannot set C{Authorization} on a WebSocket, so
OpenAI's clients send the key as the subprotocol
C{openai-insecure-api-key.<key>}.
"""

from __future__ import annotations

from typing import Final

from twisted.web.http_headers import Headers

#: The subprotocol prefix that carries a key.
KEY_PROTOCOL: Final = "openai-insecure-api-key."


def wants_websocket(headers: Headers) -> bool:
    """Whether a request asks to be upgraded to a WebSocket."""
    upgrade = headers.getRawHeaders(b"upgrade")
    return upgrade is not None and any(
        token.strip().lower() == b"websocket"
        for value in upgrade
        for token in value.split(b",")
    )


def subprotocols(headers: Headers) -> list[str]:
    """The subprotocols offered in C{Sec-WebSocket-Protocol}, in order."""
    return [
        token.strip()
        for value in headers.getRawHeaders(b"sec-websocket-protocol") or []
        for token in value.decode("latin-1").split(",")
        if token.strip()
    ]


def key_in_subprotocols(offered: list[str]) -> str | None:
    """The key carried in an C{openai-insecure-api-key.} subprotocol, if any."""
    for protocol in offered:
        if protocol.startswith(KEY_PROTOCOL):
            return protocol[len(KEY_PROTOCOL) :]
    return None


def authorization_of(headers: Headers) -> bytes | None:
    """
    The C{Authorization} value a request's key check should see: its
    header, or for a WebSocket upgrade without one, the key of its
    subprotocol as a bearer token.
    """
    values = headers.getRawHeaders(b"authorization")
    if values:
        return values[0]
    if not wants_websocket(headers):
        return None
    key = key_in_subprotocols(subprotocols(headers))
    return None if key is None else b"Bearer " + key.encode("latin-1")
