"""Header filtering, for arbitrary header sets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from openai_proxy.http.headers import REQUEST_DROPPED, RESPONSE_DROPPED, filtered

_token = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz-ABC", min_size=1, max_size=12
).map(str.encode)
_names = st.one_of(_token, st.sampled_from(sorted(REQUEST_DROPPED | RESPONSE_DROPPED)))
_value = st.binary(max_size=20).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b""))


class FilterTests(TestCase):
    @given(
        st.lists(st.tuples(_names, _value)),
        st.lists(_token, max_size=3),
        st.sampled_from([REQUEST_DROPPED, RESPONSE_DROPPED]),
    )
    def test_dropped_and_connection_named_headers_never_pass(
        self,
        pairs: list[tuple[bytes, bytes]],
        named: list[bytes],
        dropped: frozenset[bytes],
    ) -> None:
        headers = Headers()
        for name, value in pairs:
            headers.addRawHeader(name, value)
        if named:
            headers.addRawHeader(b"Connection", b", ".join(named))
        out = dict(filtered(headers, dropped))
        lowered_named = {n.lower() for n in named}
        for name in out:
            self.assertNotIn(name, dropped)
            self.assertNotIn(name, lowered_named)
        # Everything else passes, values unchanged.
        for name, value in pairs:
            lowered = name.lower()
            if lowered not in dropped and lowered not in lowered_named:
                self.assertIn(value, out[lowered])

    def test_end_to_end_openai_headers_pass(self) -> None:
        headers = Headers(
            {
                b"OpenAI-Organization": [b"org"],
                b"X-Ratelimit-Limit-Requests": [b"5"],
                b"Retry-After": [b"1"],
                b"Content-Type": [b"application/json"],
            }
        )
        out = dict(filtered(headers, RESPONSE_DROPPED))
        self.assertEqual(
            set(out),
            {
                b"openai-organization",
                b"x-ratelimit-limit-requests",
                b"retry-after",
                b"content-type",
            },
        )
