"""The C{keywords} backend: a local list of forbidden terms."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred, succeed

from openai_proxy.moderation.policy import Verdict


class KeywordsBackend:
    """
    Block any text containing one of the terms, compared case-insensitively.

    The file holds one term per line (UTF-8); blank lines are ignored and
    the surrounding whitespace of each line is not part of its term.
    """

    name = "keywords"

    def __init__(self, terms: list[str]) -> None:
        self._terms = tuple({term.casefold() for term in terms if term})

    @classmethod
    def from_file(cls, path: str) -> KeywordsBackend:
        """Read the terms from C{path}; raise L{OSError} when unreadable."""
        text = Path(path).read_text(encoding="utf-8")
        return cls([line.strip() for line in text.splitlines()])

    def check(self, text: str, upstream_key: str) -> Deferred[Verdict]:
        """Fire at once with L{Verdict.BLOCK} on a hit, else L{Verdict.PASS}."""
        folded = text.casefold()
        hit = any(term in folded for term in self._terms)
        return succeed(Verdict.BLOCK if hit else Verdict.PASS)

    def start(self) -> None:
        """Nothing to acquire."""

    def stop(self) -> Deferred[None]:
        """Nothing to release."""
        return succeed(None)
