"""
Start-up settings: parsed and validated once, into an immutable L{Config}.

Every setting has a command-line option and an environment variable; the
option wins.  A bad value raises L{ConfigError} naming the setting.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from openai_proxy.moderation.config import ModerationConfig

#: C{source(option, env)} returns the raw value that wins for a setting
#: (the option's, else the environment's), or L{None} when neither is set.
Source = Callable[[str, str], "str | None"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


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
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
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


def usable_cpus() -> int:
    """The CPUs this process may run on (all of them where that is unknown, as on PyPy)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return max(1, len(affinity(0)) if affinity else (os.cpu_count() or 1))


def parse_workers(raw: str | None) -> int:
    """
    Parse the C{--workers}/C{WORKERS} setting: a whole number ≥ 1, or
    C{auto} for the number of CPUs this process may run on.  Unset or blank
    means 1.

    @raise ConfigError: for anything else.
    """
    if raw is None or raw.strip() == "":
        return 1
    value = raw.strip().lower()
    if value == "auto":
        return usable_cpus()
    try:
        count = int(value)
    except ValueError:
        raise ConfigError(
            _WORKERS, f"expected a whole number or auto, got {raw!r}"
        ) from None
    if count < 1:
        raise ConfigError(_WORKERS, f"must be at least 1, got {raw!r}")
    return count


def check_listen(listen: Sequence[str], workers: int) -> None:
    """
    Refuse listen descriptions that C{workers} processes cannot share: with
    more than one worker, each must be a plain C{tcp:} or C{tcp6:} one.
    Cheap and side-effect free, for an options parser to call early.

    @raise ConfigError: naming the first description that cannot be shared.
    """
    if workers <= 1:
        return
    for description in listen:
        # By its prefix: parsing an ssl: description would load its files.
        kind = description.split(":", 1)[0].strip().lower()
        if kind not in ("tcp", "tcp6"):
            raise ConfigError(
                _WORKERS,
                "more than one worker can only share plain tcp: listen descriptions, "
                f"not {description!r}; use --workers 1 for it",
            )


_WORKERS = "--workers/WORKERS"


@dataclass(frozen=True)
class Config:
    """
    Everything the proxy needs to know at start-up, validated.

    Keys are held here and nowhere else; L{Config.__repr__} hides them.
    """

    listen: tuple[str, ...] = ("tcp:9000",)
    upstream: str = "https://api.openai.com"
    routes: tuple[tuple[str, str], ...] = (("fk", "https://openai.api2d.net"),)
    proxy_keys: tuple[str, ...] = field(default=(), repr=False)
    openai_keys: tuple[str, ...] = field(default=(), repr=False)
    timeout: float = 30.0
    max_body: int = 52_428_800
    cors_origins: tuple[str, ...] = ("*",)
    open_proxy: bool = False
    workers: int = 1
    grace: float = 30.0
    log_format: str = "text"
    log_bodies: bool = False
    metrics_listen: str | None = None
    metrics_key: str | None = field(default=None, repr=False)
    moderation: ModerationConfig = field(default_factory=ModerationConfig)

    @classmethod
    def load(
        cls,
        options: Mapping[str, object] | None = None,
        env: Mapping[str, str] | None = None,
        *,
        listen: Sequence[str] = (),
        routes: Sequence[str] = (),
    ) -> Config:
        """
        Build a L{Config} from parsed command-line C{options} (values L{None}
        when not given) and the environment C{env} (default C{os.environ}).
        C{listen} and C{routes} are the repeatable options, in order.

        @raise ConfigError: naming the first bad setting.
        """
        source = make_source(options or {}, os.environ if env is None else env)
        return cls(
            listen=_listen(listen, source("", "PORT")),
            upstream=parse_base_url(
                "--upstream/UPSTREAM", source("upstream", "UPSTREAM") or cls.upstream
            ),
            routes=_routes(routes, source("", "ROUTES")),
            proxy_keys=_keys(source, "proxy-key-file", "PROXY_KEY"),
            openai_keys=_keys(source, "openai-key-file", "OPENAI_KEY"),
            timeout=parse_positive(
                "--timeout/TIMEOUT", source("timeout", "TIMEOUT"), 30000
            )
            / 1000.0,
            max_body=int(
                parse_positive(
                    "--max-body/MAX_BODY",
                    source("max-body", "MAX_BODY"),
                    cls.max_body,
                    integer=True,
                )
            ),
            cors_origins=split_list(source("cors-origins", "CORS_ORIGINS") or "*"),
            open_proxy=parse_bool(
                "--open/OPEN_PROXY", source("open", "OPEN_PROXY"), False
            ),
            workers=parse_workers(source("workers", "WORKERS")),
            grace=parse_positive("--grace/GRACE", source("grace", "GRACE"), cls.grace),
            log_format=parse_choice(
                "--log-format/LOG_FORMAT",
                source("log-format", "LOG_FORMAT"),
                ("text", "json"),
                "text",
            ),
            log_bodies=parse_bool("LOG_BODIES", source("", "LOG_BODIES"), False),
            metrics_listen=source("metrics-listen", "METRICS_LISTEN") or None,
            metrics_key=source("", "METRICS_KEY") or None,
            moderation=ModerationConfig.load(source),
        )._checked()

    def _checked(self) -> Config:
        check_listen(self.listen, self.workers)
        if self.openai_keys and not self.proxy_keys and not self.open_proxy:
            raise ConfigError(
                "PROXY_KEY",
                "OPENAI_KEY is set but PROXY_KEY is not, so anyone who can reach "
                "the proxy would spend your key; set PROXY_KEY (or --proxy-key-file), "
                "or pass --open / OPEN_PROXY=1 if that is what you want",
            )
        return self


def _listen(options: Sequence[str], port: str | None) -> tuple[str, ...]:
    if options:
        return tuple(options)
    if port is None or port.strip() == "":
        return Config.listen
    port = port.strip()
    if port.isdigit():
        if not 0 < int(port) < 65536:
            raise ConfigError(
                "PORT", f"expected a port number from 1 to 65535, got {port!r}"
            )
        return (f"tcp:{port}",)
    # An endpoint description (tcp:..., ssl:..., unix:...) is accepted too.
    if ":" not in port:
        raise ConfigError(
            "PORT", f"expected a port number or endpoint description, got {port!r}"
        )
    return (port,)


def _routes(options: Sequence[str], env: str | None) -> tuple[tuple[str, str], ...]:
    if options:
        items, setting = tuple(options), "--route"
    elif env is not None:
        items, setting = split_list(env), "ROUTES"
    else:
        return Config.routes
    routes = []
    for item in items:
        prefix, sep, url = item.partition("=")
        if not sep or not prefix.strip():
            raise ConfigError(setting, f"expected PREFIX=URL, got {item!r}")
        routes.append((prefix.strip(), parse_base_url(setting, url)))
    return tuple(routes)


def _keys(source: Source, file_option: str, env_name: str) -> tuple[str, ...]:
    path = source(file_option, f"{env_name}_FILE")
    if path:
        keys = read_secret_file(f"--{file_option}/{env_name}_FILE", path)
    else:
        keys = split_list(source("", env_name))
    for key in keys:
        if any(c.isspace() for c in key) or not key.isprintable():
            raise ConfigError(
                env_name, "a key contains whitespace or control characters"
            )
    return keys
