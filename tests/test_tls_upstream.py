"""
https upstreams: one endpoint and one set of TLS options per upstream, and
the CA trusted through OpenSSL's C{SSL_CERT_FILE}.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported

from openai_proxy.upstream.client import CachedEndpoints
from tests.certs import make_certs, trust
from tests.fake_upstream import FakeOpenAI
from tests.harness import AUTH, Proxy, client


class _CountingPolicy:
    def __init__(self) -> None:
        self.calls: list[tuple[bytes, int]] = []
        self._real = BrowserLikePolicyForHTTPS()

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        self.calls.append((hostname, port))
        return self._real.creatorForNetloc(hostname, port)


class CachedEndpointsTests(TestCase):
    def test_one_endpoint_and_one_tls_creator_per_upstream(self) -> None:
        policy = _CountingPolicy()
        endpoints = CachedEndpoints(Clock(), policy)  # type: ignore[arg-type]
        first = endpoints.endpointForURI(URI.fromBytes(b"https://api.example/v1/a"))
        again = endpoints.endpointForURI(URI.fromBytes(b"https://api.example/v1/b?x"))
        other = endpoints.endpointForURI(URI.fromBytes(b"https://api.example:8443/"))
        plain = endpoints.endpointForURI(URI.fromBytes(b"http://api.example/v1/a"))
        self.assertIs(first, again)
        self.assertEqual(len({id(first), id(other), id(plain)}), 3)
        self.assertEqual(policy.calls, [(b"api.example", 443), (b"api.example", 8443)])

    def test_cache_is_bounded(self) -> None:
        endpoints = CachedEndpoints(Clock(), limit=2)
        for port in range(1, 6):
            endpoints.endpointForURI(URI.fromBytes(b"http://h:%d/" % port))
            self.assertLessEqual(len(endpoints._endpoints), 2)

    def test_other_schemes_are_refused(self) -> None:
        with self.assertRaises(SchemeNotSupported):
            CachedEndpoints(Clock()).endpointForURI(URI.fromBytes(b"ftp://h/x"))


class HTTPSUpstreamTests(TestCase):
    def setUp(self) -> None:
        self.certs = make_certs(self.mktemp_dir())
        self.fake = FakeOpenAI()
        self.port = self.fake.start_tls(self, self.certs.cert, self.certs.key)
        self.http = client(self)

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    def trust(self, ca: str | None) -> None:
        trust(self, ca)

    async def get_models(self, proxy: Proxy) -> tuple[int, Any]:
        response = await self.http.get(proxy.url + "/v1/models", headers=AUTH)
        return response.code, json.loads(await response.content())

    async def test_trusted_ca_from_ssl_cert_file(self) -> None:
        if platform.python_implementation() == "PyPy":
            raise SkipTest(
                "on Debian trixie's PyPy 7.3.19 with the cryptography wheels "
                "that import there (<47), SSL_CERT_FILE does not reach the "
                "upstream TLS trust (see the README's Performance/PyPy note)"
            )
        self.trust(self.certs.ca)
        proxy = Proxy(self, {"UPSTREAM": f"https://localhost:{self.port}"})
        for _ in range(3):
            code, body = await self.get_models(proxy)
            self.assertEqual((code, body["data"][0]["id"]), (200, "gpt-fake"))
        self.assertEqual(len(self.fake.received), 3)

    async def test_untrusted_certificate_is_a_502_and_never_reaches_upstream(
        self,
    ) -> None:
        self.trust(os.devnull)
        proxy = Proxy(self, {"UPSTREAM": f"https://localhost:{self.port}"})
        code, body = await self.get_models(proxy)
        self.assertEqual(code, 502)
        self.assertIn("code", body["error"])
        self.assertEqual(self.fake.received, [])

    async def test_certificate_for_another_name_is_refused(self) -> None:
        other = make_certs(self.mktemp_dir(), host="elsewhere.example")
        fake = FakeOpenAI()
        port = fake.start_tls(self, other.cert, other.key)
        # Trust the CA that signed it, but name the host differently.
        self.trust(other.ca)
        proxy = Proxy(self, {"UPSTREAM": f"https://localhost:{port}"})
        code, _ = await self.get_models(proxy)
        self.assertEqual(code, 502)
        self.assertEqual(fake.received, [])
