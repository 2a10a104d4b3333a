"""The key rules, as pure functions, including arbitrary header bytes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from openai_proxy.http import errors
from openai_proxy.keys.auth import KeyPolicy, Token, bearer_token, split_token

_key = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters=":"),
    min_size=1,
)


class BearerTokenTests(TestCase):
    def test_scheme_is_case_insensitive_and_spaces_are_trimmed(self) -> None:
        self.assertEqual(bearer_token(b"bearer  sk-1 "), "sk-1")

    def test_other_schemes_and_empty_tokens_are_no_token(self) -> None:
        for value in [
            None,
            b"",
            b"Basic eDp5",
            b"Bearer",
            b"Bearer   ",
            b"Bearer \xff\xfe",
        ]:
            self.assertIsNone(bearer_token(value), value)

    @given(st.binary())
    def test_any_header_value_gives_a_token_or_none_and_never_raises(
        self, value: bytes
    ) -> None:
        token = bearer_token(value)
        if token is not None:
            self.assertTrue(token)
            self.assertEqual(token, token.strip())
            self.assertIn(token.encode("ascii"), value)


class SplitTokenTests(TestCase):
    @given(_key, st.text(min_size=0).filter(lambda s: "\n" not in s))
    def test_split_at_the_first_colon(self, upstream: str, proxy: str) -> None:
        parts = split_token(f"{upstream}:{proxy}", server_keys=False)
        self.assertEqual(parts, Token(upstream, proxy or None))

    @given(_key)
    def test_token_without_colon_is_proxy_key_only_with_server_keys(
        self, token: str
    ) -> None:
        self.assertEqual(split_token(token, server_keys=True), Token(None, token))
        self.assertEqual(split_token(token, server_keys=False), Token(token, None))


class KeyPolicyTests(TestCase):
    def test_missing_token_is_401(self) -> None:
        with self.assertRaises(errors.ProxyError) as e:
            KeyPolicy([], []).upstream_key(None)
        self.assertEqual(e.exception.status, 401)

    def test_wrong_proxy_key_is_403(self) -> None:
        policy = KeyPolicy(["pk"], [])
        with self.assertRaises(errors.ProxyError) as e:
            policy.upstream_key(b"Bearer sk:pk2")
        self.assertEqual(e.exception.status, 403)

    def test_token_without_its_proxy_half_is_told_the_proxy_key_is_missing(
        self,
    ) -> None:
        # No server keys: a token without a colon is the upstream key alone.
        policy = KeyPolicy(["the-proxy-key-0001"], [])
        for header in (
            b"Bearer not-an-openai-key",
            b"Bearer sk-abc",
            b"Bearer sk-abc:",
        ):
            with self.assertRaises(errors.ProxyError) as e:
                policy.upstream_key(header)
            self.assertEqual(e.exception.status, 401)
            self.assertEqual(e.exception.code, "missing_proxy_key")
            self.assertIn("<openai-key>:<proxy-key>", e.exception.message)

    def test_server_keys_rotate(self) -> None:
        policy = KeyPolicy(["pk"], ["a", "b", "c"])
        got = [policy.upstream_key(b"Bearer pk") for _ in range(4)]
        self.assertEqual(got, ["a", "b", "c", "a"])

    @given(st.binary())
    def test_arbitrary_header_never_passes_a_proxy_key_check(
        self, value: bytes
    ) -> None:
        policy = KeyPolicy(["the-proxy-key"], ["sk-server"])
        try:
            policy.upstream_key(value)
        except errors.ProxyError as e:
            self.assertIn(e.status, (401, 403))
        else:
            self.assertIn(b"the-proxy-key", value)
