"""
Finding one top-level member of a JSON object as the document streams past,
without keeping the document: only that member's own bytes are held.

The scan follows JSON's structure (strings and their escapes, nesting), so
a name inside a string or in a nested object (a client's C{metadata}, say)
is never taken for the top-level member.  Of a member named twice, the last
one counts, as for C{json.loads}.
"""

from __future__ import annotations

import json
import re
from typing import Any

# The rest of a string after its opening quote, up to (not including) its
# closing quote or a backslash that ends the data.
_STRING_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)
# Below the top level only brackets matter: whole strings and everything
# else are skipped in one match (a string cut by the end of the data stops
# the match at its opening quote).
_DEEP = re.compile(rb'(?:[^"\[\]{}]+|"[^"\\]*(?:\\.[^"\\]*)*")*', re.DOTALL)
# At the top level, the punctuation that separates members.
_TOP = re.compile(rb'["\[\]{},:]')
_QUOTE, _BACKSLASH, _COLON, _COMMA = 0x22, 0x5C, 0x3A, 0x2C
_OPENING = frozenset(b"[{")
_BLANK = b" \t\r\n\xef\xbb\xbf"  # JSON whitespace, and a UTF-8 byte order mark
_MAX_NAME = 64  # a name longer than this (escaped) is not the one looked for


class MemberScanner:
    """
    Reads a JSON document fed in pieces and keeps the raw value of the
    top-level member C{name}, up to C{max_value} bytes of it.
    """

    def __init__(self, name: str, max_value: int = 65_536) -> None:
        self._name = name
        self._max_value = max_value
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._expect_name = False
        self._member_name: bytearray | None = None  # a top-level name being read
        self._wanted = False  # the name just read is the one looked for
        self._value: bytearray | None = None  # its value, being read
        self._found: bytes | None = None
        #: The value was longer than C{max_value}: it could not be kept.
        self.overflowed = False
        #: The top-level object ended (what follows it is not read).
        self.complete = False
        #: The document is not a JSON object.
        self.not_object = False

    def value(self) -> Any:
        """
        The member's value, parsed; L{None} when it was not found (or
        could not be read whole).
        """
        if self._found is None:
            return None
        try:
            return json.loads(self._found)
        except ValueError:
            return None

    def feed(self, data: bytes) -> None:
        """Read the next piece of the document."""
        if self.complete or self.not_object:
            return
        i, n = 0, len(data)
        name_from = value_from = 0
        while i < n:
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                    i += 1
                    continue
                body = _STRING_BODY.match(data, i)
                assert body is not None  # (it matches the empty string)
                end = body.end()
                if end == n:
                    break
                if data[end] == _BACKSLASH:  # the last byte: the escape goes on
                    self._escaped = True
                    break
                self._in_string = False
                i = end + 1
                if self._member_name is not None:
                    self._member_name += data[name_from:end]
                    self._wanted = self._is_name(bytes(self._member_name))
                    self._member_name = None
                continue
            if self._depth >= 2:
                skipped = _DEEP.match(data, i)
                assert skipped is not None
                end = skipped.end()
                if end == n:
                    break
                char = data[end]
                i = end + 1
                if char == _QUOTE:
                    self._in_string = True
                elif char in _OPENING:
                    self._depth += 1
                else:
                    self._depth -= 1
                continue
            found = _TOP.search(data, i)
            if found is None:
                if self._depth == 0 and data[i:].strip(_BLANK):
                    self.not_object = True
                break
            at = found.start()
            char = data[at]
            i = at + 1
            if self._depth == 0:
                if char != ord("{") or data[:at].strip(_BLANK):
                    self.not_object = True
                    return
                self._depth = 1
                self._expect_name = True
            elif char == _QUOTE:
                self._in_string = True
                if self._expect_name:
                    self._member_name = bytearray()
                    self._wanted = False
                    name_from = i
            elif char == _COLON:
                self._expect_name = False
                if self._wanted:
                    self._wanted = False
                    self._value = bytearray()
                    self.overflowed = False
                    value_from = i
            elif char in _OPENING:
                self._depth = 2
            else:  # a comma, or the end of the object
                if self._value is not None:
                    self._value += data[value_from:at]
                    self._keep_value()
                if char == _COMMA:
                    self._expect_name = True
                else:
                    self._depth = 0
                    self.complete = True
                    return
        # The data ended inside a name or the value: keep their start.
        if self._member_name is not None:
            self._member_name += data[name_from:]
            if len(self._member_name) > _MAX_NAME:
                self._member_name = None  # not the name looked for
        if self._value is not None:
            self._value += data[value_from:]
            if len(self._value) > self._max_value:
                self._overflow()

    def _keep_value(self) -> None:
        assert self._value is not None
        if len(self._value) > self._max_value:
            self._overflow()
        else:
            self._found = bytes(self._value)
            self._value = None

    def _overflow(self) -> None:
        # Too long to keep: of the member, nothing can be read surely.
        self._value = None
        self._found = None
        self.overflowed = True

    def _is_name(self, raw: bytes) -> bool:
        if b"\\" not in raw:
            return raw == self._name.encode("utf-8")
        if len(raw) > _MAX_NAME:
            return False
        try:
            name: object = json.loads(b'"' + raw + b'"')
        except ValueError:
            return False
        return name == self._name
