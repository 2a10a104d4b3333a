"""
Errors the proxy itself answers with, shaped like the OpenAI API's own
(C{{"error": {"message", "type", "code"}}}), so the official SDKs raise their
usual exception classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from twisted.web.server import Request

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"


@dataclass(frozen=True)
class ProxyError(Exception):
    """
    An error answered by the proxy rather than relayed from the upstream;
    C{headers} are set on the response too (e.g. C{retry-after}).
    """

    status: int
    message: str
    code: str
    type: str = "invalid_request_error"
    #: The request field at fault, if one is (the API's own C{param}).
    param: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def body(self) -> bytes:
        """The OpenAI-style JSON body for this error."""
        return error_body(self.message, self.type, self.code, self.param)


_frozen_setattr = ProxyError.__setattr__


def _setattr(self: ProxyError, name: str, value: object) -> None:
    # Raising sets __cause__ (and __context__, __traceback__): CPython does
    # it behind __setattr__, PyPy through it, where the frozen dataclass
    # would refuse.  The fields stay frozen.
    if name.startswith("__") and name.endswith("__"):
        Exception.__setattr__(self, name, value)
    else:
        _frozen_setattr(self, name, value)


ProxyError.__setattr__ = _setattr  # type: ignore[method-assign,assignment]


def error_body(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    """Serialise an OpenAI-style error object."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "code": code, "param": param}}
    ).encode("utf-8")


def write_error(request: Request, error: ProxyError) -> None:
    """
    Answer C{request} with C{error} and finish it.  Headers already set (CORS,
    request id) are kept; those describing a relayed body are replaced.
    """
    body = error.body()
    request.setResponseCode(error.status)
    request.responseHeaders.setRawHeaders(b"content-type", [JSON_CONTENT_TYPE])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.responseHeaders.removeHeader(b"content-encoding")
    for name, value in error.headers:
        request.responseHeaders.setRawHeaders(name, [value])
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


@dataclass(frozen=True)
class ErrorTemplate:
    """
    An error the proxy answers with, described once; calling it gives a
    fresh L{ProxyError} to raise or write (C{raise errors.MISSING_KEY()}).

    Not an exception itself, so that it cannot be raised as is: one
    exception object raised again and again keeps every raise's frames
    (and, through them, each request) in its C{__traceback__}.
    """

    status: int
    message: str
    code: str
    type: str = "invalid_request_error"

    def __call__(self) -> ProxyError:
        """A new L{ProxyError} saying this."""
        return ProxyError(self.status, self.message, self.code, self.type)


# The errors the relay answers with, named once so tests and code agree.
MISSING_KEY = ErrorTemplate(
    401,
    "No API key: send 'Authorization: Bearer <key>' (or '<openai-key>:<proxy-key>').",
    "missing_api_key",
)
WRONG_PROXY_KEY = ErrorTemplate(
    403,
    "The proxy key is not accepted by this proxy.",
    "invalid_proxy_key",
    "permission_error",
)
NO_UPSTREAM_KEY = ErrorTemplate(
    401,
    "No OpenAI key to send upstream: use 'Authorization: Bearer <openai-key>:<proxy-key>'.",
    "missing_api_key",
)
ABSOLUTE_URI = ErrorTemplate(
    400,
    "The request target must be a path starting with '/'.",
    "invalid_request_target",
)
UPSTREAM_UNREACHABLE = ErrorTemplate(
    502, "The upstream API could not be reached.", "upstream_unreachable", "api_error"
)
UPSTREAM_TIMEOUT = ErrorTemplate(
    504, "The upstream API did not answer in time.", "upstream_timeout", "api_error"
)
UPSTREAM_FAILED = ErrorTemplate(
    502, "The upstream API broke off the response.", "upstream_error", "api_error"
)


DUPLICATE_AUTHORIZATION = ErrorTemplate(
    400,
    "The request carries more than one Authorization header.",
    "duplicate_authorization",
)
BAD_HOST = ErrorTemplate(
    400,
    "The request must carry exactly one Host header.",
    "invalid_host_header",
)
HEADER_TIMEOUT = ErrorTemplate(
    408,
    "The request's headers did not arrive in time.",
    "request_timeout",
)
HEADERS_TOO_LARGE = ErrorTemplate(
    431,
    "The request's headers are too large.",
    "request_headers_too_large",
)
URI_TOO_LONG = ErrorTemplate(
    414,
    "The request line is too long.",
    "request_uri_too_long",
)


def body_too_large(limit: int) -> ProxyError:
    """The 413 error for a request body over C{limit} bytes."""
    return ProxyError(
        413,
        f"The request body is larger than this proxy's limit of {limit} bytes.",
        "request_too_large",
    )


def egress_proxy_unreachable() -> ProxyError:
    """
    The 502 error for an egress proxy that could not be reached, or broke
    off (or never finished) its handshake: the proxy's fault, not the
    upstream's.
    """
    return ProxyError(
        502,
        "The egress proxy could not be reached.",
        "egress_proxy_unreachable",
        "api_error",
    )


def egress_proxy_auth_failed(status: str | None) -> ProxyError:
    """
    The 502 error for an egress proxy that refused this proxy's credentials
    (HTTP 407, or a SOCKS5 authentication failure); C{status} is what it
    answered.
    """
    said = f" ({status})" if status else ""
    return ProxyError(
        502,
        f"The egress proxy refused this proxy's credentials{said}.",
        "egress_proxy_auth_failed",
        "api_error",
    )


def egress_proxy_refused(status: str | None) -> ProxyError:
    """
    The 502 error for an egress proxy that would not open a tunnel to the
    upstream, naming what it answered (C{403 Forbidden}, a SOCKS reply).
    """
    said = f": {status}" if status else ""
    return ProxyError(
        502,
        f"The egress proxy refused to open a tunnel to the upstream{said}.",
        "egress_proxy_refused",
        "api_error",
    )


def egress_proxy_error(kind: str, status: str | None) -> ProxyError:
    """
    The 502 error for an egress proxy's failure of this C{kind}
    (C{auth_failed}, C{refused}, else unreachable), wherever it is met.
    """
    if kind == "auth_failed":
        return egress_proxy_auth_failed(status)
    if kind == "refused":
        return egress_proxy_refused(status)
    return egress_proxy_unreachable()
