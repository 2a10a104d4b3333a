"""
Moderation backends: each turns one text into a L{Verdict}.

A backend only answers; timeouts, long texts, levels and failures are
handled once, by L{openai_proxy.moderation.checker.Checker}.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from openai_proxy.moderation.policy import Verdict


class BackendError(Exception):
    """A backend could not give a verdict (bad answer, refused call)."""


class Backend(Protocol):
    """What L{openai_proxy.moderation.Moderation} needs from a backend."""

    #: Short name for logs (C{"tencent"}, C{"openai"}, C{"keywords"}).
    name: str

    def check(self, text: str, upstream_key: str) -> Deferred[Verdict]:
        """
        Judge C{text} (at most 10,000 characters).  C{upstream_key} is the
        upstream API key of the request being moderated, for backends that
        call the upstream.  Errbacks when no verdict could be had.
        """

    def start(self) -> None:
        """Acquire what L{check} needs (threads); called once, before use."""

    def stop(self) -> Deferred[None]:
        """
        Release what L{start} acquired; no L{check} is called after.  Fires
        once released, without blocking the reactor meanwhile.
        """
