"""
One text field of a C{multipart/form-data} request body (an audio upload's
C{model}), found in the body twisted.web already holds (in memory, or
spooled to a file) by reading it in pieces: the uploaded file itself is
never held in memory whole, wherever the field comes.
"""

from __future__ import annotations

import re
from typing import IO

_CHUNK = 65_536
_MAX_HEADERS = 8_192  # bytes of one part's headers
_MAX_VALUE = 1_024  # bytes of the field's value
_BOUNDARY = re.compile(rb'boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))', re.I)
_DISPOSITION = re.compile(rb"^content-disposition:(.*)$", re.I | re.M)
# "name=" at the start of a parameter, so "filename=" does not match.
_NAME = re.compile(rb'(?:^|;)\s*name="([^"]*)"', re.I)


def boundary_of(content_type: bytes) -> bytes | None:
    """The boundary of a C{multipart/form-data} content type, or L{None}."""
    if not content_type.lower().startswith(b"multipart/form-data"):
        return None
    match = _BOUNDARY.search(content_type)
    if match is None:
        return None
    return match.group(1) or match.group(2)


def form_field(body: IO[bytes], boundary: bytes, name: bytes) -> bytes | None:
    """
    The value of the first part named C{name} in the multipart C{body}
    (read from where it stands), or L{None} when there is none, or the body
    is not well-formed enough to tell.  At most a piece of C{64 KiB} plus
    one part's headers is held at a time.
    """
    delimiter = b"--" + boundary
    reader = _Reader(body)
    while reader.skip_past(delimiter):
        headers = reader.read_until(b"\r\n\r\n", _MAX_HEADERS)
        if headers is None:
            return None
        disposition = _DISPOSITION.search(headers)
        if disposition is None:
            continue
        found = _NAME.search(disposition.group(1))
        if found is not None and found.group(1) == name:
            return reader.read_until(b"\r\n" + delimiter, _MAX_VALUE)
    return None


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

    def read_until(self, marker: bytes, limit: int) -> bytes | None:
        """What comes before the next C{marker}, if within C{limit} bytes."""
        while True:
            at = self._buffer.find(marker)
            if at >= 0:
                if at > limit:
                    return None
                found = self._buffer[:at]
                self._buffer = self._buffer[at + len(marker) :]
                return found
            if len(self._buffer) > limit + len(marker) or not self._more():
                return None
