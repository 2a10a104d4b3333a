"""
Generic parsing of start-up settings: the error that names a setting, and
the helpers every settings module (the proxy's, moderation's) parses with.

This module imports nothing of the proxy's, so that any settings module can
import it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit

#: C{source(option, env)} returns the raw value that wins for a setting
#: (the option's, else the environment's), or L{None} when neither is set.
Source = Callable[[str, str], "str | None"]

#: The words (lower case) a yes/no setting or request field may say yes with.
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
#: ... and no with.
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


class ConfigError(Exception):
    """
    A setting has a value the proxy cannot start with.

    @ivar setting: the environment variable or option at fault, as a user
        would write it (e.g. C{"TIMEOUT"} or C{"--timeout/TIMEOUT"}).
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


def make_source(options: Mapping[str, object], env: Mapping[str, str]) -> Source:
    """
    Return a L{Source} that prefers C{options[option]} (when not L{None})
    over C{env[env_name]}.
    """

    def source(option: str, env_name: str) -> str | None:
        value = options.get(option)
        if value is not None:
            return str(value)
        return env.get(env_name)

    return source


def parse_bool(setting: str, raw: str | None, default: bool) -> bool:
    """Parse a yes/no setting (1/0, true/false, yes/no, on/off)."""
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise ConfigError(
        setting, f"expected 1/0, true/false, yes/no or on/off, got {raw!r}"
    )


def parse_positive(
    setting: str, raw: str | None, default: float, *, integer: bool = False
) -> float:
    """Parse a number that must be greater than zero."""
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ConfigError(setting, f"expected {kind}, got {raw!r}") from None
    if not value > 0:
        raise ConfigError(setting, f"must be greater than 0, got {raw!r}")
    return value


def parse_choice(
    setting: str, raw: str | None, choices: Sequence[str], default: str
) -> str:
    """Parse a setting that takes one of a few words (case-insensitive)."""
    if raw is None or raw.strip() == "":
        return default
    lowered = raw.strip().lower()
    if lowered not in choices:
        raise ConfigError(setting, f"expected one of {', '.join(choices)}; got {raw!r}")
    return lowered


def split_list(raw: str | None) -> tuple[str, ...]:
    """Split a comma- or newline-separated list, dropping blanks."""
    if not raw:
        return ()
    return tuple(
        item.strip()
        for line in raw.splitlines()
        for item in line.split(",")
        if item.strip()
    )


def read_secret_file(setting: str, path: str) -> tuple[str, ...]:
    """Read keys from a file: one per line or comma-separated; C{#} comments."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(setting, f"cannot read {path!r}: {e.strerror}") from None
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return split_list("\n".join(lines))


def parse_base_url(setting: str, raw: str) -> str:
    """
    Validate an upstream base URL: http or https, a host, maybe a path
    prefix, no query or fragment.  Returns it without a trailing slash.
    """
    url = raw.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(setting, f"expected an http:// or https:// URL, got {raw!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(
            setting, f"the URL must not carry a query, fragment or credentials: {raw!r}"
        )
    try:
        _ = parts.port  # urlsplit only validates the port when asked for it
    except ValueError:
        raise ConfigError(setting, f"bad port in {raw!r}") from None
    return url.rstrip("/")
