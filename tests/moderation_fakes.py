"""Fakes shared by the moderation tests (no tests here): hand-fired checks,
backends, and SSE chunk builders."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed

from openai_proxy.moderation.policy import Verdict


class ManualCheck:
    """A C{check(text)} whose answers the test gives, in any order."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, Deferred[bool]]] = []
        self._answered: set[int] = set()

    def __call__(self, text: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.asked.append((text, d))
        return d

    @property
    def texts(self) -> list[str]:
        return [text for text, _ in self.asked]

    @property
    def cancelled(self) -> list[str]:
        """The texts whose checks were cancelled before the test answered."""
        return [
            text
            for n, (text, d) in enumerate(self.asked)
            if d.called and n not in self._answered
        ]

    def answer(self, text: str, stopped: bool = False) -> None:
        """Answer the first check of C{text} not answered yet (even when it
        was cancelled: an answer may always come late)."""
        for n, (asked, d) in enumerate(self.asked):
            if asked == text and n not in self._answered:
                self._answered.add(n)
                d.callback(stopped)
                return
        raise AssertionError(f"{text!r} was not asked (asked: {self.texts})")

    def answer_all(self, stopped: bool = False) -> None:
        for n, (_, d) in enumerate(self.asked):
            if n not in self._answered:
                self._answered.add(n)
                d.callback(stopped)


class ManualBackend:
    """A backend whose verdicts the test gives by hand."""

    name = "manual"

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, Deferred[Verdict]]] = []
        self.started = self.stopped = False

    def check(self, text: str, upstream_key: str) -> Deferred[Verdict]:
        d: Deferred[Verdict] = Deferred()
        self.asked.append((text, upstream_key, d))
        return d

    def answer(self, index: int, verdict: Verdict) -> None:
        self.asked[index][2].callback(verdict)

    def start(self) -> None:
        self.started = True

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)


class FixedBackend:
    """A backend answering at once: C{verdicts[word]} when the text holds
    C{word}, else Pass; C{errors} holds words whose texts fail."""

    name = "fixed"

    def __init__(
        self, verdicts: dict[str, Verdict] | None = None, errors: tuple[str, ...] = ()
    ) -> None:
        self.verdicts = verdicts or {}
        self.errors = errors
        self.asked: list[tuple[str, str]] = []

    def check(self, text: str, upstream_key: str) -> Deferred[Verdict]:
        self.asked.append((text, upstream_key))
        if any(word in text for word in self.errors):
            raise RuntimeError("backend exploded")
        for word, verdict in self.verdicts.items():
            if word in text:
                return succeed(verdict)
        return succeed(Verdict.PASS)

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return succeed(None)


def event(payload: Any, kind: str | None = None) -> bytes:
    text = (
        payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    )
    return (f"event: {kind}\n" if kind else "").encode() + f"data: {text}\n\n".encode()


CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 7,
    "model": "m",
}


def chat(
    index: int = 0, content: str | None = None, finish: str | None = None, **delta: Any
) -> bytes:
    if content is not None:
        delta["content"] = content
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    return event({**CHUNK, "choices": [choice]})


def completion(index: int = 0, text: str = "", finish: str | None = None) -> bytes:
    return event(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 7,
            "model": "m",
            "choices": [
                {
                    "index": index,
                    "text": text,
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
        }
    )


DONE = b"data: [DONE]\n\n"


def payloads(output: bytes) -> list[Any]:
    """The data of each event written, JSON-decoded where possible."""
    from openai_proxy.http.sse import SSEParser

    parser = SSEParser()
    out: list[Any] = []
    for e in parser.feed(output) + parser.finish():
        if e.data is not None:
            out.append(e.json() if e.json() is not None else e.data)
    return out
