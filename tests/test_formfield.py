"""Finding a multipart form's C{model} fields without holding the upload."""

from __future__ import annotations

import email.parser
import email.policy
import io

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from openai_proxy.keys.formfield import (
    _CHUNK,
    _MAX_HEADERS,
    FormError,
    boundary_of,
    form_fields,
)

B = b"----b0undary7"


def form(*parts: tuple[bytes, bytes], boundary: bytes = B) -> bytes:
    """A multipart body of (Content-Disposition parameters, value) parts."""
    out = b""
    for params, value in parts:
        out += b"--" + boundary + b"\r\n"
        out += b"Content-Disposition: form-data; " + params + b"\r\n"
        out += b"Content-Type: application/octet-stream\r\n\r\n" + value + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def model_of(body: bytes, boundary: bytes = B) -> bytes | None:
    found = models_in(body, boundary)
    return found[0] if found else None


def models_in(body: bytes, boundary: bytes = B) -> list[bytes]:
    return form_fields(io.BytesIO(body), boundary, ("model",)).get("model", [])


def email_models(body: bytes, content_type: bytes) -> list[bytes]:
    """The C{model} fields as the standard library's MIME parser reads them."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type + b"\r\n\r\n" + body
    )
    found = []
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "model":
            found.append(part.get_payload(decode=True).removesuffix(b"\r\n"))
    return found


class BoundaryTests(SynchronousTestCase):
    def test_plain_and_quoted(self) -> None:
        self.assertEqual(boundary_of(b"multipart/form-data; boundary=" + B), B)
        self.assertEqual(boundary_of(b'Multipart/Form-Data; boundary="a b"'), b"a b")

    def test_not_a_form(self) -> None:
        self.assertIsNone(boundary_of(b"application/json"))

    def test_the_parameter_named_boundary_not_one_ending_so(self) -> None:
        ctype = b"multipart/form-data; xboundary=zz; boundary=BND"
        self.assertEqual(boundary_of(ctype), b"BND")
        self.assertEqual(
            email_models(form((b'name="model"', b"m"), boundary=b"BND"), ctype),
            [b"m"],
        )

    def test_a_form_without_one_readable_boundary_cannot_be_read(self) -> None:
        for ctype in [
            b"multipart/form-data",
            b"multipart/form-data; xboundary=zz",
            b"multipart/form-data; boundary=a; boundary=b",
            b"multipart/form-data; boundary=a b",
            b'multipart/form-data; boundary="a\\"b"',
            b"multipart/form-data; boundary*=utf-8''a",
            b"multipart/form-data; boundary=",
        ]:
            with self.assertRaises(FormError, msg=ctype):
                boundary_of(ctype)


class FormFieldTests(SynchronousTestCase):
    def test_the_field_first(self) -> None:
        body = form((b'name="model"', b"whisper-1"), (b'name="file"', b"x" * 10))
        self.assertEqual(model_of(body), b"whisper-1")

    def test_the_field_after_a_large_file(self) -> None:
        audio = bytes(range(256)) * 2000  # 512 KB, many pieces
        body = form(
            (b'name="file"; filename="model.mp3"', audio),
            (b'name="model"', b"gpt-4o-transcribe"),
        )
        self.assertEqual(model_of(body), b"gpt-4o-transcribe")

    def test_a_delimiter_cut_by_a_piece_edge(self) -> None:
        delimiter = b"--" + B
        for cut in range(1, len(delimiter)):
            # The model part's delimiter starts `cut` bytes before the edge.
            start = form((b'name="file"; filename="a"', b"")).index(b"\r\n--" + B)
            audio = b"\0" * (_CHUNK - cut - 2 - start)
            body = form(
                (b'name="file"; filename="a"', audio), (b'name="model"', b"m-1")
            )
            self.assertEqual(body.index(delimiter, 1), _CHUNK - cut)
            self.assertEqual(model_of(body), b"m-1", cut)

    def test_filename_is_not_the_name(self) -> None:
        body = form((b'name="file"; filename="model"', b"data"))
        self.assertIsNone(model_of(body))

    def test_no_field(self) -> None:
        self.assertIsNone(model_of(form((b'name="file"', b"data"))))

    def test_every_field_of_the_name(self) -> None:
        # The upstream may read the first or the last: both must be checked.
        body = form(
            (b'name="model"', b"gpt-4o-transcribe"),
            (b'name="file"; filename="a"', b"x" * 100),
            (b'name="model"', b"whisper-1"),
        )
        self.assertEqual(models_in(body), [b"gpt-4o-transcribe", b"whisper-1"])

    def test_a_boundary_longer_than_rfc_2046_allows(self) -> None:
        long = b"b" * 120  # RFC 2046 says at most 70
        ctype = b"multipart/form-data; boundary=" + long
        body = form((b'name="model"', b"m-long"), boundary=long)
        self.assertEqual(boundary_of(ctype), long)
        self.assertEqual(models_in(body, long), [b"m-long"])
        self.assertEqual(models_in(form((b"name=model", b"m-bare"))), [b"m-bare"])

    def test_a_boundary_line_with_junk_is_content_as_in_the_stdlib(self) -> None:
        content = b"audio\r\n--" + B + b"junk\r\n"
        content += b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1'
        body = form(
            (b'name="file"; filename="a.mp3"', content),
            (b'name="model"', b"gpt-4o-transcribe"),
        )
        self.assertEqual(models_in(body), [b"gpt-4o-transcribe"])
        ctype = b"multipart/form-data; boundary=" + B
        self.assertEqual(email_models(body, ctype), [b"gpt-4o-transcribe"])

    def test_padding_after_a_delimiter_is_allowed(self) -> None:
        body = form((b'name="model"', b"m")).replace(B + b"\r\n", B + b" \t\r\n", 1)
        self.assertEqual(models_in(body), [b"m"])

    def test_headers_over_8_kib_cannot_be_read(self) -> None:
        big = b'name="file"; filename="' + b"a" * _MAX_HEADERS + b'"'
        body = form((big, b"x"), (b'name="model"', b"gpt-4o-transcribe"))
        with self.assertRaises(FormError):
            models_in(body)

    def test_forms_parsers_may_read_differently_cannot_be_read(self) -> None:
        lf_only = b"--" + B + b'\nContent-Disposition: form-data; name="model"\n\n'
        lf_only += b"m-lf\n--" + B + b"--\n"
        inner_lf = form((b'name="file"', b"x\n--" + B + b"\r\nmore"))
        for body in [
            lf_only,
            inner_lf,
            form((b'name="model"', b"m"))[:-4],  # no closing delimiter
            form((b'name="model"', b"m")) + form((b'name="model"', b"m2")),
            b"not a multipart body at all",
            form((b'name="model"; name="file"', b"m")),
            form((b'name="mod\\el"', b"m")),
            form((b"name*=utf-8''model", b"m")),
            form((b'name="model"', b"m")).replace(
                b"Content-Type: application", b"Content-Transfer-Encoding: base64\r\nX"
            ),
            form((b'name="model"', b"m")).replace(b"Content-Type:", b" Content-Type:"),
            form((b'name="file"', b"")).replace(b"\r\n\r\n\r\n", b"\r\n\r\n"),
        ]:
            with self.assertRaises(FormError, msg=body):
                models_in(body)

    def test_a_value_with_a_line_break_cannot_be_read(self) -> None:
        # The standard library's parser reads b"\r\n" as b"": parsers differ.
        for value in (b"\r\n", b"\r\ngpt-4o", b"gpt-4o\n", b"gpt\r4o"):
            with self.assertRaises(FormError, msg=value):
                models_in(form((b'name="model"', value)))

    def test_a_long_value_cannot_be_read(self) -> None:
        body = form((b'name="model"', b"m" * 5000), (b'name="model"', b"m-2"))
        with self.assertRaises(FormError):
            models_in(body)

    @given(
        st.lists(
            st.tuples(
                st.sampled_from([b"model", b"file", b"purpose"]),
                st.binary(max_size=300).filter(lambda v: B not in v),
            ),
            min_size=1,
            max_size=5,
        )
    )
    def test_the_same_models_as_the_stdlib_parser(
        self, parts: list[tuple[bytes, bytes]]
    ) -> None:
        body = form(*[(b'name="' + name + b'"', value) for name, value in parts])
        ctype = b"multipart/form-data; boundary=" + B
        try:
            ours = models_in(body)
        except FormError:
            return  # refused: nothing is forwarded unchecked
        self.assertEqual(ours, email_models(body, ctype))
