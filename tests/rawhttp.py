"""A bare TCP client, for requests no HTTP library would send."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure


class Collector(Protocol):
    """Collects everything the server sends; C{done} fires with it at close."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: Deferred[bytes] = Deferred()
        self.first: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason: Failure) -> None:
        self.done.callback(bytes(self.data))


async def connect(port: int) -> Collector:
    """Open a connection to C{127.0.0.1:port}."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    proto: Collector = await connectProtocol(endpoint, Collector())
    return proto


async def raw_request(port: int, payload: bytes) -> bytes:
    """Send C{payload} as is; return all the server sent until it closed."""
    proto = await connect(port)
    assert proto.transport is not None
    proto.transport.write(payload)
    return await proto.done
