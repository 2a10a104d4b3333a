"""
Log output: plain text or NDJSON on stdout, with secrets redacted, and
request ids.

Every observer made here passes events through L{redact_event} and writes
through L{redact_text}, so neither a field named like a secret nor a string
shaped like a key (C{Bearer ...}, C{sk-...}) nor a secret registered with
L{register_secrets} reaches the output, whatever the code that logged it did.

With twistd, either name a factory (C{twistd --logger=openai_proxy.logs.json_observer})
or let the plugin's options call L{use_log_format}.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any, Final

from twisted.logger import (
    FileLogObserver,
    LogEvent,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.python.usage import Options

#: The values C{--log-format} / C{LOG_FORMAT} accept.
LOG_FORMATS: Final = ("text", "json")
#: What a redacted value or substring is replaced with.
REDACTED: Final = "[REDACTED]"

# A field is secret when its name holds one of these words, in snake, kebab
# or camel case: api_key, openaiKey, x-api-key, proxy_keys, skey, sid,
# access_token, password, cookie...  "token" counts only in the singular:
# "prompt_tokens" and "max_tokens" are counts, worth keeping in the log.
_SECRET_NAME: Final = re.compile(
    r"(?i:authori[sz]ation|api_?key|secret|passw(?:or)?d|cookie|credential)"
    r"|(?i:(?:^|[^a-z])(?:s?keys?|sid|token)(?![a-z]))"
    r"|[a-z0-9](?:Keys?|Token|Sid)(?![a-z])"
)
# Strings shaped like credentials, wherever they appear in the output.
_SECRET_SHAPES: Final = (
    r"(?i:\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]+",
    # A real key is long enough to find even glued to a preceding word;
    # a short one only as a word of its own.
    r"sk-[A-Za-z0-9_-]{20,}",
    r"\bsk-[A-Za-z0-9_-]{6,}",
    r"\bAKID[A-Za-z0-9]{6,}",
    r"(?i:\bsignature=)[0-9A-Fa-f]{16,}",
)
# A shorter secret is redacted only as a word of its own: anywhere, it would
# redact pieces of ordinary words.
_MIN_SECRET_LENGTH: Final = 4
# Containers nested deeper than this are replaced whole by REDACTED.
_MAX_DEPTH: Final = 6

# Lower-case words one of _SECRET_SHAPES needs: a line holding none of them
# (nor a registered secret) is left alone without running the regex.
_SHAPE_WORDS: Final = ("bearer", "basic", "sk-", "akid", "signature=")

_registered: set[str] = set()
_pattern: re.Pattern[str] = re.compile("|".join(_SECRET_SHAPES))


def new_request_id() -> str:
    """Return a fresh, unguessable request id: 16 lowercase hex digits."""
    return secrets.token_hex(8)


def register_secrets(values: Iterable[str | None]) -> None:
    """
    Redact these exact strings (and their JSON-escaped forms) from every log
    line from now on, e.g. the proxy and upstream keys from the config.
    L{None} and empty values are ignored.  A secret shorter than 4
    characters is redacted only where it stands alone (not inside a longer
    word of letters, digits, C{-} or C{_}), so that it does not blank out
    every word it happens to appear in.
    """
    global _pattern
    for value in values:
        if value:
            _registered.add(value)
            _registered.add(json.dumps(value)[1:-1])
    # Longest first, so a secret containing another is removed whole.
    literals = sorted(_registered, key=len, reverse=True)
    _pattern = re.compile("|".join([*map(_literal, literals), *_SECRET_SHAPES]))


def _literal(secret: str) -> str:
    if len(secret) >= _MIN_SECRET_LENGTH:
        return re.escape(secret)
    return rf"(?<![\w-]){re.escape(secret)}(?![\w-])"


def redact_text(text: str) -> str:
    """Return C{text} with every credential-shaped or registered secret replaced."""
    lowered = text.lower()
    if not any(word in lowered for word in _SHAPE_WORDS) and not any(
        secret in text for secret in _registered
    ):
        return text  # the common case, found far faster than by the regex
    return _pattern.sub(_replacement, text)


def _replacement(match: re.Match[str]) -> str:
    found = match.group(0)
    # Keep the scheme or prefix so a reader still sees what kind of thing
    # was there.
    for prefix in ("bearer ", "basic ", "signature="):
        if found.lower().startswith(prefix):
            return found[: len(prefix)] + REDACTED
    return REDACTED


@functools.lru_cache(maxsize=4096)
def is_secret_name(name: str) -> bool:
    """Whether a field called C{name} holds a secret (and is redacted whole)."""
    return _SECRET_NAME.search(name) is not None


def redact_event(event: LogEvent) -> LogEvent:
    """
    Return a copy of C{event} (the original is shared with other observers
    and left alone) where every field named like a secret, at any nesting
    depth, is L{REDACTED}.  Twisted's own C{log_*} fields are kept as they
    are.  Strings are not searched here: the observers redact the whole
    written line with L{redact_text}, which covers every field at once.
    """
    redacted: dict[str, Any] = {}
    for name, value in event.items():
        if name.startswith("log_"):
            redacted[name] = value
        elif is_secret_name(name):
            redacted[name] = REDACTED
        elif isinstance(value, str | int | float | bool | None):
            redacted[name] = value
        else:
            redacted[name] = _scrub(value, 0)
    return redacted


def _scrub(value: object, depth: int) -> object:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if depth >= _MAX_DEPTH:
        return value if isinstance(value, int | float | bool | None) else REDACTED
    if isinstance(value, Mapping):
        return {
            key: REDACTED if is_secret_name(str(key)) else _scrub(item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(item, depth + 1) for item in value]
    return value


class _RedactingFile:
    """
    A text file wrapper that redacts each write: the last line of defence,
    catching secrets in fields, reprs, exception messages and tracebacks.

    Flushing is batched: once the reactor runs, the lines of one reactor
    turn are flushed together at its end instead of one system call each.
    """

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._flush_pending = False

    def write(self, text: str) -> None:
        self._out.write(redact_text(text))

    def flush(self) -> None:
        # Only a reactor already installed (by twistd) is used: importing it
        # here would install the default one before twistd chose.
        reactor: Any = sys.modules.get("twisted.internet.reactor")
        if reactor is None or not reactor.running:
            self._out.flush()  # before start-up, or after shutdown
        elif not self._flush_pending:
            self._flush_pending = True
            reactor.callLater(0, self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        self._out.flush()


class _RedactingObserver(FileLogObserver):
    """
    Formats L{redact_event} copies the way a stock Twisted file observer does
    (Twisted's class, so it is an C{ILogObserver} to twistd), and writes
    through a L{_RedactingFile}.
    """

    def __init__(
        self, format_event: Callable[[LogEvent], str | None], out: IO[str]
    ) -> None:
        super().__init__(_RedactingFile(out), format_event)  # type: ignore[arg-type]

    def __call__(self, event: LogEvent) -> None:
        super().__call__(redact_event(event))


#: Twisted's own fields that go into a JSON line (the others hold objects).
_JSON_LOG_FIELDS: Final = ("log_time", "log_namespace", "log_format", "log_system")


def _json_line(event: LogEvent) -> str:
    """
    One event as one JSON object: its own fields, Twisted's time, namespace,
    format and level, and C{log_text} (the formatted message) and
    C{log_traceback} for jq.  Lighter than Twisted's C{eventAsJSON}, which
    flattens every format string and costs several times as much.
    """
    out: dict[str, Any] = {
        k: v
        for k, v in event.items()
        if not k.startswith("log_") or k in _JSON_LOG_FIELDS
    }
    level = event.get("log_level")
    if level is not None:
        out["log_level"] = {"name": level.name}
    out["log_text"] = formatEvent(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        out["log_traceback"] = failure.getTraceback()
    return json.dumps(out, default=_jsonable, ensure_ascii=False) + "\n"


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return repr(value)


_destination: str | None = None


def _output() -> IO[str]:
    if _destination:
        # LogFile rotates at 1 MB, as twistd's own --logfile does.
        log_file: IO[str] = LogFile.fromFullPath(_destination)
        return log_file
    return sys.stdout


def json_observer(out: IO[str] | None = None) -> FileLogObserver:
    """
    Return an observer writing each event as one JSON object per line
    (NDJSON; Twisted's event fields plus C{log_text}, the formatted message,
    and C{log_traceback} for failures), redacted.  Zero arguments writes to
    stdout, so it serves as C{twistd --logger=openai_proxy.logs.json_observer}.
    """
    out = out if out is not None else _output()
    return _RedactingObserver(_json_line, out)


def text_observer(out: IO[str] | None = None) -> FileLogObserver:
    """
    Return an observer writing Twisted's usual one-line text (and
    tracebacks), redacted.  Zero arguments writes to stdout.
    """
    out = out if out is not None else _output()
    return _RedactingObserver(textFileLogObserver(out).formatEvent, out)


def use_log_format(options: Options, log_format: str) -> None:
    """
    Make twistd log in C{log_format} (one of L{LOG_FORMATS}) through the
    redacting observers.  Call it from the plugin's C{Options.postOptions}:
    twistd reads its C{--logger} option (C{options.parent}) only after the
    plugin's options are parsed.  An explicit C{--logger} is left alone;
    twistd's C{--logfile}, if given, is honoured.

    @raise ValueError: if C{log_format} is not one of L{LOG_FORMATS}.
    """
    global _destination
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be text or json, not {log_format!r}")
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("logger") is not None:
        return
    logfile = parent.get("logfile")
    _destination = logfile if logfile and logfile != "-" else None
    parent["logger"] = f"{__name__}.{log_format}_observer"
