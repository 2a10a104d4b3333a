"""A real redis-server for one test: loopback, a free port, no persistence."""

from __future__ import annotations

import shutil
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

REDIS_SERVER = shutil.which("redis-server")
SKIP = (
    None
    if REDIS_SERVER
    else "redis-server is not installed (apt-get install redis-server)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Watch(ProcessProtocol):
    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._seen = b""

    def outReceived(self, data: bytes) -> None:
        self._seen += data
        if not self.ready.called and b"Ready to accept connections" in self._seen:
            self.ready.callback(None)

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(self._seen.decode(errors="replace")))
        self.ended.callback(None)


class RedisServer:
    """C{await RedisServer.start(test)}: running until the test's cleanup."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._watch = _Watch()
        self._process: Any = None

    @classmethod
    async def start(cls, test: Any) -> RedisServer:
        server = cls()
        assert REDIS_SERVER is not None
        server._process = reactor.spawnProcess(
            server._watch,
            REDIS_SERVER,
            [
                REDIS_SERVER,
                "--save",
                "",
                "--appendonly",
                "no",
                "--port",
                str(server.port),
                "--bind",
                "127.0.0.1",
            ],
            env=None,
        )
        test.addCleanup(server.stop)
        await server._watch.ready
        return server

    def stop(self) -> Deferred[None]:
        """Stop the server (if still running); fires once it has exited."""
        if self._process is not None and self._process.pid is not None:
            self._process.signalProcess("TERM")
        return self._watch.ended if not self._watch.ended.called else _done()


def _done() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    d.callback(None)
    return d
