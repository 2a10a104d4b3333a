"""
Quotas that last (requests per day, tokens per day and per month) on named
keys: the calendar of C{QUOTA_TZ}, the limiters' decisions across a day's
and a month's end, the 429 and how the official SDK takes it, C{/usage},
and the quota shared through Redis by two proxy processes.
"""

from __future__ import annotations

import calendar
import json
import re
import time
from typing import Any

import openai
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openai_proxy.config import Config, ConfigError
from openai_proxy.keys.limits import Decision, LocalLimiter, Usage
from openai_proxy.keys.named import KeysFileError, NamedKey, parse_keys
from openai_proxy.keys.quotas import (
    QuotaCalendar,
    QuotaStatus,
    UnknownZone,
    quota_exceeded,
)
from openai_proxy.keys.redisstore import RedisStore, _hour_days
from openai_proxy.ops.startup import summary
from openai_proxy.upstream.failover import KeyPool
from tests.fake_upstream import FakeOpenAI
from tests.harness import JSON, Proxy, client
from tests.redis_server import SKIP, RedisServer
from tests.test_keys import ADMIN, chat, keys_file
from tests.test_operations import start_twistd

DAILY = "pk-daily-0a1b2c"
TOKENS = "pk-tokens-3d4e5f"
MONTHLY = "pk-monthly-6a7b8c"
PLAIN = "pk-plain-9d0e1f"

QUOTAS_TOML = f"""
[[keys]]
name = "daily"
key = "{DAILY}"
requests_per_day = 2

[[keys]]
name = "tokens"
key = "{TOKENS}"
tokens_per_day = 3

[[keys]]
name = "monthly"
key = "{MONTHLY}"
tokens_per_month = 4

[[keys]]
name = "plain"
key = "{PLAIN}"
"""

#: 2026-12-06 15:59:59 UTC: one second before midnight in Asia/Shanghai.
BEFORE_SHANGHAI_MIDNIGHT = float(calendar.timegm((2026, 12, 6, 15, 59, 59)))


def named(**limits: Any) -> NamedKey:
    return NamedKey("q", b"q" * 32, **limits)


class QuotaFieldsTests(SynchronousTestCase):
    def test_keys_file_takes_the_three_quotas(self) -> None:
        daily, tokens, monthly, plain = parse_keys(QUOTAS_TOML)
        self.assertEqual((daily.requests_per_day, daily.has_quota), (2, True))
        self.assertEqual(tokens.tokens_per_day, 3)
        self.assertEqual(monthly.tokens_per_month, 4)
        self.assertFalse(plain.has_quota)

    def test_a_quota_must_be_a_whole_number(self) -> None:
        for value in ("0", "1.5", '"10"', "true"):
            with self.assertRaises(KeysFileError) as caught:
                parse_keys(
                    f'[[keys]]\nname = "x"\nkey = "k"\ntokens_per_day = {value}\n'
                )
            self.assertIn(
                "'tokens_per_day' must be a whole number", str(caught.exception)
            )


class CalendarTests(SynchronousTestCase):
    def test_days_and_months_follow_the_zone(self) -> None:
        shanghai = QuotaCalendar("Asia/Shanghai")
        now = BEFORE_SHANGHAI_MIDNIGHT
        self.assertEqual(shanghai.periods(now), ("2026-12-06", "2026-12"))
        self.assertEqual(shanghai.periods(now + 1), ("2026-12-07", "2026-12"))
        self.assertEqual(QuotaCalendar().periods(now + 1), ("2026-12-06", "2026-12"))
        self.assertEqual(shanghai.day_end(now), now + 1)
        self.assertEqual(
            shanghai.isoformat(shanghai.day_end(now)), "2026-12-07T00:00:00+08:00"
        )
        self.assertEqual(
            shanghai.isoformat(shanghai.month_end(now)), "2027-01-01T00:00:00+08:00"
        )
        self.assertEqual(QuotaCalendar().isoformat(now + 1), "2026-12-06T16:00:00Z")

    def test_a_day_is_one_tuple_for_its_whole_length(self) -> None:
        # The in-process limiter notices a new day by the tuple's identity.
        utc = QuotaCalendar()
        noon = float(calendar.timegm((2026, 3, 29, 12, 0, 0)))
        self.assertIs(utc.periods(noon), utc.periods(noon + 3600))

    def test_a_day_of_daylight_saving_change_is_23_hours(self) -> None:
        paris = QuotaCalendar("Europe/Paris")
        # 2026-03-29: clocks go from 02:00 to 03:00 in Paris.
        start = float(calendar.timegm((2026, 3, 28, 23, 0, 0)))  # local midnight
        self.assertEqual(paris.day_end(start + 60) - start, 23 * 3600)

    def test_an_unknown_zone_is_refused_naming_the_setting(self) -> None:
        with self.assertRaises(UnknownZone):
            QuotaCalendar("Mars/Olympus_Mons")
        with self.assertRaises(ConfigError) as caught:
            Config.load({}, {"QUOTA_TZ": "Mars/Olympus_Mons"})
        self.assertIn("QUOTA_TZ", str(caught.exception))
        self.assertIn("Mars/Olympus_Mons", str(caught.exception))
        self.assertEqual(Config.load({}, {}).quota_tz, "UTC")
        self.assertEqual(
            Config.load({"quota-tz": "Asia/Tokyo"}, {"QUOTA_TZ": "UTC"}).quota_tz,
            "Asia/Tokyo",
        )


class ShownTests(SynchronousTestCase):
    def test_the_start_up_line_names_a_zone_other_than_utc(self) -> None:
        env = {"KEYS_FILE": keys_file(self, QUOTAS_TOML), "OPEN_PROXY": "1"}
        self.assertTrue(summary(Config.load({}, env)).endswith("; limits per process"))
        line = summary(Config.load({}, {**env, "QUOTA_TZ": "Asia/Shanghai"}))
        self.assertTrue(
            line.endswith("; limits per process, days in Asia/Shanghai"), line
        )

    def test_redis_reads_the_utc_days_of_a_month_that_began_the_day_before(
        self,
    ) -> None:
        # 2026-12-01 in Shanghai began at 2026-11-30 16:00 UTC.
        now = float(calendar.timegm((2026, 12, 5, 8, 0, 0)))
        start = QuotaCalendar("Asia/Shanghai").month_start(now)
        self.assertEqual(
            _hour_days(start, now),
            ["2026-11-30", "2026-12-01", "2026-12-02", "2026-12-03"]
            + ["2026-12-04", "2026-12-05"],
        )
        late = float(calendar.timegm((2026, 12, 20, 8, 0, 0)))
        days = _hour_days(QuotaCalendar().month_start(late), late)
        self.assertEqual(
            (days[0], days[-1], len(days)), ("2026-12-01", "2026-12-20", 20)
        )


class LocalQuotaTests(SynchronousTestCase):
    def limiter(self, now: list[float], zone: str = "Asia/Shanghai") -> LocalLimiter:
        return LocalLimiter(lambda: now[0], QuotaCalendar(zone))

    def test_requests_per_day_start_afresh_at_midnight_in_the_zone(self) -> None:
        now = [BEFORE_SHANGHAI_MIDNIGHT - 3600]
        limiter = self.limiter(now)
        key = named(requests_per_day=2)
        for ticket in ("t1", "t2"):
            self.assertIsNone(limiter.decide(key).denied)
            limiter.settle(key, ticket, None)
        now[0] = BEFORE_SHANGHAI_MIDNIGHT
        refused = limiter.decide(key)
        self.assertEqual(
            refused,
            Decision(
                "requests_per_day",
                1.0,
                quota_used=2,
                quota_reset=BEFORE_SHANGHAI_MIDNIGHT + 1,
            ),
        )
        now[0] += 1  # midnight in Shanghai, 16:00 in UTC
        self.assertIsNone(limiter.decide(key).denied)

    def test_tokens_per_day_count_what_ended(self) -> None:
        now = [BEFORE_SHANGHAI_MIDNIGHT + 1 - 60]
        limiter = self.limiter(now)
        key = named(tokens_per_day=10)
        self.assertIsNone(limiter.decide(key).denied)
        # Admitted while under: the tokens of requests in flight overshoot.
        self.assertIsNone(limiter.decide(key).denied)
        limiter.settle(key, "t1", Usage(6, 2))
        limiter.settle(key, "t2", Usage(3, 0))
        refused = limiter.decide(key)
        self.assertEqual((refused.denied, refused.quota_used), ("tokens_per_day", 11))
        self.assertEqual(refused.retry_after, 60.0)
        now[0] += 60
        self.assertIsNone(limiter.decide(key).denied)

    def test_tokens_per_month_last_past_a_day_and_end_with_the_month(self) -> None:
        # 2026-12-31 15:00 UTC: 23:00 on the month's last day in Shanghai.
        now = [float(calendar.timegm((2026, 12, 31, 15, 0, 0)))]
        limiter = self.limiter(now)
        key = named(tokens_per_month=5)
        limiter.decide(key)
        limiter.settle(key, "t1", Usage(5, 0))
        refused = limiter.decide(key)
        self.assertEqual(refused.denied, "tokens_per_month")
        self.assertEqual(refused.retry_after, 3600.0)
        now[0] += 3600  # January
        self.assertIsNone(limiter.decide(key).denied)

    def test_a_quota_refusal_comes_before_the_minute_limits_and_is_counted(
        self,
    ) -> None:
        now = [BEFORE_SHANGHAI_MIDNIGHT - 100]
        limiter = self.limiter(now)
        key = named(requests_per_day=1, rpm=1)
        limiter.decide(key)
        self.assertEqual(limiter.decide(key).denied, "requests_per_day")
        report = self.successResultOf(limiter.report(now[0], ["q"]))
        self.assertEqual(report.today["q"]["refused_requests_per_day"], 1)
        self.assertEqual(report.day, "2026-12-06")
        self.assertEqual(
            report.quotas(key, now[0]),
            {"requests_per_day": QuotaStatus(1, 1, 0, "2026-12-07T00:00:00+08:00")},
        )

    def test_the_usage_days_follow_the_zone(self) -> None:
        now = [BEFORE_SHANGHAI_MIDNIGHT]
        limiter = self.limiter(now)
        key = named()
        limiter.decide(key)
        limiter.settle(key, "t1", Usage(1, 1))
        now[0] += 3600  # 01:00 on the 7th in Shanghai
        limiter.decide(key)
        limiter.settle(key, "t2", Usage(2, 2))
        report = self.successResultOf(limiter.report(now[0], ["q"]))
        self.assertEqual(report.day, "2026-12-07")
        self.assertEqual(report.today["q"]["requests"], 1)
        self.assertEqual(report.this_month["q"]["requests"], 2)
        self.assertEqual(
            report.month_days("q")[-2:], [("2026-12-06", 2), ("2026-12-07", 4)]
        )

    def test_the_429_is_openai_insufficient_quota_not_to_be_retried(self) -> None:
        key = named(tokens_per_day=100)
        shanghai = QuotaCalendar("Asia/Shanghai")
        reset = BEFORE_SHANGHAI_MIDNIGHT + 1
        error = quota_exceeded(
            key,
            Decision("tokens_per_day", 1.0, quota_used=120, quota_reset=reset),
            shanghai,
        )
        self.assertEqual(error.status, 429)
        body = json.loads(error.body())["error"]
        self.assertEqual(
            (body["type"], body["code"]), ("insufficient_quota", "insufficient_quota")
        )
        self.assertIn("tokens per day", body["message"])
        self.assertIn("Limit 100, Used 120", body["message"])
        self.assertIn("2026-12-07T00:00:00+08:00", body["message"])
        self.assertIn((b"x-should-retry", b"false"), error.headers)
        self.assertIsNot(
            error, quota_exceeded(key, Decision("tokens_per_day"), shanghai)
        )


class QuotaRelayTests(TestCase):
    """Quotas through a proxy on loopback, and the official SDK in front of it."""

    def setUp(self) -> None:
        self.fake = FakeOpenAI()
        self.proxy = Proxy(
            self,
            {
                "UPSTREAM": self.fake.start(self),
                "KEYS_FILE": keys_file(self, QUOTAS_TOML),
                "OPENAI_KEY": "sk-server-one",
                "ADMIN_KEY": ADMIN,
                "QUOTA_TZ": "Asia/Shanghai",
            },
        )
        self.http = client(self)

    async def post(self, key: str) -> tuple[Any, Any]:
        response = await self.http.post(
            self.proxy.url + "/v1/chat/completions",
            json.dumps(chat()).encode(),
            headers={"Authorization": f"Bearer {key}", **JSON},
        )
        return response, json.loads(await response.content())

    async def get(self, path: str, **headers: str) -> Any:
        response = await self.http.get(
            self.proxy.url + path,
            headers={"Authorization": f"Bearer {ADMIN}", **headers},
        )
        return await response.content()

    async def refused(self, name: str, limit: str) -> str | None:
        """The value of the refusals counter of key C{name} and C{limit}."""
        metrics = (await self.get("/metrics")).decode()
        series = f'openai_proxy_rate_limited_total{{key="{name}",limit="{limit}"}}'
        found = re.search(re.escape(series) + r" (\S+)", metrics)
        return None if found is None else found.group(1)

    async def test_over_a_quota_is_429_insufficient_quota_and_counted(self) -> None:
        for _ in range(2):
            self.assertEqual((await self.post(DAILY))[0].code, 200)
        response, body = await self.post(DAILY)
        self.assertEqual(response.code, 429)
        self.assertEqual(body["error"]["code"], "insufficient_quota")
        self.assertEqual(body["error"]["type"], "insufficient_quota")
        self.assertRegex(
            body["error"]["message"], r"resets at \d{4}-\d\d-\d\dT00:00:00\+08:00"
        )
        self.assertEqual(response.headers.getRawHeaders(b"x-should-retry"), [b"false"])
        self.assertEqual(len(self.fake.received), 2)
        self.assertEqual(await self.refused("daily", "requests_per_day"), "1.0")

    async def test_usage_shows_each_quota_and_what_is_left(self) -> None:
        await self.post(TOKENS)  # the fake upstream reports 2 tokens
        usage = json.loads(await self.get("/usage"))
        self.assertEqual(usage["time_zone"], "Asia/Shanghai")
        quota = usage["keys"]["tokens"]["quota"]["tokens_per_day"]
        self.assertEqual((quota["limit"], quota["used"], quota["remaining"]), (3, 2, 1))
        self.assertTrue(quota["resets_at"].endswith("T00:00:00+08:00"))
        self.assertNotIn("quota", usage["keys"]["plain"])
        page = (await self.get("/usage", Accept="text/html")).decode()
        self.assertIn("tokens today: 2 / 3", page)
        self.assertIn("1 left; resets", page)
        self.assertIn("no quota", page)

    async def test_the_sdk_raises_at_once_without_retrying(self) -> None:
        # Ten seconds before the reset: a retry-after the SDK would wait for
        # (it gives up by itself only past a minute), were it not told not to.
        limiter = self.proxy.app.limiter
        assert isinstance(limiter, LocalLimiter)
        limiter.clock = lambda: BEFORE_SHANGHAI_MIDNIGHT - 9
        for _ in range(2):
            await self.post(DAILY)
        sdk = openai.OpenAI(base_url=self.proxy.url + "/v1", api_key=DAILY)
        self.addCleanup(sdk.close)
        self.assertEqual(sdk.max_retries, 2)  # the default, which would retry a 429

        def call() -> tuple[BaseException, float]:
            started = time.monotonic()
            try:
                sdk.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
            except openai.RateLimitError as e:
                return e, time.monotonic() - started
            raise AssertionError("the SDK did not raise")

        error, took = await deferToThread(call)
        assert isinstance(error, openai.RateLimitError)
        self.assertEqual(error.code, "insufficient_quota")
        # One request: a retry would be refused and counted again, after
        # the SDK's back-off of at least half a second.
        self.assertEqual(await self.refused("daily", "requests_per_day"), "1.0")
        self.assertLess(took, 0.4)


class RedisQuotaTests(TestCase):
    skip = SKIP

    async def test_yesterdays_tokens_do_not_count_today(self) -> None:
        redis = await RedisServer.start(self)
        store = RedisStore(redis.url, reactor, KeyPool([]))
        store.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(store.stop()))
        await store.ready()
        key = named(tokens_per_day=10, tokens_per_month=25)
        now = time.time()
        yesterday = store.calendar.periods(now - 86400)[0]
        today, month = store.calendar.periods(now)
        if yesterday[:7] == month:  # not on the first of a month
            await store._redis.call(
                "HSET", f"openai-proxy:usage:{yesterday}", "q|prompt_tokens", 50
            )
        self.assertIsNone((await store.admit(key, "t1")).denied)
        store.settle(key, "t1", Usage(6, 4))
        refused = await store.admit(key, "t2")
        self.assertEqual((refused.denied, refused.quota_used), ("tokens_per_day", 10))
        self.assertAlmostEqual(
            refused.quota_reset, store.calendar.day_end(time.time()), delta=0.001
        )
        self.assertTrue(0 < refused.retry_after <= 86400)
        await store._redis.call(
            "HINCRBY", f"openai-proxy:usage:{month}", "q|completion_tokens", 15
        )
        self.assertEqual((await store.admit(key, "t3")).denied, "tokens_per_day")
        await store._redis.call("DEL", f"openai-proxy:usage:{today}")
        refused = await store.admit(key, "t4")
        self.assertEqual((refused.denied, refused.quota_used), ("tokens_per_month", 25))

    async def test_usage_counts_by_the_days_of_the_zone(self) -> None:
        redis = await RedisServer.start(self)
        # Kiritimati is UTC+14: its day is another than UTC's for most hours.
        kiritimati = QuotaCalendar("Pacific/Kiritimati")
        store = RedisStore(redis.url, reactor, KeyPool([]), calendar=kiritimati)
        store.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(store.stop()))
        await store.ready()
        key = named(requests_per_day=5)
        await store.admit(key, "t1")
        store.settle(key, "t1", Usage(2, 1))
        await store.ping()
        now = time.time()
        report = await store.report(now, ["q"])
        self.assertEqual((report.day, report.month), kiritimati.periods(now))
        self.assertEqual(report.today["q"]["requests"], 1)
        self.assertEqual(report.month_days("q")[-1], (report.day, 3))
        self.assertEqual(report.quotas(key, now)["requests_per_day"].remaining, 4)


class TwoProcessQuotaTests(TestCase):
    skip = SKIP

    async def test_a_daily_quota_holds_across_two_twistd_processes(self) -> None:
        redis = await RedisServer.start(self)
        fake = FakeOpenAI()
        env = {
            "UPSTREAM": fake.start(self),
            "KEYS_FILE": keys_file(self, QUOTAS_TOML),
            "OPENAI_KEY": "sk-server-one",
            "REDIS_URL": redis.url,
            "QUOTA_TZ": "Europe/Paris",
        }
        http = client(self)
        ports = []
        for _ in range(2):
            proc, port = await start_twistd(self, env)
            await proc.logged(rb"Redis connected")
            ports.append(port)
        answers = []
        for port in (ports[0], ports[1], ports[0], ports[1]):
            response = await http.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json.dumps(chat()).encode(),
                headers={"Authorization": f"Bearer {DAILY}", **JSON},
            )
            body = json.loads(await response.content())
            answers.append((response.code, body.get("error", {}).get("code")))
        self.assertEqual(
            answers,
            [
                (200, None),
                (200, None),
                (429, "insufficient_quota"),
                (429, "insufficient_quota"),
            ],
        )
        self.assertEqual(len(fake.received), 2)
