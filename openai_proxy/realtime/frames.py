"""
Writing WebSocket frames (RFC 6455 section 5.2).

Reading is wsproto's; writing is done here because wsproto only writes a
text message from a C{str}, and the relay holds every message as the bytes
it received: encoding them again per message would cost more than the frame.
"""

from __future__ import annotations

import os
import struct
from typing import Final

from wsproto.frame_protocol import XorMaskerSimple

TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA

#: Close codes that name a state and must never be sent in a close frame
#: (1005 no code, 1006 dropped, 1015 TLS failure), and the reserved 1004.
_NOT_SENDABLE: Final = frozenset({1004, 1005, 1006, 1015})
_MAX_REASON: Final = 123  # a control frame's payload is at most 125 bytes

_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """
    One final frame carrying C{payload}; C{mask} for a frame a client sends
    (the masking key then comes from C{os.urandom}, as the RFC asks).
    """
    size = len(payload)
    first = 0x80 | opcode
    bit = 0x80 if mask else 0
    if size < 126:
        head = _SHORT.pack(first, bit | size)
    elif size < 65536:
        head = _MEDIUM.pack(first, bit | 126, size)
    else:
        head = _LONG.pack(first, bit | 127, size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(XorMaskerSimple(key).process(bytearray(payload)))


def sendable(code: int | None) -> int | None:
    """
    The code to put in a close frame for a session that ended with C{code}:
    L{None} (a close without a code) for the codes that must not be sent.
    """
    if code is None or code in _NOT_SENDABLE or not 1000 <= code <= 4999:
        return None
    return code


def close_frame(code: int | None, reason: str, *, mask: bool) -> bytes:
    """A close frame with C{code} (none if L{None}) and C{reason}, cut to fit."""
    code = sendable(code)
    if code is None:
        return frame(CLOSE, b"", mask=mask)
    encoded = reason.encode("utf-8")
    if len(encoded) > _MAX_REASON:
        # Cut on a character boundary: a close reason must be valid UTF-8.
        encoded = encoded[:_MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
    return frame(CLOSE, struct.pack("!H", code) + encoded, mask=mask)
