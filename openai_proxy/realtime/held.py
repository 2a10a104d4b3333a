"""
Bytes a filter holds back from one side of a session, and that side's
reading paused while they are over a bound, so that memory stays bounded.
"""

from __future__ import annotations

from openai_proxy.realtime.filters import Peer


class HeldBytes:
    """
    Counts the bytes held from C{peer}: over C{bound}, C{peer} is paused
    (once); back at or under it, resumed.  After L{stop} it is neither.
    """

    def __init__(self, peer: Peer, bound: int) -> None:
        self._peer = peer
        self._bound = bound
        self._held = 0
        self._paused = False
        self._stopped = False

    def hold(self, size: int) -> None:
        """Count C{size} more bytes held."""
        self._held += size
        if self._held > self._bound and not self._paused and not self._stopped:
            self._paused = True
            self._peer.pause()

    def release(self, size: int) -> None:
        """
        Count C{size} held bytes as gone.  Call it only once they are sent
        on: a resume may hand over the peer's next message at once.
        """
        self._held -= size
        if self._paused and self._held <= self._bound and not self._stopped:
            self._paused = False
            self._peer.resume()

    def stop(self) -> None:
        """The session ended: pause and resume no more."""
        self._stopped = True
