"""
A named key's limits and usage on a session: the models it may use, checked
on a C{session.update} that names one; the tokens each turn reports
(C{response.done} in the Realtime API, C{response.completed} in Responses
over WebSocket) charged as they arrive; and a key over its C{tpm} stopped
before its next C{response.create} goes upstream.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from openai_proxy.keys.accounting import Account
from openai_proxy.keys.limits import Usage
from openai_proxy.keys.usage import usage_of
from openai_proxy.realtime.filters import Message, Peer
from openai_proxy.realtime.wire import POLICY

#: Events larger than this are not parsed on the reactor: their usage is
#: read from their tail, where the API puts it.
_PARSE_LIMIT = 65_536
_TAIL = 16_384
_INPUT = re.compile(rb'"input_tokens"\s*:\s*(\d+)')
_OUTPUT = re.compile(rb'"output_tokens"\s*:\s*(\d+)')
# Base64 audio holds no "." and no quote: these never match inside it, so
# the large audio appends are passed on without being parsed.
_CLIENT_TYPES = (b"session.update", b"response.create")
_USAGE_TYPES = (b'"response.done"', b'"response.completed"')


def error_event(code: str, message: str, event_id: str | None = None) -> Message:
    """An C{error} event, as the Realtime API sends one, for the client."""
    return Message(
        json.dumps(
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "code": code,
                    "message": message,
                    "param": None,
                    "event_id": event_id,
                },
            }
        ).encode("utf-8"),
        True,
    )


class KeyLimits:
    """
    The L{SessionFilter} for a session on a named key (its L{Account} was
    opened at the handshake: one request, one C{concurrency} slot for the
    whole session).
    """

    def __init__(self, client: Peer, upstream: Peer, account: Account) -> None:
        self._client = client
        self._upstream = upstream
        self._account = account
        self._key = account.key
        self._held: list[Message] | None = None
        self._closed = False

    def from_client(self, message: Message) -> None:
        if self._held is not None:
            self._held.append(message)  # in order, after the one being read
            return
        data = message.data
        if not (
            message.text and (_CLIENT_TYPES[0] in data or _CLIENT_TYPES[1] in data)
        ):
            self._upstream.send(message)
        elif len(data) <= _PARSE_LIMIT:
            self._checked(message, _parse(data))
        else:
            # A large event is parsed off the reactor; the client is not
            # read meanwhile, and what it sent already waits its turn.
            self._held = []
            self._client.pause()
            d = deferToThread(_parse, data)
            d.addCallback(self._parsed, message)
            d.addErrback(self._parse_failed, message)

    def _parsed(self, event: Any, message: Message) -> None:
        held, self._held = self._held or [], None
        self._client.resume()
        if self._closed:
            return
        self._checked(message, event)
        for later in held:
            self.from_client(later)

    def _parse_failed(self, failure: Failure, message: Message) -> None:
        self._parsed(None, message)

    def _checked(self, message: Message, event: Any) -> None:
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "session.update" and not self._model_allowed(event):
            return
        if kind == "response.create" and self._account.over_tokens():
            self._client.send(
                error_event(
                    "rate_limit_exceeded",
                    f"Rate limit reached for key '{self._key.name}': "
                    f"tokens per minute ({self._key.tpm}).",
                    _event_id(event),
                )
            )
            self._client.close(POLICY, "tokens per minute exceeded")
            return
        self._upstream.send(message)

    def from_upstream(self, message: Message) -> None:
        self._client.send(message)
        data = message.data
        if message.text and (_USAGE_TYPES[0] in data or _USAGE_TYPES[1] in data):
            usage = _usage(data)
            if usage is not None:
                self._account.charge(usage)

    def closed(self) -> None:
        self._closed = True

    def _model_allowed(self, event: Any) -> bool:
        session = event.get("session") if isinstance(event, dict) else None
        model = session.get("model") if isinstance(session, dict) else None
        if not isinstance(model, str) or self._key.allows_model(model):
            return True
        self._client.send(
            error_event(
                "model_not_allowed",
                f"The model '{model}' is not allowed for key '{self._key.name}'.",
                _event_id(event),
            )
        )
        return False


def _parse(data: bytes) -> Any:
    try:
        event = json.loads(data)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _event_id(event: Any) -> str | None:
    found = event.get("event_id") if isinstance(event, dict) else None
    return found if isinstance(found, str) else None


def _usage(data: bytes) -> Usage | None:
    if len(data) <= _PARSE_LIMIT:
        try:
            event = json.loads(data)
        except ValueError:
            return None
        if not isinstance(event, dict) or event.get("type") not in (
            "response.done",
            "response.completed",
        ):
            return None
        return usage_of(event.get("response"))
    tail = data[-_TAIL:]
    inputs, outputs = _INPUT.findall(tail), _OUTPUT.findall(tail)
    if not inputs and not outputs:
        return None
    return Usage(int(inputs[-1]) if inputs else 0, int(outputs[-1]) if outputs else 0)
