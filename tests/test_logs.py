"""Tests for L{openai_proxy.telemetry.logs}: NDJSON output, redaction, request ids."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogPublisher,
    formatEventAsClassicLogText,
    formatTime,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import TestCase

from openai_proxy.telemetry import access, logs
from openai_proxy.telemetry.access import log_request

OPENAI_KEY = "sk-proj-Abc123Def456Ghi789Jkl012"
PROXY_KEY = "plain-proxy-key-without-shape"
SECRET_FIELDS = ("authorization", "api_key", "openaiKey", "token", "secret", "password")


class _Leaky:
    """An object whose repr holds a key, as a careless log call might pass."""

    def __repr__(self) -> str:
        return f"<Leaky key={PROXY_KEY} auth=Bearer {OPENAI_KEY}>"


class _Isolated(TestCase):
    """Keeps L{logs.register_secrets} from leaking between tests."""

    def setUp(self) -> None:
        self.patch(logs, "_registered", set())
        self.patch(logs, "_pattern", logs._pattern)


class JSONObserverTests(_Isolated):
    """L{logs.json_observer} writes one parseable, key-free object per line."""

    def setUp(self) -> None:
        super().setUp()
        self.out = io.StringIO()
        self.log = Logger(namespace="test", observer=logs.json_observer(self.out))

    def lines(self) -> list[dict[str, Any]]:
        text = self.out.getvalue()
        self.assertTrue(text.endswith("\n"))
        return [json.loads(line) for line in text.splitlines()]

    def test_one_object_per_line_with_fields_and_text(self) -> None:
        self.log.info("upstream answered {status}", status=200, request_id="ab12")
        self.log.warn("second line\nwith a newline")
        first, second = self.lines()
        self.assertEqual(first["status"], 200)
        self.assertEqual(first["request_id"], "ab12")
        self.assertEqual(first["log_text"], "upstream answered 200")
        self.assertEqual(first["log_level"]["name"], "info")
        self.assertEqual(first["log_namespace"], "test")
        self.assertEqual(second["log_text"], "second line\nwith a newline")

    def test_no_record_separator(self) -> None:
        self.log.info("x")
        self.assertNotIn("\x1e", self.out.getvalue())

    def test_fields_named_like_secrets_redacted(self) -> None:
        fields = {name: PROXY_KEY for name in SECRET_FIELDS}
        self.log.info("auth {authorization} via {api_key}", **fields)
        [line] = self.lines()
        self.assertNotIn(PROXY_KEY, self.out.getvalue())
        for name in SECRET_FIELDS:
            self.assertEqual(line[name], logs.REDACTED)
        self.assertIn(logs.REDACTED, line["log_text"])

    def test_nested_secret_fields_and_bearer_values_redacted(self) -> None:
        headers = {
            "Authorization": f"Bearer {PROXY_KEY}",
            "X-Note": f"forwarded Bearer {PROXY_KEY}",
            "content-type": "application/json",
        }
        self.log.info(
            "headers {headers}", headers=headers, raw=[b"Bearer " + b"x" * 30]
        )
        [line] = self.lines()
        self.assertNotIn(PROXY_KEY, self.out.getvalue())
        self.assertNotIn("x" * 30, self.out.getvalue())
        self.assertEqual(line["headers"]["content-type"], "application/json")

    def test_key_shaped_text_in_format_string_redacted(self) -> None:
        self.log.info(f"client sent {OPENAI_KEY} in the body")
        [line] = self.lines()
        self.assertNotIn(OPENAI_KEY, self.out.getvalue())
        self.assertEqual(line["log_text"], f"client sent {logs.REDACTED} in the body")

    def test_failure_with_key_in_message_redacted(self) -> None:
        try:
            raise ValueError(f"upstream refused key {OPENAI_KEY}")
        except ValueError:
            self.log.failure("upstream call failed")
        [line] = self.lines()
        self.assertNotIn(OPENAI_KEY, self.out.getvalue())
        self.assertIn("ValueError", line["log_traceback"])

    def test_registered_secret_redacted_anywhere(self) -> None:
        logs.register_secrets([PROXY_KEY, None, "", "ab"])
        self.log.info("object {thing!r}", thing=_Leaky(), other=_Leaky())
        self.assertNotIn(PROXY_KEY, self.out.getvalue())
        self.assertNotIn(OPENAI_KEY, self.out.getvalue())
        [line] = self.lines()
        # Too short to register: "ab" must not have been scrubbed from words.
        self.assertIn("auth=", line["log_text"])

    def test_counts_named_tokens_kept(self) -> None:
        self.log.info("usage", prompt_tokens=12, max_tokens=100, keywords=["x"])
        [line] = self.lines()
        self.assertEqual(
            (line["prompt_tokens"], line["max_tokens"], line["keywords"]),
            (12, 100, ["x"]),
        )

    def test_event_seen_by_other_observers_unchanged(self) -> None:
        event = {
            "log_format": "k {api_key}",
            "api_key": PROXY_KEY,
            "log_namespace": "t",
        }
        observer = logs.json_observer(io.StringIO())
        observer(event)
        self.assertEqual(event["api_key"], PROXY_KEY)
        self.assertNotIn("log_text", event)


class TextObserverTests(_Isolated):
    """L{logs.text_observer} writes Twisted's text lines, redacted the same way."""

    def test_text_redacted(self) -> None:
        out = io.StringIO()
        log = Logger(namespace="test", observer=logs.text_observer(out))
        log.info(
            "key {api_key} and {header}",
            api_key=PROXY_KEY,
            header=f"Bearer {OPENAI_KEY}",
        )
        try:
            raise RuntimeError(OPENAI_KEY)
        except RuntimeError:
            log.failure("oops")
        text = out.getvalue()
        self.assertNotIn(PROXY_KEY, text)
        self.assertNotIn(OPENAI_KEY, text)
        self.assertIn("[test#info] key [REDACTED] and Bearer [REDACTED]", text)
        self.assertIn("RuntimeError", text)


class RedactTextTests(_Isolated):
    """L{logs.redact_text} finds key-shaped strings wherever they are."""

    @given(
        st.text(max_size=20),
        st.from_regex(r"sk-[A-Za-z0-9_-]{20,40}", fullmatch=True),
        st.text(max_size=20),
    )
    def test_openai_key_never_survives(self, before: str, key: str, after: str) -> None:
        self.assertNotIn(key, logs.redact_text(before + key + after))

    @given(st.from_regex(r"[A-Za-z0-9._~+/=-]{8,40}", fullmatch=True))
    def test_bearer_token_never_survives(self, token: str) -> None:
        redacted = logs.redact_text(f'{{"Authorization": "Bearer {token}"}}')
        self.assertEqual(redacted, f'{{"Authorization": "Bearer {logs.REDACTED}"}}')

    def test_ordinary_text_untouched(self) -> None:
        text = "POST /v1/chat/completions 200 in 1.2s; ask-me; key=value"
        self.assertEqual(logs.redact_text(text), text)


class TwistdLoggerTests(_Isolated):
    """The observers plug into twistd through its C{--logger} option."""

    def plugin_options(self, *twistd_args: str) -> tuple[ServerOptions, usage.Options]:
        parent = ServerOptions()
        parent.parseOptions(["-n", *twistd_args])
        child = usage.Options()
        child.parent = parent
        return parent, child

    def test_use_log_format_json_installs_factory(self) -> None:
        parent, child = self.plugin_options()
        logs.use_log_format(child, "json")
        parent.postOptions()  # twistd resolves the dotted name here
        self.assertIs(parent["logger"], logs.json_observer)

    def test_use_log_format_text_installs_redacting_text(self) -> None:
        parent, child = self.plugin_options()
        logs.use_log_format(child, "text")
        parent.postOptions()
        self.assertIs(parent["logger"], logs.text_observer)

    def test_explicit_logger_left_alone(self) -> None:
        parent, child = self.plugin_options(
            "--logger=twisted.logger.textFileLogObserver"
        )
        before = parent["logger"]
        logs.use_log_format(child, "json")
        self.assertIs(parent["logger"], before)

    def test_unknown_format_refused(self) -> None:
        _, child = self.plugin_options()
        self.assertRaises(ValueError, logs.use_log_format, child, "xml")

    def test_zero_argument_factories_write_stdout_as_log_observers(self) -> None:
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        for factory in (logs.json_observer, logs.text_observer):
            observer = factory()
            self.assertIsInstance(observer, FileLogObserver)
            self.assertTrue(ILogObserver.providedBy(observer))
            observer({"log_format": "hello", "log_time": 0.0})
        first, second = stdout.getvalue().splitlines()
        self.assertEqual(json.loads(first)["log_text"], "hello")
        self.assertTrue(second.endswith("hello"))


class RequestIdTests(TestCase):
    """L{logs.new_request_id} gives short, fresh hex ids."""

    def test_short_unique_hex(self) -> None:
        ids = {logs.new_request_id() for _ in range(1000)}
        self.assertEqual(len(ids), 1000)
        self.assertTrue(all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids))

    def test_a_new_process_draws_a_new_prefix(self) -> None:
        first = logs._RequestIds()
        second = logs._RequestIds()
        self.assertNotEqual(first()[:8], second()[:8])
        self.assertEqual(first()[8:], "00000001")

    def test_counter_running_out_draws_a_new_prefix(self) -> None:
        ids = logs._RequestIds()
        ids._next = 0xFFFFFFFF
        last = ids()
        self.assertTrue(last.endswith("ffffffff"))
        after = ids()
        self.assertNotEqual(after[:8], last[:8])
        self.assertTrue(after.endswith("00000000"))

    def test_forked_child_gets_its_own_prefix(self) -> None:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report an id and leave at once
            os.write(write, logs.new_request_id().encode())
            os._exit(0)
        os.close(write)
        child = os.read(read, 64).decode()
        os.close(read)
        os.waitpid(pid, 0)
        self.assertNotEqual(child[:8], logs.new_request_id()[:8])


def _access_event(**overrides: Any) -> dict[str, Any]:
    """The event L{log_request} emits, as the observers receive it."""
    seen: list[dict[str, Any]] = []
    publisher = LogPublisher(seen.append)
    fields: dict[str, Any] = {
        "method": b"POST",
        "path": b"/v1/chat/completions",
        "status": 200,
        "bytes_out": 1032,
        "duration": 0.00123,
        "upstream": "api.openai.com",
        "request_id": "0123456789abcdef",
        **overrides,
    }
    original = access._log.observer
    access._log.observer = publisher
    try:
        log_request(**fields)
    finally:
        access._log.observer = original
    return seen[0]


def _as_logger_info_made_it(event: dict[str, Any]) -> dict[str, Any]:
    """The same access event, made by Twisted's own C{Logger.info}."""
    seen: list[dict[str, Any]] = []
    logger = Logger(namespace="openai_proxy.access", observer=seen.append)
    logger.info(
        "{line}", **{k: v for k, v in event.items() if not k.startswith("log_")}
    )
    return seen[0]


class AccessLineTests(_Isolated):
    """
    The access log skips Twisted's generic formatting: what it writes must
    be, byte for byte, what Twisted's own observers wrote for the same event.
    """

    def test_event_is_the_one_logger_info_makes(self) -> None:
        event = _access_event(body="{}")
        twisted_event = _as_logger_info_made_it(event)
        twisted_event["log_time"] = event["log_time"]
        self.assertIs(event["log_logger"], access._log)
        twisted_event["log_logger"] = access._log
        self.assertEqual(list(event.items()), list(twisted_event.items()))

    @given(
        st.floats(min_value=0, max_value=4e9),
        st.text(max_size=40),
        st.sampled_from([None, "-", "api.openai.com"]),
    )
    def test_text_line_is_twisteds(self, when: float, path: str, upstream: Any) -> None:
        event = _access_event(
            path=path.encode("utf-8"), upstream=upstream, duration=when % 3
        )
        event["log_time"] = when
        ours, theirs = io.StringIO(), io.StringIO()
        logs.text_observer(ours)(event)
        FileLogObserver(theirs, textFileLogObserver(io.StringIO()).formatEvent)(event)
        self.assertEqual(ours.getvalue(), logs.redact_text(theirs.getvalue()))

    def test_times_next_to_a_second_are_twisteds(self) -> None:
        event = _access_event()
        for when in [1.0, 1.4999999, 1.9999994, 1.9999995, 1.9999996, 2.0, 59.9999999]:
            event["log_time"] = when
            self.assertEqual(logs._time_text(when), formatTime(when), when)
            self.assertEqual(logs._text_line(event), formatEventAsClassicLogText(event))

    def test_other_events_are_formatted_by_twisted(self) -> None:
        failure = Failure(ValueError("boom"))
        for event in [
            {"log_format": "x {y}", "y": 1, "log_time": 5.5, "log_namespace": "n"},
            {"log_format": "{line}", "line": "a", "log_system": "sys", "log_time": 1.0},
            {"log_format": "{line}", "line": "a", "log_failure": failure},
            {"log_format": "{line}", "line": 3, "log_time": None},
        ]:
            self.assertEqual(
                logs._text_line(event), formatEventAsClassicLogText(event), event
            )

    def test_json_line_is_the_one_logger_info_gave(self) -> None:
        event = _access_event(body="{}")
        twisted_event = _as_logger_info_made_it(event)
        twisted_event["log_time"] = event["log_time"]
        ours, theirs = io.StringIO(), io.StringIO()
        logs.json_observer(ours)(event)
        logs.json_observer(theirs)(twisted_event)
        self.assertEqual(ours.getvalue(), theirs.getvalue())
        self.assertEqual(
            json.loads(ours.getvalue())["log_text"],
            "POST /v1/chat/completions 200 1032B 1.2ms upstream=api.openai.com"
            " id=0123456789abcdef",
        )

    def test_json_line_matches_json_dumps(self) -> None:
        event = {"log_format": "{line}", "line": "é\n", "x": b"\xff", "y": object}
        text = logs._json_line(event)
        self.assertEqual(
            text,
            json.dumps(
                {
                    "log_format": "{line}",
                    "line": "é\n",
                    "x": "\ufffd",
                    "y": repr(object),
                    "log_text": "é\n",
                },
                ensure_ascii=False,
            )
            + "\n",
        )


class ShortSecretTests(_Isolated):
    """Item 14 of issue 9: every configured key is redacted, whatever its length."""

    def test_a_three_character_key_is_redacted_where_it_stands_alone(self) -> None:
        logs.register_secrets(["k9z", "q"])
        self.assertEqual(
            logs.redact_text("token=k9z key q, upstream sk-x:k9z"),
            "token=[REDACTED] key [REDACTED], upstream sk-x:[REDACTED]",
        )

    def test_a_short_key_inside_a_longer_word_is_left_alone(self) -> None:
        logs.register_secrets(["ab"])
        self.assertEqual(logs.redact_text("about tab-ab_x"), "about tab-ab_x")
