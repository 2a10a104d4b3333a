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
    method_text = method.decode("ascii", "replace")
    path_text = path.decode("ascii", "replace")
    duration_ms = round(duration * 1000.0, 3)
    upstream = upstream or "-"
    # The line is formatted here, once: a log format with one field costs
    # the observers far less than one with six.  The fields stay in the
    # event for JSON output.
    _log.info(
        "{line}",
        line=f"{method_text} {path_text} {status} {bytes_out}B "
        f"{duration_ms:.1f}ms upstream={upstream}",
        method=method_text,
        path=path_text,
        status=status,
        bytes_out=bytes_out,
        duration_ms=duration_ms,
        upstream=upstream,
        request_id=request_id,
        **extra,
    )
