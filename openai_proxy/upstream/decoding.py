"""
Decoding a compressed upstream body the proxy must read (to moderate it),
strictly and within a size limit.

Twisted's C{GzipDecoder} neither notices a corrupt or truncated stream (the
client would get a clean, short body) nor bounds what a small body may
inflate to.  L{Decoder} does both; L{DecodedResponse} applies it to a
response's body as it is delivered.
"""

from __future__ import annotations

import zlib
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

#: The decoded bytes handed on at a time: an inflated piece is never larger.
PIECE = 65536

_GZIP_MAGIC = b"\x1f\x8b"
#: C{Content-Encoding} values L{Decoder} reads, and their zlib C{wbits}.
ENCODINGS = {b"gzip": 31, b"x-gzip": 31, b"deflate": 15}


class DecodeError(Exception):
    """The body is corrupt, truncated, or decodes to more than the limit."""


class Decoder:
    """
    Decode one C{gzip} (members may follow each other) or C{deflate} (zlib)
    body fed in pieces.  L{feed} returns the decoded pieces, each at most
    L{PIECE} bytes; L{finish} says the body ended.  Both raise
    L{DecodeError} when the data is corrupt, when the decoded size passes
    C{limit}, or (L{finish}) when the stream stopped before its end; after
    that the decoder takes nothing more.
    """

    def __init__(self, encoding: bytes, limit: int) -> None:
        wbits = ENCODINGS.get(encoding.strip().lower())
        if wbits is None:
            raise DecodeError(f"unsupported content encoding {encoding!r}")
        self._wbits = wbits
        self._limit = limit
        self._inflater = zlib.decompressobj(wbits)
        self._size = 0
        self._started = False  # a member has begun (gzip members may follow)
        self._failed = False

    def feed(self, data: bytes) -> list[bytes]:
        """Decode C{data}; return what it decodes to, in pieces."""
        if self._failed:
            raise DecodeError("the body already failed to decode")
        out: list[bytes] = []
        try:
            self._inflate(data, out)
        except (zlib.error, DecodeError) as e:
            self._failed = True
            if isinstance(e, DecodeError):
                raise
            raise DecodeError(f"corrupt compressed body: {e}") from None
        return out

    def finish(self) -> None:
        """The body ended: fail unless the stream ended properly."""
        if self._failed:
            raise DecodeError("the body already failed to decode")
        if self._started and not self._inflater.eof:
            self._failed = True
            raise DecodeError("truncated compressed body")
        if not self._started:
            self._failed = True
            raise DecodeError("empty compressed body")

    def _inflate(self, data: bytes, out: list[bytes]) -> None:
        while data:
            if self._inflater.eof:
                # Another gzip member may follow; anything else is garbage.
                if self._wbits != 31 or not _could_be_member(data):
                    raise DecodeError("data after the end of the compressed body")
                self._inflater = zlib.decompressobj(self._wbits)
            self._started = True
            piece = self._inflater.decompress(data, PIECE)
            self._size += len(piece)
            if self._size > self._limit:
                raise DecodeError(f"the body decodes to more than {self._limit} bytes")
            if piece:
                out.append(piece)
            if self._inflater.eof:
                data = self._inflater.unused_data
            else:
                data = self._inflater.unconsumed_tail


def _could_be_member(data: bytes) -> bool:
    # Only a prefix may have arrived: a lone 0x1f could still be a member.
    return (
        _GZIP_MAGIC.startswith(data[:2]) if len(data) < 2 else data[:2] == _GZIP_MAGIC
    )


_DONE = Failure(ResponseDone())


class _Decoding(Protocol):
    """Decodes a body on its way to C{inner}; a failure ends it with L{DecodeError}."""

    def __init__(self, inner: Protocol, decoder: Decoder) -> None:
        self._inner = inner
        self._decoder = decoder
        self._error: DecodeError | None = None

    def makeConnection(self, transport: Any) -> None:
        Protocol.makeConnection(self, transport)
        self._inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        try:
            pieces = self._decoder.feed(data)
        except DecodeError as e:
            self._fail(e)
            return
        for piece in pieces:
            self._inner.dataReceived(piece)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self._error is None and reason.check(ResponseDone, PotentialDataLoss):
            try:
                self._decoder.finish()
            except DecodeError as e:
                self._error = e
        if self._error is not None:
            reason = Failure(self._error)
        self._inner.connectionLost(reason)

    def _fail(self, error: DecodeError) -> None:
        self._error = error
        # Nothing more of this body is of use: close the upstream connection
        # (connectionLost then reports the error).
        producer: Any = self.transport
        if producer is not None:
            producer.stopProducing()


@implementer(IResponse)
class DecodedResponse:
    """
    C{response} with its body decoded by a L{Decoder} as it is delivered:
    the protocol given to L{deliverBody} gets decoded bytes, and its
    C{connectionLost} a L{DecodeError} failure when decoding failed.  Its
    C{headers} lose C{Content-Encoding} and its length is unknown.
    """

    def __init__(self, response: IResponse, encoding: bytes, limit: int) -> None:
        self._response = response
        self._decoder = Decoder(encoding, limit)
        self.version = response.version
        self.code = response.code
        self.phrase = response.phrase
        self.headers = response.headers.copy()
        self.headers.removeHeader(b"content-encoding")
        self.length: Any = UNKNOWN_LENGTH
        self.request = response.request
        self.previousResponse = response.previousResponse

    def deliverBody(self, protocol: Any) -> None:
        self._response.deliverBody(_Decoding(protocol, self._decoder))

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response
