"""
Log output: plain text or NDJSON on stdout, with secrets redacted, and
request ids.

Every observer made here passes events through L{redact_event} and writes
through L{redact_text}, so neither a field named like a secret nor a string
shaped like a key (C{Bearer ...}, C{sk-...}) nor a secret registered with
L{register_secrets} reaches the output, whatever the code that logged it did.

With twistd, either name a factory (C{twistd --logger=openai_proxy.telemetry.logs.json_observer})
or let the plugin's options call L{use_log_format}.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any, Final

from twisted.logger import (
    FileLogObserver,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
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


class _RequestIds:
    """
    Request ids without a system call each: 8 random hex digits drawn once
    per process (again after a fork, and when the counter runs out), then a
    counter.  Ids from different processes differ in their prefix with
    near certainty; within a process they never repeat.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._next = 0

    def __call__(self) -> str:
        n = self._next
        if n > 0xFFFFFFFF:
            self.reseed()
            n = 0
        self._next = n + 1
        return f"{self._prefix}{n:08x}"


_request_ids = _RequestIds()
os.register_at_fork(after_in_child=_request_ids.reseed)


def new_request_id() -> str:
    """
    Return a fresh request id: 16 lowercase hex digits, unique within the
    process and, by a random per-process prefix, across processes.
    """
    return _request_ids()


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


_PLAIN: Final = (str, int, float, type(None))  # bool is an int


@functools.lru_cache(maxsize=1024)
def _plain_fields(names: tuple[str, ...]) -> tuple[str, ...] | None:
    """
    The names of an event's own fields (not Twisted's C{log_*}), or L{None}
    if one is named like a secret: events of one kind share their names, so
    this is worked out once per kind.
    """
    own = tuple(name for name in names if not name.startswith("log_"))
    return None if any(is_secret_name(name) for name in own) else own


def redact_event(event: LogEvent) -> LogEvent:
    """
    Return C{event} with every field named like a secret, at any nesting
    depth, L{REDACTED}: a copy when anything had to change (the original is
    shared with other observers and left alone), else C{event} itself.
    Twisted's own C{log_*} fields are kept as they are.  Strings are not
    searched here: the observers redact the whole written line with
    L{redact_text}, which covers every field at once.
    """
    fields = _plain_fields(tuple(event))
    if fields is not None:
        for name in fields:
            if not isinstance(event[name], _PLAIN):
                break
        else:
            return event  # the common case: plain values under harmless names
    redacted: dict[str, Any] = {}
    for name, value in event.items():
        if name.startswith("log_"):
            redacted[name] = value
        elif is_secret_name(name):
            redacted[name] = REDACTED
        elif isinstance(value, _PLAIN):
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


#: The format of events that carry their text ready-made in a C{line} field
#: (the access log): formatted without Twisted's format-string machinery.
#: The text observer appends such an event's C{request_body} field, if it
#: has one, as C{ body=} and a JSON string (one line, whatever it holds);
#: the JSON observer has it as a field of its own.
LINE_FORMAT: Final = "{line}"


def _message(event: LogEvent) -> str:
    """What Twisted's C{formatEvent} makes of C{event}, faster for L{LINE_FORMAT}."""
    if event.get("log_format") == LINE_FORMAT:
        line = event.get("line")
        if type(line) is str:
            return line
    return formatEvent(event)


_last_second: list[Any] = [None, ""]


def _time_text(when: float | None) -> str:
    """
    Twisted's C{formatTime(when)} (RFC 3339, to the second), computed once a
    second rather than once a line.
    """
    if when is None:
        return "-"
    second = int(when)
    # fromtimestamp() rounds to microseconds: close enough to the next
    # second, it would print that one.
    if when - second >= 0.999999:
        return formatTime(when)
    if _last_second[0] != second:
        _last_second[:] = [second, formatTime(second)]
    text: str = _last_second[1]
    return text


def _text_line(event: LogEvent) -> str | None:
    """
    The line Twisted's C{textFileLogObserver} writes for C{event}, byte for
    byte; an access-log event is formatted without the generic machinery,
    and gets its C{request_body} appended (see L{LINE_FORMAT}).
    """
    if (
        event.get("log_format") == LINE_FORMAT
        and "log_failure" not in event
        and "log_system" not in event
    ):
        line = event.get("line")
        level = event.get("log_level")
        if type(line) is str and line and level is not None:
            body = event.get("request_body")
            if isinstance(body, str):
                line = f"{line} body={_encode(body)}"
            namespace = event.get("log_namespace", "-")
            text = (
                f"{_time_text(event.get('log_time'))} [{namespace}#{level.name}] {line}"
            )
            return text.replace("\n", "\n\t") + "\n"
    return formatEventAsClassicLogText(event, formatTime=_time_text)


@functools.lru_cache(maxsize=1024)
def _json_fields(names: tuple[str, ...]) -> tuple[str, ...]:
    """Which of an event's fields go into its JSON line, in their order."""
    return tuple(k for k in names if not k.startswith("log_") or k in _JSON_LOG_FIELDS)


def _json_line(event: LogEvent) -> str:
    """
    One event as one JSON object: its own fields, Twisted's time, namespace,
    format and level, and C{log_text} (the formatted message) and
    C{log_traceback} for jq.  Lighter than Twisted's C{eventAsJSON}, which
    flattens every format string and costs several times as much.
    """
    out: dict[str, Any] = {k: event[k] for k in _json_fields(tuple(event))}
    level = event.get("log_level")
    if level is not None:
        out["log_level"] = {"name": level.name}
    out["log_text"] = _message(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        out["log_traceback"] = failure.getTraceback()
    return _encode(out) + "\n"


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return repr(value)


# json.dumps() with options builds a new encoder per call: build it once.
_encode: Final = json.JSONEncoder(default=_jsonable, ensure_ascii=False).encode


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
    stdout, so it serves as C{twistd --logger=openai_proxy.telemetry.logs.json_observer}.
    """
    out = out if out is not None else _output()
    return _RedactingObserver(_json_line, out)


def text_observer(out: IO[str] | None = None) -> FileLogObserver:
    """
    Return an observer writing Twisted's usual one-line text (and
    tracebacks), redacted.  Zero arguments writes to stdout.
    """
    out = out if out is not None else _output()
    return _RedactingObserver(_text_line, out)


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
