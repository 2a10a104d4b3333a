"""
The C{/usage} page: its HTML for fixed usage, the counts behind it (tokens
per hour, refusals per limit, what a key uses now) in process and in Redis,
and the page served over loopback with Basic auth.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import json
import re
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openai_proxy.admin.svgchart import stacked_bars
from openai_proxy.admin.usagehtml import PageData, render_page
from openai_proxy.admin.usagepage import basic_password, describe_store, prefers_html
from openai_proxy.keys.limits import LimitsUnavailable, LocalLimiter, Usage
from openai_proxy.keys.named import NamedKey, parse_keys
from openai_proxy.keys.usagereport import Current, Report
from tests.harness import JSON, Proxy, RelayTestCase, client
from tests.redis_server import SKIP, RedisServer
from tests.test_keys import (
    ADMIN,
    ALICE,
    BOB,
    CAROL,
    KEYS_TOML,
    SERVER_KEYS,
    chat,
    keys_file,
)

#: 2026-12-06 10:30:00 UTC.
NOW = float(calendar.timegm((2026, 12, 6, 10, 30, 0)))
HOUR = int(NOW) // 3600
BROWSER = b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
SECRET = "pk-very-secret-key-0042"


def key(name: str, **limits: Any) -> NamedKey:
    return NamedKey(name, hashlib.sha256(SECRET.encode()).digest(), **limits)


def page(
    report: Report | None,
    keys: list[NamedKey],
    benches: tuple[float, ...] = (),
    problem: str | None = None,
) -> str:
    data = PageData(report, keys, benches, "in this process", NOW, problem)
    return render_page(data).decode("utf-8")


def text_of(html: str) -> str:
    """The page's text, without tags, whitespace squeezed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


class PageHTMLTests(SynchronousTestCase):
    def test_a_key_name_is_escaped_everywhere(self) -> None:
        name = '<script>alert("x")</script>'
        report = Report(
            "2026-12-06",
            "2026-12",
            {name: {"requests": 1, "prompt_tokens": 2, "completion_tokens": 3}},
            current={name: Current()},
            hours={name: {HOUR: 5}},
        )
        html = page(report, [key(name)])
        self.assertNotIn("<script", html)
        self.assertIn("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;", html)

    def test_a_key_at_its_limit_and_one_near_it_are_marked(self) -> None:
        report = Report(
            "2026-12-06",
            "2026-12",
            current={"alice": Current(10, 0, 0), "bob": Current(0, 850, 0)},
        )
        html = page(report, [key("alice", rpm=10), key("bob", tpm=1000)])
        self.assertIn('<span class="at">10 / 10 (at limit)</span>', html)
        self.assertIn('<span class="near">850 / 1,000 (near)</span>', html)

    def test_counts_today_and_this_month_and_refusals_are_shown(self) -> None:
        counts = {
            "requests": 1234,
            "prompt_tokens": 1000,
            "completion_tokens": 500,
            "refused_tokens": 3,
        }
        report = Report("2026-12-06", "2026-12", {"alice": counts}, {"alice": counts})
        text = text_of(page(report, [key("alice", tpm=100)]))
        self.assertIn("alice active no limit – / 100 no limit 1,234 requests", text)
        self.assertEqual(
            text.count(
                "1,234 requests 1,500 tokens 1,000 prompt + 500 completion "
                "refused: 3 by tpm"
            ),
            2,
        )

    def test_states_disabled_and_expired(self) -> None:
        keys = parse_keys(KEYS_TOML)  # dave disabled, erin expired in 2001
        text = text_of(page(Report("2026-12-06", "2026-12"), list(keys)))
        self.assertIn("dave disabled", text)
        self.assertIn("erin expired", text)
        self.assertIn("alice active", text)

    def test_no_keys(self) -> None:
        html = page(Report("2026-12-06", "2026-12"), [])
        self.assertIn("No named keys", html)
        self.assertNotIn("<svg", html)

    def test_counts_unavailable_says_so_and_still_lists_keys(self) -> None:
        html = page(None, [key("alice", rpm=5)], problem="Redis is not connected")
        self.assertIn('role="alert"', html)
        self.assertIn("cannot be read right now: Redis is not connected", html)
        self.assertIn("alice", html)

    def test_no_secret_nor_any_part_of_one_is_on_the_page(self) -> None:
        report = Report(
            "2026-12-06",
            "2026-12",
            {"alice": {"requests": 1}},
            hours={"alice": {HOUR: 7}},
        )
        html = page(report, [key("alice")], benches=(0.0, NOW + 60))
        digest = hashlib.sha256(SECRET.encode()).hexdigest()
        for secret in (SECRET, digest):
            for start in range(0, len(secret) - 8):
                self.assertNotIn(secret[start : start + 8], html)

    def test_the_server_key_pool_shows_benches_by_index(self) -> None:
        text = text_of(page(Report("2026-12-06", "2026-12"), [], (0.0, NOW + 90)))
        self.assertIn("0 in use", text)
        self.assertIn("1 benched until 2026-12-06 10:31:30 UTC", text)

    def test_the_last_48_hours_are_drawn_with_a_title_per_bar_and_a_table(
        self,
    ) -> None:
        report = Report(
            "2026-12-06",
            "2026-12",
            {"a": {"prompt_tokens": 1}},
            hours={"a": {HOUR: 1200, HOUR - 47: 3, HOUR - 48: 999}, "b": {HOUR: 34}},
        )
        html = page(report, [key("a"), key("b")])
        self.assertIn("<title>a, 2026-12-06 10:00: 1,200 tokens</title>", html)
        self.assertIn("<title>b, 2026-12-06 10:00: 34 tokens</title>", html)
        self.assertIn("<title>a, 2026-12-04 11:00: 3 tokens</title>", html)
        self.assertNotIn("999 tokens</title>", html, "49 hours ago is not drawn")
        self.assertIn(
            '<tr><th scope="row" class="text">2026-12-06 10:00</th>'
            "<td>1,200</td><td>34</td></tr>",
            html,
        )
        # This month, per day: the 4th's 999 counts, the 6th's are summed.
        self.assertIn("<title>a, 2026-12-04: 1,002 tokens</title>", html)
        self.assertIn("<title>a, 2026-12-06: 1,200 tokens</title>", html)


class ChartTests(SynchronousTestCase):
    def test_bars_stack_in_series_order(self) -> None:
        svg = stacked_bars(
            "t", ["2026-12-01", "2026-12-02"], [("x", [3, 0]), ("y", [1, 8])]
        )
        heights = re.findall(r'<rect [^>]*y="([\d.]+)" [^>]*height="([\d.]+)"', svg)
        self.assertEqual(len(heights), 3, "a zero is not drawn")
        (y1, h1), (y2, h2), _ = ((float(a), float(b)) for a, b in heights)
        self.assertAlmostEqual(y1 - h2, y2)  # y sits on top of x
        self.assertAlmostEqual(h1 / h2, 3.0, places=1)
        self.assertIn("<title>t</title>", svg)


class NegotiationTests(SynchronousTestCase):
    def test_html_only_when_preferred_to_json(self) -> None:
        for accept, html in [
            (BROWSER, True),
            (b"text/html", True),
            (None, False),
            (b"*/*", False),
            (b"application/json", False),
            (b"application/json, text/html", False),
            (b"text/html;q=0.5, application/json", False),
            (b"text/html, application/json;q=0.5", True),
            (b"text/html;q=0", False),
        ]:
            self.assertEqual(prefers_html(accept), html, accept)

    def test_basic_password_any_user(self) -> None:
        def basic(text: str) -> bytes:
            return b"Basic " + base64.b64encode(text.encode())

        self.assertEqual(basic_password(basic("admin:s3:cret")), "s3:cret")
        self.assertEqual(basic_password(basic(":pw")), "pw")
        self.assertIsNone(basic_password(basic("no-colon")))
        self.assertIsNone(basic_password(b"Basic !!!"))
        self.assertIsNone(basic_password(b"Bearer abc"))
        self.assertIsNone(basic_password(None))

    def test_where_the_counters_live_never_shows_a_password(self) -> None:
        where = describe_store("redis://user:hunter2@redis.internal:6380/3")
        self.assertIn("redis.internal:6380, database 3", where)
        self.assertNotIn("hunter2", where)
        self.assertIn("this worker's figures", describe_store(None, workers=4))


class LocalCountsTests(SynchronousTestCase):
    def test_tokens_per_hour_and_refusals_per_limit(self) -> None:
        now = [NOW]
        limiter = LocalLimiter(lambda: now[0])
        alice = key("alice", rpm=1, concurrency=5)
        limiter.decide(alice)
        limiter.settle(alice, "t1", Usage(3, 4))
        self.assertEqual(limiter.decide(alice).denied, "requests")
        now[0] += 3600
        limiter.decide(alice)
        limiter.settle(alice, "t2", Usage(10, 0))
        report = self.successResultOf(limiter.report(now[0], ["alice", "nobody"]))
        self.assertEqual(report.hours, {"alice": {HOUR: 7, HOUR + 1: 10}})
        self.assertEqual(report.today["alice"]["refused_requests"], 1)
        self.assertEqual(report.current["alice"], Current(1, 0, 0))
        self.assertEqual(report.current["nobody"], Current())
        document: Any = report.as_json(["alice"], now[0])
        entry = document["keys"]["alice"]
        self.assertEqual(
            entry["hours"], {"2026-12-06T10:00Z": 7, "2026-12-06T11:00Z": 10}
        )
        self.assertEqual(entry["days"], {"2026-12-06": 17})
        self.assertEqual(
            entry["today"]["refused"],
            {
                "requests": 1,
                "tokens": 0,
                "concurrency": 0,
                "requests_per_day": 0,
                "tokens_per_day": 0,
                "tokens_per_month": 0,
            },
        )
        self.assertEqual(entry["now"], {"requests": 1, "tokens": 0, "in_flight": 0})

    def test_hours_older_than_forty_days_are_forgotten(self) -> None:
        now = [NOW]
        limiter = LocalLimiter(lambda: now[0])
        alice = key("alice")
        limiter.settle(alice, "t1", Usage(1, 1))
        now[0] += 40 * 86400 + 3600
        limiter.settle(alice, "t2", Usage(1, 0))
        report = self.successResultOf(limiter.report(now[0]))
        self.assertEqual(list(report.hours["alice"].values()), [1])


ADMIN_BASIC = "Basic " + base64.b64encode(f"anyone:{ADMIN}".encode()).decode()


class PageOverLoopbackTests(RelayTestCase):
    def setUp(self) -> None:
        self.env = {
            "KEYS_FILE": keys_file(self, KEYS_TOML),
            "OPENAI_KEY": SERVER_KEYS,
            "ADMIN_KEY": ADMIN,
            "TIMEOUT": "2000",
        }
        super().setUp()

    async def post(self, key: str) -> None:
        response = await self.http.post(
            self.url("/v1/chat/completions"),
            json.dumps(chat()).encode(),
            headers={"Authorization": f"Bearer {key}", **JSON},
        )
        await response.content()

    async def get(self, **headers: str) -> tuple[Any, bytes]:
        response = await self.http.get(self.url("/usage"), headers=headers)
        return response, await response.content()

    async def test_a_browser_is_asked_to_sign_in(self) -> None:
        response, body = await self.get(Accept=BROWSER.decode())
        self.assertEqual(response.code, 401)
        self.assertEqual(
            response.headers.getRawHeaders(b"www-authenticate"),
            [b'Basic realm="openai-proxy", charset="UTF-8"'],
        )
        self.assertEqual(json.loads(body)["error"]["code"], "invalid_api_key")
        wrong = "Basic " + base64.b64encode(b"admin:guess").decode()
        response, _ = await self.get(Accept=BROWSER.decode(), Authorization=wrong)
        self.assertEqual(response.code, 401)

    async def test_a_browser_signed_in_gets_the_page_with_strict_headers(
        self,
    ) -> None:
        for _ in range(3):
            await self.post(ALICE)  # rpm 2: the third is refused
        await self.post(BOB)
        response, body = await self.get(
            Accept=BROWSER.decode(), Authorization=ADMIN_BASIC
        )
        self.assertEqual(response.code, 200)
        header = response.headers.getRawHeaders
        self.assertEqual(header(b"content-type"), [b"text/html; charset=utf-8"])
        csp = header(b"content-security-policy")[0]
        self.assertIn(b"default-src 'none'", csp)
        self.assertNotIn(b"script-src", csp)
        self.assertEqual(header(b"x-frame-options"), [b"DENY"])
        self.assertEqual(header(b"cache-control"), [b"no-store"])
        text = text_of(body.decode())
        self.assertIn("alice active 2 / 2 (at limit)", text)
        self.assertIn("refused: 1 by rpm", text)
        self.assertIn("bob active", text)
        self.assertIn("Counters: in this process", text)
        self.assertNotIn(ALICE, body.decode())
        self.assertNotIn(CAROL, body.decode())

    async def test_json_for_scripts_with_basic_auth_too(self) -> None:
        await self.post(ALICE)
        response, body = await self.get(Authorization=ADMIN_BASIC)
        self.assertEqual(response.code, 200)
        document = json.loads(body)
        self.assertEqual(document["keys"]["alice"]["today"]["requests"], 1)
        self.assertEqual(sum(document["keys"]["alice"]["hours"].values()), 2)


class _DownLimiter(LocalLimiter):
    def report(self, now: float, names: Any = ()) -> Deferred[Report]:
        return fail(LimitsUnavailable("Redis is not connected"))


class RedisPageTests(TestCase):
    skip = SKIP

    async def test_redis_counts_hours_refusals_and_now_and_the_page_survives_it_down(
        self,
    ) -> None:
        redis = await RedisServer.start(self)
        fake_url = self.fake_upstream()
        env = {
            "UPSTREAM": fake_url,
            "KEYS_FILE": keys_file(self, KEYS_TOML),
            "OPENAI_KEY": SERVER_KEYS,
            "ADMIN_KEY": ADMIN,
            "REDIS_URL": redis.url,
            "TIMEOUT": "2000",
        }
        one, two = Proxy(self, env), Proxy(self, env)
        for proxy in (one, two):
            await proxy.app.store.ready()
        http = client(self)
        for base in (one.url, two.url, one.url):
            response = await http.post(
                base + "/v1/chat/completions",
                json.dumps(chat()).encode(),
                headers={"Authorization": f"Bearer {ALICE}", **JSON},
            )
            await response.content()
        await one.app.store.ping()  # the settles went before this
        await two.app.store.ping()
        response = await http.get(
            two.url + "/usage", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        alice = json.loads(await response.content())["keys"]["alice"]
        self.assertEqual(alice["today"]["refused"]["requests"], 1)
        self.assertEqual(sum(alice["hours"].values()), 4)
        self.assertEqual(sum(alice["days"].values()), 4)
        self.assertEqual(alice["now"], {"requests": 2, "tokens": 0, "in_flight": 0})
        page_response = await http.get(
            two.url + "/usage",
            headers={"Authorization": ADMIN_BASIC, "Accept": BROWSER.decode()},
        )
        text = text_of((await page_response.content()).decode())
        self.assertIn("Counters: in Redis at 127.0.0.1:", text)
        self.assertIn("refused: 1 by rpm", text)

        await redis.stop()
        down = await http.get(
            two.url + "/usage",
            headers={"Authorization": ADMIN_BASIC, "Accept": BROWSER.decode()},
        )
        body = (await down.content()).decode()
        self.assertEqual(down.code, 200)
        self.assertIn("The usage counts cannot be read right now", body)
        self.assertIn("alice", body)

    def fake_upstream(self) -> str:
        from tests.fake_upstream import FakeOpenAI

        url: str = FakeOpenAI().start(self)
        return url
