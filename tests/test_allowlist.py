"""
What a named key may reach (issue 17, items 2, 3, 6, 9, 10 and 14): models
named anywhere a request names one, and paths, checked on what the upstream
will parse, through a real proxy on loopback in front of the fake upstream.
"""

from __future__ import annotations

import gzip
import json
import threading
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from openai_proxy import bodies
from openai_proxy.keys.named import KeysFileError, NamedKey, parse_keys
from tests.fake_upstream import Script
from tests.harness import AUTH, JSON, ModeratedRelayTestCase, RelayTestCase
from tests.rawhttp import raw_request
from tests.test_formfield import email_models, form
from tests.test_keys import chat, keys_file

ALICE = "pk-alice-7f01"  # gpt-4o* only
WENDY = "pk-wendy-5a22"  # whisper-1 only
CAROL = "pk-carol-0c31"  # one request at a time, any model
PAT = "pk-pat-91d4"  # gpt-4o*, on the paths listed
OLLY = "pk-olly-33e8"  # any model, chat completions only

KEYS_TOML = f"""
[[keys]]
name = "alice"
key = "{ALICE}"
models = ["gpt-4o*"]

[[keys]]
name = "wendy"
key = "{WENDY}"
models = ["whisper-1"]

[[keys]]
name = "carol"
key = "{CAROL}"
concurrency = 1

[[keys]]
name = "pat"
key = "{PAT}"
models = ["gpt-4o*"]
paths = ["/v1/chat/completions", "/v1/files", "/v1/batches"]

[[keys]]
name = "olly"
key = "{OLLY}"
paths = ["POST /v1/chat/completions"]
"""

BND = b"BND"
# 5,000 nested lists in 10 KB, next to a field the proxy must read.
DEEP = b'{"moderation": false, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"


class _NamedKeyTest(RelayTestCase):
    def setUp(self) -> None:
        self.env = {
            "KEYS_FILE": keys_file(self, KEYS_TOML),
            "OPENAI_KEY": "sk-server-one",
            "TIMEOUT": "2000",
        }
        super().setUp()

    async def send(
        self,
        key: str,
        body: bytes,
        path: str = "/v1/chat/completions",
        ctype: bytes = b"application/json",
        **headers: bytes,
    ) -> tuple[int, dict[str, Any]]:
        response = await self.http.post(
            self.url(path),
            body,
            headers={
                b"Authorization": b"Bearer " + key.encode(),
                b"Content-Type": ctype,
                **{k.replace("_", "-").encode(): v for k, v in headers.items()},
            },
        )
        raw = await response.content()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {}
        return response.code, answer

    def assert_refused(
        self, result: tuple[int, dict[str, Any]], status: int, code: str
    ) -> None:
        error = result[1].get("error") or {}
        self.assertEqual((result[0], error.get("code")), (status, code))
        self.assertEqual(self.fake.received, [])


def _ctype(boundary: bytes = BND, extra: bytes = b"") -> bytes:
    return b"multipart/form-data; " + extra + b"boundary=" + boundary


class FormModelTests(_NamedKeyTest):
    """Item 2: a form's model is read as the upstream's parser reads it."""

    async def transcribe(self, body: bytes, ctype: bytes) -> tuple[int, Any]:
        return await self.send(WENDY, body, "/v1/audio/transcriptions", ctype)

    async def test_a_boundary_parameter_is_found_by_name(self) -> None:
        ctype = _ctype(extra=b"xboundary=zz; ")
        body = form(
            (b'name="file"; filename="a.mp3"', b"\0" * 100),
            (b'name="model"', b"gpt-4o-transcribe"),
            boundary=BND,
        )
        self.assertEqual(email_models(body, ctype), [b"gpt-4o-transcribe"])
        self.assert_refused(
            await self.transcribe(body, ctype), 403, "model_not_allowed"
        )

    async def test_a_part_with_headers_over_8_kib_is_refused(self) -> None:
        long_name = b'name="file"; filename="' + b"a" * 9000 + b'.mp3"'
        body = form(
            (long_name, b"\0" * 100),
            (b'name="model"', b"gpt-4o-transcribe"),
            boundary=BND,
        )
        self.assertEqual(email_models(body, _ctype()), [b"gpt-4o-transcribe"])
        self.assert_refused(
            await self.transcribe(body, _ctype()), 400, "unreadable_body"
        )

    async def test_a_boundary_line_with_junk_in_a_file_is_content(self) -> None:
        # A scanner taking "--BNDjunk" for a delimiter reads the real model
        # part's delimiter as that false part's headers, and misses it.
        audio = b"\0" * 100 + b"\r\n--BNDjunk\r\n"
        audio += b'Content-Disposition: form-data; name="x"'
        body = form(
            (b'name="file"; filename="a.mp3"', audio),
            (b'name="model"', b"gpt-4o-transcribe"),
            boundary=BND,
        )
        self.assertEqual(email_models(body, _ctype()), [b"gpt-4o-transcribe"])
        self.assert_refused(
            await self.transcribe(body, _ctype()), 403, "model_not_allowed"
        )

    async def test_an_allowed_model_in_a_large_form_goes_upstream_unchanged(
        self,
    ) -> None:
        body = form(
            (b'name="file"; filename="a.mp3"', b"\0" * 300_000),
            (b'name="model"', b"whisper-1"),
            boundary=BND,
        )
        code, _ = await self.transcribe(body, _ctype())
        self.assertEqual(code, 404)  # the fake's answer: it went upstream
        self.assertEqual(self.fake.received[-1].body, body)


class JSONModelTests(_NamedKeyTest):
    """Item 3: the model check decides on the parsed keys, or refuses."""

    async def test_a_second_model_written_with_an_escape_is_checked(self) -> None:
        body = b'{"\\u006dodel":"gpt-5","model":"gpt-4o-mini","messages":[]}'
        self.assert_refused(await self.send(ALICE, body), 403, "model_not_allowed")

    async def test_a_model_deeper_in_the_body_is_checked(self) -> None:
        body = json.dumps(chat(tools=[{"type": "x", "model": "gpt-5"}])).encode()
        self.assert_refused(await self.send(ALICE, body), 403, "model_not_allowed")

    async def test_bodies_the_check_cannot_read_are_refused(self) -> None:
        good = json.dumps(chat()).encode()
        for body, headers in [
            (gzip.compress(good), {"content_encoding": b"gzip"}),
            (b"\xef\xbb\xbf" + good, {}),
            (good[:-1], {}),
            (b"[" + good + b"]", {}),
            (json.dumps(chat(model=["gpt-5"])).encode(), {}),
            (good.replace(b"gpt-4o-mini", b"gpt-4o-\xff"), {}),
            (DEEP, {}),
        ]:
            code, answer = await self.send(ALICE, body, **headers)
            self.assertEqual(code, 400, body[:40])
            self.assertIn(answer["error"]["code"], ("unreadable_body", "invalid_json"))
        self.assertEqual(self.fake.received, [])

    async def test_malformed_json_on_a_key_without_models_goes_upstream(
        self,
    ) -> None:
        await self.send(CAROL, b'{"model": ', "/v1/embeddings")
        self.assertEqual(self.fake.received[-1].body, b'{"model": ')


class OtherModelTests(_NamedKeyTest):
    """Item 6: models named in client secrets and batch files, and batches."""

    async def test_a_realtime_client_secret_names_an_allowed_model(self) -> None:
        path = "/v1/realtime/client_secrets"
        refused = {"session": {"type": "realtime", "model": "gpt-realtime"}}
        self.assert_refused(
            await self.send(ALICE, json.dumps(refused).encode(), path),
            403,
            "model_not_allowed",
        )
        default = {"session": {"type": "realtime"}}
        self.assert_refused(
            await self.send(ALICE, json.dumps(default).encode(), path),
            400,
            "model_required",
        )
        self.assert_refused(await self.send(ALICE, b"", path), 400, "model_required")
        allowed = {"session": {"type": "realtime", "model": "gpt-4o-realtime"}}
        await self.send(ALICE, json.dumps(allowed).encode(), path)
        self.assertEqual(self.fake.received[-1].json(), allowed)

    async def test_paths_with_a_default_model_must_name_one(self) -> None:
        prompt = json.dumps({"prompt": "a cat"}).encode()
        self.assert_refused(
            await self.send(ALICE, prompt, "/v1/images/generations"),
            400,
            "model_required",
        )
        image = form((b'name="image"; filename="a.png"', b"\x89PNG"), boundary=BND)
        self.assert_refused(
            await self.send(ALICE, image, "/v1/images/variations", _ctype()),
            400,
            "model_required",
        )

    async def test_a_model_in_the_query_is_checked(self) -> None:
        response = await self.http.get(
            self.url("/v1/realtime?mod%65l=gpt-realtime"),
            headers={"Authorization": f"Bearer {ALICE}"},
        )
        error = json.loads(await response.content())["error"]
        self.assertEqual((response.code, error["code"]), (403, "model_not_allowed"))
        self.assertEqual(self.fake.received, [])

    def batch_upload(self, *lines: dict[str, Any]) -> bytes:
        jsonl = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        return form(
            (b'name="file"; filename="in.jsonl"', jsonl),
            (b'name="purpose"', b"batch"),
            boundary=BND,
        )

    def line(self, model: str, url: str = "/v1/chat/completions") -> dict[str, Any]:
        return {"custom_id": model, "method": "POST", "url": url, "body": chat(model)}

    async def test_each_line_of_a_batch_input_file_is_checked(self) -> None:
        lines = [self.line("gpt-4o-mini")] * 2000 + [self.line("gpt-5")]
        body = self.batch_upload(*lines)
        self.assert_refused(
            await self.send(ALICE, body, "/v1/files", _ctype()),
            403,
            "model_not_allowed",
        )
        no_model = {"custom_id": "x", "url": "/v1/chat/completions", "body": {}}
        self.assert_refused(
            await self.send(ALICE, self.batch_upload(no_model), "/v1/files", _ctype()),
            400,
            "unreadable_body",
        )
        ok = self.batch_upload(*lines[:-1])
        code, _ = await self.send(ALICE, ok, "/v1/files", _ctype())
        self.assertEqual(code, 200)
        self.assertEqual(self.fake.received[-1].body, ok)

    async def test_a_batch_line_must_be_for_one_of_the_keys_paths(self) -> None:
        body = self.batch_upload(self.line("gpt-4o-mini", "/v1/embeddings"))
        self.assert_refused(
            await self.send(PAT, body, "/v1/files", _ctype()),
            403,
            "path_not_allowed",
        )

    async def test_batches_need_the_path_listed_on_a_key_with_models(self) -> None:
        batch = json.dumps(
            {
                "input_file_id": "file-x",
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            }
        ).encode()
        self.assert_refused(
            await self.send(ALICE, batch, "/v1/batches"), 403, "path_not_allowed"
        )
        upload = json.dumps(
            {"purpose": "batch", "filename": "a", "bytes": 1, "mime_type": "x"}
        ).encode()
        self.assert_refused(
            await self.send(ALICE, upload, "/v1/uploads"), 403, "path_not_allowed"
        )
        await self.send(PAT, batch, "/v1/batches")
        self.assertEqual(self.fake.received[-1].uri, b"/v1/batches")


class PathTests(_NamedKeyTest):
    """Item 6: a key's paths keep it away from the server key's other data."""

    async def test_only_the_listed_paths_are_reached(self) -> None:
        for method, path in [
            ("GET", "/v1/files"),
            ("GET", "/v1/chat/completions"),  # stored completions
            ("GET", "/v1/chat/completions/chatcmpl-1"),
            ("DELETE", "/v1/files/file-1"),
        ]:
            response = await self.http.request(
                method, self.url(path), headers={"Authorization": f"Bearer {OLLY}"}
            )
            error = json.loads(await response.content())["error"]
            self.assertEqual((response.code, error["code"]), (403, "path_not_allowed"))
        self.assertEqual(self.fake.received, [])
        code, _ = await self.send(OLLY, json.dumps(chat()).encode())
        self.assertEqual(code, 200)

    async def test_a_path_is_refused_before_the_body_is_read(self) -> None:
        raw = await raw_request(
            self.proxy.port.getHost().port,
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + OLLY.encode()
            + b"\r\nContent-Length: 40000000\r\nExpect: 100-continue\r\n\r\n",
        )
        self.assertNotIn(b"100 Continue", raw)
        self.assertIn(b"path_not_allowed", raw)
        self.assertTrue(raw.startswith(b"HTTP/1.1 403 "))

    async def test_a_path_written_another_way_is_refused(self) -> None:
        for path in ["/v1//chat/completions", "/v1/chat/%63ompletions"]:
            self.assert_refused(
                await self.send(OLLY, json.dumps(chat()).encode(), path),
                400,
                "invalid_path",
            )


class DeepJSONTests(_NamedKeyTest):
    """Item 9: JSON too deep to parse is a 400, and the key's slot is freed."""

    async def test_deep_json_is_400_and_the_next_request_is_admitted(self) -> None:
        for _ in range(2):
            code, answer = await self.send(CAROL, DEEP)
            self.assertEqual((code, answer["error"]["code"]), (400, "invalid_json"))
            self.assertIn("nested too deeply", answer["error"]["message"])
        code, _ = await self.send(CAROL, json.dumps(chat()).encode())
        self.assertEqual(code, 200)

    async def test_deep_json_in_a_large_body_is_400(self) -> None:
        big = DEEP[:-1] + b', "pad": "' + b"x" * 200_000 + b'"}'
        code, answer = await self.send(CAROL, big)
        self.assertEqual((code, answer["error"]["code"]), (400, "invalid_json"))


class DeepJSONWithoutNamedKeyTests(RelayTestCase):
    async def test_deep_json_with_a_local_field_is_400(self) -> None:
        response = await self.http.post(
            self.url("/v1/chat/completions"), DEEP, headers={**AUTH, **JSON}
        )
        error = json.loads(await response.content())["error"]
        self.assertEqual((response.code, error["code"]), (400, "invalid_json"))
        self.assertEqual(self.fake.received, [])


# What JSON.stringify makes of a cut emoji: a lone surrogate, escaped.
LONE = b'"\\ud83d"'


class LoneSurrogateTests(_NamedKeyTest):
    """Item 10: a body the proxy rewrites keeps a lone surrogate escaped."""

    async def test_an_injected_stream_keeps_the_escape(self) -> None:
        body = json.dumps(chat(stream=True)).encode().replace(b'"hi"', LONE)
        code, _ = await self.send(ALICE, body)
        self.assertEqual(code, 200)
        sent = self.fake.received[-1]
        self.assertIn(b"\\ud83d", sent.body)
        self.assertEqual(sent.json()["messages"][0]["content"], "\ud83d")
        self.assertEqual(sent.json()["stream_options"], {"include_usage": True})

    async def test_a_local_field_is_removed_and_the_escape_kept(self) -> None:
        body = b'{"model": "m", "input": ' + LONE + b', "moderation": false}'
        code, _ = await self.send(CAROL, body, "/v1/embeddings")
        self.assertEqual(code, 200)
        self.assertEqual(
            self.fake.received[-1].json(), {"model": "m", "input": "\ud83d"}
        )

    async def test_other_text_stays_utf_8(self) -> None:
        body = '{"model": "m", "input": "héllo 你好", "moderation": false}'
        await self.send(CAROL, body.encode(), "/v1/embeddings")
        self.assertIn("你好".encode(), self.fake.received[-1].body)


class LoneSurrogateModeratedTests(ModeratedRelayTestCase):
    moderation_env = {"MODERATE_INPUT": "1"}

    async def test_moderated_input_with_a_lone_surrogate_is_judged(self) -> None:
        body = json.dumps(chat(moderation=True)).encode().replace(b'"hi"', LONE)
        response = await self.http.post(
            self.url("/v1/chat/completions"), body, headers={**AUTH, **JSON}
        )
        await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(
            self.fake.received[-1].json()["messages"][0]["content"], "\ud83d"
        )


class OneParseTests(_NamedKeyTest):
    """Item 14: a named key's body is parsed once, off the reactor when large."""

    async def test_a_large_body_is_parsed_once_in_a_thread(self) -> None:
        threads: list[threading.Thread] = []
        original = bodies.parse_json

        def parse_json(raw: bytes, *, strict: bool) -> Any:
            threads.append(threading.current_thread())
            return original(raw, strict=strict)

        self.patch(bodies, "parse_json", parse_json)
        payload = chat(stream=True, moderation=False)
        payload["messages"] *= 5000  # ~200 KB
        code, _ = await self.send(ALICE, json.dumps(payload).encode())
        self.assertEqual(code, 200)
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.main_thread())
        sent = self.fake.received[-1].json()
        self.assertNotIn("moderation", sent)
        self.assertEqual(sent["stream_options"], {"include_usage": True})

    async def test_a_large_body_sent_unchanged_comes_from_the_request(
        self,
    ) -> None:
        self.fake.script = Script(body=b"{}", headers={b"content-type": [b"x/y"]})
        payload = chat()
        payload["messages"] *= 5000
        raw = json.dumps(payload).encode()
        code, _ = await self.send(ALICE, raw)
        self.assertEqual(code, 200)
        self.assertEqual(self.fake.received[-1].body, raw)


class PathsFieldTests(SynchronousTestCase):
    def test_paths_are_globs_on_the_path(self) -> None:
        olly = parse_keys(KEYS_TOML)[4]
        self.assertEqual(olly.paths, ("POST /v1/chat/completions",))
        self.assertTrue(olly.allows_path("POST", "/v1/chat/completions"))
        self.assertFalse(olly.allows_path("GET", "/v1/chat/completions"))
        self.assertFalse(olly.allows_path("POST", "/v1/chat/completions/x"))
        pat = NamedKey("pat", b"", paths=("/v1/files*",))
        self.assertTrue(pat.allows_path("GET", "/v1/files/file-1/content"))
        self.assertTrue(NamedKey("any", b"").allows_path("GET", "/anything"))

    def test_paths_must_be_a_list_of_paths(self) -> None:
        for value in ['"/v1/files"', '["v1/files"]', "[1]", '["post /v1/files"]']:
            with self.assertRaises(KeysFileError) as caught:
                parse_keys(f'[[keys]]\nname = "x"\nkey = "k"\npaths = {value}\n')
            self.assertIn("'paths'", str(caught.exception))
