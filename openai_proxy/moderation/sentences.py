"""
Cutting streamed text into sentences, so each can be moderated as soon as
it is complete.
"""

from __future__ import annotations

import re
import unicodedata

#: Characters that end a sentence (the character stays with the sentence).
TERMINATORS = frozenset("。！？；!?;…\n")

#: A sentence is cut at this many characters when no boundary comes sooner.
MAX_SENTENCE = 200

# Where a sentence ends: just after a terminator, or after a "." that
# whitespace follows (a "." last in the text waits for the next piece).
_BOUNDARY = re.compile("[" + re.escape("".join(sorted(TERMINATORS))) + r"]|\.(?=\s)")
# Characters that surely need a check: found in C before any per-character
# loop runs (which then only sees text with none of them).
_SURELY_TEXT = re.compile(
    r"[0-9A-Za-z\u00c0-\u024f\u0400-\u04ff\u3041-\u3096\u30a1-\u30fa\u4e00-\u9fff\uac00-\ud7af]"
)


class SentenceSplitter:
    """
    Accumulate text pieces and cut them into sentences.

    A sentence ends after any of L{TERMINATORS}, after a C{.} that is followed
    by whitespace (the whitespace starts the next sentence), or after
    L{MAX_SENTENCE} characters without a boundary.  The sentences returned by
    L{feed}, followed by what L{flush} returns, concatenate to exactly the
    text fed, whatever the pieces were.
    """

    def __init__(self, max_length: int = MAX_SENTENCE) -> None:
        self._max = max_length
        self._pending = ""

    def feed(self, text: str) -> list[str]:
        """Add C{text}; return the sentences it completes, in order."""
        # Boundaries are found by one regular-expression pass (in C): linear
        # in the text, and fast enough for a multi-megabyte event.
        pending = self._pending + text
        sentences: list[str] = []
        start = 0
        limit = self._max
        for match in _BOUNDARY.finditer(pending):
            cut = match.end()
            while cut - start > limit:
                sentences.append(pending[start : start + limit])
                start += limit
            sentences.append(pending[start:cut])
            start = cut
        while len(pending) - start >= limit:
            sentences.append(pending[start : start + limit])
            start += limit
        self._pending = pending[start:]
        return sentences

    def flush(self) -> str:
        """Return (and forget) the unfinished tail; C{""} when there is none."""
        tail, self._pending = self._pending, ""
        return tail


def needs_check(text: str) -> bool:
    """
    Whether C{text} has anything a backend could object to: text made only of
    whitespace and punctuation (e.g. the second C{…} of C{……}) does not.
    """
    if _SURELY_TEXT.search(text):
        return True
    return any(
        not char.isspace() and not unicodedata.category(char).startswith("P")
        for char in text
    )
