"""
The start-up line: one log line that says what a started proxy does, so a
user sees at once which routes, keys and moderation are in force.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.logger import Logger

from openai_proxy.config import Config
from openai_proxy.ops.workers import with_default_backlog

# The README names this namespace and log readers filter on it: it
# stays what it was before the module moved into ops/.
_log = Logger(namespace="openai_proxy.startup")


def package_version() -> str:
    """This package's installed version (C{"unknown"} when not installed)."""
    try:
        return version("openai-proxy")
    except PackageNotFoundError:
        return "unknown"


def summary(config: Config) -> str:
    """
    One line saying what C{config} makes active: listen descriptions (with
    the backlog they get), upstream and route hosts, the key mode (how many
    proxy and server keys, or open), the moderation backend and mode, and
    the number of workers.  It names hosts, never URLs' paths, and counts
    keys, never shows them.
    """
    routes = ", ".join(f"{prefix}→{_host(url)}" for prefix, url in config.routes)
    parts = [
        "listen " + ", ".join(with_default_backlog(d) for d in config.listen),
        "upstream " + _host(config.upstream),
        "routes " + (routes or "none"),
        "egress: " + _egress(config),
        "keys: " + _keys(config),
        "moderation: " + _moderation(config),
        f"workers {config.workers}" + (" (auto)" if config.workers_auto else ""),
    ]
    if config.upstreams_file is not None:
        parts.append("upstreams by model: " + _by_model(config))
    if config.metrics_listen is not None:
        parts.append("metrics on " + config.metrics_listen)
    if config.keys_file is not None:
        # Where limits are kept decides whether they hold across processes.
        limits = "limits " + ("in redis" if config.redis_url else "per process")
        if config.quota_tz != Config.quota_tz:
            limits += f", days in {config.quota_tz}"
        parts.append(limits)
    return f"openai-proxy {package_version()}: " + "; ".join(parts)


def _host(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return host if parts.port is None else f"{host}:{parts.port}"


def _by_model(config: Config) -> str:
    # Name, host and egress proxy of each (display() has no password).
    return (
        ", ".join(
            f"{u.name}→{_host(u.base_url)}"
            + ("" if u.proxy is None else f" via {u.proxy.display()}")
            for u in config.upstreams
        )
        or "none"
    )


def _egress(config: Config) -> str:
    # Which proxy each upstream (and TMS) is reached through, by the same
    # choice the client makes; display() never shows credentials.
    targets = [config.upstream, *(url for _, url in config.routes)]
    m = config.moderation
    if m.backend == "tencent":
        endpoint = m.tencent_endpoint
        targets.append(endpoint if "://" in endpoint else "https://" + endpoint)
    said: dict[str, str] = {}
    for url in targets:
        proxy = config.egress.proxy_for_url(url)
        said.setdefault(
            _host(url), "direct" if proxy is None else "via " + proxy.display()
        )
    if all(how == "direct" for how in said.values()):
        return "direct"
    return ", ".join(f"{host} {how}" for host, how in said.items())


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _keys(config: Config) -> str:
    kinds = []
    if config.proxy_keys:
        kinds.append(_count(len(config.proxy_keys), "proxy key"))
    if config.keys_file is not None:
        kinds.append(_count(len(config.named_keys), "named key"))
    clients = " + ".join(kinds) or "open (no proxy key)"
    if config.openai_keys:
        upstream = _count(len(config.openai_keys), "server key")
    else:
        upstream = "clients' own OpenAI keys"
    return f"{clients}, {upstream}"


def _moderation(config: Config) -> str:
    m = config.moderation
    if m.mode == "off" or m.backend is None:
        why = "off" if m.mode == "off" else "no backend"
        return f"{why} (a request asking for it gets 400)"
    return (
        f"{m.backend}, mode {m.mode}, level {m.level}, "
        f"input {'on' if m.moderate_input else 'off'}, on error {m.on_error}"
    )


class StartupLine(Service):
    """Logs L{summary} once, when started (add it in the main process only)."""

    def __init__(self, config: Config) -> None:
        self._line = summary(config)

    def startService(self) -> None:
        super().startService()
        _log.info("{summary}", summary=self._line)
