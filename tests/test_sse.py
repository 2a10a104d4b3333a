"""Tests for L{openai_proxy.http.sse}."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from openai_proxy.http.sse import SSEEvent, SSEParser, format_event, format_json_event


def parse(*reads: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for data in reads:
        events.extend(parser.feed(data))
    return events + parser.finish()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    return [*pieces, data[start:]]


class ParserTests(TestCase):
    def test_lf_events(self) -> None:
        events = parse(b'data: {"a":1}\n\ndata: [DONE]\n\n')
        self.assertEqual([e.data for e in events], ['{"a":1}', "[DONE]"])
        self.assertEqual(events[0].raw, b'data: {"a":1}\n\n')
        self.assertEqual(events[0].json(), {"a": 1})
        self.assertIsNone(events[1].json())

    def test_crlf_and_cr_line_endings(self) -> None:
        for sep in (b"\r\n", b"\r"):
            events = parse(b"data: a" + sep + sep + b"data: b" + sep + sep)
            self.assertEqual([e.data for e in events], ["a", "b"])
            self.assertEqual(
                b"".join(e.raw for e in events),
                (b"data: a" + sep * 2 + b"data: b" + sep * 2),
            )

    def test_multiline_data_joined_with_newline(self) -> None:
        [event] = parse(b"data: one\ndata:two\ndata\n\n")
        self.assertEqual(event.data, "one\ntwo\n")

    def test_event_field_and_comments(self) -> None:
        events = parse(b": keep-alive\n\nevent: response.created\nid: 7\ndata: {}\n\n")
        self.assertEqual(events[0], SSEEvent(b": keep-alive\n\n", None, None))
        self.assertEqual(events[1].event, "response.created")
        self.assertEqual(events[1].data, "{}")

    def test_event_split_inside_utf8_character(self) -> None:
        data = "data: 你好\n\n".encode()
        cut = data.index("你".encode()) + 1
        [event] = parse(data[:cut], data[cut:])
        self.assertEqual(event.data, "你好")
        self.assertEqual(event.raw, data)

    def test_crlf_split_between_cr_and_lf(self) -> None:
        events = parse(b"data: a\r\n\r", b"\ndata: b\r\n\r\n")
        self.assertEqual(
            [e.raw for e in events], [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]
        )

    def test_event_held_until_its_blank_line(self) -> None:
        parser = SSEParser()
        self.assertEqual(parser.feed(b"data: a\n"), [])
        [event] = parser.feed(b"\n")
        self.assertEqual(event.data, "a")

    def test_unterminated_last_event_keeps_its_bytes(self) -> None:
        [event] = parse(b"data: tail")
        self.assertEqual((event.raw, event.data), (b"data: tail", "tail"))

    def test_non_json_data_is_not_an_error(self) -> None:
        [event] = parse(b"data: not json {\n\n")
        self.assertIsNone(event.json())

    def test_leading_byte_order_mark_ignored(self) -> None:
        [event] = parse(b"\xef\xbb\xbfdata: x\n\n")
        self.assertEqual(event.data, "x")

    def test_format_event_round_trips(self) -> None:
        raw = format_event("a\nb", "kind") + format_json_event({"t": "é"})
        events = parse(raw)
        self.assertEqual(
            [(e.event, e.data) for e in events], [("kind", "a\nb"), (None, '{"t":"é"}')]
        )


_LINES = st.sampled_from(
    [
        'data: {"choices":[{"index":0,"delta":{"content":"你好。"}}]}',
        "data: [DONE]",
        "data:x",
        "data",
        ": comment",
        "event: response.output_text.delta",
        "id: 3",
        "data: é…😀",
        "",
        "retry: 10",
    ]
)
_STREAMS = st.tuples(
    st.lists(st.tuples(_LINES, st.sampled_from(["\n", "\r\n", "\r"])), max_size=30),
    st.booleans(),
).map(
    lambda t: (
        "".join(line + end for line, end in t[0]).encode()
        + (b"\xef\xbb" if t[1] else b"")
    )
)


class ParserPropertyTests(TestCase):
    @settings(max_examples=300, deadline=None)
    @given(_STREAMS, st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
    def test_any_split_gives_the_same_events(
        self, data: bytes, cuts: list[int]
    ) -> None:
        """Events (fields and raw bytes) do not depend on how reads are split,
        and their raw bytes add up to the input."""
        whole = parse(data)
        pieces = parse(*split_at(data, cuts))
        self.assertEqual(pieces, whole)
        self.assertEqual(b"".join(e.raw for e in whole), data)

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=8))
    def test_arbitrary_bytes_survive(self, data: bytes, cuts: list[int]) -> None:
        events = parse(*split_at(data, cuts))
        self.assertEqual(events, parse(data))
        self.assertEqual(b"".join(e.raw for e in events), data)

    def test_byte_at_a_time(self) -> None:
        data = b'data: {"x":"\xe4\xbd\xa0"}\r\n\r\n: c\r\revent: e\ndata: 1\n\n'
        self.assertEqual(
            parse(*[data[i : i + 1] for i in range(len(data))]), parse(data)
        )
