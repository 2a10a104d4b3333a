"""
The upstream side: where a request goes, and the HTTP client that takes it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from http.cookiejar import CookieJar
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import treq.client
from treq.cookies import IndexableCookieJar
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

_DOT_SEGMENTS = frozenset({b".", b".."})
# RFC 3986: no whitespace, control or non-ASCII bytes, and a request target
# carries no fragment.
_NOT_IN_TARGETS = re.compile(rb"[\x00-\x20\x7f-\xff#]")


class _NoCookies(IndexableCookieJar):
    """
    A cookie jar that keeps nothing: treq's client would otherwise carry one
    caller's upstream cookies into the next caller's requests.
    """

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: Any) -> None:
        pass

    def add_cookie_header(self, request: Any) -> None:
        pass


class Upstreams:
    """
    The configured upstream base URLs, and the choice between them: a key
    starting with a route's prefix goes to that route's URL, any other key to
    the default.  No other host is ever named.
    """

    def __init__(self, default: str, routes: Sequence[tuple[str, str]] = ()) -> None:
        self._default = default.encode("ascii")
        # Longest prefix first, so "fk-x" can be routed apart from "fk".
        self._routes = sorted(
            ((p, u.encode("ascii")) for p, u in routes), key=lambda r: -len(r[0])
        )

    def base_for(self, upstream_key: str) -> bytes:
        """The base URL (no trailing slash) a request sent with this key goes to."""
        for prefix, url in self._routes:
            if upstream_key.startswith(prefix):
                return url
        return self._default

    @staticmethod
    def url(base: bytes, target: bytes) -> bytes:
        """
        The upstream URL for a request target.  C{target} must start with
        C{/}: appended to a base URL it can then only name a path on that
        base's host.  Nor may its path hold a C{.} or C{..} segment (plain or
        percent-encoded), which could climb out of the base URL's path prefix,
        nor may it hold spaces, control or non-ASCII bytes, or a fragment.

        @raise ValueError: for a target that breaks either rule.
        """
        if not target.startswith(b"/"):
            raise ValueError("request target must start with /")
        if _NOT_IN_TARGETS.search(target):
            raise ValueError("request target holds a byte no URL may hold")
        path = target.split(b"?", 1)[0]
        suspect = b"." in path or b"%2e" in path.lower()
        if suspect and _DOT_SEGMENTS & set(unquote_to_bytes(path).split(b"/")):
            raise ValueError("request target must not hold dot segments")
        return base + target

    @staticmethod
    def host_of(base: bytes) -> str:
        """The host[:port] of a base URL, for logs."""
        return urlsplit(base.decode("ascii")).netloc


class _QuietFactory(_HTTP11ClientFactory):
    # One "Starting factory" log line per upstream connection is noise.
    noisy = False


def make_pool(reactor: Any, max_persistent_per_host: int = 64) -> HTTPConnectionPool:
    """A persistent connection pool sized for a busy relay."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_persistent_per_host
    # An idle keep-alive connection may be closed by the upstream at any
    # moment; twisted retries idempotent requests on such a connection.
    pool.retryAutomatically = True
    pool._factory = _QuietFactory
    return pool


def make_client(
    reactor: IReactorTime, pool: HTTPConnectionPool
) -> treq.client.HTTPClient:
    """
    A treq client over C{pool} that stores no cookies.  Callers pass
    C{allow_redirects=False}: a redirect must reach the client, not be
    followed to a host nobody configured.
    """
    jar: CookieJar = _NoCookies()
    return treq.client.HTTPClient(Agent(reactor, pool=pool), cookiejar=jar)  # type: ignore[arg-type]
