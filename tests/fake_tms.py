"""
A fake Tencent Cloud TMS endpoint for tests, spoken to by the real SDK.

    tms = FakeTMS("AKIDtest", "secret", block_words=["bomb"])
    port = tms.start()                 # listens on 127.0.0.1, any free port
    self.addCleanup(tms.stop)          # a Deferred: waits for connections to close
    ... TENCENT_CLOUD_ENDPOINT = tms.url   (http://127.0.0.1:PORT)
    ... tms.calls                      # [TMSCall(text=..., ...)]

It checks the TC3-HMAC-SHA256 signature exactly as TMS does and answers a
bad one (or an unknown SecretId) with a Tencent-style error body; it decodes
C{Content} and decides by the words it contains: C{block_words} give
C{Block}, C{review_words} C{Review}, anything else C{Pass}.  A text holding a
word of C{delays} is answered that many seconds later.  Connections are not
kept alive, so no socket outlives a test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from twisted.internet import reactor as _default_reactor
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

_AUTH = re.compile(
    r"TC3-HMAC-SHA256 Credential=(?P<id>[^/]+)/(?P<date>[0-9-]+)/(?P<service>\w+)"
    r"/tc3_request, SignedHeaders=(?P<signed>[a-z;-]+), Signature=(?P<sig>[0-9a-f]+)"
)


@dataclass
class TMSCall:
    """One request the fake received (C{text} is L{None} when not decoded)."""

    action: str
    region: str
    secret_id: str | None
    text: str | None
    biztype: str | None
    answer: str  # "Pass" | "Review" | "Block" | the error code


class FakeTMS:
    """
    A TMS C{TextModeration} endpoint on loopback.  See the module docstring.

    @ivar calls: every request received, in order of arrival.
    @ivar port: the port listened on, once started.
    """

    def __init__(
        self,
        secret_id: str,
        secret_key: str,
        *,
        block_words: Iterable[str] = (),
        review_words: Iterable[str] = (),
        delays: Mapping[str, float] | None = None,
        reactor: Any = None,
    ) -> None:
        self.secret_id = secret_id
        self.secret_key = secret_key
        self.block_words = list(block_words)
        self.review_words = list(review_words)
        self.delays = dict(delays or {})
        self.calls: list[TMSCall] = []
        self.port = 0
        self._reactor = reactor if reactor is not None else _default_reactor
        self._listening: IListeningPort | None = None
        self._pending: dict[Request, IDelayedCall] = {}
        self._channels: dict[Any, tuple[Any, Deferred[None]]] = {}

    @property
    def endpoint(self) -> str:
        """C{127.0.0.1:PORT}, as the SDK's HttpProfile wants it."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """C{http://127.0.0.1:PORT}, as TENCENT_CLOUD_ENDPOINT takes it."""
        return f"http://{self.endpoint}"

    def start(self) -> int:
        """Listen on a free loopback port; return it."""
        site = _Site(_TMSResource(self), self._channels)
        self._listening = self._reactor.listenTCP(0, site, interface="127.0.0.1")
        self.port = self._listening.getHost().port
        return self.port

    def stop(self) -> Deferred[Any]:
        """
        Stop listening, answer delayed requests at once, and fire once every
        connection is closed.
        """
        for request, call in list(self._pending.items()):
            call.cancel()
            self._pending.pop(request, None)
            _finish(request, self._answer_now(request))
        waits: list[Deferred[Any]] = []
        for transport, closed in list(self._channels.values()):
            waits.append(closed)
            transport.loseConnection()
        if self._listening is not None:
            waits.append(maybeDeferred(self._listening.stopListening))
            self._listening = None
        return DeferredList(waits)

    def verdict(self, text: str) -> str:
        """The C{Suggestion} for C{text}."""
        folded = text.casefold()
        if any(word.casefold() in folded for word in self.block_words):
            return "Block"
        if any(word.casefold() in folded for word in self.review_words):
            return "Review"
        return "Pass"

    def render(self, request: Request) -> bytes | int:
        """Answer one request (at once, or later for a delayed text)."""
        # Close after each answer, and say so: a client told nothing would
        # reuse the connection and find it closed.
        request.channel.persistent = False
        request.setHeader(b"connection", b"close")
        body = request.content.read() if request.content is not None else b""
        error, call = self._authorise(request, body)
        self.calls.append(call)
        if error is not None:
            return _json(request, {"Error": error})
        assert call.text is not None
        delay = max(
            (s for word, s in self.delays.items() if word in call.text), default=None
        )
        payload = self._suggestion(call)
        if delay is None:
            return _json(request, payload)
        request.setHeader(b"content-type", b"application/json")
        pending = self._reactor.callLater(
            delay, self._answer_later, request, _encode(payload)
        )
        self._pending[request] = pending
        request.notifyFinish().addErrback(lambda _: self._gone(request))
        return NOT_DONE_YET

    def _answer_later(self, request: Request, body: bytes) -> None:
        self._pending.pop(request, None)
        _finish(request, body)

    def _answer_now(self, request: Request) -> bytes:
        return _encode(
            {"Error": {"Code": "InternalError", "Message": "the fake is stopping"}}
        )

    def _gone(self, request: Request) -> None:
        call = self._pending.pop(request, None)
        if call is not None and call.active():
            call.cancel()

    def _authorise(
        self, request: Request, body: bytes
    ) -> tuple[dict[str, str] | None, TMSCall]:
        header = _header(request, b"authorization") or ""
        action = _header(request, b"x-tc-action") or ""
        region = _header(request, b"x-tc-region") or ""
        call = TMSCall(action, region, None, None, None, "")
        match = _AUTH.fullmatch(header)
        if match is None:
            return _error(call, "AuthFailure.InvalidAuthorization", "bad header")
        call.secret_id = match["id"]
        if match["id"] != self.secret_id:
            return _error(call, "AuthFailure.SecretIdNotFound", "unknown SecretId")
        if not hmac.compare_digest(match["sig"], self._signature(request, body)):
            return _error(call, "AuthFailure.SignatureFailure", "bad signature")
        if action != "TextModeration":
            return _error(call, "InvalidAction", f"unknown action {action!r}")
        try:
            params = json.loads(body)
            call.text = base64.b64decode(params["Content"], validate=True).decode()
        except (ValueError, KeyError, TypeError):
            return _error(call, "InvalidParameter", "Content is not base64 UTF-8")
        call.biztype = params.get("BizType")
        return None, call

    def _signature(self, request: Request, body: bytes) -> str:
        timestamp = _header(request, b"x-tc-timestamp") or "0"
        date = datetime.fromtimestamp(int(timestamp), timezone.utc).strftime("%Y-%m-%d")
        canonical = "\n".join(
            [
                "POST",
                "/",
                "",
                f"content-type:{_header(request, b'content-type')}\n"
                f"host:{_header(request, b'host')}\n",
                "content-type;host",
                hashlib.sha256(body).hexdigest(),
            ]
        )
        scope = f"{date}/tms/tc3_request"
        to_sign = "\n".join(
            [
                "TC3-HMAC-SHA256",
                timestamp,
                scope,
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        key = ("TC3" + self.secret_key).encode()
        for part in (date, "tms", "tc3_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()

    def _suggestion(self, call: TMSCall) -> dict[str, Any]:
        assert call.text is not None
        suggestion = call.answer = self.verdict(call.text)
        words = self.block_words if suggestion == "Block" else self.review_words
        hits = [w for w in words if w.casefold() in call.text.casefold()]
        return {
            "BizType": call.biztype or "",
            "Suggestion": suggestion,
            "Label": "Normal" if suggestion == "Pass" else "Illegal",
            "SubLabel": "",
            "Score": 0 if suggestion == "Pass" else 99,
            "Keywords": [] if suggestion == "Pass" else hits,
        }


class _TMSResource(Resource):
    isLeaf = True

    def __init__(self, fake: FakeTMS) -> None:
        super().__init__()
        self._fake = fake

    def render_POST(self, request: Request) -> bytes | int:
        return self._fake.render(request)


class _Site(Site):
    """Tracks open connections so that L{FakeTMS.stop} can wait for them."""

    def __init__(
        self, resource: Resource, channels: dict[Any, tuple[Any, Deferred[None]]]
    ) -> None:
        super().__init__(resource)
        self._channels = channels

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        closed: Deferred[None] = Deferred()
        made, lost = channel.makeConnection, channel.connectionLost

        def makeConnection(transport: Any) -> None:
            self._channels[channel] = (transport, closed)
            made(transport)

        def connectionLost(reason: Any) -> None:
            lost(reason)
            self._channels.pop(channel, None)
            closed.callback(None)

        channel.makeConnection = makeConnection
        channel.connectionLost = connectionLost
        return channel


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def _error(call: TMSCall, code: str, message: str) -> tuple[dict[str, str], TMSCall]:
    call.answer = code
    return {"Code": code, "Message": message}, call


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(
        {"Response": {**payload, "RequestId": str(uuid.uuid4())}}
    ).encode()


def _json(request: Request, payload: dict[str, Any]) -> bytes:
    # The SDK recognises an error body only with exactly this Content-Type.
    request.setHeader(b"content-type", b"application/json")
    return _encode(payload)


def _finish(request: Request, body: bytes) -> None:
    request.write(body)
    request.finish()
