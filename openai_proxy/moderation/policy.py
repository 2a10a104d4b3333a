"""
What a backend's verdict means for a reply: the moderation level, the
treatment of failed calls, and which requests are moderated at all.
"""

from __future__ import annotations

import enum

from openai_proxy.moderation.errors import RequestRefused

LEVELS = ("low", "high")


class Verdict(enum.Enum):
    """A backend's opinion of one text (Tencent TMS's C{Suggestion})."""

    PASS = "Pass"
    REVIEW = "Review"
    BLOCK = "Block"


def stops(verdict: Verdict, level: str) -> bool:
    """
    Whether a text with this verdict must not reach the client: level
    C{"low"} stops only L{Verdict.BLOCK}; C{"high"} stops anything but
    L{Verdict.PASS}.
    """
    if level == "high":
        return verdict is not Verdict.PASS
    return verdict is Verdict.BLOCK


def error_verdict(on_error: str) -> Verdict:
    """
    What a failed or timed-out call counts as: C{MODERATION_ON_ERROR=block}
    makes it a L{Verdict.BLOCK} (stopped at every level), C{pass} a
    L{Verdict.PASS}.
    """
    return Verdict.BLOCK if on_error == "block" else Verdict.PASS


def requested_level(mode: str, configured: str, body: dict[str, object]) -> str:
    """
    The level for one request: its C{moderation_level} when given, except
    that under C{MODERATION=always} a request may only raise the configured
    level, never lower it.

    @raise RequestRefused: C{moderation_level} is neither C{"low"} nor
        C{"high"}.
    """
    asked = body.get("moderation_level")
    if asked is None:
        return configured
    if asked not in LEVELS:
        raise RequestRefused(
            400,
            "moderation_level must be 'low' or 'high'",
            "invalid_moderation_level",
        )
    assert isinstance(asked, str)
    if mode == "always" and LEVELS.index(asked) < LEVELS.index(configured):
        return configured
    return asked


def wants_moderation(mode: str, body: dict[str, object] | None) -> bool:
    """
    Whether the request asks for (or gets anyway) moderation: always under
    C{MODERATION=always}; under C{request} only with C{"moderation": true};
    under C{off}, whenever the request asks, so that the caller can refuse
    rather than silently skip what was asked for.
    """
    if mode == "always":
        return True
    return body is not None and body.get("moderation") is True
