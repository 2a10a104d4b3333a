"""
Concurrency slots kept in Redis (issue 17, items 7, 8 and 18): every
admission is settled exactly once, a slot is a lease the live process
renews, and a settle is reported lost only when it was.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from openai_proxy import forward
from openai_proxy.keys import redisstore
from openai_proxy.keys.limits import Decision
from openai_proxy.keys.named import NamedKey
from openai_proxy.keys.redisstore import RedisStore
from openai_proxy.keys.resp import RedisClient
from openai_proxy.upstream.failover import KeyPool
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


async def store_settled(proxy: Proxy) -> None:
    """Wait until every request admitted so far has settled."""
    await proxy.app.accounting.settled()


class _SlotTestCase(TestCase):
    skip = SKIP
    timeout = 30

    async def start(self, *options: str, **extra: str) -> Proxy:
        # DEBUG SLEEP stands for a slow Redis.
        self.redis = await RedisServer.start(
            self, "--enable-debug-command", "local", *options
        )
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
        self.fake.script = None  # the next requests are answered at once
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
        await store_settled(proxy)
        await store.ping()  # sent after the settle: answered once it is done
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


#: Short leases for the tests: what takes a minute in production takes
#: well under a second here.
_LEASE, _RENEW_EVERY = 0.6, 0.15


class LeaseTests(_SlotTestCase):
    """Item 8: a slot is a lease the live process renews."""

    def setUp(self) -> None:
        self.patch(redisstore, "LEASE", _LEASE)
        self.patch(redisstore, "RENEW_EVERY", _RENEW_EVERY)

    async def test_a_settle_lost_while_redis_restarts_frees_the_slot_in_a_lease(
        self,
    ) -> None:
        data = self.mktemp()
        os.makedirs(data)
        proxy = await self.start("--appendonly", "yes", "--dir", data)
        store = proxy.app.store
        stream = await self.open_stream()
        await self.redis.stop()
        assert stream.transport is not None
        stream.transport.abortConnection()  # it ends while Redis is down
        await stream.done
        await store_settled(proxy)
        self.assertEqual(store.in_flight, 0)
        await self.redis.restart()
        await store.ready()
        side = await self.side_client()
        # Redis kept the slot (its data survived the restart)...
        self.assertEqual(await side.call("ZCARD", _IN_FLIGHT), 1)
        # ...and freed it when its lease ran out: not ten minutes later.
        await deferLater(reactor, _LEASE, lambda: None)
        self.assertEqual(await self.carol_code(), 200)

    async def test_a_request_longer_than_its_lease_keeps_its_slot(self) -> None:
        proxy = await self.start()
        stream = await self.open_stream()
        await deferLater(reactor, 3 * _LEASE, lambda: None)
        self.assertEqual(await self.carol_code(), 429)
        self.assertEqual(proxy.app.store.in_flight, 1)
        assert stream.transport is not None
        stream.transport.abortConnection()
        await stream.done
        await store_settled(proxy)
        await proxy.app.store.ping()  # sent after the settle: answered once it is done
        self.assertEqual(await self.carol_code(), 200)

    async def test_a_stream_counts_again_once_a_wiped_redis_is_back(self) -> None:
        proxy = await self.start()  # no persistence: a restart loses the slots
        store = proxy.app.store
        stream = await self.open_stream()
        await self.redis.restart()
        await store.ready()
        await deferLater(reactor, 2 * _RENEW_EVERY, lambda: None)
        await store.ping()
        self.assertEqual(await self.carol_code(), 429)
        assert stream.transport is not None
        stream.transport.abortConnection()
        await stream.done

    async def test_one_script_renews_every_lease_of_the_process(self) -> None:
        self.redis = await RedisServer.start(self)
        store = RedisStore(self.redis.url, reactor, KeyPool([]), renew_every=60)
        store.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(store.stop()))
        await store.ready()
        keys = [NamedKey(name, b"x" * 32, concurrency=100) for name in "ab"]
        for n in range(50):
            await store.admit(keys[n % 2], f"t{n}")
        side = await self.side_client()
        before = await self.scripts_run(side)
        scores = await side.call(
            "ZRANGE", "openai-proxy:inflight:a", 0, 0, "WITHSCORES"
        )
        store._renew()
        await store.ping()
        self.assertEqual(await self.scripts_run(side), before + 1)
        renewed = await side.call(
            "ZRANGE", "openai-proxy:inflight:a", 0, 0, "WITHSCORES"
        )
        assert isinstance(scores, list) and isinstance(renewed, list)
        self.assertGreater(float(renewed[1]), float(scores[1]))
        self.assertEqual(await side.call("ZCARD", "openai-proxy:inflight:b"), 25)

    async def scripts_run(self, side: RedisClient) -> int:
        """How many EVALSHA calls Redis has run so far."""
        info = await side.call("INFO", "commandstats")
        assert isinstance(info, bytes)
        found = re.search(rb"cmdstat_evalsha:calls=(\d+)", info)
        return int(found.group(1)) if found else 0
