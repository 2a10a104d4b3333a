"""
Server-held upstream keys that fail over: a pool handing keys out in turn,
skipping benched ones, and the rule deciding when an upstream answer makes a
request try the next key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.server import Request
from zope.interface import implementer

#: Upstream statuses after which a request is tried once more on another key.
_RETRIED = frozenset({401, 403, 429})
#: Error bodies larger than this are not read whole (only their start).
_ERROR_BODY_LIMIT = 65536


class KeyPool:
    """
    The server-held upstream keys, handed out in turn (round robin).  A
    benched key is skipped until its bench time is over; when every key is
    benched, the one free soonest is handed out.

    @ivar on_bench: called with (index, seconds) each time a key is benched,
        e.g. to share the bench through Redis.
    """

    def __init__(
        self, keys: Sequence[str], clock: Callable[[], float] = time.time
    ) -> None:
        self.keys = tuple(keys)
        self._clock = clock
        self._next = 0
        self._benched_until = [0.0] * len(self.keys)
        self.on_bench: Callable[[int, float], None] | None = None

    def pick(self) -> int:
        """The index of the next key to use."""
        count = len(self.keys)
        now = self._clock()
        start = self._next
        for step in range(count):
            index = (start + step) % count
            if self._benched_until[index] <= now:
                self._next = (index + 1) % count
                return index
        self._next = (start + 1) % count
        return min(range(count), key=lambda i: self._benched_until[i])

    def other(self, index: int) -> int | None:
        """The next key after C{index} that is not benched, or L{None}."""
        now = self._clock()
        count = len(self.keys)
        for step in range(1, count):
            candidate = (index + step) % count
            if self._benched_until[candidate] <= now:
                return candidate
        return None

    def bench(self, index: int, seconds: float) -> None:
        """Skip key C{index} for C{seconds} from now."""
        self.bench_until(index, self._clock() + seconds)
        if self.on_bench is not None:
            self.on_bench(index, seconds)

    def bench_until(self, index: int, until: float) -> None:
        """Skip key C{index} until the time C{until} (for shared bench state)."""
        if 0 <= index < len(self._benched_until):
            self._benched_until[index] = max(self._benched_until[index], until)

    def bench_ends(self) -> tuple[float, ...]:
        """When each key's bench ends, by index (in the past: not benched)."""
        return tuple(self._benched_until)

    def benched(self, index: int) -> bool:
        """Whether key C{index} is benched now."""
        return self._benched_until[index] > self._clock()


@dataclass(frozen=True)
class Verdict:
    """What one upstream answer means for its key."""

    retry: bool
    bench_seconds: float | None


def judge(status: int, headers: Headers, body: bytes, cooldown: float) -> Verdict:
    """
    Decide whether an upstream answer (before any byte reached the client)
    is worth a retry on another key, and for how long its key is benched:
    C{cooldown} after 401/403 or C{insufficient_quota}, a 429's
    C{retry-after} for that long.
    """
    if status not in _RETRIED and status < 500:
        return Verdict(False, None)
    if status in (401, 403) or _error_code(body) == "insufficient_quota":
        return Verdict(True, cooldown)
    if status == 429:
        return Verdict(True, _retry_after(headers))
    return Verdict(True, None)


def might_retry(status: int) -> bool:
    """Whether an answer with this status may make the request try another key."""
    return status in _RETRIED or status >= 500


def _error_code(body: bytes) -> str | None:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        return code if isinstance(code, str) else None
    return None


def _retry_after(headers: Headers) -> float | None:
    for name, scale in ((b"retry-after-ms", 0.001), (b"retry-after", 1.0)):
        values = headers.getRawHeaders(name)
        if values:
            try:
                seconds = float(values[0]) * scale
            except ValueError:
                continue
            if seconds > 0:
                return seconds
    return None


_DONE = Failure(ResponseDone())


class _Collect(Protocol):
    def __init__(self, limit: int) -> None:
        self.chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self._size < self._limit:
            self.chunks.append(data)
            self._size += len(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.done.callback(b"".join(self.chunks))


def read_error_body(response: IResponse) -> Deferred[bytes]:
    """Read an upstream error answer's body (its start, when it is large)."""
    collect = _Collect(_ERROR_BODY_LIMIT)
    response.deliverBody(collect)
    return collect.done


@implementer(IResponse)
class ReadResponse:
    """
    An upstream answer whose body was already read (to judge it), handed on
    as a response that delivers that body again.
    """

    def __init__(self, original: IResponse, body: bytes) -> None:
        self.version = original.version
        self.code = original.code
        self.phrase = original.phrase
        self.headers = original.headers
        self.length = len(body)
        self.request = original.request
        self.previousResponse = original.previousResponse
        self.body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(_Finished())
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(_DONE)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response


class _Finished:
    """The producer of a body already in memory: nothing to pause or stop."""

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass


class _KeepOpen:
    """A spooled request body that C{FileBodyProducer} may not close."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._f.read(size)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        position: int = self._f.seek(offset, whence)
        return position

    def tell(self) -> int:
        position: int = self._f.tell()
        return position

    def close(self) -> None:
        pass


def replayable(request: Request, body: IBodyProducer | None) -> IBodyProducer | None:
    """
    A producer of the same request body that can be sent again: one already
    in memory is; one read from twisted.web's spool file is made anew from
    the start of the file, which it does not close.
    """
    if isinstance(body, FileBodyProducer) and request.content is not None:
        request.content.seek(0)
        return FileBodyProducer(_KeepOpen(request.content))
    return body
