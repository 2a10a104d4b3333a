"""
Upstreams by model: the C{UPSTREAMS_FILE} model and its parser.

The file is TOML, one C{[[upstreams]]} table per upstream, in the order they
are tried::

    [[upstreams]]
    name = "azure"
    base_url = "https://example.openai.azure.com/openai"
    models = ["gpt-4o*"]           # model names this upstream serves (globs)
    keys_env = "AZURE_KEYS"        # or keys = ["..."]; comma-separated in the variable
    auth_header = "api-key"        # or "authorization" (Bearer, the default)
    headers = { "x-team" = "ml" }  # sent with every request
    weight = 3                     # shares traffic with other weighted matches
    proxy = "socks5h://proxy.internal:1080"   # egress proxy for this upstream

The request's path (C{/v1/...}) is appended to C{base_url}, as for C{UPSTREAM}.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (Tencent SCF's newest): the same parser, from PyPI
    import tomli as tomllib

from openai_proxy.upstream.egress import EgressProxy, parse_proxy

_FIELDS = frozenset(
    {"name", "base_url", "models", "keys", "keys_env", "proxy", "auth_header"}
    | {"headers", "weight"}
)
#: How each C{auth_header} value sends a key.
AUTH_HEADERS = ("authorization", "api-key")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Headers the proxy sets itself, which an upstream's C{headers} may not.
_OWN_HEADERS = frozenset(
    {"host", "authorization", "api-key", "content-length", "transfer-encoding"}
    | {"connection", "accept-encoding", "content-type"}
)


class UpstreamsFileError(ValueError):
    """The upstreams file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Upstream:
    """
    One upstream of the file: where it is, the models it serves, the keys the
    proxy sends it (held here only; C{repr} hides them) and how.
    """

    name: str
    base_url: str
    models: tuple[str, ...]
    keys: tuple[str, ...] = field(default=(), repr=False)
    proxy: EgressProxy | None = None
    auth_header: str = "authorization"
    headers: tuple[tuple[str, str], ...] = ()
    #: L{None}: not weighted (see L{openai_proxy.upstream.choose}).
    weight: int | None = None

    def serves(self, model: str) -> bool:
        """Whether one of C{models} matches C{model} (case-sensitive globs)."""
        return any(fnmatch.fnmatchcase(model, glob) for glob in self.models)


def parse_upstreams(
    text: str, env: Mapping[str, str], source: str = "UPSTREAMS_FILE"
) -> tuple[Upstream, ...]:
    """
    Parse the TOML text of an upstreams file; C{keys_env} names are looked
    up in C{env}.

    @raise UpstreamsFileError: naming the entry and field at fault.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UpstreamsFileError(f"{source}: not valid TOML: {e}") from None
    unknown = sorted(set(document) - {"upstreams"})
    if unknown:
        raise UpstreamsFileError(f"{source}: unknown table {unknown[0]!r}")
    entries = document.get("upstreams", [])
    if not isinstance(entries, list):
        raise UpstreamsFileError(
            f"{source}: 'upstreams' must be an array of tables ([[upstreams]])"
        )
    upstreams: list[Upstream] = []
    for number, entry in enumerate(entries, 1):
        where = f"{source}: [[upstreams]] #{number}"
        if not isinstance(entry, dict):
            raise UpstreamsFileError(f"{where}: expected a table")
        upstream = _parse_entry(where, entry, env)
        if any(u.name == upstream.name for u in upstreams):
            raise UpstreamsFileError(
                f"{where}: the name {upstream.name!r} is used twice"
            )
        upstreams.append(upstream)
    return tuple(upstreams)


def _parse_entry(where: str, entry: dict[str, Any], env: Mapping[str, str]) -> Upstream:
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise UpstreamsFileError(f"{where}: unknown field {unknown[0]!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UpstreamsFileError(
            f"{where}: 'name' must be letters, digits, '.', '_' or '-' (64 at most)"
        )
    where = f"{where} ({name!r})"
    base_url = _base_url(where, entry.get("base_url"))
    models = entry.get("models")
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m for m in models)
    ):
        raise UpstreamsFileError(f"{where}: 'models' must be a non-empty list of globs")
    auth_header = entry.get("auth_header", "authorization")
    if auth_header not in AUTH_HEADERS:
        raise UpstreamsFileError(
            f"{where}: 'auth_header' must be 'authorization' or 'api-key'"
        )
    weight = entry.get("weight")
    if weight is not None and (
        not isinstance(weight, int) or isinstance(weight, bool) or weight < 1
    ):
        raise UpstreamsFileError(f"{where}: 'weight' must be a whole number ≥ 1")
    proxy = entry.get("proxy")
    return Upstream(
        name=name,
        base_url=base_url,
        models=tuple(models),
        keys=_keys(where, entry, env),
        proxy=None if proxy is None else _proxy(where, proxy),
        auth_header=auth_header,
        headers=_headers(where, entry.get("headers", {})),
        weight=weight,
    )


def _base_url(where: str, raw: object) -> str:
    if not isinstance(raw, str):
        raise UpstreamsFileError(f"{where}: 'base_url' must be a string")
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamsFileError(
            f"{where}: 'base_url' must be an http:// or https:// URL, got {raw!r}"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise UpstreamsFileError(
            f"{where}: 'base_url' must not carry a query, fragment or credentials"
        )
    try:
        _ = parts.port  # urlsplit only validates the port when asked for it
    except ValueError:
        raise UpstreamsFileError(f"{where}: bad port in 'base_url' {raw!r}") from None
    return raw.strip().rstrip("/")


def _keys(where: str, entry: dict[str, Any], env: Mapping[str, str]) -> tuple[str, ...]:
    # An upstream may have no key (a local server that asks for none).
    if "keys" in entry and "keys_env" in entry:
        raise UpstreamsFileError(f"{where}: give at most one of 'keys' and 'keys_env'")
    if "keys_env" in entry:
        variable = entry["keys_env"]
        if not isinstance(variable, str) or not variable:
            raise UpstreamsFileError(f"{where}: 'keys_env' must name a variable")
        raw = env.get(variable)
        if raw is None or not raw.strip():
            raise UpstreamsFileError(
                f"{where}: the environment variable {variable!r} ('keys_env') "
                "is not set"
            )
        keys = [k.strip() for k in raw.split(",") if k.strip()]
    else:
        keys = entry.get("keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise UpstreamsFileError(f"{where}: 'keys' must be a list of strings")
    for key in keys:
        if not key or not key.isprintable() or any(c.isspace() for c in key):
            raise UpstreamsFileError(
                f"{where}: a key is empty or holds whitespace or control characters"
            )
    return tuple(keys)


def _headers(where: str, raw: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        raise UpstreamsFileError(f"{where}: 'headers' must be a table of strings")
    headers = []
    for name, value in raw.items():
        if not _TOKEN.fullmatch(name) or not isinstance(value, str):
            raise UpstreamsFileError(f"{where}: 'headers' must be a table of strings")
        if name.lower() in _OWN_HEADERS:
            raise UpstreamsFileError(
                f"{where}: 'headers' may not set {name!r}, which the proxy sets"
            )
        if any(c in value for c in "\r\n\x00"):
            raise UpstreamsFileError(f"{where}: the header {name!r} holds a line break")
        headers.append((name.lower(), value))
    return tuple(headers)


def _proxy(where: str, raw: object) -> EgressProxy:
    # Parsed as EGRESS_PROXY is, so that both mean the same.
    if not isinstance(raw, str):
        raise UpstreamsFileError(f"{where}: 'proxy' must be a URL string")
    try:
        return parse_proxy(raw)
    except ValueError as e:  # its message never holds the credentials
        raise UpstreamsFileError(f"{where}: 'proxy': {e}") from None


def read_upstreams_file(
    path: str, env: Mapping[str, str] | None = None
) -> tuple[Upstream, ...]:
    """
    Read and parse the upstreams file at C{path} (C{keys_env} looked up in
    C{env}, default C{os.environ}).

    @raise UpstreamsFileError: why not.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UpstreamsFileError(
            f"UPSTREAMS_FILE: cannot read {path!r}: {e.strerror}"
        ) from None
    except UnicodeDecodeError:
        raise UpstreamsFileError(f"UPSTREAMS_FILE: {path!r} is not UTF-8") from None
    return parse_upstreams(text, os.environ if env is None else env)
