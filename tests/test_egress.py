"""
Egress proxies: which proxy the settings choose, the CONNECT and SOCKS5
handshakes, and the relay through real proxies (tinyproxy, dante) to an
https upstream with a private CA.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import openai
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.server import Site

from openai_proxy.config import Config, ConfigError
from openai_proxy.ops.startup import summary
from openai_proxy.telemetry import logs
from openai_proxy.upstream.client import CachedEndpoints
from openai_proxy.upstream.egress import EgressSettings, endpoint_to, parse_proxy
from openai_proxy.upstream.tunnel import SOCKS5, EgressProxyError, HTTPConnect
from tests.certs import make_certs, trust
from tests.egress_proxies import (
    SKIP_DANTE,
    SKIP_TINYPROXY,
    Dante,
    TinyProxy,
    system_user,
)
from tests.fake_tms import FakeTMS
from tests.fake_upstream import FakeOpenAI, Script, chat_stream
from tests.harness import AUTH, TMS_ID, TMS_SECRET, Proxy, client, closed_port_url
from tests.redis_server import make_tls_files
from tests.test_moderation_backends import _Moderations
from tests.test_upstreams_by_model import toml_entry

SECRET = "pw-Never-Logged-42"


class ParseProxyTests(SynchronousTestCase):
    def test_schemes_ports_and_credentials(self) -> None:
        proxy = parse_proxy("http://alice:p%40ss@proxy.example:3128")
        self.assertEqual(
            (proxy.scheme, proxy.host, proxy.port, proxy.credentials),
            ("http", "proxy.example", 3128, ("alice", "p@ss")),
        )
        self.assertEqual(parse_proxy("socks5h://s.example").port, 1080)
        self.assertEqual(parse_proxy("proxy.example:8080").scheme, "http")
        self.assertEqual(parse_proxy("http://proxy.example").port, 80)

    def test_display_and_repr_never_show_credentials(self) -> None:
        proxy = parse_proxy(f"socks5://bob:{SECRET}@10.0.0.1:1080")
        self.assertEqual(proxy.display(), "socks5://10.0.0.1:1080")
        self.assertNotIn(SECRET, repr(proxy))
        self.assertIn(SECRET, proxy.url())
        self.assertEqual(parse_proxy(proxy.url()), proxy)

    def test_unknown_scheme_is_refused_without_the_credentials(self) -> None:
        with self.assertRaises(ValueError) as e:
            parse_proxy(f"https://u:{SECRET}@proxy.example:443")
        self.assertIn("socks5h://", str(e.exception))
        self.assertNotIn(SECRET, str(e.exception))

    def test_a_path_or_a_bad_port_is_refused(self) -> None:
        for bad in ("http://p.example:3128/x", "http://p.example:99999", "http://"):
            with self.assertRaises(ValueError):
                parse_proxy(bad)


def settings(override: str | None = None, **env: str) -> EgressSettings:
    return EgressSettings.from_environment(env, override)


class ChoiceTests(SynchronousTestCase):
    def chosen(self, s: EgressSettings, url: str) -> str | None:
        scheme, rest = url.split("://")
        host, _, port = rest.partition(":")
        proxy = s.proxy_for(scheme, host, int(port or 443))
        return None if proxy is None else proxy.display()

    def test_https_and_http_variables_by_upstream_scheme_then_all_proxy(self) -> None:
        s = settings(HTTPS_PROXY="http://s:1", HTTP_PROXY="http://p:2")
        self.assertEqual(self.chosen(s, "https://api.example"), "http://s:1")
        self.assertEqual(self.chosen(s, "wss://api.example"), "http://s:1")
        self.assertEqual(self.chosen(s, "http://api.example:80"), "http://p:2")
        s = settings(ALL_PROXY="socks5h://a:3", HTTP_PROXY="http://p:2")
        self.assertEqual(self.chosen(s, "https://api.example"), "socks5h://a:3")
        self.assertIsNone(self.chosen(settings(), "https://api.example"))

    def test_lower_case_wins_and_empty_counts_as_unset(self) -> None:
        s = settings(https_proxy="http://low:1", HTTPS_PROXY="http://up:2")
        self.assertEqual(self.chosen(s, "https://api.example"), "http://low:1")
        s = settings(https_proxy="", HTTPS_PROXY="http://up:2")
        self.assertEqual(self.chosen(s, "https://api.example"), "http://up:2")

    def test_egress_proxy_overrides_the_variables_and_none_turns_them_off(
        self,
    ) -> None:
        s = settings("socks5://e:9", HTTPS_PROXY="http://s:1")
        self.assertEqual(self.chosen(s, "https://api.example"), "socks5://e:9")
        self.assertEqual(self.chosen(s, "http://api.example:80"), "socks5://e:9")
        s = settings("none", HTTPS_PROXY="http://s:1", ALL_PROXY="http://a:1")
        self.assertIsNone(self.chosen(s, "https://api.example"))

    def test_no_proxy_names_domains_addresses_ranges_and_ports(self) -> None:
        s = settings(
            "http://e:9",
            NO_PROXY="example.com, .internal,10.0.0.0/8, 192.168.1.5,vllm:8000",
        )
        for direct in (
            "https://example.com",
            "https://api.example.com",
            "https://a.b.internal",
            "https://10.1.2.3",
            "https://192.168.1.5",
            "http://vllm:8000",
        ):
            self.assertIsNone(self.chosen(s, direct), direct)
        for proxied in (
            "https://notexample.com",
            "https://example.com.evil",
            "https://11.1.2.3",
            "https://vllm:8001",
        ):
            self.assertEqual(self.chosen(s, proxied), "http://e:9", proxied)
        self.assertIsNone(
            self.chosen(settings("http://e:9", no_proxy="*"), "https://x")
        )

    def test_a_bad_variable_is_a_config_error_naming_it_without_credentials(
        self,
    ) -> None:
        with self.assertRaises(ConfigError) as e:
            Config.load({}, {"HTTPS_PROXY": f"ftp://u:{SECRET}@p:1"})
        self.assertIn("HTTPS_PROXY", str(e.exception))
        self.assertNotIn(SECRET, str(e.exception))
        with self.assertRaises(ConfigError) as e:
            Config.load({"egress-proxy": "http://p:x"}, {})
        self.assertIn("--egress-proxy/EGRESS_PROXY", str(e.exception))

    def test_config_repr_hides_proxy_credentials(self) -> None:
        config = Config.load({}, {"EGRESS_PROXY": f"http://u:{SECRET}@p:3128"})
        self.assertNotIn(SECRET, repr(config))

    def test_startup_line_says_which_proxy_for_which_upstream(self) -> None:
        config = Config.load(
            {},
            {
                "HTTPS_PROXY": f"http://u:{SECRET}@proxy.corp:3128",
                "NO_PROXY": "openai.api2d.net",
            },
        )
        line = summary(config)
        self.assertIn(
            "egress: api.openai.com via http://proxy.corp:3128, "
            "openai.api2d.net direct",
            line,
        )
        self.assertNotIn(SECRET, line)
        self.assertIn("egress: direct", summary(Config.load({}, {})))


class EndpointChoiceTests(SynchronousTestCase):
    def test_each_upstream_gets_its_proxy_and_one_may_be_set_apart(self) -> None:
        endpoints = CachedEndpoints(
            Clock(), egress=settings(HTTPS_PROXY="http://corp:3128", NO_PROXY="vllm")
        )
        api = URI.fromBytes(b"https://api.example/v1/models")
        first = endpoints.endpointForURI(api)
        self.assertIs(endpoints.endpointForURI(api), first)
        self.assertEqual(
            endpoints.proxy_for(b"https", b"api.example", 443),
            parse_proxy("http://corp:3128"),
        )
        self.assertIsNone(endpoints.proxy_for(b"https", b"vllm", 443))
        # An upstream's own proxy (or none), over the settings.
        endpoints.use_proxy("https://api.example", parse_proxy("socks5h://s:1080"))
        self.assertEqual(
            endpoints.proxy_for(b"https", b"api.example", 443).display(),  # type: ignore[union-attr]
            "socks5h://s:1080",
        )
        self.assertIsNot(endpoints.endpointForURI(api), first)
        endpoints.use_proxy("https://api.example", None)
        self.assertIsNone(endpoints.proxy_for(b"https", b"api.example", 443))

    def test_tls_is_checked_against_the_server_name_given(self) -> None:
        calls: list[tuple[bytes, int]] = []

        class Policy:
            def creatorForNetloc(self, host: bytes, port: int) -> Any:
                calls.append((host, port))
                return BrowserLikePolicyForHTTPS().creatorForNetloc(host, port)

        proxy = parse_proxy("http://proxy.example:3128")
        endpoint_to(Clock(), proxy, "api.example", 443, tls=True, policy=Policy())  # type: ignore[arg-type]
        endpoint_to(
            Clock(),
            proxy,
            "10.0.0.7",
            443,
            tls=True,
            server_name="api.example",
            policy=Policy(),  # type: ignore[arg-type]
        )
        self.assertEqual(calls, [(b"api.example", 443), (b"api.example", 443)])


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def _shake(handshake: Any) -> tuple[StringTransport, Deferred[Any], _Recorder]:
    inner = _Recorder()
    handshake.wrapped_factory = Factory.forProtocol(lambda: inner)
    handshake.done = Deferred()
    transport = StringTransport()
    handshake.makeConnection(transport)
    return transport, handshake.done, inner


class HandshakeTests(SynchronousTestCase):
    """The handshakes byte by byte (the real proxies are below)."""

    def test_connect_sends_basic_credentials_and_hands_over_the_rest(self) -> None:
        shake = HTTPConnect("http://p:1", "api.example", 443, ("u", "pw"))
        transport, done, inner = _shake(shake)
        self.assertEqual(
            transport.value(),
            b"CONNECT api.example:443 HTTP/1.1\r\nHost: api.example:443\r\n"
            b"Proxy-Authorization: Basic dTpwdw==\r\n\r\n",
        )
        shake.dataReceived(b"HTTP/1.1 200 OK\r\nX: y\r\n")
        self.assertFalse(done.called)
        shake.dataReceived(b"\r\nearly")
        self.assertIs(self.successResultOf(done), inner)
        shake.dataReceived(b" bytes")
        self.assertEqual(inner.data, b"early bytes")

    def test_connect_statuses(self) -> None:
        for answer, kind, status in (
            (b"HTTP/1.1 407 Proxy Authentication Required", "auth_failed", "407"),
            (b"HTTP/1.0 403 Access violation", "refused", "403 Access violation"),
            (b"SSH-2.0-OpenSSH", "refused", None),
        ):
            shake = HTTPConnect("http://p:1", "::1", 443, None)
            transport, done, _ = _shake(shake)
            self.assertIn(b"CONNECT [::1]:443 ", transport.value())
            shake.dataReceived(answer + b"\r\n\r\n")
            error = self.failureResultOf(done, EgressProxyError).value
            self.assertEqual(error.kind, kind)
            if status is not None:
                self.assertTrue((error.status or "").startswith(status), error.status)
            self.assertTrue(transport.disconnecting)

    def test_socks5_with_a_name_auth_and_a_domain_bound_address(self) -> None:
        shake = SOCKS5("socks5h://s:1", "api.example", 443, ("u", "pw"))
        transport, done, inner = _shake(shake)
        self.assertEqual(transport.value(), b"\x05\x02\x00\x02")
        transport.clear()
        shake.dataReceived(b"\x05\x02")
        self.assertEqual(transport.value(), b"\x01\x01u\x02pw")
        transport.clear()
        shake.dataReceived(b"\x01\x00")
        self.assertEqual(transport.value(), b"\x05\x01\x00\x03\x0bapi.example\x01\xbb")
        # A reply bound to a name, split across reads, then the stream.
        shake.dataReceived(b"\x05\x00\x00\x03\x04ho")
        shake.dataReceived(b"st\x00\x50tls")
        self.assertIs(self.successResultOf(done), inner)
        self.assertEqual(inner.data, b"tls")

    def test_socks5_errors(self) -> None:
        for answers, kind in (
            ([b"\x05\xff"], "auth_failed"),
            ([b"\x05\x02", b"\x01\x01"], "auth_failed"),
            ([b"\x05\x00", b"\x05\x05\x00\x01" + bytes(6)], "refused"),
        ):
            shake = SOCKS5("socks5://s:1", "10.0.0.1", 443, ("u", "pw"))
            _, done, _ = _shake(shake)
            for answer in answers:
                shake.dataReceived(answer)
            self.assertEqual(self.failureResultOf(done).value.kind, kind)

    def test_closed_during_the_handshake_is_unreachable(self) -> None:
        shake = SOCKS5("socks5://s:1", "10.0.0.1", 443, None)
        _, done, _ = _shake(shake)
        shake.connectionLost()
        self.assertEqual(self.failureResultOf(done).value.kind, "unreachable")


class _ThroughProxies(TestCase):
    """An https upstream (private CA, certificate for C{localhost})."""

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.certs = make_certs(directory)
        trust(self, self.certs.ca)
        self.fake = FakeOpenAI()
        self.upstream_port = self.fake.start_tls(self, self.certs.cert, self.certs.key)
        self.upstream = f"https://localhost:{self.upstream_port}"
        self.http = client(self)

    def proxy(self, **env: str) -> Proxy:
        return Proxy(self, {"UPSTREAM": self.upstream, **env})

    async def get_models(self, proxy: Proxy) -> tuple[int, Any]:
        response = await self.http.get(proxy.url + "/v1/models", headers=AUTH)
        return response.code, json.loads(await response.content())

    def egress_errors(self, proxy: Proxy) -> float:
        for metric in proxy.app.metrics.registry.collect():
            for sample in metric.samples:
                if (
                    sample.name == "openai_proxy_upstream_errors_total"
                    and sample.labels.get("kind") == "egress_proxy"
                ):
                    return float(sample.value)
        raise AssertionError("no egress_proxy series")

    def pooled(self, proxy: Proxy) -> int:
        return sum(len(c) for c in proxy.app.pool._connections.values())


class HTTPConnectTests(_ThroughProxies):
    skip = SKIP_TINYPROXY

    async def test_https_upstream_through_connect_pooled_like_direct(self) -> None:
        tiny = await TinyProxy.start(self)
        proxy = self.proxy(HTTPS_PROXY=tiny.url)
        for _ in range(3):
            code, body = await self.get_models(proxy)
            self.assertEqual((code, body["data"][0]["id"]), (200, "gpt-fake"))
        self.assertEqual(len(self.fake.received), 3)
        # One tunnel, kept and reused for the three requests.
        self.assertEqual(self.pooled(proxy), 1)
        self.assertEqual(tiny.daemon.output.count("CONNECT localhost:"), 1)

    async def test_basic_auth_and_the_sdk_streaming_through_it(self) -> None:
        tiny = await TinyProxy.start(self, auth=("alice", SECRET))
        proxy = self.proxy(EGRESS_PROXY=tiny.url, PROXY_KEY="pk-team")
        self.fake.script = Script(events=chat_stream(["Hel", "lo"]))
        sdk = openai.OpenAI(
            base_url=proxy.url + "/v1", api_key="sk-user:pk-team", max_retries=0
        )
        self.addCleanup(sdk.close)

        def stream() -> str:
            chunks = sdk.chat.completions.create(
                model="gpt-fake",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks)

        self.assertEqual(await deferToThread(stream), "Hello")

    async def test_wrong_credentials_are_egress_proxy_auth_failed(self) -> None:
        tiny = await TinyProxy.start(self, auth=("alice", "right"))
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        proxy = self.proxy(EGRESS_PROXY=f"http://alice:{SECRET}@127.0.0.1:{tiny.port}")
        code, body = await self.get_models(proxy)
        self.assertEqual(
            (code, body["error"]["code"]), (502, "egress_proxy_auth_failed")
        )
        self.assertIn("401", body["error"]["message"])  # tinyproxy's answer
        # None at all: 407.
        proxy = self.proxy(EGRESS_PROXY=tiny.address)
        code, body = await self.get_models(proxy)
        self.assertEqual(
            (code, body["error"]["code"]), (502, "egress_proxy_auth_failed")
        )
        self.assertIn("407", body["error"]["message"])
        self.assertEqual(self.egress_errors(proxy), 1)
        self.assertEqual(self.fake.received, [])
        logged = " ".join(logs.redact_text(formatEvent(e)) for e in events)
        self.assertIn("407", logged)
        # The credentials are redacted wherever they would be logged.
        self.assertNotIn(SECRET, logged)
        leak = f"proxy http://alice:{SECRET}@127.0.0.1 / {SECRET}"
        self.assertNotIn(SECRET, logs.redact_text(leak))

    async def test_a_refused_connect_names_the_proxys_status(self) -> None:
        tiny = await TinyProxy.start(self, connect_ports=(443,))
        proxy = self.proxy(HTTPS_PROXY=tiny.url)
        code, body = await self.get_models(proxy)
        self.assertEqual((code, body["error"]["code"]), (502, "egress_proxy_refused"))
        self.assertIn("403", body["error"]["message"])
        self.assertEqual(self.egress_errors(proxy), 1)

    async def test_certificate_is_checked_against_the_upstream_not_the_proxy(
        self,
    ) -> None:
        # The upstream's certificate names only "localhost"; the proxy is
        # "localhost" and the upstream 127.0.0.1: checking the proxy's name
        # would wrongly accept it.
        directory = self.mktemp()
        files = make_tls_files(directory)
        trust(self, files.ca)
        fake = FakeOpenAI()
        port = fake.start_tls(self, files.cert, files.key)
        tiny = await TinyProxy.start(self)
        proxy = Proxy(
            self,
            {
                "UPSTREAM": f"https://127.0.0.1:{port}",
                "EGRESS_PROXY": f"http://localhost:{tiny.port}",
            },
        )
        code, body = await self.get_models(proxy)
        self.assertEqual(code, 502)
        self.assertFalse(body["error"]["code"].startswith("egress_proxy"))
        self.assertEqual(fake.received, [])
        # The same certificate, named as the upstream, through the same proxy.
        proxy = Proxy(
            self,
            {
                "UPSTREAM": f"https://localhost:{port}",
                "EGRESS_PROXY": f"http://localhost:{tiny.port}",
            },
        )
        code, _ = await self.get_models(proxy)
        self.assertEqual(code, 200)

    async def test_http_upstream_is_tunnelled_too(self) -> None:
        plain = FakeOpenAI()
        upstream = plain.start(self)
        tiny = await TinyProxy.start(self)
        proxy = Proxy(self, {"UPSTREAM": upstream, "HTTP_PROXY": tiny.url})
        code, _ = await self.get_models(proxy)
        self.assertEqual(code, 200)
        self.assertIn("CONNECT 127.0.0.1:", tiny.daemon.output)

    async def test_an_upstream_of_the_upstreams_file_uses_its_own_proxy(
        self,
    ) -> None:
        # No proxy variable at all: only the file's own "proxy" sends the
        # request through the tunnel, with the credentials it names.
        tiny = await TinyProxy.start(self, auth=("alice", SECRET))
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(
                toml_entry(
                    "tunnelled",
                    self.upstream,
                    ["gpt-*"],
                    keys=["sk-file-key"],
                    proxy=tiny.url,
                )
            )
        proxy = Proxy(
            self,
            {
                "UPSTREAM": self.upstream,
                "UPSTREAMS_FILE": path,
                "PROXY_KEY": "pk-egress-test-0123",
            },
        )
        response = await self.http.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": []},
            headers={"Authorization": "Bearer pk-egress-test-0123"},
        )
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual(tiny.daemon.output.count("CONNECT localhost:"), 1)
        self.assertEqual(
            self.fake.received[-1].headers.getRawHeaders(b"authorization"),
            [b"Bearer sk-file-key"],
        )

    async def test_openai_moderation_backend_goes_through_it_too(self) -> None:
        moderations = _Moderations()
        listening = reactor.listenTCP(0, Site(moderations), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        tiny = await TinyProxy.start(self)
        proxy = Proxy(
            self,
            {
                "UPSTREAM": f"http://127.0.0.1:{port}",
                "HTTP_PROXY": tiny.url,
                "MODERATION_BACKEND": "openai",
            },
        )
        plan = proxy.app.moderation.plan(b"/v1/chat/completions", {"moderation": True})
        assert plan is not None
        self.assertTrue(await plan.stops("bad text", "sk-user"))
        self.assertEqual(len(moderations.seen), 1)
        self.assertIn(f"CONNECT 127.0.0.1:{port}", tiny.daemon.output)


class EgressFailureTests(_ThroughProxies):
    async def test_unreachable_proxy_is_egress_proxy_unreachable(self) -> None:
        closed = await closed_port_url()
        proxy = self.proxy(HTTPS_PROXY=closed)
        code, body = await self.get_models(proxy)
        self.assertEqual(
            (code, body["error"]["code"]), (502, "egress_proxy_unreachable")
        )
        self.assertEqual(self.egress_errors(proxy), 1)

    async def test_a_proxy_that_never_answers_the_handshake_is_unreachable(
        self,
    ) -> None:
        silent = reactor.listenTCP(
            0, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )
        self.addCleanup(silent.stopListening)
        proxy = self.proxy(
            EGRESS_PROXY=f"http://127.0.0.1:{silent.getHost().port}", TIMEOUT="200"
        )
        code, body = await self.get_models(proxy)
        self.assertEqual(
            (code, body["error"]["code"]), (502, "egress_proxy_unreachable")
        )
        self.assertEqual(self.egress_errors(proxy), 1)

    async def test_no_proxy_goes_direct(self) -> None:
        closed = await closed_port_url()
        proxy = self.proxy(HTTPS_PROXY=closed, NO_PROXY="localhost")
        code, _ = await self.get_models(proxy)
        self.assertEqual(code, 200)


class SOCKS5Tests(_ThroughProxies):
    skip = SKIP_DANTE

    async def test_socks5h_and_socks5_reach_the_https_upstream(self) -> None:
        dante = await Dante.start(self)
        for scheme in ("socks5h", "socks5"):
            proxy = self.proxy(ALL_PROXY=dante.url(scheme))
            for _ in range(2):
                code, body = await self.get_models(proxy)
                self.assertEqual((code, body["object"]), (200, "list"), scheme)
            self.assertEqual(self.pooled(proxy), 1)
        self.assertEqual(len(self.fake.received), 4)

    async def test_socks5_user_and_password(self) -> None:
        user, password = system_user(self)
        dante = await Dante.start(self, usernames=True)
        host = f"127.0.0.1:{dante.port}"
        proxy = self.proxy(EGRESS_PROXY=f"socks5h://{user}:{password}@{host}")
        code, _ = await self.get_models(proxy)
        self.assertEqual(code, 200)
        for url in (f"socks5h://{user}:wrong-{SECRET}@{host}", f"socks5h://{host}"):
            proxy = self.proxy(EGRESS_PROXY=url)
            code, body = await self.get_models(proxy)
            self.assertEqual(
                (code, body["error"]["code"]), (502, "egress_proxy_auth_failed"), url
            )
            self.assertNotIn(SECRET, body["error"]["message"])

    async def test_a_refused_socks_connection_names_the_reply(self) -> None:
        dante = await Dante.start(self, blocked_port=self.upstream_port)
        proxy = self.proxy(EGRESS_PROXY=dante.url())
        code, body = await self.get_models(proxy)
        self.assertEqual((code, body["error"]["code"]), (502, "egress_proxy_refused"))
        self.assertIn("SOCKS reply 2", body["error"]["message"])
        self.assertEqual(self.egress_errors(proxy), 1)


class TMSEgressTests(TestCase):
    """
    Tencent TMS is reached through the proxy the settings choose, and only
    that one: the SDK's own reading of the variables is turned off.
    """

    def setUp(self) -> None:
        self.tms = FakeTMS(TMS_ID, TMS_SECRET, block_words=["bomb"])
        self.tms.start()
        self.addCleanup(self.tms.stop)

    def proxy(self, **env: str) -> Proxy:
        return Proxy(
            self,
            {
                "UPSTREAM": "http://127.0.0.1:9",
                "TENCENT_CLOUD_SID": TMS_ID,
                "TENCENT_CLOUD_SKEY": TMS_SECRET,
                "TENCENT_CLOUD_ENDPOINT": self.tms.url,
                **env,
            },
        )

    async def stops(self, proxy: Proxy, text: str) -> bool:
        plan = proxy.app.moderation.plan(b"/v1/chat/completions", {"moderation": True})
        assert plan is not None
        stopped: bool = await plan.stops(text, "k")
        return stopped

    async def test_tms_through_tinyproxy_with_credentials(self) -> None:
        if SKIP_TINYPROXY:
            raise SkipTest(SKIP_TINYPROXY)
        tiny = await TinyProxy.start(self, auth=("alice", SECRET))
        proxy = self.proxy(HTTP_PROXY=tiny.url, MODERATION_ON_ERROR="pass")
        self.assertTrue(await self.stops(proxy, "a bomb"))
        self.assertIn("a bomb", [call.text for call in self.tms.calls])
        self.assertIn(f"POST {self.tms.url}", tiny.daemon.output)

    async def test_the_sdks_own_reading_of_the_variables_is_off(self) -> None:
        # The process environment names a proxy nobody listens on; the
        # proxy's settings say NO_PROXY for TMS: it is reached directly.
        closed = await closed_port_url()
        env = {**os.environ, "HTTP_PROXY": closed, "http_proxy": closed}
        self.patch(os, "environ", env)
        proxy = self.proxy(
            HTTP_PROXY=closed, NO_PROXY="127.0.0.1", MODERATION_ON_ERROR="pass"
        )
        self.assertTrue(await self.stops(proxy, "a bomb"))
        self.assertIn("a bomb", [call.text for call in self.tms.calls])

    def test_tms_through_socks_without_pysocks_refuses_to_start(self) -> None:
        settings = {
            "TENCENT_CLOUD_SID": TMS_ID,
            "TENCENT_CLOUD_SKEY": TMS_SECRET,
            "ALL_PROXY": "socks5h://127.0.0.1:1080",
        }
        self.patch(importlib.util, "find_spec", lambda name: None)
        with self.assertRaises(ConfigError) as e:
            Config.load({}, settings)
        self.assertIn("PySocks", str(e.exception))
        Config.load({}, {**settings, "NO_PROXY": "tms.tencentcloudapi.com"})


class WebSocketEgressTests(TestCase):
    """The WebSocket relay's upstream hop goes through the egress proxy too."""

    def open_session(self, proxy: Proxy) -> Deferred[Any]:
        from tests.test_realtime_relay import events_until

        url = proxy.url.replace("http://", "ws://") + "/v1/realtime?model=gpt-realtime"

        def run() -> Any:
            from websockets.exceptions import InvalidStatus
            from websockets.sync.client import connect

            try:
                with connect(
                    url,
                    additional_headers=AUTH,
                    compression=None,
                    open_timeout=5,
                ) as ws:
                    return events_until(ws, "session.created")[-1]["type"]
            except InvalidStatus as e:
                return e.response.status_code, json.loads(e.response.body)

        return deferToThread(run)

    async def test_a_session_goes_through_connect(self) -> None:
        if SKIP_TINYPROXY:
            raise SkipTest(SKIP_TINYPROXY)
        from tests.fake_realtime import FakeRealtime

        fake = FakeRealtime()
        upstream = fake.start(self)
        tiny = await TinyProxy.start(self)
        proxy = Proxy(self, {"UPSTREAM": upstream, "HTTP_PROXY": tiny.url})
        self.assertEqual(await self.open_session(proxy), "session.created")
        self.assertIn("CONNECT 127.0.0.1:", tiny.daemon.output)

    async def test_an_unreachable_proxy_refuses_the_handshake_with_502(self) -> None:
        from tests.fake_realtime import FakeRealtime

        fake = FakeRealtime()
        upstream = fake.start(self)
        dead = await closed_port_url()
        proxy = Proxy(self, {"UPSTREAM": upstream, "HTTP_PROXY": dead})
        status, body = await self.open_session(proxy)
        self.assertEqual(
            (status, body["error"]["code"]), (502, "egress_proxy_unreachable")
        )
        self.assertEqual(fake.handshakes, [])
