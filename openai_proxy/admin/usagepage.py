"""
C{GET /usage}: the admin's view of the named keys' usage, as JSON for
scripts (C{Authorization: Bearer <ADMIN_KEY>}) and as an HTML page for a
browser, which signs in with HTTP Basic auth (the admin key as password).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from twisted.web.server import Request

from openai_proxy.admin.usagehtml import PageData, render_page
from openai_proxy.http.errors import JSON_CONTENT_TYPE, ProxyError, write_error
from openai_proxy.keys.auth import bearer_token
from openai_proxy.keys.limits import Limiter, LimitsUnavailable
from openai_proxy.keys.named import NamedKey
from openai_proxy.upstream.failover import KeyPool

_REALM = b'Basic realm="openai-proxy", charset="UTF-8"'
#: The page's script-free policy: its styles are inline, its charts inline
#: SVG, and nothing is fetched from anywhere.
_CSP = (
    b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def admin_only() -> ProxyError:
    """The 401 for a request to C{/usage} without the admin key."""
    return ProxyError(
        401,
        "Send 'Authorization: Bearer <ADMIN_KEY>' (or sign in with the admin "
        "key as the password) to read usage.",
        "invalid_api_key",
        headers=((b"www-authenticate", _REALM),),
    )


def no_admin_key() -> ProxyError:
    """The 404 for C{/usage} on a proxy without C{ADMIN_KEY}."""
    return ProxyError(
        404,
        "Usage is not served: this proxy has no ADMIN_KEY.",
        "not_found",
    )


def usage_unavailable() -> ProxyError:
    """The 503 for usage JSON while the counts cannot be read."""
    return ProxyError(
        503,
        "The proxy cannot read the usage counts right now; try again shortly.",
        "limits_unavailable",
        "api_error",
    )


class UsagePage:
    """
    Answers C{GET /usage} for a request bearing the admin key: JSON (per-key
    counts for today and this month, what each key uses now and has left
    of its quotas, tokens per hour) unless the client prefers HTML, then a page showing the same and
    the server-key pool.

    @param where: where the counters live, in words, for the page.
    """

    def __init__(
        self,
        admin_key: str | None,
        limiter: Limiter,
        keys: Callable[[], Sequence[NamedKey]],
        pool: KeyPool | None = None,
        where: str = "this process",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._expected = (
            None if admin_key is None else _digest(admin_key.encode("utf-8"))
        )
        self._limiter = limiter
        self._keys = keys
        self._pool = pool
        self._where = where
        self._clock = clock

    async def render(self, request: Request) -> None:
        """Answer C{request} and finish it."""
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"vary", b"Accept, Authorization")
        if self._expected is None:
            write_error(request, no_admin_key())
            return
        if not self._admitted(request.getHeader(b"authorization")):
            write_error(request, admin_only())
            return
        now = self._clock()
        keys = list(self._keys())
        names = [k.name for k in keys]
        try:
            report = await self._limiter.report(now, names)
            problem = None
        except LimitsUnavailable as e:
            report, problem = None, str(e)
        if not prefers_html(request.getHeader(b"accept")):
            if report is None:
                write_error(request, usage_unavailable())
                return
            names += sorted(set(report.this_month) - set(names))
            by_name = {k.name: k for k in keys}
            body = json.dumps(report.as_json(names, now, by_name)).encode("utf-8")
            request.setHeader(b"content-type", JSON_CONTENT_TYPE)
        else:
            benches = () if self._pool is None else self._pool.bench_ends()
            body = render_page(
                PageData(report, keys, benches, self._where, now, problem)
            )
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setHeader(b"content-security-policy", _CSP)
            request.setHeader(b"x-frame-options", b"DENY")
            request.setHeader(b"x-content-type-options", b"nosniff")
            request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"content-length", b"%d" % len(body))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _admitted(self, authorization: bytes | None) -> bool:
        expected = self._expected
        assert expected is not None
        token = bearer_token(authorization)
        if token is None:
            token = basic_password(authorization)
        presented = _digest((token or "").encode("utf-8"))
        return hmac.compare_digest(presented, expected) and token is not None


def basic_password(authorization: bytes | None) -> str | None:
    """
    The password of an C{Authorization: Basic ...} header value (any user
    name), or L{None} when there is none or it is malformed.
    """
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return password if colon else None


def prefers_html(accept: bytes | None) -> bool:
    """
    Whether an C{Accept} header value ranks C{text/html} above JSON (as a
    browser's does); C{*/*} alone, or no header, means JSON.
    """
    if not accept:
        return False
    html = json_q = 0.0
    wildcard = 0.0
    for item in accept.decode("latin-1").split(","):
        kind, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        kind = kind.lower()
        if kind == "text/html":
            html = max(html, q)
        elif kind == "application/json":
            json_q = max(json_q, q)
        elif kind == "*/*":
            wildcard = max(wildcard, q)
    return html > 0 and html > (json_q or wildcard)


def describe_store(redis_url: str | None, workers: int = 1) -> str:
    """
    Where the counters live, in words, without the URL's password: this
    process's, or Redis at its host, port and database.
    """
    if redis_url is None:
        if workers > 1:
            return (
                "in this worker process only; with several workers each counts "
                "its own share, and these are this worker's figures"
            )
        return "in this process"
    parts = urlsplit(redis_url)
    if parts.scheme == "unix":
        return f"in Redis at unix socket {parts.path}"
    database = parts.path.strip("/") or "0"
    tls = " (TLS)" if parts.scheme == "rediss" else ""
    return (
        f"in Redis at {parts.hostname}:{parts.port or 6379}, database "
        f"{database}{tls}, shared by every worker and replica using it"
    )


def _digest(value: bytes) -> bytes:
    # Fixed-length digests keep even the key's length out of the timing.
    return hashlib.sha256(value).digest()
