"""
A fake realtime upstream: a WebSocket server (the C{websockets} package, on
its own asyncio loop in a thread, so that it shares no code with the proxy)
speaking enough of the Realtime API's GA protocol, and of its beta event
names when the handshake says C{OpenAI-Beta: realtime=v1}.

It records what it received, and can refuse the handshake with a status,
close with a code, or stop reading.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

#: The usage each fake response reports.
USAGE = {
    "total_tokens": 30,
    "input_tokens": 12,
    "output_tokens": 18,
    "input_token_details": {"cached_tokens": 4, "text_tokens": 8, "audio_tokens": 4},
    "output_token_details": {"text_tokens": 6, "audio_tokens": 12},
}
#: The text each fake response says, in these deltas.
DELTAS = ["Hello ", "from the ", "fake model."]
AUDIO_CHUNK = bytes(range(256)) * 4


@dataclass
class Handshake:
    """One handshake as the fake saw it."""

    path: str
    headers: Headers
    subprotocols: list[str]


@dataclass
class Closed:
    """How one session ended, as the fake saw it (time.monotonic)."""

    code: int | None
    reason: str
    at: float


@dataclass
class FakeRealtime:
    """
    The fake.  Set C{refuse} to (status, body) to refuse handshakes;
    C{stop_reading} to stop reading after C{session.created}; C{subprotocol}
    to choose that one when offered.
    """

    refuse: tuple[int, bytes] | None = None
    stop_reading: bool = False
    subprotocol: str | None = "realtime"
    handshakes: list[Handshake] = field(default_factory=list)
    received: list[Any] = field(default_factory=list)
    closes: list[Closed] = field(default_factory=list)
    opened: int = 0
    flooded: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _server: Server | None = None
    _thread: threading.Thread | None = None

    def start(self, test: Any) -> str:
        """Serve on a loopback port until the test ends; return its http:// URL."""
        ready = threading.Event()
        port: list[int] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()

            async def main() -> None:
                self._server = await serve(
                    self._session,
                    "127.0.0.1",
                    0,
                    process_request=self._process_request,
                    select_subprotocol=self._select,
                    compression=None,
                    max_size=None,
                    ping_interval=None,
                )
                port.append(self._server.sockets[0].getsockname()[1])
                ready.set()
                await self._server.wait_closed()

            loop.run_until_complete(main())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(5)
        test.addCleanup(self.stop)
        return f"http://127.0.0.1:{port[0]}"

    def stop(self) -> None:
        """Close the server and every session."""
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        if self._thread is not None:
            self._thread.join(5)

    def events(self, kind: str) -> list[dict[str, Any]]:
        """The JSON events of type C{kind} received so far."""
        return [
            e for e in self.received if isinstance(e, dict) and e.get("type") == kind
        ]

    def _select(self, connection: ServerConnection, offered: Any) -> str | None:
        if self.subprotocol in offered:
            return self.subprotocol
        return None

    def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        self.handshakes.append(
            Handshake(
                request.path,
                request.headers,
                [
                    p.strip()
                    for v in request.headers.get_all("Sec-WebSocket-Protocol")
                    for p in v.split(",")
                ],
            )
        )
        if self.refuse is not None:
            status, body = self.refuse
            response = Response(
                status,
                "Refused",
                Headers(
                    [
                        ("Content-Type", "application/json"),
                        ("Content-Length", str(len(body))),
                        ("x-request-id", "req_refused"),
                    ]
                ),
                body,
            )
            return response
        return None

    async def _session(self, ws: ServerConnection) -> None:
        self.opened += 1
        path = ws.request.path if ws.request is not None else ""
        beta = bool(ws.request and ws.request.headers.get("OpenAI-Beta"))
        session: dict[str, Any] = {"id": "sess_fake", "model": _model_of(path)}
        await ws.send(
            json.dumps(
                {"type": "session.created", "event_id": "ev_0", "session": session}
            )
        )
        try:
            if self.stop_reading:
                await asyncio.sleep(3600)
            async for raw in ws:
                event: Any = raw
                if isinstance(raw, str):
                    try:
                        event = json.loads(raw)
                    except ValueError:
                        event = raw
                self.received.append(event)
                if not isinstance(event, dict):
                    await ws.send(raw)  # echo anything else, as it came
                    continue
                await self._answer(ws, event, session, beta)
        except Exception:
            pass
        finally:
            self.closes.append(
                Closed(ws.close_code, ws.close_reason or "", time.monotonic())
            )

    async def _answer(
        self,
        ws: ServerConnection,
        event: dict[str, Any],
        session: dict[str, Any],
        beta: bool,
    ) -> None:
        kind = event.get("type")
        if kind == "session.update":
            session.update(event.get("session") or {})
            await ws.send(
                json.dumps(
                    {"type": "session.updated", "event_id": "ev_1", "session": session}
                )
            )
        elif kind == "response.create":
            await self._respond(ws, beta)
        elif kind == "fake.close":
            await ws.close(event["code"], event.get("reason", ""))
        elif kind == "fake.big":
            await ws.send("x" * event["size"])
        elif kind == "fake.say":
            await ws.send(json.dumps(event["event"]))
        elif kind == "fake.flood":
            for _ in range(event["count"]):
                await ws.send("y" * event["size"])
                self.flooded += 1
        elif kind == "fake.hangup":
            ws.transport.abort()

    async def _respond(self, ws: ServerConnection, beta: bool) -> None:
        text = "response.text.delta" if beta else "response.output_text.delta"
        transcript = (
            "response.audio_transcript.delta"
            if beta
            else "response.output_audio_transcript.delta"
        )
        audio = "response.audio.delta" if beta else "response.output_audio.delta"
        rid = f"resp_{len(self.received)}"
        await ws.send(
            json.dumps(
                {
                    "type": "response.created",
                    "event_id": "ev_2",
                    "response": {"id": rid, "status": "in_progress"},
                }
            )
        )
        for delta in DELTAS:
            await ws.send(
                json.dumps(
                    {
                        "type": text,
                        "event_id": "ev_t",
                        "response_id": rid,
                        "item_id": "item_1",
                        "output_index": 0,
                        "content_index": 0,
                        "delta": delta,
                    }
                )
            )
            await ws.send(
                json.dumps(
                    {
                        "type": transcript,
                        "event_id": "ev_a",
                        "response_id": rid,
                        "item_id": "item_1",
                        "output_index": 0,
                        "content_index": 0,
                        "delta": delta,
                    }
                )
            )
            await ws.send(
                json.dumps(
                    {
                        "type": audio,
                        "event_id": "ev_b",
                        "response_id": rid,
                        "item_id": "item_1",
                        "output_index": 0,
                        "content_index": 0,
                        "delta": base64.b64encode(AUDIO_CHUNK).decode(),
                    }
                )
            )
        await ws.send(
            json.dumps(
                {
                    "type": "response.done",
                    "event_id": "ev_3",
                    "response": {
                        "id": rid,
                        "object": "realtime.response",
                        "status": "completed",
                        "output": [
                            {
                                "type": "message",
                                "content": [
                                    {"type": "output_text", "text": "".join(DELTAS)}
                                ],
                            }
                        ],
                        "usage": USAGE,
                    },
                }
            )
        )


def _model_of(path: str) -> str:
    if "model=" in path:
        return path.split("model=", 1)[1].split("&", 1)[0]
    return "gpt-realtime"
