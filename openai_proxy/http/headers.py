"""
Which headers cross the proxy, in each direction.

End-to-end headers pass unchanged.  Hop-by-hop headers (and any a
C{Connection} header names), C{Host}, cookies, credentials and the headers
that describe a body the proxy may re-frame do not.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.web.http_headers import Headers

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Never sent upstream: the proxy sets its own C{Host} (from the upstream
#: URL), C{Authorization} and body framing; the client's cookies and
#: forwarding hints are not the upstream's business.  C{Accept-Encoding}
#: passes: the body comes back as the upstream sent it.
REQUEST_DROPPED = _HOP_BY_HOP | {
    b"host",
    b"authorization",
    b"cookie",
    b"cookie2",
    b"content-length",
    b"expect",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"x-real-ip",
}

#: Never sent to the client: the upstream's cookies, its CORS answer (the
#: proxy gives its own), the proxy's own request id (which an upstream must
#: not forge), and headers twisted.web writes itself or that describe the
#: upstream's framing (the proxy sets C{Content-Length} from the body it
#: relays).  C{Content-Encoding} passes: an unread body is relayed as the
#: upstream encoded it.
RESPONSE_DROPPED = _HOP_BY_HOP | {
    b"x-proxy-request-id",
    b"set-cookie",
    b"set-cookie2",
    b"content-length",
    b"date",
    b"server",
    b"access-control-allow-origin",
    b"access-control-allow-credentials",
    b"access-control-allow-methods",
    b"access-control-allow-headers",
    b"access-control-expose-headers",
    b"access-control-max-age",
}


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    # RFC 9110 7.6.1: a header named in Connection is hop-by-hop too.
    values = headers.getRawHeaders(b"connection") or []
    return frozenset(
        token.strip().lower()
        for value in values
        for token in value.split(b",")
        if token.strip()
    )


def filtered(
    headers: Headers, dropped: frozenset[bytes]
) -> Iterable[tuple[bytes, list[bytes]]]:
    """
    The (lower-cased name, values) pairs of C{headers} that may cross the
    proxy, given the set of lower-case names it must C{drop}.
    """
    extra = _connection_tokens(headers)
    for name, values in headers.getAllRawHeaders():
        lowered = name.lower()
        if lowered in dropped or lowered in extra:
            continue
        yield lowered, list(values)


def copy_headers(source: Headers, dropped: frozenset[bytes], target: Headers) -> None:
    """Copy the headers of C{source} that may cross the proxy into C{target}."""
    for name, values in filtered(source, dropped):
        target.setRawHeaders(name, values)
