"""
Cutting streamed text into sentences, so each can be moderated as soon as
it is complete.
"""

from __future__ import annotations

import unicodedata

#: Characters that end a sentence (the character stays with the sentence).
TERMINATORS = frozenset("。！？；!?;…\n")

#: A sentence is cut at this many characters when no boundary comes sooner.
MAX_SENTENCE = 200


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
        self._pending += text
        sentences: list[str] = []
        start = 0
        pending = self._pending
        i = 0
        while i < len(pending):
            char = pending[i]
            cut = -1
            if char in TERMINATORS:
                cut = i + 1
            elif char == "." and i + 1 < len(pending) and pending[i + 1].isspace():
                cut = i + 1
            elif i + 1 - start >= self._max:
                cut = i + 1
            if cut >= 0:
                sentences.append(pending[start:cut])
                start = cut
            i += 1
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
    return any(
        not char.isspace() and not unicodedata.category(char).startswith("P")
        for char in text
    )
