"""Finding a multipart form's C{model} fields without holding the upload."""

from __future__ import annotations

import io

from twisted.trial.unittest import SynchronousTestCase

from openai_proxy.formfield import _CHUNK, boundary_of, form_fields

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
    return form_fields(io.BytesIO(body), boundary, b"model")


class BoundaryTests(SynchronousTestCase):
    def test_plain_and_quoted(self) -> None:
        self.assertEqual(boundary_of(b"multipart/form-data; boundary=" + B), B)
        self.assertEqual(boundary_of(b'Multipart/Form-Data; boundary="a b"'), b"a b")

    def test_not_a_form(self) -> None:
        self.assertIsNone(boundary_of(b"application/json"))
        self.assertIsNone(boundary_of(b"multipart/form-data"))


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

    def test_no_field_or_not_a_form(self) -> None:
        self.assertIsNone(model_of(form((b'name="file"', b"data"))))
        self.assertIsNone(model_of(b"not a multipart body at all"))

    def test_every_field_of_the_name(self) -> None:
        # The upstream may read the first or the last: both must be checked.
        body = form(
            (b'name="model"', b"gpt-4o-transcribe"),
            (b'name="file"; filename="a"', b"x" * 100),
            (b'name="model"', b"whisper-1"),
        )
        self.assertEqual(models_in(body), [b"gpt-4o-transcribe", b"whisper-1"])

    def test_what_lenient_parsers_accept(self) -> None:
        lf_only = b"--" + B + b'\nContent-Disposition: form-data; name="model"\n\n'
        lf_only += b"m-lf\n--" + B + b"--\n"
        self.assertEqual(models_in(lf_only), [b"m-lf"])
        self.assertEqual(models_in(form((b"name=model", b"m-bare"))), [b"m-bare"])
        long = b"b" * 120  # RFC 2046 says at most 70
        ctype = b"multipart/form-data; boundary=" + long
        body = form((b'name="model"', b"m-long"), boundary=long)
        self.assertEqual(boundary_of(ctype), long)
        self.assertEqual(models_in(body, long), [b"m-long"])

    def test_a_long_value_is_cut(self) -> None:
        body = form((b'name="model"', b"m" * 5000), (b'name="model"', b"m-2"))
        self.assertEqual(models_in(body), [b"m" * 1024, b"m-2"])
