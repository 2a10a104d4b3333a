"""The access log: one line per request, keyword fields, never a secret."""

from __future__ import annotations

from twisted.logger import Logger

_log = Logger(namespace="openai_proxy.access")


def log_request(
    *,
    method: bytes,
    path: bytes,
    status: int,
    bytes_out: int,
    duration: float,
    upstream: str | None,
    request_id: str | None = None,
    body: str | None = None,
) -> None:
    """
    Log one finished (or abandoned) request.  C{path} must be given without
    its query string: queries may carry anything.  C{body} (the start of the
    request body) is logged only when given, which C{LOG_BODIES=1} asks for.
    """
    extra = {} if body is None else {"request_body": body}
    _log.info(
        "{method} {path} {status} {bytes_out}B {duration_ms:.1f}ms upstream={upstream}",
        method=method.decode("ascii", "replace"),
        path=path.decode("ascii", "replace"),
        status=status,
        bytes_out=bytes_out,
        duration_ms=duration * 1000.0,
        upstream=upstream or "-",
        request_id=request_id,
        **extra,
    )
