"""
A long run of the same refusal keeps no memory: each request's error is an
object of its own, so nothing (a shared exception's traceback, a parser's
partial buffers) keeps a finished request's frames alive.

Each test makes C{_WARM_UP} requests (caches fill, pools settle), then
counts with C{tracemalloc} how many memory blocks C{runs} more requests
add to what the first C{runs} of them left allocated (after a full
collection each time).  Blocks rather than bytes: a dictionary of
Twisted's that grows by doubling is one block of many bytes, once.
Over loopback, with the proxy in this process.
"""

from __future__ import annotations

import gc
import json
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from openai_proxy.keys.limits import periods
from openai_proxy.keys.resp import RedisClient
from tests.harness import KEY, Proxy, client, closed_port_url
from tests.redis_server import SKIP, RedisServer
from tests.test_keys import ADMIN, ALICE, KEYS_TOML, chat, keys_file

_WARM_UP = 20
_RUNS = 60
#: Requests in flight at once (an unreachable upstream takes its time).
_AT_ONCE = 25
#: How many more memory blocks a request may leave behind, on average
#: (what is left of the last requests, a cache filling up: 3 at most
#: here).  A shared exception kept ~80 blocks (5-10 KB) per refusal.
_BOUND = 10
_PROXY_KEY = "pk-memory-test-1"
#: Enough frames for the filters of L{_allocated} to see the test runner.
_FRAMES = 6


async def _batches(run: Callable[[], Awaitable[object]], count: int) -> None:
    for start in range(0, count, _AT_ONCE):
        batch = [
            Deferred.fromCoroutine(_call(run))
            for _ in range(min(_AT_ONCE, count - start))
        ]
        await gatherResults(batch, consumeErrors=True)


async def _call(run: Callable[[], Awaitable[object]]) -> None:
    await run()


async def assert_keeps_nothing(
    run: Callable[[], Awaitable[object]],
    runs: int = _RUNS,
    warm_up: int = _WARM_UP,
    bound: int = _BOUND,
) -> None:
    """
    Fail unless C{runs} more calls of C{run} (after a warm-up and a first
    C{runs}, so that caches have filled and the last request's leftovers
    are in both counts) keep fewer than C{bound} more memory blocks each,
    on average; the message says where most bytes were allocated.
    """
    await _batches(run, warm_up)
    gc.collect()
    tracemalloc.start(_FRAMES)
    try:
        await _batches(run, runs)
        before = sum(stat.count for stat in _allocated())
        await _batches(run, runs)
        after = _allocated()
    finally:
        tracemalloc.stop()
    kept = sum(stat.count for stat in after) - before
    if kept > bound * runs:
        raise AssertionError(
            f"{runs} requests kept {kept} more blocks; most bytes from:\n"
            + "\n\n".join("\n".join(stat.traceback.format()) for stat in after[:3])
        )


def _allocated() -> list[tracemalloc.Statistic]:
    # Not the log lines a trial worker (trial -j) is still sending to its
    # manager: they are the test runner's, and in flight (on a loaded
    # machine, a thousand blocks of formatted log text at a time, whose
    # stacks are too deep for the trial frames to show).  Nor what
    # tracemalloc itself holds.
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [
            tracemalloc.Filter(False, "*/twisted/trial/*", all_frames=True),
            tracemalloc.Filter(False, "*/twisted/protocols/amp.py", all_frames=True),
            tracemalloc.Filter(False, "*/twisted/logger/_format.py", all_frames=True),
            tracemalloc.Filter(False, tracemalloc.__file__, all_frames=True),
        ]
    )
    return snapshot.statistics("traceback")


class RefusalsKeepNoMemoryTests(TestCase):
    """Refusals the proxy raises or writes itself, over loopback."""

    async def refuse(
        self, env: dict[str, str], headers: dict[str, str], status: int
    ) -> None:
        proxy = Proxy(self, env)
        http = client(self)

        async def run() -> None:
            response = await http.post(
                proxy.url + "/v1/chat/completions",
                json.dumps(chat()).encode(),
                headers=headers,
            )
            await response.content()
            self.assertEqual(response.code, status)

        await assert_keeps_nothing(run)

    async def test_missing_key(self) -> None:
        env = {"PROXY_KEY": _PROXY_KEY, "UPSTREAM": await closed_port_url()}
        await self.refuse(env, {}, 401)

    async def test_wrong_proxy_key(self) -> None:
        env = {"PROXY_KEY": _PROXY_KEY, "UPSTREAM": await closed_port_url()}
        await self.refuse(env, {"Authorization": f"Bearer {KEY}:pk-wrong"}, 403)

    async def test_no_upstream_key(self) -> None:
        env = {"PROXY_KEY": _PROXY_KEY, "UPSTREAM": await closed_port_url()}
        await self.refuse(env, {"Authorization": f"Bearer :{_PROXY_KEY}"}, 401)

    async def test_unreachable_upstream(self) -> None:
        env = {"UPSTREAM": await closed_port_url()}
        await self.refuse(env, {"Authorization": f"Bearer {KEY}"}, 502)


class RedisRefusalsKeepNoMemoryTests(TestCase):
    """The refusals and reports that go through Redis."""

    skip = SKIP

    async def start(self, **extra: str) -> Proxy:
        self.redis = await RedisServer.start(self)
        env = {
            "UPSTREAM": await closed_port_url(),
            "KEYS_FILE": keys_file(self, KEYS_TOML),
            "OPENAI_KEY": "sk-server-one",
            "ADMIN_KEY": ADMIN,
            "REDIS_URL": self.redis.url,
            **extra,
        }
        proxy = Proxy(self, env)
        await proxy.app.store.ready()
        self.http = client(self)
        return proxy

    async def get_usage(self, proxy: Proxy, token: str, status: int) -> Any:
        response = await self.http.get(
            proxy.url + "/usage", headers={"Authorization": f"Bearer {token}"}
        )
        body = await response.content()
        self.assertEqual(response.code, status)
        return json.loads(body)

    async def test_limits_unavailable(self) -> None:
        proxy = await self.start(LIMITS_ON_ERROR="deny")
        await self.redis.stop()

        async def run() -> None:
            response = await self.http.post(
                proxy.url + "/v1/chat/completions",
                json.dumps(chat()).encode(),
                headers={"Authorization": f"Bearer {ALICE}"},
            )
            body = json.loads(await response.content())
            self.assertEqual(body["error"]["code"], "limits_unavailable")

        await assert_keeps_nothing(run)

    async def test_usage_unavailable(self) -> None:
        proxy = await self.start()
        await self.redis.stop()
        await assert_keeps_nothing(lambda: self.get_usage(proxy, ADMIN, 503))

    async def test_usage_of_many_keys(self) -> None:
        # Redis's replies (~150 KB each) reach the proxy in several
        # reads: each read but the last ends inside a reply.
        proxy = await self.start()
        names = [f"key-{n:04d}" for n in range(600)]
        await self.seed_usage(names)

        async def run() -> None:
            usage = await self.get_usage(proxy, ADMIN, 200)
            self.assertEqual(len(usage["keys"]), len(names) + 5)

        # The parser that raised one shared exception kept ~12,000 blocks
        # of each (with 1,500 keys, 3 MB).
        await assert_keeps_nothing(run, runs=4, warm_up=4, bound=1000)

    async def seed_usage(self, names: list[str]) -> None:
        redis = RedisClient(self.redis.url, reactor)
        redis.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(redis.stop()))
        await redis.when_up()
        fields: list[str | int] = []
        for name in names:
            for what in ("requests", "prompt_tokens", "completion_tokens"):
                fields += [f"{name}|{what}", 12345]
        for period in periods(time.time()):
            await redis.call("HSET", f"openai-proxy:usage:{period}", *fields)
