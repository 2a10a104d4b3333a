"""Tests for L{openai_proxy.moderation.sentences}."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from openai_proxy.moderation.sentences import (
    TERMINATORS,
    SentenceSplitter,
    needs_check,
)


def split(*pieces: str) -> tuple[list[str], str]:
    splitter = SentenceSplitter()
    sentences: list[str] = []
    for piece in pieces:
        sentences.extend(splitter.feed(piece))
    return sentences, splitter.flush()


class SplitterTests(TestCase):
    def test_chinese_punctuation(self) -> None:
        self.assertEqual(
            split("你好。今天天气好！真的吗？是的；好…再见"),
            (["你好。", "今天天气好！", "真的吗？", "是的；", "好…"], "再见"),
        )

    def test_english_period_needs_following_whitespace(self) -> None:
        self.assertEqual(
            split("Version 3.5 is out. Great! Really? Yes; ok"),
            (["Version 3.5 is out.", " Great!", " Really?", " Yes;"], " ok"),
        )

    def test_period_at_end_of_piece_waits_for_next_character(self) -> None:
        splitter = SentenceSplitter()
        self.assertEqual(splitter.feed("Hello."), [])
        self.assertEqual(splitter.feed(" World"), ["Hello."])
        self.assertEqual(splitter.flush(), " World")

    def test_newline_ends_a_sentence(self) -> None:
        self.assertEqual(split("line one\nline two"), (["line one\n"], "line two"))

    def test_mixed_languages_across_pieces(self) -> None:
        self.assertEqual(
            split("Hi th", "ere. 你", "好吗？fine"),
            (["Hi there.", " 你好吗？"], "fine"),
        )

    def test_cut_at_200_characters_without_boundary(self) -> None:
        sentences, tail = split("a" * 450)
        self.assertEqual(sentences, ["a" * 200, "a" * 200])
        self.assertEqual(tail, "a" * 50)

    def test_tail_is_returned_once(self) -> None:
        splitter = SentenceSplitter()
        splitter.feed("no end")
        self.assertEqual(splitter.flush(), "no end")
        self.assertEqual(splitter.flush(), "")

    @given(st.lists(st.text(alphabet="ab .。!\n…é", max_size=60), max_size=10))
    def test_sentences_and_tail_rebuild_the_text(self, pieces: list[str]) -> None:
        sentences, tail = split(*pieces)
        self.assertEqual("".join(sentences) + tail, "".join(pieces))
        self.assertTrue(all(0 < len(s) <= 200 for s in sentences))

    def test_punctuation_only_text_needs_no_check(self) -> None:
        self.assertFalse(needs_check("…！\n "))
        self.assertTrue(needs_check("。a"))
        self.assertTrue(needs_check("😀"))


def reference_split(pieces: list[str], limit: int = 200) -> tuple[list[str], str]:
    # The splitter's rules written the slow, obvious way (one character at a
    # time, rescanning what is pending), as the fast one must behave.
    pending = ""
    sentences: list[str] = []
    for piece in pieces:
        pending += piece
        start = 0
        for i, char in enumerate(pending):
            boundary = char in TERMINATORS or (
                char == "." and i + 1 < len(pending) and pending[i + 1].isspace()
            )
            if boundary or i + 1 - start >= limit:
                sentences.append(pending[start : i + 1])
                start = i + 1
        pending = pending[start:]
    return sentences, pending


class FastSplitterTests(TestCase):
    @given(
        st.lists(st.text(alphabet="ab .。!?;\n…\t\u3000é", max_size=300), max_size=8)
    )
    def test_same_sentences_as_the_character_by_character_rules(
        self, pieces: list[str]
    ) -> None:
        self.assertEqual(split(*pieces), reference_split(pieces))

    def test_ten_megabytes_in_one_piece_split_in_one_pass(self) -> None:
        text = "word " * 2_000_000 + "end."
        sentences, tail = split(text)
        self.assertEqual(len(sentences), len(text) // 200)
        self.assertEqual("".join(sentences) + tail, text)

    @given(st.text(max_size=50))
    def test_needs_check_agrees_with_the_character_rule(self, text: str) -> None:
        expected = any(
            not c.isspace() and not unicodedata.category(c).startswith("P")
            for c in text
        )
        self.assertEqual(needs_check(text), expected)
