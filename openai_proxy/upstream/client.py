"""
The upstream side: where a request goes, and the HTTP client that takes it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import treq.client
from hyperlink import EncodedURL
from treq.cookies import IndexableCookieJar
from treq.response import _Response
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer

from openai_proxy.upstream.egress import EgressProxy, EgressSettings, endpoint_to

_DOT_SEGMENTS = frozenset({b".", b".."})
# RFC 3986: no whitespace, control or non-ASCII bytes, and a request target
# carries no fragment.
_NOT_IN_TARGETS = re.compile(rb"[\x00-\x20\x7f-\xff#]")
# The printable bytes hyperlink's to_uri() (what treq.HTTPClient.request
# applies to every URL) percent-encodes in a path or query; encoding them
# here sends the upstream the bytes it got when treq did it.
_TO_URI_ENCODES = re.compile(rb'["<>\[\\\]^`{|}]')


def _percent_encode(match: re.Match[bytes]) -> bytes:
    return b"%%%02X" % match.group()[0]


def _as_uri(base: str) -> bytes:
    """
    C{base} as treq would send it (lower-case host, default port dropped,
    IDNA): done once per upstream instead of once per request.
    """
    try:
        return EncodedURL.from_text(base).to_uri().to_text().encode("ascii")
    except Exception:  # hyperlink cannot encode every host (IPv6 literals)
        return base.encode("ascii")


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
        self._default = _as_uri(default)
        # Longest prefix first, so "fk-x" can be routed apart from "fk".
        self._routes = sorted(
            ((p, _as_uri(u)) for p, u in routes), key=lambda r: -len(r[0])
        )
        bases = [self._default, *(u for _, u in self._routes)]
        self._hosts = {base: urlsplit(base.decode("ascii")).netloc for base in bases}
        self._host_headers = {base: _host_header(base) for base in bases}

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

        The URL comes out as treq's own C{to_uri()} would have made it, so it
        can go to L{RelayClient.relay} unchanged.

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
        if _TO_URI_ENCODES.search(target):
            target = _TO_URI_ENCODES.sub(_percent_encode, target)
        if target.endswith(b"?") and target.find(b"?") == len(target) - 1:
            target = target[:-1]  # hyperlink drops an empty query
        return base + target

    def host_header(self, base: bytes) -> bytes:
        """
        The C{Host} header value for requests to a base URL from L{base_for},
        exactly as Twisted's C{Agent} would compute it per request.
        """
        value = self._host_headers.get(base)
        return _host_header(base) if value is None else value

    def host_of(self, base: bytes) -> str:
        """The host[:port] of a base URL from L{base_for}, for logs."""
        host = self._hosts.get(base)
        if host is None:
            host = urlsplit(base.decode("ascii")).netloc
        return host


def _host_header(base: bytes) -> bytes:
    # As twisted.web.client.Agent._computeHostValue, from the URL as Agent
    # parses it.
    uri = URI.fromBytes(base)
    host: bytes = uri.host
    if isIPv6Address(host.decode("ascii")):
        host = b"[" + host + b"]"
    if (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443)):
        return host
    port: int = uri.port
    return b"%b:%d" % (host, port)


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


class RelayClient(treq.client.HTTPClient):
    """
    treq's client, plus L{relay}: a request with none of the layers a relay
    has no use for.

    C{request} and its shortcuts behave as in treq (they never store a
    cookie).  L{relay} relies on treq internals (the C{_agent} and
    C{_cookiejar} attributes, C{treq.response._Response}); setup.cfg pins
    the treq versions it was tested with.
    """

    #: The endpoints its agent connects through, when made by L{make_client}
    #: (to set an upstream's own egress proxy with L{CachedEndpoints.use_proxy}).
    endpoints: CachedEndpoints | None = None

    def __init__(self, agent: IAgent, reactor: IReactorTime) -> None:
        super().__init__(agent, cookiejar=_NoCookies())
        self._reactor = reactor

    def relay(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        timeout: float | None = None,
    ) -> Deferred[IResponse]:
        """
        Send one request as it is, and fire with the response at its headers
        (the body streams, through C{deliverBody}).

        Unlike C{request}: C{url} goes out as given (make it with
        L{Upstreams.url}, which encodes what treq would have); no cookie is
        added or kept; redirects are never followed; no C{Accept-Encoding}
        is added and a compressed body stays compressed, C{Content-Encoding}
        and all; C{headers} is sent as given and may be changed by the
        agent.  C{timeout} seconds without response headers cancel the
        request, as in treq.
        """
        d: Deferred[IResponse] = self._agent.request(method.upper(), url, headers, body)
        if timeout:
            call = self._reactor.callLater(timeout, d.cancel)

            def headers_came(result: object) -> object:
                if call.active():
                    call.cancel()
                return result

            d.addBoth(headers_came)
        return d.addCallback(_Response, self._cookiejar)


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """
    The endpoints an L{Agent} connects through, one per (scheme, host, port)
    made once and reused: Twisted's own factory makes a new endpoint, and for
    https new TLS options, for every request.  The TLS options trust what
    OpenSSL trusts by default (C{SSL_CERT_FILE} / C{SSL_CERT_DIR} if set, else
    the system's CAs) and check the host name.

    Only the configured upstreams are ever asked for, so the cache stays
    small; it is emptied should it ever grow past C{limit}.

    A connection goes through the egress proxy C{egress} chooses for its
    upstream (see L{openai_proxy.upstream.egress}), or the one set for that
    upstream with L{use_proxy}; tunnelled connections are pooled by the
    upstream's (scheme, host, port) like direct ones.
    """

    def __init__(
        self,
        reactor: Any,
        policy: IPolicyForHTTPS | None = None,
        limit: int = 64,
        egress: EgressSettings | None = None,
    ) -> None:
        self._reactor = reactor
        self._policy = policy or BrowserLikePolicyForHTTPS()
        self._limit = limit
        self._egress = egress or EgressSettings()
        self._pinned: dict[tuple[bytes, bytes, int], EgressProxy | None] = {}
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def use_proxy(self, base_url: str, proxy: EgressProxy | None) -> None:
        """
        Connect to the upstream at C{base_url} through C{proxy} (L{None}:
        directly), whatever the egress settings say.  Cheap when nothing
        changes, so it may be called for every request.
        """
        uri = URI.fromBytes(base_url.encode("ascii"))
        key = (uri.scheme, uri.host, uri.port)
        if key in self._pinned and self._pinned[key] == proxy:
            return  # as it was: the cached endpoint stays
        self._pinned[key] = proxy
        self._endpoints.pop(key, None)

    def proxy_for(self, scheme: bytes, host: bytes, port: int) -> EgressProxy | None:
        """The egress proxy connections to this upstream go through, if any."""
        key = (scheme, host, port)
        if key in self._pinned:
            return self._pinned[key]
        return self._egress.proxy_for(scheme.decode(), host.decode("ascii"), port)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._make(uri)
            if len(self._endpoints) >= self._limit:
                self._endpoints.clear()
            self._endpoints[key] = endpoint
        return endpoint

    def _make(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        return endpoint_to(
            self._reactor,
            self.proxy_for(uri.scheme, uri.host, uri.port),
            uri.host.decode("ascii"),
            uri.port,
            tls=uri.scheme == b"https",
            policy=self._policy,
        )


class _RelayAgent(Agent):
    """
    C{Agent} whose C{request} parses each upstream's scheme and host once,
    not the whole URL per request (C{URI.fromBytes} and Python's C{urlparse}
    cost more than the rest of the URL handling together).  URLs it does not
    recognise as simple (a C{;} or C{#}, no C{scheme://host/}) go through
    C{Agent.request} unchanged.  Leans on C{Agent._getEndpoint} and
    C{Agent._requestWithEndpoint}, pinned by tests/test_upstream.py.
    """

    _origins: dict[bytes, URI]

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        start = uri.find(b"://")
        slash = uri.find(b"/", start + 3) if start > 0 else -1
        if slash < 0 or b";" in uri or b"#" in uri:
            return super().request(method, uri, headers, bodyProducer)
        origin = uri[:slash]
        try:
            base = self._origins[origin]
        except AttributeError:
            self._origins = {}
            base = self._origins[origin] = URI.fromBytes(origin + b"/")
        except KeyError:
            if len(self._origins) >= 64:
                self._origins.clear()
            base = self._origins[origin] = URI.fromBytes(origin + b"/")
        path, _, query = uri[slash:].partition(b"?")
        parsed = URI(
            base.scheme, base.netloc, base.host, base.port, path, b"", query, b""
        )
        try:
            endpoint = self._getEndpoint(parsed)
        except SchemeNotSupported:
            return fail()
        key = (parsed.scheme, parsed.host, parsed.port)
        # What URI.originForm makes of it: an empty query loses its "?".
        target = path + b"?" + query if query else path
        result: Deferred[IResponse] = self._requestWithEndpoint(
            key, endpoint, method, parsed, headers, bodyProducer, target
        )
        return result


def make_client(
    reactor: IReactorTime,
    pool: HTTPConnectionPool,
    policy: IPolicyForHTTPS | None = None,
    egress: EgressSettings | None = None,
) -> RelayClient:
    """
    A client over C{pool} that stores no cookies and reuses one endpoint
    (and TLS options) per upstream, each through the egress proxy
    C{egress} chooses for it.  Callers of C{request} pass
    C{allow_redirects=False}: a redirect must reach the client, not be
    followed to a host nobody configured.
    """
    endpoints = CachedEndpoints(reactor, policy, egress=egress)
    agent = _RelayAgent.usingEndpointFactory(reactor, endpoints, pool)
    client = RelayClient(agent, reactor)
    client.endpoints = endpoints
    return client
