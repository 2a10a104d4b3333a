"""
Limits, usage and benches shared through a real redis-server: two proxies
(in this process, and as two twistd children) hold one key's limits.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.fake_upstream import FakeOpenAI, Script
from tests.harness import JSON, Proxy, client
from tests.redis_server import SKIP, RedisServer
from tests.test_keys import ADMIN, ALICE, BOB, CAROL, KEYS_TOML, chat, keys_file
from tests.test_operations import start_twistd


class SharedLimitsTests(TestCase):
    skip = SKIP

    async def start(self, **extra: str) -> list[Proxy]:
        self.redis = await RedisServer.start(self)
        self.fake = FakeOpenAI()
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

    async def post(self, base: str, key: str, payload: Any | None = None) -> Any:
        response = await self.http.post(
            base + "/v1/chat/completions",
            json.dumps(payload or chat()).encode(),
            headers={"Authorization": f"Bearer {key}", **JSON},
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
        self.fake.by_key["sk-server-one"] = Script(stall=True)
        self.fake.by_key["sk-server-two"] = Script(stall=True)
        first = Deferred.fromCoroutine(self.post(one.url, CAROL))
        while not self.fake.received:
            await (await self.http.get(one.url + "/healthz")).content()
        refused, _ = await self.post(two.url, CAROL)
        self.assertEqual(refused.code, 429)
        self.fake.by_key.clear()
        self.fake._cleanup()
        await first
        await two.app.store._conn.ping()  # the release went before this
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
            _, port = await start_twistd(self, env)
            ports.append(port)
        for port in ports:
            while True:  # until its Redis connection is up
                ready = await http.get(f"http://127.0.0.1:{port}/readyz")
                if json.loads(await ready.content()).get("redis") == "up":
                    break
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
