"""
Making the upstream's C{Connection} header visible to the relay.

Twisted's HTTP client parser files C{Connection} (with the other framing
headers) under the parser's C{connHeaders} and leaves it out of
C{response.headers}, which is all a response's user can see.  The headers it
names are hop-by-hop (RFC 9110 7.6.1) and must not reach the client, but
without it the relay cannot know which they are.  L{install} wraps
C{HTTPClientParser.allHeadersReceived} so that, once a response's headers
are in, its C{Connection} values are copied into C{response.headers}, where
L{openai_proxy.http.headers} drops them and every header they name.
"""

from __future__ import annotations

from typing import Any

from twisted.web._newclient import HTTPClientParser

_MARK = "_openai_proxy_exposes_connection"


def install() -> None:
    """Expose C{Connection} on every response Twisted parses (idempotent)."""
    if getattr(HTTPClientParser, _MARK, False):
        return
    original = HTTPClientParser.allHeadersReceived

    def allHeadersReceived(self: Any) -> None:
        response = getattr(self, "response", None)
        values = self.connHeaders.getRawHeaders(b"connection")
        if response is not None and values:
            response.headers.setRawHeaders(b"connection", list(values))
        original(self)

    HTTPClientParser.allHeadersReceived = allHeadersReceived  # type: ignore[method-assign]
    setattr(HTTPClientParser, _MARK, True)
