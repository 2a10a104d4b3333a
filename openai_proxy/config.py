"""
Start-up settings: parsed and validated once, into an immutable L{Config}.

Every setting has a command-line option and an environment variable; the
option wins.  A bad value raises L{ConfigError} naming the setting.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict
from urllib.parse import urlsplit

from openai_proxy.cpus import available_cpus
from openai_proxy.keys.named import KeysFileError, NamedKey, read_keys_file
from openai_proxy.keys.quotas import QuotaCalendar, UnknownZone
from openai_proxy.moderation.config import ModerationConfig
from openai_proxy.settings import ConfigError as ConfigError
from openai_proxy.settings import (
    Source,
    make_source,
    parse_base_url,
    parse_bool,
    parse_choice,
    parse_positive,
    read_secret_file,
    split_list,
)
from openai_proxy.upstream.channels import (
    Upstream,
    UpstreamsFileError,
    read_upstreams_file,
)
from openai_proxy.upstream.egress import EgressSettings


def parse_workers(raw: str | None) -> int:
    """
    Parse the C{--workers}/C{WORKERS} setting: a whole number ≥ 1, or
    C{auto} for the number of CPUs this process is given (its affinity,
    capped by a cgroup CPU quota; see L{available_cpus}).  Unset or blank
    means 1.

    @raise ConfigError: for anything else.
    """
    if raw is None or raw.strip() == "":
        return 1
    value = raw.strip().lower()
    if value == "auto":
        return available_cpus()
    try:
        count = int(value)
    except ValueError:
        raise ConfigError(
            _WORKERS, f"expected a whole number or auto, got {raw!r}"
        ) from None
    if count < 1:
        raise ConfigError(_WORKERS, f"must be at least 1, got {raw!r}")
    return count


def shareable(description: str) -> bool:
    """Whether several worker processes can share this listen description."""
    # By its prefix: parsing an ssl: description would load its files.
    return description.split(":", 1)[0].strip().lower() in ("tcp", "tcp6")


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
        if not shareable(description):
            raise ConfigError(
                _WORKERS,
                "more than one worker can only share plain tcp: listen descriptions, "
                f"not {description!r}; use --workers 1 for it",
            )


_WORKERS = "--workers/WORKERS"


def _workers_settings(raw: str | None) -> dict[str, Any]:
    auto = raw is not None and raw.strip().lower() == "auto"
    return {"workers": parse_workers(raw), "workers_auto": auto}


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
    send_timeout: float = 60.0
    header_timeout: float = 30.0
    max_body: int = 52_428_800
    max_moderated_body: int = 10_485_760
    max_decoded_body: int = 67_108_864
    cors_origins: tuple[str, ...] = ("*",)
    open_proxy: bool = False
    workers: int = 1
    #: Whether C{workers} came from C{auto} (which means 1 when a listen
    #: description cannot be shared, rather than a refusal to start).
    workers_auto: bool = False
    grace: float = 30.0
    #: Seconds between the keep-alive pings on each hop of a WebSocket session.
    ws_ping_interval: float = 30.0
    #: The largest WebSocket message relayed, in bytes (audio is base64).
    ws_max_message: int = 16_777_216
    log_format: str = "text"
    log_bodies: bool = False
    metrics_listen: str | None = None
    metrics_key: str | None = field(default=None, repr=False)
    moderation: ModerationConfig = field(default_factory=ModerationConfig)
    keys_file: str | None = None
    named_keys: tuple[NamedKey, ...] = field(default=(), repr=False)
    admin_key: str | None = field(default=None, repr=False)
    inject_usage: bool = True
    key_cooldown: float = 600.0
    redis_url: str | None = field(default=None, repr=False)
    limits_on_error: str = "allow"
    #: The IANA time zone whose days and months the quotas and usage count.
    quota_tz: str = "UTC"
    upstreams_file: str | None = None
    upstreams: tuple[Upstream, ...] = field(default=(), repr=False)
    #: Egress proxies: C{EGRESS_PROXY}, C{HTTPS_PROXY}, C{HTTP_PROXY},
    #: C{ALL_PROXY}, C{NO_PROXY} (their C{repr} hides credentials).
    egress: EgressSettings = field(default_factory=EgressSettings)

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
        environ = os.environ if env is None else env
        source = make_source(options or {}, environ)
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
            send_timeout=parse_positive(
                "--send-timeout/SEND_TIMEOUT",
                source("send-timeout", "SEND_TIMEOUT"),
                60000,
            )
            / 1000.0,
            header_timeout=parse_positive(
                "--header-timeout/HEADER_TIMEOUT",
                source("header-timeout", "HEADER_TIMEOUT"),
                30000,
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
            max_moderated_body=int(
                parse_positive(
                    "--max-moderated-body/MAX_MODERATED_BODY",
                    source("max-moderated-body", "MAX_MODERATED_BODY"),
                    cls.max_moderated_body,
                    integer=True,
                )
            ),
            max_decoded_body=int(
                parse_positive(
                    "--max-decoded-body/MAX_DECODED_BODY",
                    source("max-decoded-body", "MAX_DECODED_BODY"),
                    cls.max_decoded_body,
                    integer=True,
                )
            ),
            cors_origins=split_list(source("cors-origins", "CORS_ORIGINS") or "*"),
            open_proxy=parse_bool(
                "--open/OPEN_PROXY", source("open", "OPEN_PROXY"), False
            ),
            **_workers_settings(source("workers", "WORKERS")),
            grace=parse_positive("--grace/GRACE", source("grace", "GRACE"), cls.grace),
            ws_ping_interval=parse_positive(
                "--ws-ping-interval/WS_PING_INTERVAL",
                source("ws-ping-interval", "WS_PING_INTERVAL"),
                cls.ws_ping_interval,
            ),
            ws_max_message=int(
                parse_positive(
                    "--ws-max-message/WS_MAX_MESSAGE",
                    source("ws-max-message", "WS_MAX_MESSAGE"),
                    cls.ws_max_message,
                    integer=True,
                )
            ),
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
            **_key_settings(source),
            **_upstreams_settings(source, environ),
            egress=_egress(environ, source("egress-proxy", "EGRESS_PROXY")),
        )._checked()

    def tms_proxy(self) -> str | None:
        """
        The egress proxy URL (with its credentials) the C{tencent}
        moderation backend reaches TMS through, chosen as for an upstream;
        L{None}: direct.
        """
        # As the backend reads TENCENT_CLOUD_ENDPOINT: http:// selects plain
        # HTTP, anything else is https.
        endpoint = self.moderation.tencent_endpoint
        plain = endpoint.lower().startswith("http://")
        if not plain:
            endpoint = "https://" + endpoint.split("://", 1)[-1]
        proxy = self.egress.proxy_for_url(endpoint)
        return None if proxy is None else proxy.url()

    def _checked(self) -> Config:
        if (
            self.workers_auto
            and self.workers > 1
            and not all(shareable(d) for d in self.listen)
        ):
            # auto asks for what suits the machine: one process is what
            # suits a listen only one process can hold.
            return replace(self, workers=1)._checked()
        check_listen(self.listen, self.workers)
        tms_proxy = self.tms_proxy() if self.moderation.backend == "tencent" else None
        if (
            tms_proxy is not None
            and tms_proxy.startswith("socks")
            and importlib.util.find_spec("socks") is None
        ):
            raise ConfigError(
                "EGRESS_PROXY",
                "Tencent TMS through a SOCKS proxy needs PySocks: "
                "pip install 'requests[socks]' (or list the TMS host in NO_PROXY)",
            )
        if (
            self.openai_keys
            and not self.proxy_keys
            and self.keys_file is None
            and not self.open_proxy
        ):
            raise ConfigError(
                "PROXY_KEY",
                "OPENAI_KEY is set but PROXY_KEY is not, so anyone who can reach "
                "the proxy would spend your key; set PROXY_KEY (or --proxy-key-file), "
                "or pass --open / OPEN_PROXY=1 if that is what you want",
            )
        keyed = [u.name for u in self.upstreams if u.keys]
        if (
            keyed
            and not self.proxy_keys
            and self.keys_file is None
            and not self.open_proxy
        ):
            raise ConfigError(
                "PROXY_KEY",
                f"the upstream {keyed[0]!r} of UPSTREAMS_FILE has keys but PROXY_KEY "
                "is not set, so anyone who can reach the proxy would spend them; "
                "set PROXY_KEY (or KEYS_FILE), or pass --open / OPEN_PROXY=1",
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


#: What C{ROUTES} or C{--route} say to turn routing off, besides C{ROUTES=}.
_NO_ROUTES = "none"


def _routes(options: Sequence[str], env: str | None) -> tuple[tuple[str, str], ...]:
    # Entries add to the default routes (replacing one with the same prefix):
    # a user adding a route must not lose the api2d one without a word.  Only
    # an explicitly empty setting turns routing off.
    if options:
        items, setting = tuple(options), "--route"
    elif env is not None:
        items, setting = split_list(env), "ROUTES"
    else:
        return Config.routes
    if not items or [i.lower() for i in items] == [_NO_ROUTES]:
        return ()
    routes = dict(Config.routes)
    for item in items:
        prefix, sep, url = item.partition("=")
        if not sep or not prefix.strip():
            raise ConfigError(
                setting, f"expected PREFIX=URL (or {_NO_ROUTES}), got {item!r}"
            )
        routes[prefix.strip()] = parse_base_url(setting, url)
    return tuple(routes.items())


def _egress(env: Mapping[str, str], override: str | None) -> EgressSettings:
    try:
        return EgressSettings.from_environment(env, override)
    except ValueError as e:
        setting, reason = e.args
        raise ConfigError(setting, reason) from None


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


class _KeySettings(TypedDict):
    keys_file: str | None
    named_keys: tuple[NamedKey, ...]
    admin_key: str | None
    inject_usage: bool
    key_cooldown: float
    redis_url: str | None
    limits_on_error: str
    quota_tz: str


def _key_settings(source: Source) -> _KeySettings:
    # Named keys, their limits and usage, and server-key failover.
    keys_file = source("keys-file", "KEYS_FILE") or None
    named: tuple[NamedKey, ...] = ()
    if keys_file is not None:
        try:
            named = read_keys_file(keys_file)
        except KeysFileError as e:
            raise ConfigError("--keys-file/KEYS_FILE", str(e)) from None
    redis_url = source("", "REDIS_URL") or None
    if redis_url is not None and urlsplit(redis_url).scheme not in (
        "redis",
        "rediss",
        "unix",
    ):
        raise ConfigError("REDIS_URL", "expected a redis://, rediss:// or unix:// URL")
    return {
        "keys_file": keys_file,
        "named_keys": named,
        "admin_key": source("", "ADMIN_KEY") or None,
        "inject_usage": parse_bool(
            "--inject-usage/INJECT_USAGE", source("inject-usage", "INJECT_USAGE"), True
        ),
        "key_cooldown": parse_positive(
            "--key-cooldown/KEY_COOLDOWN",
            source("key-cooldown", "KEY_COOLDOWN"),
            Config.key_cooldown,
        ),
        "redis_url": redis_url,
        "limits_on_error": parse_choice(
            "--limits-on-error/LIMITS_ON_ERROR",
            source("limits-on-error", "LIMITS_ON_ERROR"),
            ("allow", "deny"),
            "allow",
        ),
        "quota_tz": _quota_tz(source("quota-tz", "QUOTA_TZ")),
    }


def _quota_tz(raw: str | None) -> str:
    zone = (raw or "").strip() or Config.quota_tz
    try:
        QuotaCalendar(zone)
    except UnknownZone as e:
        raise ConfigError("--quota-tz/QUOTA_TZ", str(e)) from None
    return zone


class _UpstreamsSettings(TypedDict):
    upstreams_file: str | None
    upstreams: tuple[Upstream, ...]


def _upstreams_settings(source: Source, env: Mapping[str, str]) -> _UpstreamsSettings:
    # Upstreams chosen by model; their keys_env names are read from env.
    path = source("upstreams-file", "UPSTREAMS_FILE") or None
    upstreams: tuple[Upstream, ...] = ()
    if path is not None:
        try:
            upstreams = read_upstreams_file(path, env)
        except UpstreamsFileError as e:
            raise ConfigError("--upstreams-file/UPSTREAMS_FILE", str(e)) from None
    return {"upstreams_file": path, "upstreams": upstreams}
