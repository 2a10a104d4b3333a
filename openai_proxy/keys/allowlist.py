"""
What a named key may reach: the paths its C{paths} lists, and the models its
C{models} lists, wherever a request names one (any C{model} of a JSON body,
a realtime client secret's C{session.model}, a form's C{model} field, each
line of an uploaded batch input file, a C{?model=} query).

The check decides on what the upstream will parse, so a body it cannot read
surely (not UTF-8, a BOM, compressed, not a JSON object, a form parsers
could read differently) is refused with 400 on a key with C{models}, never
forwarded unchecked.  The functions reading bodies block: the caller runs
them in a thread for large bodies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import parse_qsl

from openai_proxy.http.errors import ProxyError
from openai_proxy.keys.formfield import FormError, boundary_of, form_fields, read_form
from openai_proxy.keys.named import NamedKey, model_not_allowed

#: A realtime client secret names its model in C{session.model}.
CLIENT_SECRETS = b"/v1/realtime/client_secrets"
#: A batch names no model: the models are in its input file, which any key
#: sharing the server key may have uploaded.
BATCHES = b"/v1/batches"
UPLOADS = b"/v1/uploads"
#: Where the upstream picks a default model when a request names none: a key
#: with C{models} must name one, the default not being the proxy's to know.
DEFAULTED_JSON = frozenset(
    {
        b"/v1/images/generations",
        b"/v1/moderations",
        b"/v1/realtime/sessions",
        b"/v1/responses",
    }
)
DEFAULTED_FORM = frozenset({b"/v1/images/edits", b"/v1/images/variations"})


def unreadable_body(why: str) -> ProxyError:
    """The 400 for a body a key with C{models} needs to read but cannot."""
    return ProxyError(
        400,
        f"This key's requests are checked for the models they name, and this "
        f"body cannot be read surely: {why}.",
        "unreadable_body",
    )


def json_too_deep() -> ProxyError:
    """The 400 for a JSON body nested more deeply than the proxy parses."""
    return ProxyError(
        400,
        "The JSON body is nested too deeply for this proxy to read.",
        "invalid_json",
    )


def path_not_allowed(key: NamedKey, path: str, why: str = "") -> ProxyError:
    """The 403 for a path C{key} may not reach."""
    return ProxyError(
        403,
        f"The proxy key {key.name!r} may not use {path!r}{why}.",
        "path_not_allowed",
        "permission_error",
    )


def model_required(where: str) -> ProxyError:
    """The 400 for a request that leaves its model to the upstream's default."""
    return ProxyError(
        400,
        f"This key may only use listed models: name one in '{where}'.",
        "model_required",
        param=where,
    )


def check_path(key: NamedKey, method: bytes, path: bytes) -> None:
    """
    Refuse a C{method} request to C{path} (the request's path, without
    query) that C{key}'s C{paths} does not allow.  A path another server could read as
    a different one (percent-encoded, doubled or back slashes) is refused
    too: the globs match the path as written.

    @raise ProxyError: 400 C{invalid_path} or 403 C{path_not_allowed}.
    """
    if not key.paths:
        return
    if b"%" in path or b"//" in path or b"\\" in path:
        raise ProxyError(
            400,
            "This key's paths are checked; write the path plainly (no "
            "percent-encoding, '//' or '\\').",
            "invalid_path",
        )
    text = path.decode("ascii", "replace")
    if not key.allows_path(method.decode("ascii", "replace"), text):
        raise path_not_allowed(key, text)


def check_query(key: NamedKey, uri: bytes) -> None:
    """
    Refuse a request whose query names a model (C{?model=}, as a realtime
    WebSocket does) that C{key} may not use.

    @raise ProxyError: 403 C{model_not_allowed}.
    """
    if not key.models or b"?" not in uri:
        return
    query = uri.split(b"?", 1)[1].decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name.strip() == "model" and not key.allows_model(value):
            raise model_not_allowed(key, value)


def query_models(uri: bytes) -> tuple[str, ...]:
    """The models a request's query names (C{?model=}, as a realtime WebSocket does)."""
    if b"?" not in uri or b"model" not in uri:
        return ()
    query = uri.split(b"?", 1)[1].decode("latin-1")
    return tuple(
        value
        for name, value in parse_qsl(query, keep_blank_values=True)
        if name.strip() == "model"
    )


class JSONUnreadable(Exception):
    """A JSON body that cannot be read; C{why} says what is wrong with it."""

    def __init__(self, why: str, *, too_deep: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.too_deep = too_deep


@dataclass
class JSONBody:
    """A parsed JSON body, with what a model check needs of it."""

    value: Any
    #: The outermost object's members in order, a name given twice kept twice.
    top: list[tuple[str, Any]] = field(default_factory=list)
    #: Every value of a member named C{model}, at any depth.
    models: list[Any] = field(default_factory=list)


def parse_json(raw: bytes, *, strict: bool) -> JSONBody:
    """
    Parse C{raw}.  With C{strict} (for a model check) it must be UTF-8
    without a BOM, and every member named C{model} is collected, duplicates
    included: parsers keep the first or the last, so every one counts.

    @raise JSONUnreadable: why it cannot be parsed.
    """
    if not strict:
        try:
            return JSONBody(json.loads(raw))
        except RecursionError:
            raise JSONUnreadable("nested too deeply", too_deep=True) from None
        except ValueError as e:
            raise JSONUnreadable(f"not valid JSON ({e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONUnreadable("it is not UTF-8") from None
    del raw  # a large body is not held twice while it is parsed
    if text.startswith("\ufeff"):
        raise JSONUnreadable("it starts with a byte order mark")
    body = JSONBody(None)
    models = body.models

    def collect(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        for name, value in pairs:
            if name == "model":
                models.append(value)
        # The outermost object is built last.
        body.top = pairs
        return dict(pairs)

    try:
        body.value = json.loads(text, object_pairs_hook=collect)
    except RecursionError:
        raise JSONUnreadable("it is nested too deeply", too_deep=True) from None
    except ValueError as e:
        raise JSONUnreadable(f"it is not valid JSON ({e})") from None
    if not isinstance(body.value, dict):
        raise JSONUnreadable("it is not a JSON object")
    return body


def check_json(key: NamedKey, path: bytes, body: JSONBody) -> None:
    """
    Refuse a POST to C{path} whose parsed C{body} names a model C{key} may
    not use, at any depth; a realtime client secret that names no model;
    and, unless C{key}'s C{paths} lists the path, a batch (or a batch
    upload) whose models cannot be checked.

    @raise ProxyError: 400 or 403.
    """
    named = False
    for name, value in body.top:
        if name == "model":
            if not isinstance(value, str):
                raise unreadable_body("its 'model' is not a string")
            named = True
    if path in DEFAULTED_JSON and not named:
        raise model_required("model")
    for model in body.models:
        if isinstance(model, str) and not key.allows_model(model):
            raise model_not_allowed(key, model)
    if path == CLIENT_SECRETS:
        sessions = [value for name, value in body.top if name == "session"]
        if not sessions or not all(
            isinstance(s, dict) and isinstance(s.get("model"), str) for s in sessions
        ):
            raise model_required("session.model")
    if path == BATCHES or (
        path == UPLOADS
        and any(name == "purpose" and value == "batch" for name, value in body.top)
    ):
        _refuse_unchecked_batch(key, path)


def _refuse_unchecked_batch(key: NamedKey, path: bytes) -> None:
    if not key.paths:
        raise path_not_allowed(
            key,
            path.decode("ascii", "replace"),
            ": a batch's models cannot be checked (list the path in the key's "
            "'paths' to allow it)",
        )


def check_form(
    key: NamedKey, path: bytes, content: IO[bytes], ctype: bytes
) -> tuple[str, ...]:
    """
    Refuse a multipart POST to C{path} whose C{model} field names a model
    C{key} may not use, or that uploads a batch input file (C{purpose}
    C{batch}) naming one on any line.  Reads C{content} from its start,
    twice for a batch file.  Returns the models the C{model} fields name.

    @raise ProxyError: 400 when the form cannot be read surely, or 403.
    """
    try:
        boundary = boundary_of(ctype)
        if boundary is None:
            raise FormError("it is not a form")
        content.seek(0)
        fields = form_fields(content, boundary, ("model", "purpose"))
        if path in DEFAULTED_FORM and not fields.get("model"):
            raise model_required("model")
        models = tuple(_text(value, "model") for value in fields.get("model", []))
        for model in models:
            if not key.allows_model(model):
                raise model_not_allowed(key, model)
        purposes = [_text(value, "purpose") for value in fields.get("purpose", [])]
        if "batch" in purposes:
            lines = _BatchLines(key)
            content.seek(0)
            read_form(
                content,
                boundary,
                lambda part: lines.feed if part.name.strip() == "file" else None,
            )
            lines.end()
    except FormError as e:
        raise unreadable_body(f"the form cannot be read ({e})") from None
    return models


def form_models(content: IO[bytes], ctype: bytes) -> tuple[str, ...]:
    """
    The models a multipart body's C{model} fields name (none when it cannot
    be read: the upstream then judges it), read from C{content}'s start.
    """
    try:
        boundary = boundary_of(ctype)
        if boundary is None:
            return ()
        content.seek(0)
        fields = form_fields(content, boundary, ("model",))
        return tuple(_text(value, "model") for value in fields.get("model", []))
    except FormError:
        return ()


def named_models(body: JSONBody) -> tuple[str, ...]:
    """
    The models a parsed body names, as the upstream reads them: each
    top-level C{model} that is a string (every one, if it is repeated), or
    failing those, each string C{model} at any depth (a realtime client
    secret's C{session.model}).
    """
    top = tuple(v for name, v in body.top if name == "model" and isinstance(v, str))
    if top:
        return top
    return tuple(v for v in body.models if isinstance(v, str))


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise FormError(f"its {name!r} field is not UTF-8") from None


class _BatchLines:
    """
    Checks a batch input file line by line as it is read: each line is a
    request whose C{body} must name a model the key may use (and whose
    C{url} must be one of the key's C{paths}, if it has them).
    """

    def __init__(self, key: NamedKey) -> None:
        self._key = key
        self._pending: list[bytes] = []
        self._number = 0

    def feed(self, data: bytes) -> None:
        """Take the next piece of the file."""
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._pending.append(data[start:end])
            self._check(b"".join(self._pending))
            self._pending = []
            start = end + 1
        if start < len(data):
            self._pending.append(data[start:])

    def end(self) -> None:
        """The file ended: check its last line, if it has no line end."""
        self._check(b"".join(self._pending))
        self._pending = []

    def _check(self, line: bytes) -> None:
        self._number += 1
        if not line.strip():
            return
        where = f"line {self._number} of the batch file"
        try:
            body = parse_json(line, strict=True)
        except JSONUnreadable as e:
            raise unreadable_body(f"{where}: {e.why}") from None
        request = body.value.get("body")
        if not isinstance(request, dict) or not isinstance(request.get("model"), str):
            raise unreadable_body(f"{where} names no 'body.model'")
        for model in body.models:
            if isinstance(model, str) and not self._key.allows_model(model):
                raise model_not_allowed(self._key, model)
        if self._key.paths:
            url = body.value.get("url")
            method = body.value.get("method", "POST")
            if (
                not isinstance(url, str)
                or not isinstance(method, str)
                or not self._key.allows_path(method, url)
            ):
                raise path_not_allowed(self._key, str(url), f" ({where})")


def check_encoding(encoding: bytes | None) -> None:
    """
    Refuse a body a model check must read that comes compressed (any
    C{Content-Encoding} but C{identity}).

    @raise ProxyError: 400 C{unreadable_body}.
    """
    if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
        raise unreadable_body(
            f"it is sent with Content-Encoding {encoding.decode('latin-1')!r}"
        )
