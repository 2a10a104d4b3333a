"""
Concurrency slots kept in Redis (issue 17, items 7, 8 and 18): every
admission is settled exactly once, a slot is a lease the live process
renews, and a settle is reported lost only when it was.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from openai_proxy import forward
from openai_proxy.keys import NamedKey
from openai_proxy.limits import Decision
from openai_proxy.resp import RedisClient
from tests.fake_upstream import FakeOpenAI, Script, chat_stream
from tests.harness import JSON, Proxy, client
from tests.rawhttp import Collector, connect
from tests.redis_server import SKIP, RedisServer
from tests.test_hardening import capture_logs
from tests.test_keys import CAROL, KEYS_TOML, chat, keys_file

_IN_FLIGHT = "openai-proxy:inflight:carol"


def _post(key: str, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


class _SlotTestCase(TestCase):
    skip = SKIP
    timeout = 30

    async def start(self, **extra: str) -> Proxy:
        # DEBUG SLEEP stands for a slow Redis.
        self.redis = await RedisServer.start(self, "--enable-debug-command", "local")
        self.fake = FakeOpenAI()
        self.proxy = Proxy(
            self,
            {
                "UPSTREAM": self.fake.start(self),
                "KEYS_FILE": keys_file(self, KEYS_TOML),
                "OPENAI_KEY": "sk-server-one",
                "REDIS_URL": self.redis.url,
                **extra,
            },
        )
        self.http = client(self)
        await self.proxy.app.store.ready()
        return self.proxy

    async def side_client(self) -> RedisClient:
        """A connection of the test's own to the same Redis."""
        side = RedisClient(self.redis.url, reactor)
        side.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(side.stop()))
        await side.when_up()
        return side

    async def carol_code(self) -> int:
        """The status of one plain request on the key with C{concurrency = 1}."""
        response = await self.http.post(
            self.proxy.url + "/v1/chat/completions",
            json.dumps(chat()).encode(),
            headers={"Authorization": f"Bearer {CAROL}", **JSON},
        )
        await response.content()
        code: int = response.code
        return code

    async def open_stream(self) -> Collector:
        """A stream on carol's key that stalls after its first events."""
        self.fake.script = Script(events=chat_stream(["a", "b", "c"]), stall_after=2)
        proto = await connect(self.proxy.port.getHost().port)
        assert proto.transport is not None
        proto.transport.write(_post(CAROL, chat(stream=True)))
        await proto.first
        return proto


class SettledOnceTests(_SlotTestCase):
    """Item 7: an admission is settled whatever happens after it."""

    async def test_a_client_gone_during_a_slow_admission_frees_its_slot(
        self,
    ) -> None:
        proxy = await self.start()
        store = proxy.app.store
        side = await self.side_client()
        admitting: Deferred[None] = Deferred()
        admit = store.admit

        def spy(key: NamedKey, ticket: str) -> Deferred[Decision]:
            if not admitting.called:
                admitting.callback(None)
            return admit(key, ticket)

        self.patch(store, "admit", spy)
        # Redis holds every command (the admission too) for a second.
        asleep = side.call("DEBUG", "SLEEP", "1")
        proto = await connect(proxy.port.getHost().port)
        assert proto.transport is not None
        proto.transport.write(_post(CAROL, chat()))
        await admitting
        proto.transport.abortConnection()
        await proto.done
        await asleep
        await store.ping()  # the admission's answer, and what followed it
        self.assertEqual(await side.call("ZCARD", _IN_FLIGHT), 0)
        self.assertEqual(await self.carol_code(), 200)


class UnexpectedErrorTests(TestCase):
    """Item 7, without Redis: an error nobody expected still settles."""

    async def test_a_request_that_crashes_after_admission_frees_its_slot(
        self,
    ) -> None:
        fake = FakeOpenAI()
        proxy = Proxy(
            self,
            {
                "UPSTREAM": fake.start(self),
                "KEYS_FILE": keys_file(self, KEYS_TOML),
                "OPENAI_KEY": "sk-server-one",
            },
        )
        http = client(self)
        crashes = [RuntimeError("a bug")]

        async def request_body(*args: Any, **kwargs: Any) -> Any:
            if crashes:
                raise crashes.pop()
            return await real_request_body(*args, **kwargs)

        real_request_body = forward.request_body
        self.patch(forward, "request_body", request_body)
        codes = []
        for _ in range(2):
            response = await http.post(
                proxy.url + "/v1/chat/completions",
                json.dumps(chat()).encode(),
                headers={"Authorization": f"Bearer {CAROL}", **JSON},
            )
            await response.content()
            codes.append(response.code)
        self.assertEqual(codes, [500, 200])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class GraceCutTests(_SlotTestCase):
    """Item 18: streams cut at GRACE settle, and nothing says otherwise."""

    async def test_streams_cut_at_grace_are_settled_without_a_warning(
        self,
    ) -> None:
        proxy = await self.start(GRACE="0.2")
        side = await self.side_client()
        streams = [await self.open_stream()]
        self.assertEqual(await side.call("ZCARD", _IN_FLIGHT), 1)
        lines = capture_logs(self)
        await proxy.app.stopService()
        for stream in streams:
            await stream.done
        self.assertEqual(await side.call("ZCARD", _IN_FLIGHT), 0)
        self.assertEqual([line for line in lines if "not recorded" in line], [])
