"""
Settings a user coming from the Node project trips on: added routes keep
the default one, half a Tencent credential refuses to start, and listens
get a backlog that absorbs bursts.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from openai_proxy.config import Config, ConfigError
from tests.fake_upstream import FakeOpenAI
from tests.harness import Proxy, client

API2D = ("fk", "https://openai.api2d.net")


class RoutesTests(TestCase):
    def test_an_added_route_keeps_the_default_one(self) -> None:
        for config in (
            Config.load({}, {"ROUTES": "xx=https://x.example"}),
            Config.load({}, {}, routes=["xx=https://x.example"]),
        ):
            self.assertEqual(config.routes, (API2D, ("xx", "https://x.example")))

    def test_a_route_for_the_default_prefix_replaces_it(self) -> None:
        config = Config.load({}, {"ROUTES": "fk=https://mirror.example,yy=http://y"})
        self.assertEqual(
            config.routes, (("fk", "https://mirror.example"), ("yy", "http://y"))
        )

    def test_routing_is_off_only_when_emptied_explicitly(self) -> None:
        for env, options in (
            ({"ROUTES": ""}, []),
            ({"ROUTES": "none"}, []),
            ({"ROUTES": " NONE "}, []),
            ({"ROUTES": "xx=https://x.example"}, ["none"]),
        ):
            self.assertEqual(Config.load({}, env, routes=options).routes, (), env)
        self.assertEqual(Config.load({}, {}).routes, (API2D,))

    def test_bad_route_names_the_setting(self) -> None:
        for env, options, setting in (
            ({"ROUTES": "none,xx=https://x.example"}, [], "ROUTES"),
            ({}, ["xx"], "--route"),
            ({"ROUTES": "=https://x.example"}, [], "ROUTES"),
        ):
            with self.assertRaises(ConfigError) as e:
                Config.load({}, env, routes=options)
            self.assertEqual(e.exception.setting, setting)


class AddedRouteOverHTTPTests(TestCase):
    async def test_added_route_and_default_upstream_both_serve(self) -> None:
        main, other = FakeOpenAI(), FakeOpenAI()
        proxy = Proxy(
            self,
            {"UPSTREAM": main.start(self), "ROUTES": f"xx={other.start(self)}"},
        )
        self.assertIn(API2D, proxy.config.routes)
        http = client(self)
        for key in ("xx-1", "sk-2"):
            response = await http.get(
                proxy.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
            )
            self.assertEqual(response.code, 200)
            await response.content()
        self.assertEqual(
            [r.header(b"authorization") for r in other.received], [b"Bearer xx-1"]
        )
        self.assertEqual(
            [r.header(b"authorization") for r in main.received], [b"Bearer sk-2"]
        )


class TencentCredentialsTests(TestCase):
    def test_one_without_the_other_refuses_naming_the_missing_one(self) -> None:
        for env, missing in (
            ({"TENCENT_CLOUD_SID": "AKIDx"}, "TENCENT_CLOUD_SKEY"),
            ({"TENCENT_CLOUD_SKEY": "secret-never-shown"}, "TENCENT_CLOUD_SID"),
            (
                {"TENCENT_CLOUD_SID": "AKIDx", "TENCENT_CLOUD_SKEY": ""},
                "TENCENT_CLOUD_SKEY",
            ),
        ):
            with self.assertRaises(ConfigError) as e:
                Config.load({}, env)
            self.assertEqual(e.exception.setting, missing)
            self.assertNotIn("secret-never-shown", str(e.exception))

    def test_both_select_tencent_and_neither_selects_nothing(self) -> None:
        both = {"TENCENT_CLOUD_SID": "AKIDx", "TENCENT_CLOUD_SKEY": "s"}
        self.assertEqual(Config.load({}, both).moderation.backend, "tencent")
        self.assertIsNone(Config.load({}, {}).moderation.backend)
