"""
Access keys: who may use the proxy, and which key goes upstream.

C{Authorization: Bearer TOKEN}.  A TOKEN with a colon is
C{UPSTREAMKEY:PROXYKEY} (split at the first colon); one without is the proxy
key when server-held upstream keys exist, else the upstream key.
"""

from __future__ import annotations

import hmac
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from openai_proxy import errors


@dataclass(frozen=True)
class Token:
    """The two halves a client's bearer token may carry (either may be absent)."""

    upstream_key: str | None
    proxy_key: str | None


def bearer_token(authorization: bytes | None) -> str | None:
    """
    The token of an C{Authorization: Bearer TOKEN} header value, or L{None}
    when there is none (absent, another scheme, empty, or not ASCII).
    """
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    if not token:
        return None
    try:
        return token.decode("ascii")
    except UnicodeDecodeError:
        return None


def split_token(token: str, *, server_keys: bool) -> Token:
    """
    Split a bearer token into its upstream and proxy halves.

    @param server_keys: whether the proxy holds upstream keys itself, which
        makes a token without a colon the proxy key.
    """
    upstream, colon, proxy = token.partition(":")
    if colon:
        return Token(upstream or None, proxy or None)
    if server_keys:
        return Token(None, token)
    return Token(token, None)


def _matches_any(candidate: str, accepted: Sequence[bytes]) -> bool:
    # Compare against every key, without stopping early, so the time taken
    # says nothing about which key (or how much of one) matched.
    given = candidate.encode("utf-8")
    found = False
    for key in accepted:
        found |= hmac.compare_digest(given, key)
    return found


class KeyPolicy:
    """
    Decides, for each request, whether it may pass and with which upstream key.

    Server-held upstream keys are handed out in turn (round robin).
    """

    def __init__(self, proxy_keys: Sequence[str], openai_keys: Sequence[str]) -> None:
        self._proxy_keys = tuple(k.encode("utf-8") for k in proxy_keys)
        self._server_keys = bool(openai_keys)
        self._openai_keys: Iterator[str] = itertools.cycle(tuple(openai_keys))

    def upstream_key(self, authorization: bytes | None) -> str:
        """
        The key to send upstream for a request with this C{Authorization}
        header value.

        @raise errors.ProxyError: 401 with no token or no key for upstream,
            403 with a proxy key that is not accepted.
        """
        token = bearer_token(authorization)
        if token is None:
            raise errors.MISSING_KEY
        parts = split_token(token, server_keys=self._server_keys)
        if self._proxy_keys and not _matches_any(
            parts.proxy_key or "", self._proxy_keys
        ):
            raise errors.WRONG_PROXY_KEY
        if self._server_keys:
            return next(self._openai_keys)
        if parts.upstream_key is None:
            raise errors.NO_UPSTREAM_KEY
        return parts.upstream_key
