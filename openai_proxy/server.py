"""
The HTTP server side: a C{Site} whose requests refuse oversized bodies
before reading them in full.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from openai_proxy import errors
from openai_proxy.access import log_request


class ProxyRequest(Request):
    """
    A request that answers 413 as soon as its body is known to be larger
    than the site's C{max_body}: at the headers when C{Content-Length} says
    so, else once a chunked body passes the limit.  The rest of the body is
    then discarded, not stored, and the connection closed after it.
    """

    channel: Any
    _refused = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.channel.site.max_body:
            expecting = self.requestHeaders.getRawHeaders(b"expect")
            # No "100 Continue": the client need not send the body at all.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse()
            if expecting:
                # It is waiting for our word before sending: nothing to drain.
                self.channel.loseConnection()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            self.channel.loseConnection()
            return
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        if self.content is not None:
            self.content.close()
            self.content = None
        site: ProxySite = self.channel.site
        body = errors.body_too_large(site.max_body).body()
        head = [
            b"HTTP/1.1 413 Content Too Large",
            b"Content-Type: " + errors.JSON_CONTENT_TYPE,
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        if site.allow_any_origin:
            head.append(b"Access-Control-Allow-Origin: *")
        self.channel.persistent = False
        # Written straight to the connection: the request line and headers
        # are parsed, but the request will never reach a resource.
        self.channel.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        site.refused(self)


class ProxyChannel(HTTPChannel):
    """
    An C{HTTPChannel} that asks its socket for its own address once: every
    C{Request} asks for it (C{Request.__init__} calls C{getHost}), and on a
    TCP connection each ask is a C{getsockname} system call.
    """

    # A slot, not an instance attribute: one more key in the channel's
    # __dict__ made it grow, ~1.3 KB per open connection.
    __slots__ = ("_cached_host",)
    _cached_host: IAddress

    def getHost(self) -> IAddress:
        try:
            host: IAddress = self._cached_host
        except AttributeError:
            assert self.transport is not None
            host = self._cached_host = self.transport.getHost()
        return host


class ProxySite(Site):
    """
    The proxy's C{Site}: no form parsing (a relay never needs it), no
    combined-format access log (the resource logs each request with keyword
    fields and no secrets), and the body-size limit its requests enforce.
    """

    requestFactory = ProxyRequest
    # The channel itself, without Twisted's wrapper that would switch to
    # HTTP/2 (which needs the h2 package, not installed) on a TLS port.
    protocol = ProxyChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        max_body: int,
        *,
        allow_any_origin: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.max_body = max_body
        self.allow_any_origin = allow_any_origin

    def log(self, request: Any) -> None:
        pass

    def refused(self, request: ProxyRequest) -> None:
        """Log a request refused as too large: it never reaches the resource."""
        # Only the channel knows the request line yet (requestReceived, which
        # sets request.method and .uri, comes after the body).
        channel = request.channel
        target = getattr(channel, "_path", b"-")
        log_request(
            method=getattr(channel, "_command", b"-"),
            path=target.split(b"?", 1)[0],
            status=413,
            bytes_out=0,
            duration=0.0,
            upstream=None,
        )
