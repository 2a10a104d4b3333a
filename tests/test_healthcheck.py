"""
Tests for L{openai_proxy.ops.healthcheck}, the image's HEALTHCHECK: it finds the
proxy wherever C{PORT} puts it and fails whenever C{/healthz} is not 200.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from openai_proxy.config import Config
from openai_proxy.ops.healthcheck import Target, main, split_description, target
from tests.harness import Proxy, closed_port_url


class TargetTests(TestCase):
    def test_unset_or_a_number_is_loopback_http(self) -> None:
        self.assertEqual(target(None), Target("http", "127.0.0.1", 9000))
        self.assertEqual(target(""), Target("http", "127.0.0.1", 9000))
        self.assertEqual(target(" 9010 "), Target("http", "127.0.0.1", 9010))

    def test_the_default_is_where_the_proxy_listens_by_default(self) -> None:
        self.assertEqual(Config().listen, ("tcp:9000",))
        self.assertEqual(target(None).port, 9000)

    def test_tcp_descriptions(self) -> None:
        cases = {
            "tcp:9010:interface=0.0.0.0": Target("http", "127.0.0.1", 9010),
            "tcp:9010": Target("http", "127.0.0.1", 9010),
            "TCP:port=9010:backlog=1024": Target("http", "127.0.0.1", 9010),
            "tcp:9010:interface=127.0.0.2": Target("http", "127.0.0.2", 9010),
            r"tcp6:9010:interface=\:\:": Target("http", "::1", 9010),
            r"tcp6:9010:interface=\:\:1": Target("http", "::1", 9010),
            "tcp6:9010": Target("http", "::1", 9010),
            "ssl:9443:privateKey=key.pem:certKey=cert.pem": Target(
                "https", "127.0.0.1", 9443
            ),
        }
        for description, expected in cases.items():
            self.assertEqual(target(description), expected, description)

    def test_unix_socket(self) -> None:
        self.assertEqual(target("unix:/run/p.sock"), Target("unix", "/run/p.sock"))
        self.assertEqual(
            target("unix:address=/run/p.sock:mode=660"), Target("unix", "/run/p.sock")
        )

    def test_descriptions_it_cannot_check(self) -> None:
        for description in ("systemd:domain=INET:index=0", "tcp:", "tcp:x", "unix:"):
            self.assertRaises(ValueError, target, description)

    def test_split_honours_escapes(self) -> None:
        self.assertEqual(
            split_description(r"tcp6:80:interface=\:\:1:a\=b"),
            (["tcp6", "80", "a=b"], {"interface": "::1"}),
        )


class CheckTests(TestCase):
    """The check run against a real proxy on loopback."""

    def setUp(self) -> None:
        self.proxy = Proxy(self, {})
        self.port = self.proxy.port.getHost().port

    async def exit_status(self, port_setting: str) -> int:
        status: int = await deferToThread(main, {"PORT": port_setting})
        return status

    async def test_passes_while_serving(self) -> None:
        self.assertEqual(await self.exit_status(str(self.port)), 0)
        self.assertEqual(
            await self.exit_status(f"tcp:{self.port}:interface=0.0.0.0"), 0
        )

    async def test_fails_when_nothing_listens(self) -> None:
        url = await closed_port_url()
        self.assertEqual(await self.exit_status(url.rsplit(":", 1)[1]), 1)

    async def test_fails_while_draining(self) -> None:
        await self.proxy.app.drain.stopService()
        self.assertEqual(await self.exit_status(str(self.port)), 1)

    async def test_fails_for_a_description_it_cannot_check(self) -> None:
        self.assertEqual(await self.exit_status("systemd:domain=INET:index=0"), 1)

    async def test_unix_socket(self) -> None:
        path = self.mktemp() + ".sock"
        unix = reactor.listenUNIX(path, self.proxy.app.site)
        self.addCleanup(unix.stopListening)
        self.assertEqual(await self.exit_status(f"unix:{path}"), 0)
