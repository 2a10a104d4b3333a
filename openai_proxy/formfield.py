"""
The text fields of one name in a C{multipart/form-data} request body (an
audio upload's C{model}), found in the body twisted.web already holds (in
memory, or spooled to a file) by reading it in pieces: the uploaded file
itself is never held in memory whole, wherever the fields come.

Parsers differ at the edges, and a field this one missed but the upstream's
read would let a restricted key through: so every field of the name is
returned (the upstream may take the first or the last), bare-LF line ends
and unquoted names are understood, and a boundary longer than RFC 2046's
70 characters is too.
"""

from __future__ import annotations

import re
from typing import IO

_CHUNK = 65_536
_MAX_HEADERS = 8_192  # bytes of one part's headers
_MAX_VALUE = 1_024  # bytes of a field's value kept
_BOUNDARY = re.compile(rb'boundary=(?:"([^"]{1,200})"|([^\s;"]{1,200}))', re.I)
_DISPOSITION = re.compile(rb"^content-disposition:(.*)$", re.I | re.M)
# "name=" at the start of a parameter, so "filename=" does not match.
_NAME = re.compile(rb'(?:^|;)\s*name\s*=\s*(?:"([^"]*)"|([^;\s"]+))', re.I)


def boundary_of(content_type: bytes) -> bytes | None:
    """The boundary of a C{multipart/form-data} content type, or L{None}."""
    if not content_type.lower().startswith(b"multipart/form-data"):
        return None
    match = _BOUNDARY.search(content_type)
    if match is None:
        return None
    return match.group(1) or match.group(2)


def form_fields(body: IO[bytes], boundary: bytes, name: bytes) -> list[bytes]:
    """
    The values of every part named C{name} in the multipart C{body} (read
    from where it stands), in order; a value is cut at 1 KiB.  At most a
    piece of 64 KiB plus one part's headers is held at a time.
    """
    delimiter = b"--" + boundary
    reader = _Reader(body)
    values = []
    while reader.skip_past(delimiter):
        headers = reader.read_until((b"\r\n\r\n", b"\n\n"), _MAX_HEADERS)
        if headers is None:
            break
        disposition = _DISPOSITION.search(headers)
        if disposition is None:
            continue
        found = _NAME.search(disposition.group(1))
        if found is not None and (found.group(1) or found.group(2)) == name:
            # The delimiter stays: it starts the next part.
            value = reader.read_until((delimiter,), _MAX_VALUE, drop_marker=False)
            if value is None:  # longer than kept: its start is what counts
                value = reader.take(_MAX_VALUE)
            values.append(value.removesuffix(b"\n").removesuffix(b"\r"))
    return values


class _Reader:
    """A file read in pieces, searched across the pieces' edges."""

    def __init__(self, body: IO[bytes]) -> None:
        self._body = body
        self._buffer = b""
        self._ended = False

    def _more(self) -> bool:
        if self._ended:
            return False
        data = self._body.read(_CHUNK)
        if not data:
            self._ended = True
            return False
        self._buffer += data
        return True

    def skip_past(self, marker: bytes) -> bool:
        """Drop everything up to and including the next C{marker}."""
        while True:
            at = self._buffer.find(marker)
            if at >= 0:
                self._buffer = self._buffer[at + len(marker) :]
                return True
            # Keep what could be the start of a marker cut by the piece's end.
            self._buffer = self._buffer[-(len(marker) - 1) :]
            if not self._more():
                return False

    def read_until(
        self, markers: tuple[bytes, ...], limit: int, *, drop_marker: bool = True
    ) -> bytes | None:
        """
        What comes before the first of C{markers} (dropped, and the marker
        too unless not C{drop_marker}), if within C{limit} bytes; else
        L{None}, dropping nothing.
        """
        longest = max(len(m) for m in markers)
        while True:
            found = [(at, m) for m in markers if (at := self._buffer.find(m)) >= 0]
            if found:
                at, marker = min(found)
                if at > limit:
                    return None
                before = self._buffer[:at]
                self._buffer = self._buffer[at + len(marker) if drop_marker else at :]
                return before
            if len(self._buffer) > limit + longest or not self._more():
                return None

    def take(self, size: int) -> bytes:
        """The next C{size} bytes (fewer at the end), dropped."""
        while len(self._buffer) < size and self._more():
            pass
        taken, self._buffer = self._buffer[:size], self._buffer[size:]
        return taken
