"""
What sits between the two hops of a WebSocket session: the relay hands
each complete message, in order, to a chain of filters, and each filter
decides what goes on (as it came, changed, later, or not at all), what is
said back, and when the session must close.

A filter is written against two L{Peer}s, the side towards the client and
the side towards the upstream, and never sees a socket: the relay (or the
next filter in the chain) is behind each.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol


class Message(NamedTuple):
    """
    One complete WebSocket message (fragments already joined).

    @ivar data: the payload; UTF-8 for a text message.
    @ivar text: whether it is a text message (else binary).
    """

    data: bytes
    text: bool


class Peer(Protocol):
    """One direction of the session, as a filter sees it."""

    def send(self, message: Message) -> None:
        """Send C{message} on towards this side."""

    def close(self, code: int, reason: str) -> None:
        """
        Close the whole session: this side gets C{code} and C{reason}, the
        other side the relay's choice (the same code where it is valid).
        """

    def pause(self) -> None:
        """
        Stop reading from this side (e.g. while held messages are being
        checked), so that memory stays bounded; L{resume} undoes it.  Pauses
        from several filters are counted: reading resumes after the last.
        """

    def resume(self) -> None:
        """Undo one L{pause}."""


class SessionFilter(Protocol):
    """
    One link of the chain.  The relay (or the filter before it) calls
    L{from_client} and L{from_upstream} with each message in the order it
    arrived; the filter passes what it lets through to C{upstream.send} and
    C{client.send} of the L{Peer}s it was made with.
    """

    def from_client(self, message: Message) -> None:
        """A message the client sent, on its way to the upstream."""

    def from_upstream(self, message: Message) -> None:
        """A message the upstream sent, on its way to the client."""

    def closed(self) -> None:
        """The session ended (either side, any reason): release what is held."""


class Passthrough:
    """The filter that lets everything through unchanged."""

    def __init__(self, client: Peer, upstream: Peer) -> None:
        self._client = client
        self._upstream = upstream

    def from_client(self, message: Message) -> None:
        self._upstream.send(message)

    def from_upstream(self, message: Message) -> None:
        self._client.send(message)

    def closed(self) -> None:
        pass
