"""Cross-origin headers, so browser apps can call the proxy directly."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.web.server import Request

_ALLOW_METHODS = b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
_DEFAULT_ALLOW_HEADERS = (
    b"Authorization, Content-Type, OpenAI-Organization, OpenAI-Project, OpenAI-Beta"
)
_MAX_AGE = b"86400"


class CORS:
    """
    The proxy's CORS policy: C{"*"} allows any origin; otherwise only the
    listed origins are echoed back.
    """

    def __init__(self, origins: Sequence[str]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(o.encode("ascii", "replace") for o in origins)

    def apply(self, request: Request) -> None:
        """Add C{Access-Control-Allow-Origin} (and friends) to a response."""
        headers = request.responseHeaders
        if self._any:
            headers.setRawHeaders(b"access-control-allow-origin", [b"*"])
        else:
            origin = request.requestHeaders.getRawHeaders(b"origin", [None])[0]
            headers.addRawHeader(b"vary", b"Origin")
            if origin not in self._origins:
                return
            headers.setRawHeaders(b"access-control-allow-origin", [origin])
        # Let browser code read the rate-limit and request-id headers.
        headers.setRawHeaders(b"access-control-expose-headers", [b"*"])

    def preflight(self, request: Request) -> bytes:
        """Answer an C{OPTIONS} preflight locally with 204."""
        request.setResponseCode(204)
        headers = request.responseHeaders
        headers.setRawHeaders(b"access-control-allow-methods", [_ALLOW_METHODS])
        asked = request.requestHeaders.getRawHeaders(b"access-control-request-headers")
        headers.setRawHeaders(
            b"access-control-allow-headers",
            [asked[0] if asked else _DEFAULT_ALLOW_HEADERS],
        )
        headers.setRawHeaders(b"access-control-max-age", [_MAX_AGE])
        headers.setRawHeaders(b"content-length", [b"0"])
        return b""
