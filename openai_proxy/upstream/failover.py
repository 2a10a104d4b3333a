"""
Server-held upstream keys that fail over: a pool handing keys out in turn,
skipping benched ones, the rule deciding when an upstream answer makes a
request try the next key, and request bodies that can be sent again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import IO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.server import Request

from openai_proxy.upstream.relay import BytesProducer

#: Upstream statuses after which a request is tried once more on another key.
_RETRIED = frozenset({401, 403, 429})


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


class _SpoolReader:
    """
    A reader of twisted.web's spool file with a position of its own (read
    with C{os.pread}): several producers can send the same body at once,
    none moving another's place, and none closes the file.
    """

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._position = 0
        self._closed = False

    def _fd(self) -> int:
        # Asked each time: once twisted.web has closed the file (the client
        # left), this raises instead of reading whatever took its number.
        return self._f.fileno()

    def read(self, size: int = -1) -> bytes:
        if self._closed:
            return b""
        fd = self._fd()
        if size < 0:
            size = max(os.fstat(fd).st_size - self._position, 0)
        data = os.pread(fd, size, self._position)
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._position
        elif whence == os.SEEK_END:
            offset += os.fstat(self._fd()).st_size
        self._position = offset
        return offset

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        self._closed = True


class _Replay(FileBodyProducer):
    """
    A spooled request body, sent from a position of its own in the spool
    file; L{abandon} stops it should the upstream answer before it is sent.
    """

    _consumer: object = None
    _sent = False

    def __init__(self, spool: IO[bytes]) -> None:
        super().__init__(_SpoolReader(spool))

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        d: Deferred[None] = super().startProducing(consumer)
        return d.addCallback(self._done)

    def _done(self, result: None) -> None:
        self._sent = True
        return result

    def abandon(self) -> None:
        """
        Stop sending, if the body is still being sent, and close the
        connection it goes on.  Merely stopped, the producer would stay
        registered with that connection, which would then never close.
        """
        if self._consumer is None or self._sent:
            return
        # Twisted hands a body with a length to a LengthEnforcingConsumer
        # wrapping the connection (tests/test_failover.py pins this).  Not
        # found, the body is left to be sent: it reads from its own position.
        transport = getattr(self._consumer, "_consumer", None)
        if transport is None or not hasattr(transport, "abortConnection"):
            return
        self.stopProducing()
        transport.abortConnection()


def replayable(request: Request, body: IBodyProducer | None) -> IBodyProducer | None:
    """
    A producer of the same request body that can be sent again, even while
    an earlier one is still sending it: one already in memory is; one read
    from twisted.web's spool file is made anew, reading from the start of
    the file at a position of its own, and does not close the file.
    """
    content = request.content
    if isinstance(body, FileBodyProducer) and content is not None:
        if isinstance(content, BytesIO):  # (not spooled after all)
            return BytesProducer(content.getvalue())
        return _Replay(content)
    return body


def abandon(body: IBodyProducer | None) -> None:
    """
    Stop an earlier attempt at sending C{body} (from L{replayable}) if the
    upstream answered before it was all sent, closing its connection.
    """
    if isinstance(body, _Replay):
        body.abandon()
