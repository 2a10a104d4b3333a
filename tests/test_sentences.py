"""Tests for L{openai_proxy.moderation.sentences}."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from openai_proxy.moderation.sentences import SentenceSplitter, needs_check


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
