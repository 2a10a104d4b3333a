"""
What a backend's verdict means for a reply: the moderation level, the
treatment of failed calls, and which requests are moderated at all.
"""

from __future__ import annotations

import enum
import json

from openai_proxy.moderation.errors import RequestRefused
from openai_proxy.settings import FALSE_WORDS, TRUE_WORDS

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
    The level for one request: its C{moderation_level} when given (in any
    case: C{"High"} is C{"high"}), except that under C{MODERATION=always} a
    request may only raise the configured level, never lower it.

    @raise RequestRefused: 400 C{invalid_moderation_level} when
        C{moderation_level} is neither C{"low"} nor C{"high"}.
    """
    asked = body.get("moderation_level")
    if asked is None:
        return configured
    level = asked.strip().lower() if isinstance(asked, str) else None
    if level not in LEVELS:
        raise RequestRefused(
            400,
            "moderation_level must be 'low' or 'high', got " + _shown(asked),
            "invalid_moderation_level",
            param="moderation_level",
        )
    assert level is not None
    if mode == "always" and LEVELS.index(level) < LEVELS.index(configured):
        return configured
    return level


def requested_moderation(body: dict[str, object] | None) -> bool:
    """
    Whether the request's C{"moderation"} field asks for a check, read the
    way the Node project's users send it: C{true}, a non-zero number, or one
    of the strings C{"true"}, C{"1"}, C{"yes"}, C{"on"} (any case) ask;
    C{false}, C{0}, C{null}, no field at all, or C{""}, C{"false"}, C{"0"},
    C{"no"}, C{"off"} do not.

    @raise RequestRefused: 400 C{invalid_moderation} for any other value, so
        that a request meaning to ask never silently gets no check.
    """
    if body is None:
        return False
    value = body.get("moderation")
    if value is None or isinstance(value, bool):
        return value is True
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise RequestRefused(
        400,
        "moderation must be true or false (or 1/0, 'yes'/'no', 'on'/'off'), got "
        + _shown(value),
        "invalid_moderation",
        param="moderation",
    )


def wants_moderation(mode: str, body: dict[str, object] | None) -> bool:
    """
    Whether the request asks for (or gets anyway) moderation: always under
    C{MODERATION=always}; under C{request} when its C{"moderation"} field
    asks (see L{requested_moderation}); under C{off}, whenever the request
    asks, so that the caller can refuse rather than silently skip what was
    asked for.

    @raise RequestRefused: for a C{"moderation"} value that is neither yes
        nor no, whatever the mode.
    """
    asked = requested_moderation(body)
    return mode == "always" or asked


def _shown(value: object) -> str:
    # The value as JSON, cut short: enough to spot the mistake.
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."
