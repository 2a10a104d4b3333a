"""The access log: one line per request, keyword fields, never a secret."""

from __future__ import annotations

from time import time
from typing import Any

from twisted.logger import Logger, LogLevel

from openai_proxy.telemetry.logs import LINE_FORMAT

_log = Logger(namespace="openai_proxy.access")
_INFO = LogLevel.info


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

    The text line ends with C{id=} and the request id (C{-} if none), so
    that a request can be found by its C{X-Proxy-Request-Id} in either log
    format; the text observer adds the body (see L{logs.LINE_FORMAT}).
    """
    method_text = method.decode("ascii", "replace")
    path_text = path.decode("ascii", "replace")
    duration_ms = round(duration * 1000.0, 3)
    upstream = upstream or "-"
    # The line is formatted here, once: the observers write it as it is
    # (logs.LINE_FORMAT).  The fields stay in the event for JSON output.
    event: dict[str, Any] = {
        "line": f"{method_text} {path_text} {status} {bytes_out}B "
        f"{duration_ms:.1f}ms upstream={upstream} id={request_id or '-'}",
        "method": method_text,
        "path": path_text,
        "status": status,
        "bytes_out": bytes_out,
        "duration_ms": duration_ms,
        "upstream": upstream,
        "request_id": request_id,
    }
    if body is not None:
        event["request_body"] = body
    # The event _log.info() would make, without Logger.emit's per-call check
    # of the level against every level there is.
    event["log_logger"] = _log
    event["log_level"] = _INFO
    event["log_namespace"] = _log.namespace
    event["log_source"] = _log.source
    event["log_format"] = LINE_FORMAT
    event["log_time"] = time()
    _log.observer(event)


def log_session(
    *,
    path: bytes,
    key: str | None,
    duration: float,
    messages_in: int,
    bytes_in: int,
    messages_out: int,
    bytes_out: int,
    close_code: int | None,
    closed_by: str,
    upstream: str | None,
    request_id: str | None,
) -> None:
    """
    Log one WebSocket session when it ends: C{_in} is what the client sent,
    C{_out} what it was sent (messages, payload bytes).  C{path} without its
    query, as for L{log_request}; C{key} is the named key's name, if any.
    """
    path_text = path.decode("ascii", "replace")
    duration_ms = round(duration * 1000.0, 3)
    code = "-" if close_code is None else str(close_code)
    _log.info(
        "{line}",
        line=f"WS {path_text} close={code} by={closed_by} {duration_ms:.1f}ms "
        f"in={messages_in}/{bytes_in}B out={messages_out}/{bytes_out}B "
        f"key={key or '-'} upstream={upstream or '-'} id={request_id or '-'}",
        method="WS",
        path=path_text,
        status=101,
        close_code=close_code,
        closed_by=closed_by,
        duration_ms=duration_ms,
        messages_in=messages_in,
        bytes_in=bytes_in,
        messages_out=messages_out,
        bytes_out=bytes_out,
        key=key,
        upstream=upstream or "-",
        request_id=request_id,
    )
