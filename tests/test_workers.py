"""
Tests for openai_proxy.ops.workers: several processes serving one socket.

The multi-process tests run ``twistd -n openai-proxy`` with ``WORKERS=2`` as
a child of the test, against a fake upstream served by the test's reactor.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from openai_proxy.config import ConfigError, check_listen, parse_workers
from openai_proxy.cpus import available_cpus
from openai_proxy.ops import workers
from tests.harness import TWISTD, client

ROOT = Path(__file__).resolve().parent.parent


class _Upstream(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b'{"object": "chat.completion"}'


class _Twistd(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _listening_inodes(port: int) -> set[str]:
    # /proc/net/tcp: local address is HEXIP:HEXPORT, state 0A is LISTEN.
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            found.add(fields[9])
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and _alive(int(entry)):
                found.append(int(entry))
    return found


class ParseWorkersTests(unittest.TestCase):
    def test_default_is_one(self) -> None:
        self.assertEqual(parse_workers(None), 1)
        self.assertEqual(parse_workers(" "), 1)

    def test_number_and_auto(self) -> None:
        self.assertEqual(parse_workers("3"), 3)
        self.assertEqual(parse_workers("AUTO"), available_cpus())

    def test_bad_values(self) -> None:
        for raw in ("0", "-1", "two", "1.5"):
            with self.assertRaises(ConfigError) as caught:
                parse_workers(raw)
            self.assertEqual(caught.exception.setting, "--workers/WORKERS")


class ListenAndForkTests(unittest.TestCase):
    def test_one_worker_is_plain_strports(self) -> None:
        svc = workers.listen_and_fork(
            ["tcp:0:interface=127.0.0.1"], Site(Resource()), 1, reactor, {}
        )
        self.assertIsInstance(svc, MultiService)

    def test_check_listen(self) -> None:
        check_listen(["unix:/tmp/x.sock"], 1)
        check_listen(["tcp:80", "tcp6:81:interface=\\:\\:1"], 4)
        with self.assertRaises(ConfigError):
            check_listen(["tcp:80", "systemd:domain=INET:index=0"], 2)

    def test_only_tcp_can_be_shared(self) -> None:
        for description in ("unix:/tmp/x.sock", "ssl:443"):
            with self.assertRaises(ConfigError) as caught:
                workers.listen_and_fork(
                    ["tcp:0", description], Site(Resource()), 2, reactor, {}
                )
            self.assertIn(repr(description), str(caught.exception))


class WorkersProcessTests(unittest.TestCase):
    """A real twistd with WORKERS=2."""

    timeout = 30

    async def _start(self) -> None:
        upstream = reactor.listenTCP(0, Site(_Upstream()), interface="127.0.0.1")
        self.addCleanup(upstream.stopListening)
        self.port = _free_port()
        env = dict(os.environ)
        env.update(
            PYTHONPATH=str(ROOT),
            UPSTREAM=f"http://127.0.0.1:{upstream.getHost().port}",
            PORT=f"tcp:{self.port}:interface=127.0.0.1",
            WORKERS="2",
            PROXY_KEY="",
            OPENAI_KEY="",
        )
        self.twistd = _Twistd()
        argv = [*TWISTD, "-n", "--pidfile=", "openai-proxy"]
        self.process = reactor.spawnProcess(
            self.twistd, sys.executable, argv, env=env, path=str(ROOT)
        )
        self.addCleanup(self._kill)
        self.parent: int = self.process.pid
        await self._until(lambda: len(_children(self.parent)) == 1 and self._serving())

    def _serving(self) -> bool:
        return len(_listening_inodes(self.port)) == 2

    def _kill(self) -> Deferred[None] | None:
        for pid in _children(self.parent):
            os.kill(pid, signal.SIGKILL)
        if self.twistd.ended.called:
            return None
        self.process.signalProcess("KILL")
        return self.twistd.ended

    async def _until(self, condition: Any, limit: float = 10.0) -> None:
        deadline = time.monotonic() + limit
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out; twistd said:\n{self.twistd.output.decode()}")
            await deferLater(reactor, 0.05, lambda: None)

    def _holders(self) -> set[int]:
        # Which processes hold accepted connections to the proxy's port.
        accepted = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{self.port:04X}") and fields[3] == "01":
                accepted.add(fields[9])
        pids = [self.parent, *_children(self.parent)]
        return {pid for pid in pids if _socket_inodes(pid) & accepted}

    async def _both_accept(self) -> set[int]:
        held = []
        seen: set[int] = set()
        try:
            for _ in range(100):
                s = socket.create_connection(("127.0.0.1", self.port))
                held.append(s)
                await deferLater(reactor, 0.02, lambda: None)
                seen = self._holders()
                if len(seen) == 2:
                    break
        finally:
            for s in held:
                s.close()
        return seen

    async def _ok(self) -> None:
        http = client(self)
        for _ in range(5):
            response = await http.post(
                f"http://127.0.0.1:{self.port}/v1/chat/completions",
                data=b"{}",
                headers={"Authorization": "Bearer sk-test"},
            )
            self.assertEqual(response.code, 200)
            self.assertIn(b"chat.completion", await response.content())

    async def _scraped_chat_requests(self) -> list[float]:
        totals = []
        for _ in range(6):
            response = await client(self).get(f"http://127.0.0.1:{self.port}/metrics")
            text = (await response.content()).decode()
            totals.append(
                sum(
                    sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                    if sample.name == "openai_proxy_requests_total"
                    and sample.labels.get("route") == "chat"
                )
            )
        return totals

    def test_two_processes_share_restart_and_stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._scenario())

    async def _scenario(self) -> None:
        await self._start()
        [child] = _children(self.parent)
        # Two SO_REUSEPORT sockets on the port, both bound by the parent;
        # the child adopted one of them.
        listening = _listening_inodes(self.port)
        self.assertEqual(len(listening & _socket_inodes(self.parent)), 2)
        await self._until(lambda: len(listening & _socket_inodes(child)) == 1)
        [inode] = listening & _socket_inodes(child)
        await self._ok()
        self.assertEqual(await self._both_accept(), {self.parent, child})

        os.kill(child, signal.SIGKILL)
        await self._until(lambda: _children(self.parent) not in ([], [child]))
        [replacement] = _children(self.parent)
        # It took over the same socket (and any connections queued on it).
        await self._until(lambda: inode in _socket_inodes(replacement))
        await self._ok()
        self.assertEqual(await self._both_accept(), {self.parent, replacement})
        # Every scrape, whichever process answers it, counts all ten
        # requests: the killed child's five included.
        self.assertEqual(await self._scraped_chat_requests(), [10] * 6)

        self.process.signalProcess("TERM")
        await self.twistd.ended
        await self._until(lambda: not _alive(replacement), limit=5.0)
        self.assertIn(b"worker 1 started", bytes(self.twistd.output))

    def test_children_stop_when_parent_dies(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._orphaned())

    async def _orphaned(self) -> None:
        await self._start()
        [child] = _children(self.parent)
        self.process.signalProcess("KILL")
        await self.twistd.ended
        # PR_SET_PDEATHSIG (and end-of-file on its settings pipe) stop it.
        await self._until(lambda: not _alive(child), limit=5.0)
