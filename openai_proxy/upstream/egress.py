"""
Egress proxies: which proxy (if any) a connection to an upstream goes
through, chosen as curl and Python's C{requests} choose it from
C{HTTPS_PROXY}, C{HTTP_PROXY}, C{ALL_PROXY} and C{NO_PROXY}, or from the
proxy's own C{EGRESS_PROXY}; and the endpoint that gets there
(L{endpoint_to}).

Every upstream connection is tunnelled, C{http://} upstreams too: an HTTP
proxy gets a C{CONNECT}, a SOCKS5 proxy a C{CONNECT} command.  So a tunnelled
connection is pooled and reused like a direct one, and TLS runs end to end
inside it, checked against the upstream's host name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from openai_proxy.upstream.tunnel import (
    SOCKS5,
    HTTPConnect,
    TunnelEndpoint,
    basic_credentials,
)

#: The schemes an egress proxy URL may have.
SCHEMES = ("http", "socks5", "socks5h")
_DEFAULT_PORTS = {"http": 80, "socks5": 1080, "socks5h": 1080}
#: What C{EGRESS_PROXY} says for "no proxy, whatever the variables say".
DIRECT = ("none", "direct")


@dataclass(frozen=True)
class EgressProxy:
    """
    One egress proxy: C{scheme} is C{http} (C{CONNECT}), C{socks5} (the
    upstream's name resolved here) or C{socks5h} (resolved by the proxy).
    Its C{repr} and L{display} never show the credentials.
    """

    scheme: str
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def display(self) -> str:
        """The proxy's URL without user or password, for logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def url(self) -> str:
        """
        The proxy's URL with its credentials, percent-encoded (for clients
        that take one, such as C{requests}): a secret, never logged.
        """
        if self.credentials is None:
            return self.display()
        user, password = (quote(s, safe="") for s in self.credentials)
        return self.display().replace("://", f"://{user}:{password}@", 1)

    @property
    def credentials(self) -> tuple[str, str] | None:
        """C{(user, password)} if the URL named a user."""
        if self.username is None:
            return None
        return (self.username, self.password or "")

    def secrets(self) -> list[str]:
        """
        Every form in which this proxy's credentials could reach a log line,
        for L{openai_proxy.telemetry.logs.register_secrets}.
        """
        if self.credentials is None:
            return []
        user, password = self.credentials
        values = [self.url(), f"{user}:{password}"]
        values.append(basic_credentials(user, password).decode())
        values.append(basic_credentials(user, password).decode().split(" ", 1)[1])
        if password:
            values.append(password)
        return values


def parse_proxy(url: str) -> EgressProxy:
    """
    Parse an egress proxy URL: C{http://[user:pass@]host:port},
    C{socks5://...} or C{socks5h://...}; a URL with no scheme is C{http}, as
    for curl.  User and password may be percent-encoded.  The port defaults
    to 80 for C{http} and 1080 for SOCKS.

    @raise ValueError: saying what is wrong, without the credentials.
    """
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"an egress proxy must be http://, socks5:// or socks5h://, not {scheme}://"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(
            "the egress proxy's port is not a number from 1 to 65535"
        ) from None
    host = parts.hostname
    if not host:
        raise ValueError("the egress proxy URL names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("an egress proxy URL has no path, query or fragment")
    username = None if parts.username is None else unquote(parts.username)
    password = None if parts.password is None else unquote(parts.password)
    return EgressProxy(scheme, host, port or _DEFAULT_PORTS[scheme], username, password)


def _no_proxy_entries(raw: str) -> tuple[str, ...]:
    return tuple(
        entry.strip().lower()
        for entry in raw.replace(" ", ",").split(",")
        if entry.strip()
    )


def _bypassed(entries: tuple[str, ...], host: str, port: int) -> bool:
    host = host.lower().rstrip(".")
    try:
        address: Any = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    for entry in entries:
        if entry == "*":
            return True
        name, want_port = entry, None
        if entry.count(":") == 1 or (entry.startswith("[") and "]:" in entry):
            name, _, text = entry.rpartition(":")
            if text.isdigit():
                want_port = int(text)
            else:
                name = entry
        if want_port is not None and want_port != port:
            continue
        name = name.strip("[]")
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = name.lstrip("*").lstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


@dataclass(frozen=True)
class EgressSettings:
    """
    The egress proxy settings, from L{from_environment}: C{override} is
    C{EGRESS_PROXY} (over the conventional variables), C{direct} says it
    was C{none}; C{https}, C{http} and C{all} are the conventional
    variables; C{no_proxy} the entries of C{NO_PROXY}, which apply to every
    one of them.
    """

    override: EgressProxy | None = None
    direct: bool = False
    https: EgressProxy | None = None
    http: EgressProxy | None = None
    all: EgressProxy | None = None
    no_proxy: tuple[str, ...] = ()

    def proxy_for(self, scheme: str, host: str, port: int) -> EgressProxy | None:
        """
        The proxy a connection to C{scheme://host:port} goes through, or
        L{None} for a direct one: none when C{EGRESS_PROXY} is C{none} or
        C{NO_PROXY} names the host (a name and its subdomains, an address or
        a CIDR range, each optionally with C{:port}; C{*} for every host);
        else C{EGRESS_PROXY}; else C{HTTPS_PROXY} for C{https}/C{wss} and
        C{HTTP_PROXY} for C{http}/C{ws}, falling back to C{ALL_PROXY}.
        """
        if self.direct or _bypassed(self.no_proxy, host, port):
            return None
        if self.override is not None:
            return self.override
        chosen = self.https if scheme in ("https", "wss") else self.http
        return chosen if chosen is not None else self.all

    def proxy_for_url(self, url: str) -> EgressProxy | None:
        """
        L{proxy_for} the host and port of C{url} (C{http}, C{https}, C{ws}
        or C{wss}; the port defaults to 443 for C{https} and C{wss}, else 80).
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme in ("https", "wss") else 80)
        return self.proxy_for(scheme, parts.hostname or "", port)

    def proxies(self) -> list[EgressProxy]:
        """Every proxy these settings may use."""
        found = [self.override, self.https, self.http, self.all]
        return [p for p in found if p is not None]

    @classmethod
    def from_environment(
        cls, env: Mapping[str, str], override: str | None = None
    ) -> EgressSettings:
        """
        Read C{HTTPS_PROXY}, C{HTTP_PROXY}, C{ALL_PROXY} and C{NO_PROXY} from
        C{env} (the lower-case form wins over the upper-case one, as in
        Python's C{urllib}; an empty one counts as unset), and
        C{override} (C{EGRESS_PROXY}: a proxy URL, or C{none} for direct
        connections whatever the variables say).

        @raise ValueError: C{(setting, reason)} for the first bad URL.
        """

        def read(name: str) -> EgressProxy | None:
            for variable in (name.lower(), name.upper()):
                raw = env.get(variable, "").strip()
                if raw:
                    try:
                        return parse_proxy(raw)
                    except ValueError as e:
                        raise ValueError(variable, str(e)) from None
            return None

        explicit: EgressProxy | None = None
        direct = False
        if override is not None and override.strip():
            if override.strip().lower() in DIRECT:
                direct = True
            else:
                try:
                    explicit = parse_proxy(override)
                except ValueError as e:
                    raise ValueError("--egress-proxy/EGRESS_PROXY", str(e)) from None
        no_proxy = env.get("no_proxy", "").strip() or env.get("NO_PROXY", "")
        return cls(
            override=explicit,
            direct=direct,
            https=read("https_proxy"),
            http=read("http_proxy"),
            all=read("all_proxy"),
            no_proxy=_no_proxy_entries(no_proxy),
        )


def endpoint_to(
    reactor: Any,
    proxy: EgressProxy | None,
    host: str,
    port: int,
    *,
    tls: bool,
    server_name: str | None = None,
    policy: IPolicyForHTTPS | None = None,
) -> IStreamClientEndpoint:
    """
    An endpoint for a connection to C{host:port}: direct when C{proxy} is
    L{None}, else through its tunnel.  With C{tls}, TLS runs over it to the
    upstream, its certificate checked against C{server_name} (default
    C{host}) by C{policy} (default: the system's CAs, as
    C{BrowserLikePolicyForHTTPS}); never against the proxy's name.

    A failure that is the proxy's fails the connection with
    L{openai_proxy.upstream.tunnel.EgressProxyError}.  For the HTTP client,
    the WebSocket relay and anything else that dials out.
    """
    endpoint: IStreamClientEndpoint
    if proxy is None:
        endpoint = HostnameEndpoint(reactor, host, port)
    else:
        endpoint = _tunnel(reactor, proxy, host, port)
    if tls:
        name = server_name or host
        policy = policy or BrowserLikePolicyForHTTPS()
        creator = policy.creatorForNetloc(_ascii(name), port)
        endpoint = wrapClientTLS(creator, endpoint)
    return endpoint


def _ascii(name: str) -> bytes:
    try:
        return name.encode("ascii")
    except UnicodeEncodeError:
        return name.encode("idna")


def _tunnel(
    reactor: Any, proxy: EgressProxy, host: str, port: int
) -> IStreamClientEndpoint:
    to_proxy = HostnameEndpoint(reactor, proxy.host, proxy.port)
    shown = proxy.display()
    credentials = proxy.credentials
    if proxy.scheme == "http":
        return TunnelEndpoint(
            to_proxy, lambda: HTTPConnect(shown, host, port, credentials), shown
        )
    if proxy.scheme == "socks5" and not _is_address(host):
        return _ResolvingFirst(reactor, to_proxy, proxy, host, port)
    return TunnelEndpoint(
        to_proxy, lambda: SOCKS5(shown, host, port, credentials), shown
    )


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IStreamClientEndpoint)
class _ResolvingFirst:
    """
    C{socks5://}: the upstream's name is resolved here (to an IPv4 address,
    by the reactor's resolver) and the proxy is given the address.
    """

    def __init__(
        self,
        reactor: Any,
        to_proxy: IStreamClientEndpoint,
        proxy: EgressProxy,
        host: str,
        port: int,
    ) -> None:
        self._reactor = reactor
        self._to_proxy = to_proxy
        self._proxy = proxy
        self._host = host
        self._port = port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        shown = self._proxy.display()
        credentials = self._proxy.credentials

        def resolved(address: str) -> Deferred[IProtocol]:
            tunnel = TunnelEndpoint(
                self._to_proxy,
                lambda: SOCKS5(shown, address, self._port, credentials),
                shown,
            )
            return tunnel.connect(protocolFactory)

        d: Deferred[str] = self._reactor.resolve(self._host)
        return d.addCallback(resolved)
