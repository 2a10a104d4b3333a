"""
SIGHUP re-reads the keys file in a real twistd with two workers: one signal
to the main process reaches both, requests in flight carry on, and a bad
file keeps the old keys.  A SIGHUP never ends the proxy, not even while it
starts.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET, Request

from tests.fake_upstream import FakeOpenAI, chat_completion
from tests.harness import JSON, client
from tests.test_keys import chat, keys_file
from tests.test_operations import Twistd, start_twistd

#: twistd, saying "plugin loaded" on stdout once it has imported the proxy's
#: plugin module (twistd's first import of the proxy's code).  It starts
#: with SIGHUP unblocked, as from a shell: the test process importing that
#: module has it blocked, and a child would inherit that.
ANNOUNCING_TWISTD = (
    sys.executable,
    "-c",
    "import signal, sys\n"
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})\n"
    "import openai_proxy.tap\n"
    "sys.stdout.write('plugin loaded\\n')\n"
    "sys.stdout.flush()\n"
    "from twisted.scripts.twistd import run\n"
    "run()\n",
)

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


class SighupStorm:
    """SIGHUP sent to a process every 5 ms from L{start} until L{stop}."""

    def __init__(self, proc: Twistd) -> None:
        self._proc = proc
        self.sent = 0
        self._loop = LoopingCall(self._hup)
        self._loop.clock = reactor
        self._waits: list[tuple[int, Deferred[None]]] = []

    def start(self) -> None:
        transport: Any = self._proc.transport
        self._pid: int = transport.pid
        self._loop.start(0.005)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        waits, self._waits = self._waits, []
        for _, d in waits:
            d.callback(None)

    def more(self, count: int) -> Deferred[None]:
        """Fire once C{count} more signals were sent (or the storm stopped)."""
        d: Deferred[None] = Deferred()
        self._waits.append((self.sent + count, d))
        return d

    def _hup(self) -> None:
        try:
            os.kill(self._pid, signal.SIGHUP)
        except ProcessLookupError:
            self.stop()  # it died: the test says so
            return
        self.sent += 1
        for wait in list(self._waits):
            if self.sent >= wait[0]:
                self._waits.remove(wait)
                wait[1].callback(None)


class SighupAtStartTests(TestCase):
    """
    Item 19 of issue 17: SIGHUPs from the moment the proxy's code runs,
    through its start and beyond, neither kill it nor its workers.
    """

    timeout = 30

    async def storm_through_start(
        self, env: dict[str, str], listening: bytes
    ) -> tuple[Twistd, int, SighupStorm]:
        """
        Start the proxy with SIGHUPs sent from the moment its plugin is
        loaded until it logged C{listening}, and 20 more; check it is still
        running.
        """
        proc = Twistd()
        storm = SighupStorm(proc)
        self.addCleanup(storm.stop)

        async def hup_from_the_plugin_on() -> None:
            await proc.logged(rb"plugin loaded")
            storm.start()

        stormed = Deferred.fromCoroutine(hup_from_the_plugin_on())
        _, port = await start_twistd(self, env, twistd=ANNOUNCING_TWISTD, proto=proc)
        await stormed
        await proc.logged(listening)
        await storm.more(20)
        storm.stop()
        self.assertFalse(proc.ended.called, proc.out)
        return proc, port, storm

    async def test_sighups_while_it_starts_are_handled_once_it_has(self) -> None:
        upstream = FakeOpenAI()
        env = {
            "UPSTREAM": upstream.start(self),
            "KEYS_FILE": keys_file(self, one_key("old", OLD)),
            "OPENAI_KEY": "sk-server-one",
        }
        proc, port, storm = await self.storm_through_start(
            env, rb"ProxySite starting on"
        )
        self.assertGreater(storm.sent, 20)
        await proc.logged(rb"keys file reloaded: 1 key")
        self.assertEqual(await keyed_post(self, port, OLD), 200)

    async def test_sighup_without_a_keys_file_is_logged_not_fatal(self) -> None:
        upstream = FakeOpenAI()
        env = {"UPSTREAM": upstream.start(self)}
        proc, port, _ = await self.storm_through_start(env, rb"ProxySite starting on")
        await proc.logged(
            rb"SIGHUP: no KEYS_FILE or UPSTREAMS_FILE, nothing to re-read"
        )
        # Clients bring their own OpenAI keys here.
        self.assertEqual(await keyed_post(self, port, "sk-client-0123456789"), 200)

    async def test_sighups_while_workers_start_do_not_kill_them(self) -> None:
        upstream = FakeOpenAI()
        env = {
            "UPSTREAM": upstream.start(self),
            "KEYS_FILE": keys_file(self, one_key("old", OLD)),
            "OPENAI_KEY": "sk-server-one",
            "WORKERS": "2",
        }
        # The main process passes each SIGHUP on to its worker, which gets
        # them from its first instant.
        proc, port, _ = await self.storm_through_start(
            env, rb"(?s)(?:ProxySite starting on.*?){2}|exited"
        )
        await proc.logged(rb"(?s)(?:keys file reloaded: 1 key.*?){2}")
        self.assertNotIn(b"exited", proc.out)
        for _ in range(6):  # new connections reach both processes
            self.assertEqual(await keyed_post(self, port, OLD), 200)
        self.assertNotIn(b"exited", proc.out)


async def keyed_post(test: TestCase, port: int, key: str) -> int:
    """Status of one chat completion through the proxy, on a new connection."""
    headers = {**JSON, "Authorization": f"Bearer {key}"}
    response = await client(test).post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json.dumps(chat()).encode(),
        headers=headers,
    )
    await response.content()
    code: int = response.code
    return code
