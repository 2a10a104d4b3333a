"""
Moderating a streamed reply sentence by sentence while relaying its events
unchanged and in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from openai_proxy.http.sse import SSEEvent, SSEParser
from openai_proxy.moderation.chunks import Key, StreamShape
from openai_proxy.moderation.sentences import SentenceSplitter, needs_check

_T = TypeVar("_T")

#: C{check(text)} fires with whether C{text} must be stopped; it errbacks only
#: with L{CancelledError}, when the moderator cancels it.
Check = Callable[[str], "Deferred[bool]"]


@dataclass
class _Sentence:
    end: int  # offset in the choice's text just after this sentence
    stopped: bool | None = None  # None while the backend has not answered


@dataclass
class _Choice:
    splitter: SentenceSplitter = field(default_factory=SentenceSplitter)
    fed: int = 0  # characters of text seen so far
    passed: int = 0  # characters known to be fine (a prefix of the text)
    released: int = 0  # characters whose events went to the client
    unreleased: str = ""  # text[released:fed]
    sentences: deque[_Sentence] = field(default_factory=deque)


#: An SSE event this large (bytes) is parsed and split in a thread.
LARGE_EVENT = 1_048_576

#: An event that completes more sentences than this (a huge event, not a
#: token) has them checked together, up to L{BATCH} characters a call (a
#: backend's limit for one text); fewer are checked one by one, so a stop
#: cuts the text at the sentence.
BATCH_FROM = 8
BATCH = 10_000

_log = Logger()


def _joined(sentences: list[str]) -> list[str]:
    """
    The sentences one event completed, as they are checked: one by one when
    few, else joined into texts of up to L{BATCH} characters (each then
    held and judged as one sentence, so a huge event costs few calls and
    little bookkeeping).
    """
    if len(sentences) <= BATCH_FROM:
        return sentences
    joined: list[str] = []
    current: list[str] = []
    size = 0
    for sentence in sentences:
        if size + len(sentence) > BATCH and current:
            joined.append("".join(current))
            current, size = [], 0
        current.append(sentence)
        size += len(sentence)
    if current:
        joined.append("".join(current))
    return joined


@dataclass
class _Batch:
    key: Key
    text: str
    sentences: list[_Sentence]
    over_cap: bool = False  # not sent: counted as a moderation error


def _batched(checks: list[tuple[Key, str, _Sentence]]) -> list[_Batch]:
    """Join consecutive sentences of one choice into texts of at most L{BATCH}."""
    if len(checks) <= BATCH_FROM:
        return [_Batch(key, text, [sentence]) for key, text, sentence in checks]
    batches: list[_Batch] = []
    for key, text, sentence in checks:
        last = batches[-1] if batches else None
        if last is not None and last.key == key and len(last.text) + len(text) <= BATCH:
            last.text += text
            last.sentences.append(sentence)
        else:
            batches.append(_Batch(key, text, [sentence]))
    return batches


@dataclass
class _Prepared:
    """One event's text cut into the sentences to check (see L{_prepare})."""

    raw: bytes
    # (choice, the event's text for it, the sentences it completed)
    splits: list[tuple[Key, str, list[str]]]
    # (choice, its unfinished tail), for the choices the event finished
    tails: list[tuple[Key, str]]


def _prepare(
    shape: StreamShape,
    event: SSEEvent,
    splitters: dict[Key, SentenceSplitter],
) -> _Prepared:
    # The costly, pure part of taking an event (parse its JSON, cut its text
    # into sentences): safe in a thread, as only it touches the splitters
    # while it runs.
    found = shape.inspect(event)
    splits = []
    for key, text in found.texts:
        splitter = splitters.get(key)
        if splitter is None:
            splitter = splitters[key] = SentenceSplitter()
        splits.append((key, text, _joined(splitter.feed(text))))
    tails = []
    for key in list(splitters) if found.all_finished else found.finished:
        splitter = splitters.get(key)
        tail = splitter.flush() if splitter is not None else ""
        if tail:
            tails.append((key, tail))
    return _Prepared(event.raw, splits, tails)


@dataclass
class _Held:
    raw: bytes
    # (choice, offset that must have passed, offset after the event's text)
    needs: list[tuple[Key, int, int]]


class StreamModerator:
    """
    Relay a C{text/event-stream} reply, holding each event back until every
    sentence it carries text of has passed moderation.

    Events are written with C{write} byte for byte as the upstream sent
    them, in their original order.  When a sentence is stopped,
    C{stop_upstream} is called and L{blocked} becomes true; the events before
    it are still written as their own sentences (of other choices) pass,
    then the text before it, then the shape's refusal events (refusal text,
    C{content_filter}, end of stream), and nothing else.

    Sentences completed by one huge event are checked in batches
    (L{BATCH_FROM}, L{BATCH}), and an event of L{LARGE_EVENT} bytes or more
    is parsed and cut into sentences in a thread (later events wait their
    turn), so that the reactor serves other clients meanwhile.
    At most C{max_event_calls} calls are made for one event and
    C{max_calls} for the whole stream; a batch past either cap is not sent
    and counts as a failed call: stopped when C{over_cap_stops}
    (C{MODERATION_ON_ERROR=block}), passed otherwise.

    @ivar blocked: whether a sentence was stopped.
    """

    def __init__(
        self,
        shape: StreamShape,
        check: Check,
        write: Callable[[bytes], None],
        stop_upstream: Callable[[], None],
        refusal_text: str,
        *,
        max_calls: int | None = None,
        max_event_calls: int | None = None,
        over_cap_stops: bool = True,
    ) -> None:
        self._max_calls = max_calls
        self._max_event_calls = max_event_calls
        self._over_cap_stops = over_cap_stops
        self._calls = 0
        self._capped = False
        self._shape = shape
        self._check = check
        self._write = write
        self._stop_upstream = stop_upstream
        self._refusal_text = refusal_text
        self._parser = SSEParser()
        self._choices: dict[Key, _Choice] = {}
        self._splitters: dict[Key, SentenceSplitter] = {}
        self._queue: deque[SSEEvent] = deque()
        self._busy = False  # a large event is being prepared in a thread
        self._final_done = False  # the tails have been taken after the end
        self._held: deque[_Held] = deque()
        self._ended = False
        self._done = False  # nothing more is ever written
        self._waiters: list[Deferred[None]] = []
        self._inflight: set[Deferred[bool]] = set()
        # Set by a stopped sentence: its choice, and that choice's text
        # offset where the output is cut.
        self._cut: tuple[Key, _Choice] | None = None
        self.blocked = False

    def feed(self, data: bytes) -> None:
        """Take upstream body bytes as they arrive."""
        if self._ended or self._done or self._cut is not None:
            return
        self.feed_events(self._parser.feed(data))

    def feed_events(self, events: Iterable[SSEEvent]) -> None:
        """
        Take events already cut apart (e.g. the messages of a WebSocket
        session, one event each); C{write} gets back each one's C{raw}.
        """
        if self._ended or self._done or self._cut is not None:
            return
        self._queue.extend(events)
        self._pump()

    def _pump(self) -> None:
        # Take queued events in order: small ones at once, a large one in a
        # thread (nothing else is taken until it is back).
        while not self._busy and not self._done and self._cut is None:
            small: list[SSEEvent] = []
            while self._queue and len(self._queue[0].raw) < LARGE_EVENT:
                small.append(self._queue.popleft())
            final = self._ended and not self._queue and not self._final_done
            if small or final:
                self._take(
                    [_prepare(self._shape, e, self._splitters) for e in small],
                    final=final,
                )
            if not self._queue:
                return
            event = self._queue.popleft()
            self._busy = True
            d = deferToThread(_prepare, self._shape, event, self._splitters)
            d.addCallbacks(self._prepared, self._prepare_failed)
            return
        if self._cut is not None or self._done:
            self._queue.clear()

    def _prepared(self, prepared: _Prepared) -> None:
        self._busy = False
        if self._done or self._cut is not None:
            self._queue.clear()
            self._release()
            return
        self._take([prepared])
        self._pump()

    def _prepare_failed(self, failure: Failure) -> None:
        self._busy = False
        _log.failure("moderating a large event failed", failure)
        self._finish()

    def end(self) -> Deferred[None]:
        """
        The upstream body ended (normally, after C{stop_upstream}, or by an
        error): moderate the unfinished tails and write what is left.  Fires
        once everything is written (at once when blocked or abandoned).
        """
        if self._done:
            return succeed(None)
        if not self._ended:
            self._ended = True
            if self._cut is None:
                self._queue.extend(self._parser.finish())
                self._pump()
            if self._done:
                return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        self._release()
        return d

    def abandon(self) -> None:
        """The client went away: drop everything and never write again."""
        self._finish()

    def _take(self, events: list[_Prepared], *, final: bool = False) -> None:
        batches: list[_Batch] = []
        for event in events:
            needs: list[tuple[Key, int, int]] = []
            checks: list[tuple[Key, str, _Sentence]] = []
            for key, text, sentences in event.splits:
                choice = self._choice(key)
                choice.fed += len(text)
                choice.unreleased += text
                self._add(key, choice, sentences, checks)
                # Trailing whitespace starts the next sentence but cannot harm:
                # it does not hold the event back.
                trailing = len(text) - len(text.rstrip())
                needs.append((key, choice.fed - trailing, choice.fed))
            for key, tail in event.tails:
                self._add(key, self._choice(key), [tail], checks)
            batches.extend(self._capped_batches(checks))
            self._held.append(_Held(event.raw, needs))
        if final:
            self._final_done = True
            checks = []
            for key in list(self._choices):
                self._flush(key, checks)
            batches.extend(self._capped_batches(checks))
        # Start the checks only now that every event is held: a backend that
        # answers at once then sees consistent state.
        for batch in batches:
            if self._done:
                return
            if batch.over_cap:
                d: Deferred[bool] = succeed(self._over_cap_stops)
            else:
                d = self._check(batch.text)
            self._inflight.add(d)
            d.addBoth(self._settled, d)
            d.addCallback(self._answered, batch.key, batch.sentences)
            d.addErrback(_ignore_cancelled)
        self._release()

    def _capped_batches(self, checks: list[tuple[Key, str, _Sentence]]) -> list[_Batch]:
        batches = _batched(checks)
        for i, batch in enumerate(batches):
            self._calls += 1
            if (self._max_event_calls is not None and i >= self._max_event_calls) or (
                self._max_calls is not None and self._calls > self._max_calls
            ):
                batch.over_cap = True
                if not self._capped:
                    self._capped = True
                    _log.warn(
                        "moderation call cap reached for a stream; the rest "
                        "counts as a moderation error ({verdict})",
                        verdict="block" if self._over_cap_stops else "pass",
                    )
        return batches

    def _settled(self, result: _T, d: Deferred[bool]) -> _T:
        self._inflight.discard(d)
        return result

    def _choice(self, key: Key) -> _Choice:
        choice = self._choices.get(key)
        if choice is None:
            splitter = self._splitters.get(key)
            if splitter is None:
                splitter = self._splitters[key] = SentenceSplitter()
            choice = self._choices[key] = _Choice(splitter)
        return choice

    def _flush(self, key: Key, checks: list[tuple[Key, str, _Sentence]]) -> None:
        choice = self._choices.get(key)
        if choice is not None:
            tail = choice.splitter.flush()
            if tail:
                self._add(key, choice, [tail], checks)

    def _add(
        self,
        key: Key,
        choice: _Choice,
        texts: list[str],
        checks: list[tuple[Key, str, _Sentence]],
    ) -> None:
        end = choice.sentences[-1].end if choice.sentences else choice.passed
        for text in texts:
            end += len(text)
            sentence = _Sentence(end)
            choice.sentences.append(sentence)
            if needs_check(text):
                checks.append((key, text, sentence))
            else:
                sentence.stopped = False
        self._advance(key, choice)

    def _answered(self, stopped: bool, key: Key, sentences: list[_Sentence]) -> None:
        if self._done:
            return  # a late answer after a block or a hang-up: dropped
        for sentence in sentences:
            sentence.stopped = stopped
        choice = self._choices[key]
        self._advance(key, choice)
        self._release()

    def _advance(self, key: Key, choice: _Choice) -> None:
        # Answers may come in any order; only a run of answered sentences
        # from the start moves the mark, so output never reorders.
        if self._cut is not None and self._cut[1] is choice:
            return  # the stopped choice never moves past its cut
        while choice.sentences and choice.sentences[0].stopped is not None:
            sentence = choice.sentences.popleft()
            if sentence.stopped:
                self._block(key, choice)
                return
            choice.passed = sentence.end

    def _release(self) -> None:
        while self._held and not self._done:
            held = self._held[0]
            waiting = [k for k, need, _ in held.needs if self._choices[k].passed < need]
            if waiting:
                if self._cut is not None and self._cut[0] in waiting:
                    self._refuse()  # the first event holding stopped text
                return
            self._held.popleft()
            for key, _, end in held.needs:
                choice = self._choices[key]
                choice.unreleased = choice.unreleased[end - choice.released :]
                choice.released = end
            self._write(held.raw)
        if self._cut is not None and not self._done:
            self._refuse()
        elif self._ended and self._final_done and not self._done:
            self._finish()

    def _block(self, key: Key, choice: _Choice) -> None:
        if self._done:
            return
        if self._cut is not None:
            self._refuse()  # a second stopped sentence: end here
            return
        self.blocked = True
        self._cut = (key, choice)
        # Events before the stopped sentence still go out once their own
        # sentences (of other choices) have passed; then the refusal.
        self._release()
        self._stop_upstream()

    def _refuse(self) -> None:
        assert self._cut is not None
        key, choice = self._cut
        passed = choice.unreleased[: max(0, choice.passed - choice.released)]
        self._write(self._shape.refusal(key, passed, self._refusal_text))
        self._finish()

    def _finish(self) -> None:
        self._done = True
        self._held.clear()
        self._queue.clear()
        self._choices.clear()
        # Answers still to come are of no use: cancelling frees what they
        # hold (timers, connections); any that arrive anyway are dropped.
        inflight, self._inflight = self._inflight, set()
        for check in inflight:
            check.cancel()
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


def _ignore_cancelled(failure: Failure) -> Failure | None:
    return None if isinstance(failure.value, CancelledError) else failure
