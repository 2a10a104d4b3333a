"""
SIGHUP re-reads the keys file in a real twistd with two workers: one signal
to the main process reaches both, requests in flight carry on, and a bad
file keeps the old keys.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET, Request

from tests.fake_upstream import FakeOpenAI, chat_completion
from tests.harness import JSON, client
from tests.test_keys import chat, keys_file
from tests.test_operations import Twistd, start_twistd

OLD = "pk-old-key-41c7e0"
NEW = "pk-new-key-90b2aa"


def one_key(name: str, key: str) -> str:
    return f'[[keys]]\nname = "{name}"\nkey = "{key}"\n'


class HoldingUpstream(FakeOpenAI):
    """
    The fake API, holding requests sent with C{x-hold} until L{release};
    C{arrived} fires when the first is held.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []
        self.arrived: Deferred[None] = Deferred()

    def render(self, request: Request) -> bytes | int:
        if request.getHeader(b"x-hold") is None:
            return super().render(request)
        self.held.append(request)
        if not self.arrived.called:
            self.arrived.callback(None)
        return NOT_DONE_YET

    def release(self) -> None:
        for request in self.held:
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps(chat_completion("held")).encode())
            request.finish()


class SighupTests(TestCase):
    timeout = 30

    async def test_sighup_reloads_the_keys_file_in_every_worker(self) -> None:
        upstream = HoldingUpstream()
        path = keys_file(self, one_key("old", OLD))
        proc, port = await start_twistd(
            self,
            {
                "UPSTREAM": upstream.start(self),
                "KEYS_FILE": path,
                "OPENAI_KEY": "sk-server-one",
                "WORKERS": "2",
            },
        )
        # The second process listening has its SIGHUP handler set.
        await proc.logged(rb"(?s)(?:ProxySite starting on.*?){2}")
        self.http = client(self)
        self.port = port
        self.assertEqual(await self.codes(OLD), {200})
        self.assertEqual(await self.codes(NEW), {403})

        in_flight = Deferred.fromCoroutine(self.post(OLD, hold=True))
        await upstream.arrived
        with open(path, "w") as f:
            f.write(one_key("new", NEW))
        hup(proc)
        await proc.logged(rb"(?s)(?:keys file reloaded: 1 key.*?){2}")
        self.assertEqual(await self.codes(NEW), {200})
        self.assertEqual(await self.codes(OLD), {403})
        upstream.release()
        self.assertEqual(await in_flight, 200)  # admitted before, kept its connection

        with open(path, "w") as f:
            f.write("[[keys]]\nname = 'broken'\n")
        hup(proc)
        await proc.logged(
            rb"(?s)(?:keys file not reloaded, keeping the old keys: .*?"
            rb"give exactly one of 'key' and 'sha256'.*?){2}"
        )
        self.assertEqual(await self.codes(NEW), {200})
        self.assertEqual(await self.codes(OLD), {403})

    async def post(self, key: str, *, hold: bool = False) -> int:
        headers = {"Authorization": f"Bearer {key}", **JSON}
        if hold:
            headers["X-Hold"] = "1"
        response = await self.http.post(
            f"http://127.0.0.1:{self.port}/v1/chat/completions",
            json.dumps(chat()).encode(),
            headers=headers,
        )
        await response.content()
        code: int = response.code
        return code

    async def codes(self, key: str) -> set[int]:
        # Each request on a new connection: the kernel spreads them over
        # both workers, so every answer must agree.
        return {await self.post(key) for _ in range(6)}


def hup(proc: Twistd) -> None:
    transport: Any = proc.transport
    os.kill(transport.pid, 1)  # SIGHUP, to the main process only
