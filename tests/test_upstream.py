"""Where requests go: routes by key, and URLs that stay on the configured hosts."""

from __future__ import annotations

from urllib.parse import urlsplit

from hyperlink import EncodedURL
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from openai_proxy.upstream import Upstreams

BASE = b"https://api.example.com/prefix"


class URLTests(TestCase):
    def test_path_and_query_are_appended_unchanged(self) -> None:
        self.assertEqual(
            Upstreams.url(BASE, b"/v1/files/a%2Fb?x=1+2"),
            b"https://api.example.com/prefix/v1/files/a%2Fb?x=1+2",
        )

    def test_targets_that_could_leave_the_base_are_refused(self) -> None:
        for target in [
            b"http://evil.example/x",
            b"evil.example/x",
            b"/v1/../../admin",
            b"/v1/./x",
            b"/v1/%2e%2e/admin",
            b"/v1/%2E%2e",
            b"/..",
            b"/v1/models#fragment",
            b"/v1/a b",
            b"/v1/\x00",
            b"/v1/caf\xc3\xa9",
        ]:
            with self.assertRaises(ValueError, msg=target):
                Upstreams.url(BASE, target)

    def test_dots_inside_names_are_fine(self) -> None:
        self.assertTrue(Upstreams.url(BASE, b"/v1/files/a..b.jsonl?x=../y"))

    @settings(max_examples=500)
    @given(
        st.one_of(
            st.binary(max_size=200),
            st.binary(max_size=200).map(lambda b: b"/" + b),
            # The characters that matter to URL parsers, densely.
            st.text("/.%2eE?#@:\\ab", max_size=40).map(lambda t: b"/" + t.encode()),
        )
    )
    def test_any_accepted_target_stays_on_the_base_host_and_prefix(
        self, target: bytes
    ) -> None:
        try:
            url = Upstreams.url(BASE, target)
        except ValueError:
            return
        # As treq will parse it (hyperlink, lazy), and as a stdlib would.
        text = url.decode("latin-1")
        parsed = EncodedURL.from_text(text)
        self.assertEqual(parsed.host, "api.example.com")
        self.assertEqual(urlsplit(text).hostname, "api.example.com")
        self.assertEqual(parsed.path[0], "prefix")


class RouteTests(TestCase):
    def test_longest_prefix_wins_and_others_go_to_the_default(self) -> None:
        upstreams = Upstreams(
            "https://default.example",
            [("fk", "https://a.example"), ("fk-x", "https://b.example")],
        )
        self.assertEqual(upstreams.base_for("fk-x123"), b"https://b.example")
        self.assertEqual(upstreams.base_for("fk123"), b"https://a.example")
        self.assertEqual(upstreams.base_for("sk-1"), b"https://default.example")
