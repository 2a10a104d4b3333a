"""
Reading a C{multipart/form-data} request body (an audio upload's C{model},
a file upload's C{purpose} and file) as RFC 7578 and RFC 2046 define it,
from the body twisted.web already holds (in memory, or spooled to a file)
in pieces: an uploaded file is never held in memory whole.

What is read here decides what a restricted key may reach, so the reading
is strict: a form that parsers could read differently (a bare-LF line end
next to a delimiter, a part's headers over 8 KiB, a parameter given twice,
an encoded field, a truncated body) raises L{FormError}, for the caller to
refuse rather than forward unchecked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import IO

_CHUNK = 65_536
_MAX_HEADERS = 8_192  # bytes of one part's headers
_MAX_VALUE = 1_024  # bytes of a field read by form_fields
_MAX_PADDING = 1_024  # whitespace allowed after a delimiter (RFC 2046 LWSP)
_MAX_BOUNDARY = 200  # RFC 2046 says 70; some clients send more
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# One "; name=value" parameter; a quoted value may hold escapes, refused later.
_PARAM = re.compile(
    rb"[ \t]*;[ \t]*("
    + _TOKEN
    + rb')[ \t]*=[ \t]*(?:"((?:[^"\\\r\n]|\\.)*)"|([^;\s"]*))'
)
_TRAILER = re.compile(rb"[ \t]*;?[ \t]*")
_IDENTITY_ENCODINGS = (b"7bit", b"8bit", b"binary")
# Parameters whose quoted value must hold no escape: parsers unescape them
# differently (a file name may: old browsers send Windows paths).
_PLAIN = (b"name", b"boundary")


class FormError(ValueError):
    """The form cannot be read surely; the message says why."""


@dataclass(frozen=True)
class Part:
    """One part of a form: its field name, and file name if it has one."""

    name: str
    filename: str | None


#: Told of each part as its headers are read; returns what takes the part's
#: content, piece by piece (L{None}: the content is skipped).
OnPart = Callable[[Part], "Callable[[bytes], None] | None"]


def boundary_of(content_type: bytes) -> bytes | None:
    """
    The boundary of a C{multipart/*} content type, or L{None} when the type
    is not multipart.

    @raise FormError: a multipart type without exactly one readable
        C{boundary} parameter.
    """
    mtype, _, rest = content_type.partition(b";")
    if not mtype.strip().lower().startswith(b"multipart/"):
        return None
    found = [value for name, value in _params(b";" + rest) if name == b"boundary"]
    if len(found) != 1:
        raise FormError("the Content-Type must name exactly one boundary")
    boundary = found[0]
    if (
        not 0 < len(boundary) <= _MAX_BOUNDARY
        or boundary.endswith(b" ")
        or any(byte < 0x20 or byte > 0x7E for byte in boundary)
    ):
        raise FormError("the form's boundary is not a valid one")
    return boundary


def _params(text: bytes) -> list[tuple[bytes, bytes]]:
    # Every "; name=value" of a header value, names lower-cased; anything
    # that is not one (a stray word, an RFC 2231 "name*") makes it unreadable.
    params = []
    at = 0
    while True:
        match = _PARAM.match(text, at)
        if match is None:
            break
        name = match.group(1).lower()
        quoted = match.group(2)
        if quoted is not None and b"\\" in quoted and name in _PLAIN:
            raise FormError(f"the parameter {name.decode()!r} holds an escape")
        params.append((name, quoted if quoted is not None else match.group(3)))
        at = match.end()
    trailer = _TRAILER.match(text, at)
    if trailer is None or trailer.end() != len(text):
        raise FormError("a header's parameters cannot be read")
    names = [name for name, _ in params]
    if len(set(names)) != len(names):
        raise FormError("a header names the same parameter twice")
    if any(name.endswith(b"*") or b"*" in name for name in names):
        raise FormError("a header uses RFC 2231 parameters")
    return params


def read_form(body: IO[bytes], boundary: bytes, on_part: OnPart) -> None:
    """
    Read the multipart C{body} (from where it stands) to its closing
    delimiter, telling C{on_part} of each part and handing its content to
    what C{on_part} returns.  At most a piece of 64 KiB plus one part's
    headers is held at a time.

    @raise FormError: the form cannot be read surely.
    """
    _FormReader(body, boundary, on_part).run()


def form_fields(
    body: IO[bytes], boundary: bytes, names: Collection[str]
) -> dict[str, list[bytes]]:
    """
    The values of every part whose name is one of C{names}, in order (the
    upstream may take the first or the last).  Names are compared with
    surrounding whitespace removed.

    @raise FormError: the form cannot be read surely, or one of those
        values is over 1 KiB or holds a line break.
    """
    found: dict[str, list[bytes]] = {}

    def on_part(part: Part) -> Callable[[bytes], None] | None:
        name = part.name.strip()
        if name not in names:
            return None
        pieces: list[bytes] = []
        found.setdefault(name, []).append(b"")
        values = found[name]
        at = len(values) - 1

        def take(data: bytes) -> None:
            pieces.append(data)
            values[at] = b"".join(pieces)
            if len(values[at]) > _MAX_VALUE:
                raise FormError(f"the form's {name!r} field is too long")

        return take

    read_form(body, boundary, on_part)
    for name, values in found.items():
        # A short text field (a model's name, a purpose) never holds a line
        # break, and parsers differ on them (the standard library's MIME
        # parser reads a value of one CRLF as empty, of two as one).
        if any(b"\r" in value or b"\n" in value for value in values):
            raise FormError(f"the form's {name!r} field holds a line break")
    return found


class _FormReader:
    """The state of one L{read_form}."""

    def __init__(self, body: IO[bytes], boundary: bytes, on_part: OnPart) -> None:
        self._body = body
        self._dash = b"--" + boundary
        # A line start before every delimiter: the body's start is one too.
        self._marker = b"\n" + self._dash
        self._on_part = on_part
        self._buffer = b"\r\n"
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

    def run(self) -> None:
        if not self._next_delimiter(None):
            raise FormError("the body holds no part of the form")
        while True:
            part = self._headers()
            while len(self._buffer) < len(self._dash) and self._more():
                pass
            if self._buffer.startswith(self._dash):
                # Only a parser taking the headers' last CRLF for the
                # delimiter's would see a delimiter here.
                raise FormError("a part's content starts with the boundary")
            if not self._next_delimiter(self._on_part(part)):
                self._epilogue()
                return

    def _epilogue(self) -> None:
        # What follows the closing delimiter is ignored, unless a parser
        # reading on could find another part there.
        while True:
            if self._marker in self._buffer:
                raise FormError("the form goes on after its closing delimiter")
            self._buffer = self._buffer[-len(self._marker) :]
            if not self._more():
                return

    def _next_delimiter(self, sink: Callable[[bytes], None] | None) -> bool:
        """
        Pass the content before the next delimiter to C{sink} and drop it
        with the delimiter; return whether a part follows (else the form
        closed).
        """
        search_from = 0
        while True:
            at = self._buffer.find(self._marker, search_from)
            if at < 0:
                # Keep what could start a delimiter cut by the piece's end,
                # and the CR that may come before it.
                keep = len(self._marker)
                if sink is not None and len(self._buffer) > keep:
                    sink(self._buffer[:-keep])
                self._buffer = self._buffer[-keep:]
                search_from = 0
                if not self._more():
                    raise FormError("the form ends before its closing delimiter")
                continue
            kind, end = self._after_delimiter(at + len(self._marker))
            if kind == "more":
                if not self._more():
                    raise FormError("the form ends inside a delimiter")
                continue
            if kind == "content":
                search_from = at + 1
                continue
            if at == 0 or self._buffer[at - 1 : at] != b"\r" or kind == "lf":
                raise FormError("a delimiter line ends with a bare LF")
            if sink is not None and at > 1:
                sink(self._buffer[: at - 1])
            self._buffer = self._buffer[end:]
            return kind == "part"

    def _after_delimiter(self, at: int) -> tuple[str, int]:
        # What follows "--boundary" at a line start: "--" closes the form,
        # optional whitespace and CRLF starts a part; anything else (such as
        # "--boundaryjunk") is content.
        buffer = self._buffer
        if len(buffer) < at + 2:
            return ("more", 0) if not self._ended else ("content", 0)
        if buffer[at : at + 2] == b"--":
            return "close", at + 2
        end = at
        while end < len(buffer) and buffer[end] in b" \t":
            end += 1
        if end - at > _MAX_PADDING:
            raise FormError("too much whitespace after a delimiter")
        if len(buffer) < end + 2 and not self._ended:
            return "more", 0
        if buffer[end : end + 2] == b"\r\n":
            return "part", end + 2
        if buffer[end : end + 1] == b"\n":
            return "lf", end + 1
        return "content", 0

    def _headers(self) -> Part:
        while True:
            if self._buffer.startswith(b"\r\n"):
                block, self._buffer = b"", self._buffer[2:]
                break
            at = self._buffer.find(b"\r\n\r\n")
            if 0 <= at <= _MAX_HEADERS:
                block, self._buffer = self._buffer[:at], self._buffer[at + 4 :]
                break
            if len(self._buffer) > _MAX_HEADERS + 4:
                raise FormError("a part's headers are over 8 KiB")
            if not self._more():
                raise FormError("the form ends inside a part's headers")
        return _part(block)


def _part(block: bytes) -> Part:
    if b"\n" in block.replace(b"\r\n", b"") or b"\r" in block.replace(b"\r\n", b""):
        raise FormError("a part's headers hold a bare CR or LF")
    dispositions = []
    for line in block.split(b"\r\n") if block else []:
        if line[:1] in (b" ", b"\t"):
            raise FormError("a part's headers are folded")
        name, colon, value = line.partition(b":")
        if not colon or not re.fullmatch(_TOKEN, name):
            raise FormError("a part's header line cannot be read")
        name = name.lower()
        if name == b"content-disposition":
            dispositions.append(value.strip())
        elif name == b"content-transfer-encoding":
            if value.strip().lower() not in _IDENTITY_ENCODINGS:
                raise FormError("a part is sent with a Content-Transfer-Encoding")
    if len(dispositions) != 1:
        raise FormError("a part needs exactly one Content-Disposition")
    kind, _, rest = dispositions[0].partition(b";")
    if kind.strip().lower() != b"form-data":
        raise FormError("a part is not form-data")
    params = dict(_params(b";" + rest))
    field = params.get(b"name")
    if field is None:
        raise FormError("a part has no name")
    filename = params.get(b"filename")
    return Part(
        field.decode("utf-8", "surrogateescape"),
        None if filename is None else filename.decode("utf-8", "surrogateescape"),
    )
