"""
A small Redis client on Twisted: RESP2 over one pipelined, reconnecting
connection, for the few commands the proxy sends (server-side scripts by
their SHA-1, hashes, PING).

Hand-written rather than txredisapi because of what that costs per call on
the proxy's hot path (one admission script per request): txredisapi hashes
the whole script text on every C{eval}, encodes every argument through
several layers, arms a C{callLater} per command for its reply timeout, and
after every bulk string in a reply pauses the connection and parses the
rest one reactor turn later.  Measured on a loop of admissions and settles
against a local redis-server (CPython 3.11, one process, best of three on a
busy 2-core machine): txredisapi ~400 us of CPU per request (~360 us even
with EVALSHA and no reply timer), this client ~105 us, of which a bare
PING round trip through the reactor is ~35 us.

What this client promises:
 - commands are written in the order they are asked for, and replies are
   matched to them in that order (Redis answers a connection in order);
   commands asked for in one reactor turn leave in one write;
 - L{RedisClient.call} fails with L{RedisUnavailable} at once while not
   connected, so a request never waits for a connection;
 - a connection that sends nothing for C{timeout} seconds while a reply is
   due is closed, failing every pending call, and connected again;
 - the scripts given to the client are loaded when it connects and are then
   run by SHA-1 (C{EVALSHA}); if Redis forgot them (C{SCRIPT FLUSH}), the
   script is loaded again and the call sent once more (after whatever was
   sent meanwhile).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Union
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet import ssl
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import (
    Protocol,
    ReconnectingClientFactory,
    connectionDone,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger()

#: A decoded reply: bulk and status strings as bytes, integers, arrays,
#: L{None} for a null, or the L{RedisError} an error reply carried.
Reply = Union[bytes, int, list["Reply"], None, "RedisError"]
Arg = bytes | str | int


class RedisError(Exception):
    """An error reply from Redis (its text, e.g. C{"NOSCRIPT ..."})."""


class RedisUnavailable(Exception):
    """Not connected, the connection was lost, or a reply did not come in time."""


class LostReply(RedisError):
    """
    What a function waiting for a reply gets when the connection is lost:
    whether Redis carried the command out is unknown.
    """


#: The position L{parse} returns when the buffer ends inside the reply.
INCOMPLETE = -1
_CR_LF = b"\r\n"


def parse(buffer: bytes, pos: int = 0) -> tuple[Reply, int]:
    """
    The reply starting at C{pos} in C{buffer} and where the next one starts,
    or C{(None, INCOMPLETE)} when the buffer ends before the reply does.

    (A return value, not an exception: a reply split over reads is the
    usual case for a large one, and an exception's traceback would keep
    each partial buffer alive for as long as the exception lives.)

    @raise ValueError: the bytes are not RESP.
    """
    end = buffer.find(_CR_LF, pos)
    if end < 0:
        return None, INCOMPLETE
    kind = buffer[pos]
    if kind == 0x24:  # "$" bulk string
        size = int(buffer[pos + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buffer) < stop + 2:
            return None, INCOMPLETE
        return buffer[end + 2 : stop], stop + 2
    if kind == 0x3A:  # ":" integer
        return int(buffer[pos + 1 : end]), end + 2
    if kind == 0x2A:  # "*" array
        count = int(buffer[pos + 1 : end])
        pos = end + 2
        if count < 0:
            return None, pos
        items: list[Reply] = []
        for _ in range(count):
            item, pos = parse(buffer, pos)
            if pos == INCOMPLETE:
                return None, INCOMPLETE
            items.append(item)
        return items, pos
    if kind == 0x2B:  # "+" status
        return buffer[pos + 1 : end], end + 2
    if kind == 0x2D:  # "-" error
        return RedisError(buffer[pos + 1 : end].decode("utf-8", "replace")), end + 2
    raise ValueError(f"not a RESP reply: {buffer[pos : pos + 16]!r}")


def bulk(arg: Arg) -> bytes:
    """One argument of a command, as a RESP bulk string."""
    if isinstance(arg, str):
        arg = arg.encode("utf-8")
    elif isinstance(arg, int):
        arg = b"%d" % arg
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def encode(args: Sequence[Arg]) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    return b"*%d\r\n" % len(args) + b"".join([bulk(arg) for arg in args])


class Script:
    """A Lua script, run by its SHA-1 (C{EVALSHA}) once loaded."""

    def __init__(self, text: str) -> None:
        self.text = text.encode("utf-8")
        self.sha = hashlib.sha1(self.text).hexdigest().encode("ascii")

    def head(self, keys: Sequence[Arg], args: Sequence[Arg], more: int) -> bytes:
        """
        The encoded start of an C{EVALSHA} of this script with C{keys} and
        the first C{args}, to which exactly C{more} L{bulk} arguments are
        to be appended.  (A caller that runs the script often with mostly
        the same arguments encodes them once.)
        """
        parts: list[Arg] = [b"EVALSHA", self.sha, len(keys), *keys, *args]
        return b"*%d\r\n" % (len(parts) + more) + b"".join([bulk(a) for a in parts])


#: What waits for a reply: a Deferred, or a function taking the reply.
_Waiter = Union["Deferred[Reply]", Callable[[Reply], None]]


class _RedisProtocol(Protocol):
    def __init__(self, client: RedisClient) -> None:
        self._client = client
        self._buffer = b""
        self._waiting: deque[_Waiter] = deque()
        self._since = 0.0  # when the oldest awaited reply became due
        self.ready = False

    def connectionMade(self) -> None:
        client = self._client
        handshake: list[list[Arg]] = []
        if client.password is not None:
            auth: list[Arg] = ["AUTH", client.password]
            if client.username is not None:
                auth.insert(1, client.username)
            handshake.append(auth)
        if client.db:
            handshake.append(["SELECT", client.db])
        for script in client.scripts:
            handshake.append(["SCRIPT", "LOAD", script.text])
        if not handshake:
            # Up once Redis has answered (over TLS, once the certificate
            # verified), not when TCP connected.
            handshake.append(["PING"])
        for number, command in enumerate(handshake, 1):
            last = number == len(handshake)
            self.write(encode(command), self._handshake_step(command[0], last))

    def _handshake_step(self, name: Arg, last: bool) -> Callable[[Reply], None]:
        def step(reply: Reply) -> None:
            if isinstance(reply, LostReply):
                return  # connectionLost says why
            if isinstance(reply, RedisError):
                # The reply names no secret: Redis says WRONGPASS, NOAUTH, ...
                self._client._warn(f"Redis refused {name!s} on connecting: {reply}")
                self.transport.loseConnection()  # type: ignore[union-attr]
            elif last:
                self._up()

        return step

    def _up(self) -> None:
        self.ready = True
        # Back-off starts again only once a connection was of use: a Redis
        # that refuses our password is not asked again ten times a second.
        self._client._factory.resetDelay()
        self._client._connected(self)

    def write(self, data: bytes, waiter: _Waiter) -> None:
        if not self._waiting:
            self._since = self._client.reactor.seconds()
        self._waiting.append(waiter)
        self.transport.write(data)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        pos = 0
        waiting = self._waiting
        try:
            while pos < len(buffer):
                reply, end = parse(buffer, pos)
                if end == INCOMPLETE:
                    break
                pos = end
                waiter = waiting.popleft()
                if isinstance(waiter, Deferred):
                    waiter.callback(reply)
                else:
                    waiter(reply)
        except (ValueError, IndexError) as e:
            _log.error("Redis sent what is not a reply: {why}", why=str(e))
            self._buffer = b""
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._buffer = buffer[pos:]
        if waiting:
            self._since = self._client.reactor.seconds()

    @property
    def awaiting(self) -> bool:
        """Whether a reply is due."""
        return bool(self._waiting)

    def overdue(self, now: float, timeout: float) -> bool:
        return bool(self._waiting) and now - self._since > timeout

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.ready:
            # Lost during the handshake: a TLS certificate that does not
            # verify, say.  Say why, once per outage.
            self._client._failed(reason)
        self.ready = False
        self._client._lost(self)
        waiting, self._waiting = self._waiting, deque()
        lost = RedisUnavailable("the connection to Redis was lost")
        for waiter in waiting:
            if isinstance(waiter, Deferred):
                waiter.errback(lost)
            else:
                waiter(LostReply(str(lost)))


class _Factory(ReconnectingClientFactory):
    noisy = False
    initialDelay = 0.1
    maxDelay = 5

    def __init__(self, client: RedisClient) -> None:
        self._client = client

    def buildProtocol(self, addr: Any) -> _RedisProtocol:
        protocol = _RedisProtocol(self._client)
        self._client._current = protocol
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self._client._failed(reason)
        super().clientConnectionFailed(connector, reason)


class RedisClient:
    """
    One connection to the Redis of a C{REDIS_URL} (C{redis://}, C{rediss://}
    or C{unix://}), kept open (reconnecting with a back-off up to 5 s) from
    L{start} to L{stop}.

    @param scripts: loaded on every connection, then run with L{evalsha}.
    @param timeout: seconds to connect, and to wait for a reply.
    """

    def __init__(
        self,
        url: str,
        reactor: Any,
        *,
        scripts: Sequence[Script] = (),
        timeout: float = 2.0,
    ) -> None:
        parts = urlsplit(url)
        self.reactor = reactor
        self.scripts = tuple(scripts)
        self.timeout = timeout
        self.password = unquote(parts.password) if parts.password else None
        self.username = unquote(parts.username) if parts.username else None
        self._scheme = parts.scheme
        if parts.scheme == "unix":
            self._path = parts.path
            self.db = int(parse_qs(parts.query).get("db", ["0"])[0])
        else:
            self._host = parts.hostname or "localhost"
            self._port = parts.port or 6379
            self.db = int(parts.path.strip("/") or 0)
        self._factory = _Factory(self)
        self._protocol: _RedisProtocol | None = None
        self._current: _RedisProtocol | None = None  # ready or not
        self._up_waiters: list[Deferred[None]] = []
        self._gone: Deferred[None] | None = None
        self._watchdog = LoopingCall(self._check_replies)
        self._watchdog.clock = reactor
        self._warned = False

    # Lifecycle

    def start(self) -> None:
        """Connect (in the background: Redis may come up later)."""
        self._watchdog.start(max(self.timeout / 4, 0.05), now=False)
        self._connect()

    def _connect(self) -> None:
        factory, timeout = self._factory, self.timeout
        if self._scheme == "unix":
            self.reactor.connectUNIX(self._path, factory, timeout=timeout)
        elif self._scheme == "rediss":
            options = ssl.optionsForClientTLS(self._host)
            self.reactor.connectSSL(
                self._host, self._port, factory, options, timeout=timeout
            )
        else:
            self.reactor.connectTCP(self._host, self._port, factory, timeout=timeout)

    async def stop(self) -> None:
        """
        Stop reconnecting and close the connection, once the replies due
        on it have come (within the reply timeout): commands sent just
        before, such as the settles of requests cut at shutdown, are then
        known to be carried out, not reported lost.
        """
        protocol = self._protocol
        if protocol is not None and protocol.awaiting:
            try:
                # Answered after everything sent before it; the watchdog,
                # still running, bounds the wait.
                await self.call("PING")
            except Exception:
                pass  # lost meanwhile: what waited was told so
        if self._watchdog.running:
            self._watchdog.stop()
        self._factory.stopTrying()
        connection = self._current
        if connection is not None and connection.transport is not None:
            self._gone = Deferred()
            connection.transport.loseConnection()
            await self._gone

    @property
    def up(self) -> bool:
        """Whether a connection is open and ready for commands."""
        return self._protocol is not None

    def when_up(self) -> Deferred[None]:
        """Fires once a connection is ready (at once when one is)."""
        if self._protocol is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._up_waiters.append(d)
        return d

    def _connected(self, protocol: _RedisProtocol) -> None:
        self._protocol = protocol
        # Once per connection (they are few): says when limits are shared.
        _log.info("Redis {state}", state="back" if self._warned else "connected")
        self._warned = False
        waiters, self._up_waiters = self._up_waiters, []
        for d in waiters:
            d.callback(None)

    def _lost(self, protocol: _RedisProtocol) -> None:
        if self._current is protocol:
            self._current = None
        if self._protocol is protocol:
            self._protocol = None
            if self._gone is None:
                self._warn("Redis connection lost")
        if self._gone is not None:
            gone, self._gone = self._gone, None
            gone.callback(None)

    def _failed(self, reason: Failure) -> None:
        self._warn(f"cannot connect to Redis: {reason.getErrorMessage()}")

    def _warn(self, message: str) -> None:
        # Once per outage, not at every reconnection attempt.  (Not a field
        # named "message": Twisted's legacy observers overwrite that one.)
        if not self._warned:
            self._warned = True
            _log.warn("{why}", why=message)

    def _check_replies(self) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.overdue(
            self.reactor.seconds(), self.timeout
        ):
            _log.warn(
                "no reply from Redis in {timeout} s: reconnecting",
                timeout=self.timeout,
            )
            protocol.transport.abortConnection()  # type: ignore[union-attr]

    # Commands

    def call(self, *args: Arg) -> Deferred[Reply]:
        """
        Send a command; fire with its reply.

        @raise: (in the Deferred) L{RedisError} for an error reply,
            L{RedisUnavailable} when not connected or the connection fails.
        """
        protocol = self._protocol
        if protocol is None:
            return fail(RedisUnavailable("Redis is not connected"))
        d: Deferred[Reply] = Deferred()
        protocol.write(encode(args), d)
        d.addCallback(_raise_error)
        return d

    def evalsha(
        self, script: Script, command: bytes, on_reply: Callable[[Reply], None]
    ) -> bool:
        """
        Send C{command} (an C{EVALSHA} of C{script}, made with
        L{Script.head}) and call C{on_reply} with its reply: a L{RedisError}
        for an error reply or a lost connection.  If Redis forgot the script
        (C{SCRIPT FLUSH}, a restart) it is loaded again and the command sent
        once more.  Returns False, sending nothing, when not connected.
        """
        protocol = self._protocol
        if protocol is None:
            return False

        def reply(value: Reply) -> None:
            if isinstance(value, RedisError) and str(value).startswith("NOSCRIPT"):
                again = self._protocol
                if again is not None:
                    # In order on one connection: loaded before it runs.
                    again.write(encode([b"SCRIPT", b"LOAD", script.text]), _ignore)
                    again.write(command, on_reply)
                    return
            on_reply(value)

        protocol.write(command, reply)
        return True


def _ignore(reply: Reply) -> None:
    pass


def _raise_error(reply: Reply) -> Reply:
    if isinstance(reply, RedisError):
        raise reply
    return reply
