"""
Incremental parsing of a C{text/event-stream} body into events that keep
their exact bytes.

The parser follows the HTML "server-sent events" rules (lines end in CRLF, LF
or CR; a blank line ends an event; C{:} starts a comment; several C{data:}
lines join with newlines) but, unlike a browser, it hands back every byte of
the input: each L{SSEEvent} carries the C{raw} bytes it was parsed from, so a
relay can forward events unchanged.  Concatenating the C{raw} of every event
returned by L{SSEParser.feed} and L{SSEParser.finish} gives back the input
exactly, however the input was split into reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_CR = 0x0D
_LF = 0x0A


@dataclass(frozen=True)
class SSEEvent:
    """
    One event of a stream.

    @ivar raw: the exact bytes of the event, from the end of the previous event
        up to and including the blank line that ends this one (for the last
        event of a stream that stops without a blank line, up to the end).
    @ivar event: the value of the last C{event:} field, or L{None}.
    @ivar data: the C{data:} field values joined with C{"\\n"}, or L{None}
        when the event has no C{data:} field (a comment, a stray blank line).
    """

    raw: bytes
    event: str | None = None
    data: str | None = None

    def json(self) -> object:
        """
        Return C{data} parsed as JSON, or L{None} when there is no data or it
        is not JSON (e.g. C{[DONE]}) or is nested too deep to parse.
        """
        if self.data is None:
            return None
        try:
            return json.loads(self.data)
        except (ValueError, RecursionError):  # (nested too deep to parse)
            return None


def format_event(data: str, event: str | None = None) -> bytes:
    """
    Serialise one event with the given C{data} (which may hold newlines) and
    optional C{event} type, ended by a blank line, LF line endings.
    """
    lines = [] if event is None else [f"event: {event}"]
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def format_json_event(payload: object, event: str | None = None) -> bytes:
    """Serialise C{payload} as compact JSON (UTF-8, not escaped) in one event."""
    return format_event(
        json.dumps(payload, ensure_ascii=False, separators=(",", ":")), event
    )


class SSEParser:
    """
    Split a byte stream into L{SSEEvent}s as it arrives.

    Reads may be split anywhere, even inside a line ending or a UTF-8
    character: fields are decoded only once their line is complete.  The
    events returned do not depend on how the input was split.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        # Where the current (unfinished) line starts and where to look next
        # for a line ending, both relative to the buffer (which starts at the
        # first byte of the current event).
        self._line_start = 0
        self._scan = 0
        self._event: str | None = None
        self._data: list[str] | None = None
        self._first_line = True

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Add bytes from the stream; return the events they complete."""
        self._buffer += data
        return self._parse(final=False)

    def finish(self) -> list[SSEEvent]:
        """
        The stream ended: return the events still pending, including a last
        event that was never ended by a blank line (so no byte is lost).
        """
        events = self._parse(final=True)
        if self._line_start < len(self._buffer):
            self._field(bytes(self._buffer[self._line_start :]))
        if self._buffer:
            events.append(self._dispatch(len(self._buffer)))
        return events

    def _parse(self, *, final: bool) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        buffer = self._buffer
        while True:
            end = _find_line_end(buffer, self._scan)
            if end < 0:
                self._scan = len(buffer)
                return events
            if buffer[end] == _CR and end + 1 == len(buffer) and not final:
                # A CR at the very end may be the first half of a CRLF: wait
                # for the next byte so the split never changes the result.
                self._scan = end
                return events
            after = end + 2 if buffer[end : end + 2] == b"\r\n" else end + 1
            line = bytes(buffer[self._line_start : end])
            self._line_start = self._scan = after
            if line:
                self._field(line)
            else:
                events.append(self._dispatch(after))
                buffer = self._buffer

    def _field(self, line: bytes) -> None:
        text = line.decode("utf-8", errors="replace")
        if self._first_line:
            # A byte order mark may open the stream; it is not part of a field.
            self._first_line = False
            text = text.removeprefix("\ufeff")
        if text.startswith(":"):
            return
        name, colon, value = text.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            if self._data is None:
                self._data = []
            self._data.append(value)
        elif name == "event":
            self._event = value

    def _dispatch(self, end: int) -> SSEEvent:
        data = None if self._data is None else "\n".join(self._data)
        event = SSEEvent(bytes(self._buffer[:end]), self._event, data)
        del self._buffer[:end]
        self._line_start = self._scan = 0
        self._event = None
        self._data = None
        return event


def _find_line_end(buffer: bytearray, start: int) -> int:
    """Index of the first CR or LF at or after C{start}, or -1."""
    lf = buffer.find(b"\n", start)
    cr = buffer.find(b"\r", start, lf if lf >= 0 else len(buffer))
    return cr if cr >= 0 else lf
