"""
Upstreams chosen by model (C{UPSTREAMS_FILE}): the file and its checks, the
order a model's upstreams are tried in, and, over loopback against several
fake upstreams, routing by model, C{api-key} auth, failover between
upstreams, C{/v1/models}, the re-read on SIGHUP and the official SDK.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from typing import Any, TypeVar

import openai
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.server import Request

from openai_proxy.config import Config, ConfigError
from openai_proxy.ops.startup import summary
from openai_proxy.telemetry.logs import redact_text
from openai_proxy.upstream.channels import (
    Upstream,
    UpstreamsFileError,
    parse_upstreams,
)
from openai_proxy.upstream.choose import UpstreamRegistry
from tests.fake_upstream import FakeOpenAI, Received, Script
from tests.harness import JSON, Proxy, client, closed_port_url
from tests.test_operations import parse_samples, series

T = TypeVar("T")

PROXY_KEY = "pk-team-0123456789abcdef"
SERVER_KEY = "sk-default-server-key"
AUTH = {"Authorization": f"Bearer {PROXY_KEY}"}


def upstream(name: str, models: list[str], **fields: Any) -> Upstream:
    return Upstream(
        name=name, base_url="http://example.test", models=tuple(models), **fields
    )


def toml_entry(name: str, url: str, models: list[str], **fields: Any) -> str:
    lines = [
        "[[upstreams]]",
        f"name = {json.dumps(name)}",
        f"base_url = {json.dumps(url)}",
    ]
    lines.append(f"models = {json.dumps(models)}")
    for field, value in fields.items():
        if isinstance(value, dict):
            inner = ", ".join(
                f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items()
            )
            lines.append(f"{field} = {{ {inner} }}")
        else:
            lines.append(f"{field} = {json.dumps(value)}")
    return "\n".join(lines) + "\n\n"


class FileTests(TestCase):
    """What an upstreams file may hold, and how a bad one is refused."""

    def test_every_field_is_read(self) -> None:
        text = toml_entry(
            "azure",
            "https://example.openai.azure.com/openai/",
            ["gpt-4o*"],
            keys_env="AZURE_KEYS",
            auth_header="api-key",
            headers={"X-Team": "ml"},
            weight=3,
            proxy="socks5h://user:p%40ss@proxy.internal:1080",
        )
        (parsed,) = parse_upstreams(text, {"AZURE_KEYS": "k-one, k-two"})
        self.assertEqual(parsed.base_url, "https://example.openai.azure.com/openai")
        self.assertEqual(parsed.keys, ("k-one", "k-two"))
        self.assertEqual(parsed.auth_header, "api-key")
        self.assertEqual(parsed.headers, (("x-team", "ml"),))
        self.assertEqual(parsed.weight, 3)
        assert parsed.proxy is not None
        self.assertEqual(parsed.proxy.password, "p@ss")
        # Shown in logs without its credentials.
        self.assertEqual(parsed.proxy.display(), "socks5h://proxy.internal:1080")
        self.assertNotIn("k-one", repr(parsed))
        self.assertNotIn("p@ss", repr(parsed))

    def test_a_bad_file_is_refused_naming_the_entry_and_field(self) -> None:
        cases = {
            "unknown field 'model'": toml_entry("a", "http://x", ["m"], model="m"),
            "'auth_header'": toml_entry("a", "http://x", ["m"], auth_header="x-key"),
            "'models'": toml_entry("a", "http://x", []),
            "'base_url'": toml_entry("a", "ftp://x", ["m"]),
            "'weight'": toml_entry("a", "http://x", ["m"], weight=0),
            "'NOPE' ('keys_env') is not set": toml_entry(
                "a", "http://x", ["m"], keys_env="NOPE"
            ),
            "'proxy'": toml_entry("a", "http://x", ["m"], proxy="ftp://p:1"),
            "may not set 'Authorization'": toml_entry(
                "a", "http://x", ["m"], headers={"Authorization": "x"}
            ),
            "is used twice": toml_entry("a", "http://x", ["m"]) * 2,
            "at most one of 'keys' and 'keys_env'": toml_entry(
                "a", "http://x", ["m"], keys=["k"], keys_env="K"
            ),
        }
        for why, text in cases.items():
            with self.assertRaises(UpstreamsFileError) as caught:
                parse_upstreams(text, {"K": "k"})
            self.assertIn(why, str(caught.exception))
            self.assertIn("[[upstreams]] #", str(caught.exception))

    def test_a_bad_proxy_password_never_reaches_the_message(self) -> None:
        text = toml_entry("a", "http://x", ["m"], proxy="http://u:hunter2@p:1/path")
        with self.assertRaises(UpstreamsFileError) as caught:
            parse_upstreams(text, {})
        self.assertNotIn("hunter2", str(caught.exception))

    def test_keys_in_the_file_need_a_proxy_key(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(toml_entry("a", "http://x", ["m"], keys=["sk-a"]))
        with self.assertRaises(ConfigError) as caught:
            Config.load({}, {"UPSTREAMS_FILE": path})
        self.assertIn("PROXY_KEY", str(caught.exception))
        config = Config.load({}, {"UPSTREAMS_FILE": path, "PROXY_KEY": PROXY_KEY})
        self.assertEqual([u.name for u in config.upstreams], ["a"])

    def test_the_start_up_line_names_each_upstream_and_proxy_without_secrets(
        self,
    ) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                toml_entry(
                    "azure",
                    "https://example.openai.azure.com/openai",
                    ["gpt-*"],
                    keys=["sk-azure-secret"],
                    proxy="socks5h://user:hunter2@proxy.internal:1080",
                )
                + toml_entry("local", "http://127.0.0.1:8000", ["llama-*"])
            )
        config = Config.load({}, {"UPSTREAMS_FILE": path, "PROXY_KEY": PROXY_KEY})
        line = summary(config)
        self.assertIn(
            "upstreams by model: azure→example.openai.azure.com via "
            "socks5h://proxy.internal:1080, local→127.0.0.1:8000",
            line,
        )
        self.assertNotIn("hunter2", line)
        self.assertNotIn("sk-azure-secret", repr(config))

    def test_the_files_keys_and_proxy_passwords_are_redacted_from_logs(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                toml_entry(
                    "a",
                    "http://127.0.0.1:1",
                    ["m"],
                    keys=["sk-file-key-5e3a1c"],
                    proxy="http://user:pw-9f8e7d6c@proxy:3128",
                )
            )
        Proxy(self, {"UPSTREAMS_FILE": path, "PROXY_KEY": PROXY_KEY})
        text = redact_text("key sk-file-key-5e3a1c via pw-9f8e7d6c")
        self.assertNotIn("sk-file-key-5e3a1c", text)
        self.assertNotIn("pw-9f8e7d6c", text)


class OrderTests(TestCase):
    """Which upstreams a model goes to, in which order."""

    def test_first_match_in_file_order_then_the_others(self) -> None:
        registry = UpstreamRegistry(
            None,
            [
                upstream("one", ["gpt-4o*"]),
                upstream("two", ["gpt-*"]),
                upstream("three", ["o3"]),
            ],
        )
        self.assertEqual(
            [c.name for c in registry.plan(["gpt-4o-mini"])], ["one", "two"]
        )
        self.assertEqual([c.name for c in registry.plan(["gpt-3.5"])], ["two"])
        self.assertEqual(registry.plan(["llama"]), [])
        self.assertEqual(registry.plan([]), [])
        chosen = registry.choose("o3")
        assert chosen is not None
        self.assertEqual(chosen.name, "three")

    def test_a_model_named_twice_goes_where_both_are_served(self) -> None:
        registry = UpstreamRegistry(
            None, [upstream("one", ["gpt-4o"]), upstream("two", ["gpt-*"])]
        )
        plan = registry.plan(["gpt-4o", "gpt-5"])
        self.assertEqual([c.name for c in plan], ["two"])

    def test_weights_spread_the_first_try_in_proportion(self) -> None:
        draws = iter([0.0, 0.24, 0.25, 0.99])
        registry = UpstreamRegistry(
            None,
            [
                upstream("primary", ["m"]),
                upstream("light", ["m"], weight=1),
                upstream("heavy", ["m"], weight=3),
            ],
            random=lambda: next(draws),
        )
        orders = [[c.name for c in registry.plan(["m"])] for _ in range(4)]
        # The unweighted upstream listed first stays first; the draw decides
        # which weighted one comes next, the other following.
        self.assertEqual(
            orders,
            [
                ["primary", "light", "heavy"],
                ["primary", "light", "heavy"],
                ["primary", "heavy", "light"],
                ["primary", "heavy", "light"],
            ],
        )

    def test_a_reload_keeps_the_old_upstreams_when_the_file_is_bad(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(toml_entry("a", "http://x", ["m"], keys=["k1", "k2"]))
        registry = UpstreamRegistry(path, parse_upstreams(open(path).read(), {}))
        pool = registry.channels[0].pool
        pool.bench(0, 60)
        with open(path, "w") as f:
            f.write(toml_entry("a", "http://x", ["m", "n"], keys=["k1", "k2"]))
        self.assertTrue(registry.reload())
        self.assertEqual(registry.channels[0].upstream.models, ("m", "n"))
        # Same keys: the same pool, its bench kept.
        self.assertIs(registry.channels[0].pool, pool)
        with open(path, "w") as f:
            f.write("[[upstreams]]\nname = 3\n")
        self.assertFalse(registry.reload())
        self.assertEqual(registry.channels[0].upstream.models, ("m", "n"))


class _ByModel(TestCase):
    """A proxy with a server key for C{UPSTREAM} and upstreams by model."""

    timeout = 20
    extra_env: dict[str, str] = {}

    def setUp(self) -> None:
        self.default = FakeOpenAI()
        self.openai = FakeOpenAI()
        self.azure = AzureLike()
        self.local = FakeOpenAI()
        self.default_url = self.default.start(self)
        self.openai_url = self.openai.start(self)
        self.azure_url = self.azure.start(self)
        self.local_url = self.local.start(self)
        self.http = client(self)

    def start(self, text: str, **env: str) -> Proxy:
        path = self.path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        self.proxy = Proxy(
            self,
            {
                "UPSTREAM": self.default_url,
                "OPENAI_KEY": SERVER_KEY,
                "PROXY_KEY": PROXY_KEY,
                "UPSTREAMS_FILE": path,
                "TIMEOUT": "2000",
                **self.extra_env,
                **env,
            },
        )
        return self.proxy

    def three(self) -> str:
        return (
            toml_entry("openai", self.openai_url, ["gpt-4o*"], keys=["sk-openai"])
            + toml_entry(
                "azure",
                self.azure_url + "/openai",
                ["gpt-4o*", "azure-*"],
                keys_env="AZURE_KEYS",
                auth_header="api-key",
                headers={"x-ms-team": "ml"},
            )
            + toml_entry("local", self.local_url, ["llama-*"])
        )

    async def chat(
        self, model: Any, auth: dict[str, str] | None = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        body = (
            raw
            if raw is not None
            else json.dumps(
                {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            ).encode()
        )
        response = await self.http.post(
            self.proxy.url + "/v1/chat/completions",
            body,
            headers={**(auth or AUTH), **JSON},
        )
        return response.code, json.loads(await response.content())

    async def scrape(self) -> dict[str, float]:
        response = await self.http.get(self.proxy.url + "/metrics")
        return parse_samples((await response.content()).decode("utf-8"))


class AzureLike(FakeOpenAI):
    """The fake API under Azure OpenAI's C{/openai} prefix."""

    def render(self, request: Request) -> bytes | int:
        if request.path.startswith(b"/openai/"):
            request.path = request.path[len(b"/openai") :]
        return super().render(request)


def only(fake: FakeOpenAI) -> Received:
    assert len(fake.received) == 1, fake.received
    return fake.received[0]


class RoutingTests(_ByModel):
    async def test_the_model_picks_the_upstream_and_its_key(self) -> None:
        self.start(self.three(), AZURE_KEYS="az-key-1")
        self.assertEqual((await self.chat("gpt-4o-mini"))[0], 200)
        sent = only(self.openai)
        self.assertEqual(sent.header(b"authorization"), b"Bearer sk-openai")
        self.assertEqual(sent.uri, b"/v1/chat/completions")
        self.assertEqual((await self.chat("llama-3"))[0], 200)
        # An upstream without keys gets none, and never the client's.
        self.assertIsNone(only(self.local).header(b"authorization"))
        self.assertEqual((await self.chat("claude-x"))[0], 200)
        self.assertEqual(
            only(self.default).header(b"authorization"), f"Bearer {SERVER_KEY}".encode()
        )
        self.assertEqual(self.azure.received, [])

    async def test_azure_gets_its_key_in_api_key_and_its_headers(self) -> None:
        self.start(self.three(), AZURE_KEYS="az-key-1")
        code, _ = await self.chat("azure-gpt", auth={**AUTH, "api-key": PROXY_KEY})
        self.assertEqual(code, 200)
        sent = only(self.azure)
        self.assertEqual(sent.uri, b"/openai/v1/chat/completions")
        self.assertEqual(sent.header(b"api-key"), b"az-key-1")
        self.assertIsNone(sent.header(b"authorization"))
        self.assertEqual(sent.header(b"x-ms-team"), b"ml")

    async def test_the_model_is_read_however_the_body_writes_it(self) -> None:
        self.start(self.three(), AZURE_KEYS="az-key-1")
        # An escaped member name, and a body labelled as plain text.
        escaped = b'{"mod\\u0065l": "llama-3", "messages": []}'
        self.assertEqual((await self.chat(None, raw=escaped))[0], 200)
        self.assertEqual(len(self.local.received), 1)
        response = await self.http.post(
            self.proxy.url + "/v1/chat/completions",
            b'{"model": "llama-3"}',
            headers={**AUTH, "Content-Type": "text/plain"},
        )
        await response.content()
        self.assertEqual(len(self.local.received), 2)
        # Named twice, differently: no upstream serves both, so UPSTREAM.
        twice = b'{"model": "llama-3", "model": "gpt-4o"}'
        self.assertEqual((await self.chat(None, raw=twice))[0], 200)
        self.assertEqual(len(self.default.received), 1)
        self.assertEqual(len(self.local.received), 2)

    async def test_the_proxys_own_fields_are_still_removed(self) -> None:
        self.start(self.three(), AZURE_KEYS="az-key-1")
        raw = b'{"model": "llama-3", "moderation": false, "messages": []}'
        self.assertEqual((await self.chat(None, raw=raw))[0], 200)
        self.assertEqual(only(self.local).json(), {"model": "llama-3", "messages": []})

    async def test_a_form_routes_by_its_model_field(self) -> None:
        self.start(toml_entry("local", self.local_url, ["whisper-*"]))
        boundary = b"b0undary"
        body = (
            b'--b0undary\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
            b"whisper-local\r\n--b0undary\r\nContent-Disposition: form-data; "
            b'name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
            b"RIFF....\r\n--b0undary--\r\n"
        )
        response = await self.http.post(
            self.proxy.url + "/v1/audio/transcriptions",
            body,
            headers={
                **AUTH,
                "Content-Type": "multipart/form-data; boundary=" + boundary.decode(),
            },
        )
        await response.content()
        self.assertEqual(only(self.local).body, body)
        self.assertEqual(self.default.received, [])

    async def test_a_query_names_the_model_when_the_body_does_not(self) -> None:
        self.start(self.three(), AZURE_KEYS="az-key-1")
        response = await self.http.get(
            self.proxy.url + "/v1/realtime?model=llama-3", headers=AUTH
        )
        await response.content()
        self.assertEqual(only(self.local).uri, b"/v1/realtime?model=llama-3")
        self.assertEqual(self.default.received, [])

    async def test_client_held_keys_only_go_to_the_default_upstream(self) -> None:
        self.start(self.three(), AZURE_KEYS="az-key-1", OPENAI_KEY="")
        own = {"Authorization": f"Bearer sk-user-own:{PROXY_KEY}"}
        self.assertEqual((await self.chat("gpt-4o", auth=own))[0], 200)
        self.assertEqual(
            only(self.default).header(b"authorization"), b"Bearer sk-user-own"
        )
        self.assertEqual(self.openai.received, [])
        # An upstream that takes no key may serve it: without the client's.
        self.assertEqual((await self.chat("llama-3", auth=own))[0], 200)
        self.assertIsNone(only(self.local).header(b"authorization"))
        # With only the proxy key, an upstream of the file serves the model...
        self.assertEqual((await self.chat("gpt-4o"))[0], 200)
        self.assertEqual(
            only(self.openai).header(b"authorization"), b"Bearer sk-openai"
        )
        # ...and a model none serves has nowhere to go.
        code, body = await self.chat("claude-x")
        self.assertEqual((code, body["error"]["code"]), (404, "model_not_found"))


class NamedKeyTests(_ByModel):
    """A named key with C{models}: its check and the choice read one parse."""

    async def test_a_named_keys_json_and_form_are_routed_and_checked(self) -> None:
        keys = self.mktemp()
        with open(keys, "w") as f:
            f.write('[[keys]]\nname = "bob"\nkey = "pk-bob-1234567890abcd"\n')
            f.write('models = ["llama-*", "whisper-*"]\n')
        text = self.three() + toml_entry("audio", self.openai_url, ["whisper-*"])
        self.start(text, AZURE_KEYS="az-key-1", KEYS_FILE=keys)
        bob = {"Authorization": "Bearer pk-bob-1234567890abcd"}
        self.assertEqual((await self.chat("llama-3", auth=bob))[0], 200)
        self.assertEqual(len(self.local.received), 1)
        code, body = await self.chat("gpt-4o", auth=bob)
        self.assertEqual((code, body["error"]["code"]), (403, "model_not_allowed"))
        form = (
            b'--b0\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
            b"whisper-1\r\n--b0--\r\n"
        )
        response = await self.http.post(
            self.proxy.url + "/v1/audio/transcriptions",
            form,
            headers={**bob, "Content-Type": "multipart/form-data; boundary=b0"},
        )
        await response.content()
        self.assertEqual(only(self.openai).uri, b"/v1/audio/transcriptions")
        self.assertEqual(self.default.received, [])


class FailoverTests(_ByModel):
    async def test_a_5xx_moves_the_request_to_the_next_upstream(self) -> None:
        self.start(self.three(), AZURE_KEYS="az-key-1")
        self.openai.script = Script(status=503, body=b'{"error": {"message": "down"}}')
        before = await self.scrape()
        code, body = await self.chat("gpt-4o", raw=None)
        self.assertEqual(code, 200)
        self.assertEqual(body["object"], "chat.completion")
        # The same body went to both.
        self.assertEqual(only(self.openai).body, only(self.azure).body)
        after = await self.scrape()
        for name, moved in (
            (series("openai_proxy_upstream_requests_total", upstream="openai"), 1),
            (series("openai_proxy_upstream_requests_total", upstream="azure"), 1),
            (series("openai_proxy_upstream_failovers_total", upstream="openai"), 1),
        ):
            self.assertEqual(after.get(name, 0) - before.get(name, 0), moved, name)

    async def test_an_exhausted_key_pool_moves_on_after_benching(self) -> None:
        text = toml_entry(
            "openai", self.openai_url, ["gpt-4o"], keys=["sk-a1", "sk-a2"]
        ) + toml_entry("backup", self.local_url, ["gpt-4o"])
        self.start(text)
        self.openai.script = Script(
            status=401, body=b'{"error": {"code": "invalid_api_key"}}'
        )
        self.assertEqual((await self.chat("gpt-4o"))[0], 200)
        self.assertEqual(
            sorted(r.header(b"authorization") or b"" for r in self.openai.received),
            [b"Bearer sk-a1", b"Bearer sk-a2"],
        )
        self.assertEqual(len(self.local.received), 1)
        samples = await self.scrape()
        benched = series(
            "openai_proxy_upstream_benched_total", upstream="openai", index="0"
        )
        self.assertEqual(samples[benched], 1)

    async def test_an_unreachable_upstream_is_skipped(self) -> None:
        gone = await closed_port_url()
        text = toml_entry("gone", gone, ["gpt-4o"]) + toml_entry(
            "backup", self.local_url, ["gpt-4o"]
        )
        self.start(text)
        self.assertEqual((await self.chat("gpt-4o"))[0], 200)
        self.assertEqual(len(self.local.received), 1)

    async def test_the_last_upstreams_answer_is_relayed(self) -> None:
        text = toml_entry("one", self.openai_url, ["gpt-4o"]) + toml_entry(
            "two", self.local_url, ["gpt-4o"]
        )
        self.start(text)
        self.openai.script = Script(status=429, body=b'{"error": {"message": "one"}}')
        self.local.script = Script(status=429, body=b'{"error": {"message": "two"}}')
        code, body = await self.chat("gpt-4o")
        self.assertEqual((code, body["error"]["message"]), (429, "two"))

    async def test_a_client_error_is_not_retried_elsewhere(self) -> None:
        text = toml_entry("one", self.openai_url, ["gpt-4o"]) + toml_entry(
            "two", self.local_url, ["gpt-4o"]
        )
        self.start(text)
        self.openai.script = Script(status=400, body=b'{"error": {"message": "bad"}}')
        self.assertEqual((await self.chat("gpt-4o"))[0], 400)
        self.assertEqual(self.local.received, [])


class ModelsListTests(_ByModel):
    async def models(self, auth: dict[str, str]) -> list[str]:
        response = await self.http.get(self.proxy.url + "/v1/models", headers=auth)
        self.assertEqual(response.code, 200)
        return [m["id"] for m in json.loads(await response.content())["data"]]

    async def test_the_union_of_each_upstreams_served_models(self) -> None:
        self.openai.models = ["gpt-4o", "gpt-4o-mini", "dall-e-3"]
        self.azure.models = ["azure-gpt", "gpt-4o"]
        self.local.models = ["llama-3"]
        self.default.models = ["o3"]
        self.start(self.three(), AZURE_KEYS="az-key-1")
        ids = await self.models(AUTH)
        self.assertEqual(ids, ["gpt-4o", "gpt-4o-mini", "azure-gpt", "llama-3", "o3"])
        self.assertEqual(only(self.azure).header(b"api-key"), b"az-key-1")

    async def test_an_upstream_that_fails_is_left_out(self) -> None:
        self.local.models = ["llama-3"]
        self.openai.script = Script(status=500, body=b"{}")
        self.start(self.three(), AZURE_KEYS="az-key-1")
        self.assertIn("llama-3", await self.models(AUTH))

    async def test_a_named_key_sees_only_its_models(self) -> None:
        keys = self.mktemp()
        with open(keys, "w") as f:
            f.write('[[keys]]\nname = "bob"\nkey = "pk-bob-1234567890abcd"\n')
            f.write('models = ["llama-*"]\n')
        self.local.models = ["llama-3", "other"]
        self.openai.models = ["gpt-4o"]
        self.start(self.three(), AZURE_KEYS="az-key-1", KEYS_FILE=keys)
        ids = await self.models({"Authorization": "Bearer pk-bob-1234567890abcd"})
        self.assertEqual(ids, ["llama-3"])


class ReloadTests(_ByModel):
    async def test_sighup_re_reads_the_file_and_keeps_it_when_bad(self) -> None:
        self.start(toml_entry("one", self.openai_url, ["gpt-4o"]))
        self.assertEqual((await self.chat("gpt-4o"))[0], 200)
        with open(self.path, "w") as f:
            f.write(toml_entry("two", self.local_url, ["gpt-4o"]))
        await self.sighup()
        self.assertEqual((await self.chat("gpt-4o"))[0], 200)
        self.assertEqual(len(self.local.received), 1)
        with open(self.path, "w") as f:
            f.write("not = [toml")
        await self.sighup()
        self.assertEqual((await self.chat("gpt-4o"))[0], 200)
        self.assertEqual(len(self.local.received), 2)
        self.assertEqual(len(self.openai.received), 1)

    async def sighup(self) -> None:
        # The handler re-reads the file on the reactor's next turn.
        reloaded: Deferred[None] = Deferred()
        self.proxy.app.on_sighup.append(lambda: reloaded.callback(None))
        os.kill(os.getpid(), signal.SIGHUP)
        await reloaded
        self.proxy.app.on_sighup.clear()


class SDKTests(_ByModel):
    async def in_thread(self, f: Callable[[], T]) -> T:
        result: T = await deferToThread(f)
        return result

    async def test_the_sdk_reaches_each_upstream_by_model(self) -> None:
        self.local.models = ["llama-3"]
        self.openai.models = ["gpt-4o"]
        self.start(self.three(), AZURE_KEYS="az-key-1")
        sdk = openai.OpenAI(
            base_url=self.proxy.url + "/v1",
            api_key=PROXY_KEY,
            max_retries=0,
            timeout=10,
        )
        self.addCleanup(sdk.close)
        for model in ("gpt-4o", "azure-gpt", "llama-3"):
            completion = await self.in_thread(
                lambda m=model: sdk.chat.completions.create(  # type: ignore[misc]
                    model=m, messages=[{"role": "user", "content": "hi"}]
                )
            )
            self.assertEqual(completion.choices[0].message.content, "Hello world!")
        stream = await self.in_thread(
            lambda: list(
                sdk.chat.completions.create(
                    model="llama-3",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                )
            )
        )
        self.assertEqual(
            "".join(c.choices[0].delta.content or "" for c in stream if c.choices),
            "Hello world!",
        )
        listed = await self.in_thread(lambda: [m.id for m in sdk.models.list()])
        self.assertEqual(listed, ["gpt-4o", "llama-3", "gpt-fake"])
        self.assertEqual(len(self.openai.received), 2)  # chat, then the list
        self.assertEqual(len(self.azure.received), 2)
        self.assertEqual(len(self.local.received), 3)
