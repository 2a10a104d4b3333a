"""
Settings a user coming from the Node project trips on: added routes keep
the default one, half a Tencent credential refuses to start, and listens
get a backlog that absorbs bursts.
"""

from __future__ import annotations

import shutil
import socket
import subprocess

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from openai_proxy.config import Config, ConfigError
from openai_proxy.ops import workers
from openai_proxy.ops.workers import DEFAULT_BACKLOG, with_default_backlog
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def kernel_backlogs(port: int) -> list[int]:
    """
    The backlog the kernel holds for each socket listening on C{port}: for a
    listening socket, C{ss} shows it as Send-Q.
    """
    if shutil.which("ss") is None:
        raise SkipTest("needs ss (iproute2) to read a listening socket's backlog")
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.strip()]


def expected_backlog() -> int:
    # The kernel caps a listen backlog at net.core.somaxconn.
    with open("/proc/sys/net/core/somaxconn") as f:
        return min(DEFAULT_BACKLOG, int(f.read()))


class BacklogTests(TestCase):
    def test_default_is_like_nginx_or_more(self) -> None:
        self.assertGreaterEqual(DEFAULT_BACKLOG, 511)

    def test_tcp_descriptions_without_a_backlog_get_the_default(self) -> None:
        for given, expected in (
            ("tcp:9000", f"tcp:9000:backlog={DEFAULT_BACKLOG}"),
            (
                "TCP6:9000:interface=\\:\\:1",
                f"TCP6:9000:interface=\\:\\:1:backlog={DEFAULT_BACKLOG}",
            ),
            (
                "tcp:port=9000:interface=127.0.0.1",
                f"tcp:port=9000:interface=127.0.0.1:backlog={DEFAULT_BACKLOG}",
            ),
            ("tcp:9000:backlog=64", "tcp:9000:backlog=64"),
            (
                "tcp:9000:Backlog=64:interface=127.0.0.1",
                "tcp:9000:Backlog=64:interface=127.0.0.1",
            ),
            ("unix:/tmp/x.sock", "unix:/tmp/x.sock"),
            ("ssl:443:privateKey=k.pem", "ssl:443:privateKey=k.pem"),
        ):
            self.assertEqual(with_default_backlog(given), expected)

    async def test_one_worker_listens_with_the_default_backlog(self) -> None:
        await self._listen(
            f"tcp:{free_port()}:interface=127.0.0.1", 1, expected_backlog()
        )

    async def test_shared_sockets_of_several_workers_have_it_too(self) -> None:
        await self._listen(
            f"tcp:{free_port()}:interface=127.0.0.1", 2, expected_backlog()
        )

    async def test_a_backlog_set_in_the_description_is_kept(self) -> None:
        await self._listen(f"tcp:{free_port()}:interface=127.0.0.1:backlog=77", 1, 77)

    async def _listen(self, description: str, count: int, backlog: int) -> None:
        port = int(description.split(":")[1])
        svc = workers.listen_and_fork(
            [description], Site(Resource()), count, reactor, {}
        )
        # Binding only (no children): what twistd does before dropping privileges.
        svc.privilegedStartService()
        try:
            self.assertEqual(kernel_backlogs(port), [backlog] * count)
        finally:
            await svc.stopService()
            await deferLater(reactor, 0, lambda: None)
