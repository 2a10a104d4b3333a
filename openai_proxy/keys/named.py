"""
Named proxy keys: the C{KEYS_FILE} model, and the registry that finds a
client's key among them and re-reads the file on C{SIGHUP}.

The file is TOML, one C{[[keys]]} table per key::

    [[keys]]
    name = "alice"
    key = "pk-alice-3f9c2a71d5e8"   # or sha256 = "<hex SHA-256 of the key>"
    rpm = 60                        # requests per minute
    tpm = 40000                     # tokens per minute
    concurrency = 4                 # requests in flight
    requests_per_day = 5000         # quotas, by the calendar of QUOTA_TZ
    tokens_per_day = 2000000
    tokens_per_month = 40000000
    models = ["gpt-4o*"]            # allowed model names (globs)
    paths = ["POST /v1/chat/completions", "/v1/embeddings"]  # paths (globs)
    expires = 2026-12-31T23:59:59Z  # a TOML date-time
    disabled = false
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import hmac
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (Tencent SCF's newest): the same parser, from PyPI
    import tomli as tomllib

from openai_proxy.http.errors import ProxyError

_log = Logger()
_FIELDS = frozenset(
    {"name", "key", "sha256", "rpm", "tpm", "concurrency", "models"}
    | {"expires", "disabled", "paths"}
    | {"requests_per_day", "tokens_per_day", "tokens_per_month"}
)
_COUNTED = (
    "rpm",
    "tpm",
    "concurrency",
    "requests_per_day",
    "tokens_per_day",
    "tokens_per_month",
)


# A path glob, with an optional method before it.
_PATH_PATTERN = re.compile(r"(?:[A-Z]+ )?/\S*")


class KeysFileError(ValueError):
    """The keys file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class NamedKey:
    """
    One named proxy key and its limits (L{None}: no limit).  The secret is
    held only as its SHA-256 digest.
    """

    name: str
    digest: bytes
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    models: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    expires: datetime.datetime | None = None
    disabled: bool = False
    requests_per_day: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    #: Whether any of the quotas applies (worked out once: asked at every
    #: admission, where a key without quotas must pay nothing for them).
    has_quota: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        quota = (
            self.requests_per_day is not None
            or self.tokens_per_day is not None
            or self.tokens_per_month is not None
        )
        object.__setattr__(self, "has_quota", quota)

    @property
    def limited(self) -> bool:
        """Whether any of rpm, tpm or concurrency applies to this key."""
        return (
            self.rpm is not None or self.tpm is not None or self.concurrency is not None
        )

    def allows_model(self, model: str) -> bool:
        """Whether C{model} matches one of C{models} (any model when empty)."""
        if not self.models:
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def allows_path(self, method: str, path: str) -> bool:
        """
        Whether a C{method} request to C{path} matches one of C{paths} (any
        when empty): a glob on the path (a C{*} matches across C{/} too),
        for any method or, written C{"POST /v1/..."}, for that one.
        """
        if not self.paths:
            return True
        for pattern in self.paths:
            verb, _, glob = pattern.rpartition(" ")
            if (not verb or verb == method) and fnmatch.fnmatchcase(path, glob):
                return True
        return False


def key_refused(key: NamedKey, now: datetime.datetime) -> ProxyError | None:
    """The error for a key that is disabled or expired at C{now}, else L{None}."""
    if key.disabled:
        return ProxyError(
            403,
            f"The proxy key {key.name!r} is disabled.",
            "key_disabled",
            "permission_error",
        )
    if key.expires is not None and now >= key.expires:
        return ProxyError(
            403,
            f"The proxy key {key.name!r} has expired.",
            "key_expired",
            "permission_error",
        )
    return None


def model_not_allowed(key: NamedKey, model: str) -> ProxyError:
    """The 403 for a request naming a model its key may not use."""
    return ProxyError(
        403,
        f"The proxy key {key.name!r} may not use the model {model!r}.",
        "model_not_allowed",
        "permission_error",
    )


def parse_keys(text: str, source: str = "KEYS_FILE") -> tuple[NamedKey, ...]:
    """
    Parse the TOML text of a keys file.

    @raise KeysFileError: naming the entry and field at fault.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise KeysFileError(f"{source}: not valid TOML: {e}") from None
    entries = document.get("keys", [])
    if not isinstance(entries, list):
        raise KeysFileError(f"{source}: 'keys' must be an array of tables ([[keys]])")
    keys: list[NamedKey] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, entry in enumerate(entries, 1):
        where = f"{source}: [[keys]] #{number}"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: expected a table")
        key = _parse_entry(where, entry)
        if key.name in names:
            raise KeysFileError(f"{where}: the name {key.name!r} is used twice")
        if key.digest in digests:
            raise KeysFileError(f"{where}: the same key is listed twice")
        names.add(key.name)
        digests.add(key.digest)
        keys.append(key)
    return tuple(keys)


def _parse_entry(where: str, entry: dict[str, Any]) -> NamedKey:
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise KeysFileError(f"{where}: unknown field {unknown[0]!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise KeysFileError(f"{where}: 'name' must be a non-empty string")
    where = f"{where} ({name!r})"
    if ("key" in entry) == ("sha256" in entry):
        raise KeysFileError(f"{where}: give exactly one of 'key' and 'sha256'")
    if "key" in entry:
        secret = entry["key"]
        if (
            not isinstance(secret, str)
            or not secret
            or not secret.isprintable()
            or any(c.isspace() for c in secret)
        ):
            raise KeysFileError(
                f"{where}: 'key' must be a non-empty string without whitespace"
            )
        digest = hashlib.sha256(secret.encode("utf-8")).digest()
    else:
        hexdigest = entry["sha256"]
        try:
            digest = bytes.fromhex(hexdigest) if isinstance(hexdigest, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise KeysFileError(f"{where}: 'sha256' must be 64 hex digits")
    limits = {}
    for what in _COUNTED:
        value = entry.get(what)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise KeysFileError(f"{where}: {what!r} must be a whole number ≥ 1")
        limits[what] = value
    models = entry.get("models", [])
    if not isinstance(models, list) or not all(
        isinstance(m, str) and m for m in models
    ):
        raise KeysFileError(f"{where}: 'models' must be a list of strings")
    paths = entry.get("paths", [])
    if not isinstance(paths, list) or not all(
        isinstance(p, str) and _PATH_PATTERN.fullmatch(p) for p in paths
    ):
        raise KeysFileError(
            f"{where}: 'paths' must be a list of paths starting with '/', "
            'each with an optional method first ("POST /v1/chat/completions")'
        )
    expires = entry.get("expires")
    if expires is not None:
        expires = _as_datetime(where, expires)
    disabled = entry.get("disabled", False)
    if not isinstance(disabled, bool):
        raise KeysFileError(f"{where}: 'disabled' must be true or false")
    return NamedKey(
        name=name.strip(),
        digest=digest,
        rpm=limits["rpm"],
        tpm=limits["tpm"],
        concurrency=limits["concurrency"],
        models=tuple(models),
        paths=tuple(paths),
        expires=expires,
        disabled=disabled,
        requests_per_day=limits["requests_per_day"],
        tokens_per_day=limits["tokens_per_day"],
        tokens_per_month=limits["tokens_per_month"],
    )


def _as_datetime(where: str, value: object) -> datetime.datetime:
    # A local date-time (no offset) or a bare date is taken as UTC.
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value
    if isinstance(value, datetime.date):
        return datetime.datetime(
            value.year, value.month, value.day, tzinfo=datetime.timezone.utc
        )
    raise KeysFileError(f"{where}: 'expires' must be a TOML date-time")


def read_keys_file(path: str) -> tuple[NamedKey, ...]:
    """Read and parse the keys file at C{path}. @raise KeysFileError: why not."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise KeysFileError(f"KEYS_FILE: cannot read {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise KeysFileError(f"KEYS_FILE: {path!r} is not UTF-8") from None
    return parse_keys(text)


class KeyRegistry:
    """
    The named keys in force.  L{find} looks a presented key up in constant
    time (every digest is compared, with no early exit); L{reload} re-reads
    the file and keeps the old keys when the new file is bad.
    """

    def __init__(
        self,
        path: str | None,
        keys: Sequence[NamedKey] = (),
        *,
        on_change: Callable[[tuple[NamedKey, ...]], None] | None = None,
    ) -> None:
        self.path = path
        self._on_change = on_change
        self._set(tuple(keys))

    def _set(self, keys: tuple[NamedKey, ...]) -> None:
        self.keys = keys
        if self._on_change is not None:
            self._on_change(keys)

    @property
    def names(self) -> tuple[str, ...]:
        """The configured key names, in file order."""
        return tuple(k.name for k in self.keys)

    def find(self, presented: str) -> NamedKey | None:
        """The named key whose secret is C{presented}, or L{None}."""
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found: NamedKey | None = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    def reload(self) -> bool:
        """
        Re-read the keys file.  Returns whether the new keys took effect; on
        a bad file the old keys stay and the reason is logged.
        """
        if self.path is None:
            return False
        try:
            keys = read_keys_file(self.path)
        except KeysFileError as e:
            _log.error("keys file not reloaded, keeping the old keys: {why}", why=e)
            return False
        self._set(keys)
        _log.info("keys file reloaded: {count} key(s)", count=len(keys))
        return True
