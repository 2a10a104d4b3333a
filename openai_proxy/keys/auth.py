"""
Access keys: who may use the proxy, and which key goes upstream.

C{Authorization: Bearer TOKEN}.  A TOKEN with a colon is
C{UPSTREAMKEY:PROXYKEY} (split at the first colon); one without is the proxy
key when server-held upstream keys exist, else the upstream key.
"""

from __future__ import annotations

import datetime
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from openai_proxy.http import errors
from openai_proxy.keys.named import KeyRegistry, NamedKey, key_refused
from openai_proxy.upstream.failover import KeyPool


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


def _missing_proxy_key() -> errors.ProxyError:
    # A token without its proxy half is a client that does not know the
    # format, not one guessing keys: show it the format.
    return errors.ProxyError(
        401,
        "No proxy key: this proxy needs "
        "'Authorization: Bearer <openai-key>:<proxy-key>'.",
        "missing_proxy_key",
    )


def _matches_any(candidate: str, accepted: Sequence[bytes]) -> bool:
    # Compare against every key, without stopping early, so the time taken
    # says nothing about which key (or how much of one) matched.
    given = candidate.encode("utf-8")
    found = False
    for key in accepted:
        found |= hmac.compare_digest(given, key)
    return found


@dataclass(frozen=True)
class Grant:
    """
    What a request may do: the key to send upstream, the index of that key
    among the server-held ones (L{None} for a client's own key), and the
    named proxy key it came with (L{None} for a C{PROXY_KEY} or none).

    An empty C{upstream_key} (only with upstreams chosen by model) means the
    request brought no key for C{UPSTREAM}: only an upstream of
    C{UPSTREAMS_FILE}, with keys of its own, can serve it.
    """

    upstream_key: str
    index: int | None = None
    named: NamedKey | None = None

    @property
    def client_key(self) -> bool:
        """Whether the key to send upstream is the client's own."""
        return self.index is None and self.upstream_key != ""


class KeyPolicy:
    """
    Decides, for each request, whether it may pass and with which upstream key.

    Server-held upstream keys are handed out in turn (round robin), skipping
    those the L{KeyPool} has benched.  Proxy keys are the C{PROXY_KEY} ones
    (unnamed, unlimited) and those of the L{KeyRegistry} (named).
    """

    def __init__(
        self,
        proxy_keys: Sequence[str],
        openai_keys: Sequence[str],
        *,
        registry: KeyRegistry | None = None,
        pool: KeyPool | None = None,
        by_model: bool = False,
    ) -> None:
        """
        @param by_model: whether upstreams are chosen by model
            (C{UPSTREAMS_FILE}): with proxy keys, a token without a colon is
            then the proxy key, and a request may come without an upstream
            key (see L{Grant}).
        """
        self._proxy_keys = tuple(k.encode("utf-8") for k in proxy_keys)
        self._registry = registry
        self._server_keys = bool(openai_keys)
        self._by_model = by_model and bool(self._proxy_keys or registry is not None)
        self.pool = pool if pool is not None else KeyPool(openai_keys)

    def upstream_key(self, authorization: bytes | None) -> str:
        """
        The key to send upstream for a request with this C{Authorization}
        header value.

        @raise errors.ProxyError: 401 with no token, no key for upstream or
            no proxy key where one is needed, 403 with a proxy key that is
            not accepted.
        """
        return self.authorize(authorization).upstream_key

    def authorize(self, authorization: bytes | None) -> Grant:
        """
        Like L{upstream_key}, and say which server key and named key apply.

        @raise errors.ProxyError: as L{upstream_key}, and 403 for a named
            key that is disabled or expired.
        """
        token = bearer_token(authorization)
        if token is None:
            raise errors.MISSING_KEY()
        parts = split_token(token, server_keys=self._server_keys or self._by_model)
        named = None
        if self._proxy_keys or self._registry is not None:
            if parts.proxy_key is None:
                raise _missing_proxy_key()
            presented = parts.proxy_key
            # Both lookups always run, so the time taken does not say which
            # kind of key (if any) matched.
            plain = bool(self._proxy_keys) and _matches_any(presented, self._proxy_keys)
            if self._registry is not None:
                named = self._registry.find(presented)
            if named is None and not plain:
                raise errors.WRONG_PROXY_KEY()
            if named is not None and (named.disabled or named.expires is not None):
                refused = key_refused(
                    named, datetime.datetime.now(datetime.timezone.utc)
                )
                if refused is not None:
                    raise refused
        if self._server_keys:
            index = self.pool.pick()
            return Grant(self.pool.keys[index], index, named)
        if parts.upstream_key is None:
            if self._by_model:
                return Grant("", None, named)
            raise errors.NO_UPSTREAM_KEY()
        return Grant(parts.upstream_key, None, named)
