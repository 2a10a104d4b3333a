"""The strict, bounded decoder for compressed bodies the proxy must read."""

from __future__ import annotations

import gzip
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from openai_proxy.upstream.decoding import PIECE, DecodeError, Decoder


def decode(encoding: bytes, pieces: list[bytes], limit: int = 10**9) -> bytes:
    decoder = Decoder(encoding, limit)
    out = b"".join(b"".join(decoder.feed(p)) for p in pieces)
    decoder.finish()
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


class DecoderTests(SynchronousTestCase):
    @given(st.binary(max_size=5000), st.lists(st.integers(min_value=0), max_size=8))
    def test_gzip_in_any_pieces_decodes_to_the_original(
        self, data: bytes, cuts: list[int]
    ) -> None:
        packed = gzip.compress(data, mtime=0)
        self.assertEqual(decode(b"gzip", split(packed, cuts)), data)

    @given(st.binary(max_size=2000))
    def test_deflate_decodes_to_the_original(self, data: bytes) -> None:
        self.assertEqual(decode(b"deflate", [zlib.compress(data)]), data)

    @given(st.binary(min_size=1, max_size=3000), st.data())
    def test_any_strict_prefix_of_a_gzip_body_is_truncated(
        self, data: bytes, draw: st.DataObject
    ) -> None:
        packed = gzip.compress(data, mtime=0)
        cut = draw.draw(st.integers(min_value=0, max_value=len(packed) - 1))
        with self.assertRaises(DecodeError):
            decode(b"gzip", [packed[:cut]])

    @given(st.binary(min_size=1, max_size=3000), st.data())
    def test_a_changed_byte_never_yields_other_data(
        self, data: bytes, draw: st.DataObject
    ) -> None:
        packed = bytearray(gzip.compress(data, mtime=0))
        # Past the 10-byte header (whose flags and mtime gzip may ignore).
        at = draw.draw(st.integers(min_value=10, max_value=len(packed) - 1))
        flip = draw.draw(st.integers(min_value=1, max_value=255))
        packed[at] ^= flip
        try:
            decoded = decode(b"gzip", [bytes(packed)])
        except DecodeError:
            return
        # Only a change inflate ignores (the padding bits after the last
        # block) may pass, and then the data is the same.
        self.assertEqual(decoded, data)

    def test_a_changed_checksum_is_corrupt(self) -> None:
        packed = bytearray(gzip.compress(b"hello", mtime=0))
        packed[-5] ^= 1  # the CRC-32's last byte
        with self.assertRaises(DecodeError):
            decode(b"gzip", [bytes(packed)])

    @settings(max_examples=300)
    @given(st.binary(max_size=3000), st.sampled_from([b"gzip", b"deflate"]))
    def test_arbitrary_bytes_decode_within_the_limit_or_raise_decode_error(
        self, data: bytes, encoding: bytes
    ) -> None:
        decoder = Decoder(encoding, 1000)
        total = 0
        try:
            for piece in decoder.feed(data):
                self.assertLessEqual(len(piece), PIECE)
                total += len(piece)
            decoder.finish()
        except DecodeError:
            return
        self.assertLessEqual(total, 1000)

    def test_a_bomb_stops_at_the_limit_without_inflating_it_all(self) -> None:
        bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), mtime=0)
        decoder = Decoder(b"gzip", 1_000_000)
        decoded = 0
        with self.assertRaises(DecodeError) as caught:
            for chunk in split(bomb, list(range(0, len(bomb), 4096))):
                decoded += sum(len(p) for p in decoder.feed(chunk))
        self.assertIn("more than 1000000 bytes", str(caught.exception))
        self.assertLessEqual(decoded, 1_000_000)

    def test_concatenated_gzip_members_decode_whole(self) -> None:
        packed = gzip.compress(b"one ", mtime=0) + gzip.compress(b"two", mtime=0)
        self.assertEqual(decode(b"gzip", [packed]), b"one two")

    def test_garbage_after_the_end_is_corrupt(self) -> None:
        with self.assertRaises(DecodeError):
            decode(b"gzip", [gzip.compress(b"x", mtime=0) + b"trailing"])

    def test_empty_body_is_not_a_gzip_body(self) -> None:
        with self.assertRaises(DecodeError):
            decode(b"gzip", [])

    def test_nothing_is_taken_after_a_failure(self) -> None:
        decoder = Decoder(b"gzip", 100)
        with self.assertRaises(DecodeError):
            decoder.feed(b"not gzip at all")
        with self.assertRaises(DecodeError):
            decoder.feed(gzip.compress(b"fine"))

    def test_unknown_encoding_is_refused(self) -> None:
        with self.assertRaises(DecodeError):
            Decoder(b"br", 100)
