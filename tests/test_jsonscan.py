"""Finding a top-level JSON member as the document streams past."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from openai_proxy.keys.jsonscan import MemberScanner

# Text that looks like JSON structure, so that strings hold brackets,
# quotes, colons and the name looked for.
_TRICKY = st.text(alphabet=st.sampled_from('usage{}[]",:\\\n é\x00'), max_size=8)
_NAMES = st.sampled_from(["usage", "metadata", 'us"age', "usage\\"]) | _TRICKY
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TRICKY
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(_NAMES, inner, max_size=4)
    ),
    max_leaves=20,
)


def scan(pieces: list[bytes], name: str = "usage", **kw: Any) -> MemberScanner:
    scanner = MemberScanner(name, **kw)
    for piece in pieces:
        scanner.feed(piece)
    return scanner


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(raw)]
    return [raw[a:b] for a, b in zip(edges, edges[1:], strict=False)]


class MemberScannerTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(
        st.lists(st.tuples(_NAMES, _VALUES), max_size=6),
        st.data(),
        st.booleans(),
        st.booleans(),
    )
    def test_finds_what_json_loads_finds_however_the_document_is_split(
        self, members: list[tuple[str, Any]], data: Any, ascii: bool, indent: bool
    ) -> None:
        # Members may repeat a name (the last one counts, as for json.loads).
        raw = (
            "{"
            + ", ".join(
                json.dumps(name, ensure_ascii=ascii)
                + ": "
                + json.dumps(value, ensure_ascii=ascii, indent=2 if indent else None)
                for name, value in members
            )
            + "}"
        ).encode()
        cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=6))
        scanner = scan(split(raw, cuts))
        self.assertTrue(scanner.complete)
        self.assertEqual(scanner.value(), json.loads(raw).get("usage"))

    def test_a_nested_or_quoted_usage_is_not_the_top_level_one(self) -> None:
        raw = (
            b'{"metadata": {"usage": {"input_tokens": 0}}, "text": "\\"usage\\": 1",'
            b' "usage": {"input_tokens": 7}, "tail": [{"usage": 0}]}'
        )
        for size in (1, 2, 3, 7, len(raw)):
            pieces = [raw[i : i + size] for i in range(0, len(raw), size)]
            self.assertEqual(scan(pieces).value(), {"input_tokens": 7})

    def test_an_escaped_name_is_the_name(self) -> None:
        self.assertEqual(scan([b'{"us\\u0061ge": 3, "x": 1}']).value(), 3)

    def test_a_document_that_is_not_an_object_has_no_member(self) -> None:
        for raw in (b'[{"usage": 1}]', b'"usage"', b'x {"usage": 1}', b"12"):
            scanner = scan([raw])
            self.assertTrue(scanner.not_object, raw)
            self.assertIsNone(scanner.value())
        self.assertFalse(scan([b" \r\n", b'\xef\xbb\xbf {"usage": 1}']).not_object)

    def test_a_cut_document_is_not_complete(self) -> None:
        scanner = scan([b'{"usage": {"input_tokens": 7}, "output": ["abc'])
        self.assertFalse(scanner.complete)
        self.assertEqual(scanner.value(), {"input_tokens": 7})
        self.assertIsNone(scan([b'{"usage": {"input_tokens": 7']).value())

    def test_a_value_over_the_limit_is_not_kept(self) -> None:
        big = b'{"usage": "' + b"x" * 100 + b'", "y": 1}'
        for pieces in ([big], [big[:50], big[50:]]):
            scanner = scan(pieces, max_value=64)
            self.assertTrue(scanner.overflowed)
            self.assertIsNone(scanner.value())
        # A later member of the same name is read again.
        scanner = scan([big[:-1] + b', "usage": 2}'], max_value=64)
        self.assertEqual((scanner.overflowed, scanner.value()), (False, 2))
