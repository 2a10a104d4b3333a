"""
Limits, usage and benches shared through a real redis-server: two proxies
(in this process, and as two twistd children) hold one key's limits.
"""

from __future__ import annotations

import gc
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from openai_proxy.keys.limits import Usage
from openai_proxy.keys.named import NamedKey
from openai_proxy.keys.redisstore import RedisStore
from openai_proxy.upstream.failover import KeyPool
from tests.fake_upstream import FakeOpenAI, Script
from tests.harness import JSON, Proxy, client
from tests.redis_server import SKIP, RedisServer
from tests.test_keys import ADMIN, ALICE, BOB, CAROL, KEYS_TOML, chat, keys_file
from tests.test_operations import start_twistd
from tests.test_sighup import HoldingUpstream


class SharedLimitsTests(TestCase):
    skip = SKIP

    async def start(self, **extra: str) -> list[Proxy]:
        self.redis = await RedisServer.start(self)
        self.fake = HoldingUpstream()
        self.env = {
            "UPSTREAM": self.fake.start(self),
            "KEYS_FILE": keys_file(self, KEYS_TOML),
            "OPENAI_KEY": "sk-server-one,sk-server-two",
            "ADMIN_KEY": ADMIN,
            "REDIS_URL": self.redis.url,
            "TIMEOUT": "2000",
            **extra,
        }
        self.http = client(self)
        proxies = [Proxy(self, self.env), Proxy(self, self.env)]
        for proxy in proxies:
            await proxy.app.store.ready()
        return proxies

    async def post(
        self, base: str, key: str, payload: Any | None = None, hold: bool = False
    ) -> Any:
        headers = {"Authorization": f"Bearer {key}", **JSON}
        if hold:
            headers["X-Hold"] = "1"  # the upstream answers when released
        response = await self.http.post(
            base + "/v1/chat/completions",
            json.dumps(payload or chat()).encode(),
            headers=headers,
        )
        body = await response.content()
        return response, body

    async def test_rpm_holds_across_two_proxies(self) -> None:
        one, two = await self.start()
        self.assertEqual((await self.post(one.url, ALICE))[0].code, 200)
        ok, _ = await self.post(two.url, ALICE)
        self.assertEqual(
            ok.headers.getRawHeaders(b"x-ratelimit-remaining-requests"), [b"0"]
        )
        refused, body = await self.post(one.url, ALICE)
        self.assertEqual(refused.code, 429)
        self.assertEqual(json.loads(body)["error"]["type"], "requests")
        self.assertTrue(refused.headers.getRawHeaders(b"retry-after-ms"))
        self.assertEqual(len(self.fake.received), 2)

    async def test_tokens_and_usage_are_shared(self) -> None:
        one, two = await self.start()
        await self.post(one.url, BOB)
        await self.post(two.url, BOB)
        refused, body = await self.post(one.url, BOB)
        self.assertEqual(
            (refused.code, json.loads(body)["error"]["type"]), (429, "tokens")
        )
        response = await self.http.get(
            two.url + "/usage", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        usage = json.loads(await response.content())
        self.assertEqual(usage["keys"]["bob"]["today"]["requests"], 2)
        self.assertEqual(usage["keys"]["bob"]["month"]["total_tokens"], 4)

    async def test_concurrency_is_shared_and_released(self) -> None:
        one, two = await self.start()
        first = Deferred.fromCoroutine(self.post(one.url, CAROL, hold=True))
        await self.fake.arrived
        refused, _ = await self.post(two.url, CAROL)
        self.assertEqual(refused.code, 429)
        self.fake.release()
        self.assertEqual((await first)[0].code, 200)
        await one.app.store.ping()  # the release went before this
        self.assertEqual((await self.post(two.url, CAROL))[0].code, 200)

    async def test_a_bench_is_seen_by_the_other_proxy(self) -> None:
        one, two = await self.start()
        self.fake.by_key["sk-server-one"] = Script(status=401, body=b"{}")
        self.fake.by_key["sk-server-two"] = Script(status=401, body=b"{}")
        response, _ = await self.post(one.url, ALICE)
        self.assertEqual(response.code, 401)
        self.assertFalse(two.app.key_pool.benched(0))
        await two.app.store._read_benches()  # what its refresh loop does
        self.assertTrue(two.app.key_pool.benched(0))
        self.assertTrue(two.app.key_pool.benched(1))

    async def test_redis_down_allows_by_default_and_readyz_says_so(self) -> None:
        one, _ = await self.start()
        await self.redis.stop()
        response, _ = await self.post(one.url, ALICE)
        self.assertEqual(response.code, 200)
        ready = await self.http.get(one.url + "/readyz")
        self.assertEqual(ready.code, 200)
        self.assertEqual(json.loads(await ready.content())["redis"], "down")
        text = (await (await self.http.get(one.url + "/metrics")).content()).decode()
        self.assertIn("openai_proxy_limits_errors_total 1.0", text)

    async def test_usage_while_redis_is_down_is_a_503_and_nothing_else(self) -> None:
        one, _ = await self.start()
        await self.redis.stop()
        response = await self.http.get(
            one.url + "/usage", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        body = json.loads(await response.content())
        self.assertEqual(
            (response.code, body["error"]["code"]), (503, "limits_unavailable")
        )
        # Both periods' reads failed; one left unawaited would log an
        # "Unhandled error in Deferred" when collected (trial fails on it).
        gc.collect()

    async def test_redis_down_with_deny_refuses_named_keys(self) -> None:
        one, _ = await self.start(LIMITS_ON_ERROR="deny")
        await self.redis.stop()
        response, body = await self.post(one.url, ALICE)
        self.assertEqual(
            (response.code, json.loads(body)["error"]["code"]),
            (503, "limits_unavailable"),
        )
        ready = await self.http.get(one.url + "/readyz")
        self.assertEqual(ready.code, 503)
        await ready.content()


class TwoProcessTests(TestCase):
    skip = SKIP

    async def test_rpm_holds_across_two_twistd_processes(self) -> None:
        redis = await RedisServer.start(self)
        fake = FakeOpenAI()
        env = {
            "UPSTREAM": fake.start(self),
            "KEYS_FILE": keys_file(self, KEYS_TOML),
            "OPENAI_KEY": "sk-server-one",
            "REDIS_URL": redis.url,
        }
        http = client(self)
        ports = []
        for _ in range(2):
            proc, port = await start_twistd(self, env)
            await proc.logged(rb"Redis connected")
            ports.append(port)
        codes = []
        for port in (ports[0], ports[1], ports[0], ports[1]):
            response = await http.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json.dumps(chat()).encode(),
                headers={"Authorization": f"Bearer {ALICE}", **JSON},
            )
            await response.content()
            codes.append(response.code)
        self.assertEqual(codes, [200, 200, 429, 429])


class RedisWindowTests(TestCase):
    """The sliding windows of the Redis scripts, seeded with past buckets."""

    skip = SKIP

    async def start(self) -> RedisStore:
        redis = await RedisServer.start(self)
        store = RedisStore(redis.url, reactor, KeyPool([]))
        store.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(store.stop()))
        await store.ready()
        return store

    async def seed(self, store: RedisStore, window: str, ago: dict[int, int]) -> int:
        """Put buckets seconds C{ago} into a window; return Redis's second."""
        reply = await store._redis.call("TIME")
        assert isinstance(reply, list) and isinstance(reply[0], bytes)
        now = int(reply[0])
        fields: list[Any] = []
        for seconds, count in ago.items():
            fields += [now - seconds, count]
        oldest, newest = now - max(ago), now - min(ago)
        total = sum(ago.values())
        key = "openai-proxy:" + window
        await store._redis.call("HSET", key, "t", total, "o", oldest, "n", newest)
        await store._redis.call("HSET", key, *fields)
        return now

    async def test_requests_leave_the_window_after_a_minute(self) -> None:
        store = await self.start()
        key = NamedKey("w", b"x" * 32, rpm=3)
        now = await self.seed(store, "rpm:w", {61: 3, 30: 2})
        admitted = await store.admit(key, "t1")
        self.assertIsNone(admitted.denied)
        self.assertEqual(admitted.requests_used, 3)
        self.assertTrue(29 <= admitted.requests_reset <= 31)
        gone = await store._redis.call("HEXISTS", "openai-proxy:rpm:w", now - 61)
        self.assertEqual(gone, 0)
        refused = await store.admit(key, "t2")
        self.assertEqual(refused.denied, "requests")
        self.assertTrue(29 <= refused.retry_after <= 31, refused)

    async def test_an_idle_window_starts_afresh(self) -> None:
        store = await self.start()
        key = NamedKey("w", b"x" * 32, rpm=3)
        await self.seed(store, "rpm:w", {100: 5, 90: 4})
        admitted = await store.admit(key, "t1")
        self.assertEqual((admitted.denied, admitted.requests_used), (None, 1))

    async def test_tokens_charged_at_the_end_count_toward_tpm(self) -> None:
        store = await self.start()
        key = NamedKey("w", b"x" * 32, tpm=10)
        await self.seed(store, "tpm:w", {45: 4})
        self.assertEqual((await store.admit(key, "t1")).tokens_used, 4)
        store.settle(key, "t1", Usage(3, 3))  # sent before the next admission
        refused = await store.admit(key, "t2")
        self.assertEqual((refused.denied, refused.tokens_used), ("tokens", 10))
        self.assertTrue(14 <= refused.retry_after <= 16, refused)

    async def test_tokens_charged_mid_session_keep_the_slot(self) -> None:
        store = await self.start()
        key = NamedKey("w", b"x" * 32, tpm=10, concurrency=1)
        self.assertIsNone((await store.admit(key, "t1")).denied)
        store.charge(key, Usage(3, 3))  # a session's turn: the slot stays held
        refused = await store.admit(key, "t2")
        self.assertEqual((refused.denied, refused.tokens_used), ("concurrency", 6))
        store.settle(key, "t1", None)
        admitted = await store.admit(key, "t3")
        self.assertEqual((admitted.denied, admitted.tokens_used), (None, 6))
