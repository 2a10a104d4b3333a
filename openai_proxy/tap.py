"""
The C{twistd openai-proxy} command: options, and the service they make.

Importing this module blocks C{SIGHUP} in the importing thread, until the
application handles it (L{openai_proxy.app.ProxyApp.startService} unblocks
it): a SIGHUP sent while the proxy starts waits, and is handled then,
instead of ending the process by the signal's default action.
"""

from __future__ import annotations

import signal

# First of all: twistd imports this module before any other of the proxy's,
# and the imports below take a tenth of a second or more.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})

import os
import shutil
import tempfile
import textwrap
from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.python import usage

from openai_proxy.config import Config, ConfigError
from openai_proxy.moderation.config import MODERATION_OPTIONS
from openai_proxy.ops.startup import StartupLine, package_version
from openai_proxy.telemetry import logs

#: (option, environment variable, default, doc) of the core settings.
_CORE_OPTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("upstream", "UPSTREAM", "https://api.openai.com", "Upstream base URL."),
    (
        "proxy-key-file",
        "PROXY_KEY_FILE",
        "none",
        "File of accepted proxy keys (instead of PROXY_KEY).",
    ),
    (
        "openai-key-file",
        "OPENAI_KEY_FILE",
        "none",
        "File of server-held upstream keys (instead of OPENAI_KEY).",
    ),
    (
        "egress-proxy",
        "EGRESS_PROXY",
        "none",
        "Egress proxy URL (http://, socks5://, socks5h://) or none.",
    ),
    ("timeout", "TIMEOUT", "30000", "Upstream timeout in ms."),
    (
        "send-timeout",
        "SEND_TIMEOUT",
        "60000",
        "ms a client may take no response bytes before it is cut off.",
    ),
    (
        "header-timeout",
        "HEADER_TIMEOUT",
        "30000",
        "ms for a request's line and headers to arrive.",
    ),
    ("max-body", "MAX_BODY", "52428800", "Largest request body in bytes."),
    (
        "max-moderated-body",
        "MAX_MODERATED_BODY",
        "10485760",
        "Largest JSON body in bytes parsed on a moderated path.",
    ),
    (
        "max-decoded-body",
        "MAX_DECODED_BODY",
        "67108864",
        "Largest moderated response body in bytes (decoded).",
    ),
    ("cors-origins", "CORS_ORIGINS", "*", "Allowed CORS origins, comma-separated."),
    ("workers", "WORKERS", "1", "Processes serving the ports: a number or auto."),
    ("grace", "GRACE", "30", "Seconds to let requests finish on SIGTERM."),
    (
        "ws-ping-interval",
        "WS_PING_INTERVAL",
        "30",
        "Seconds between WebSocket keep-alive pings.",
    ),
    (
        "ws-max-message",
        "WS_MAX_MESSAGE",
        "16777216",
        "Largest WebSocket message in bytes (else close 1009).",
    ),
    ("log-format", "LOG_FORMAT", "text", "text, or json (NDJSON on stdout)."),
    (
        "metrics-listen",
        "METRICS_LISTEN",
        "none",
        "Serve /metrics here, not on the main port.",
    ),
    ("keys-file", "KEYS_FILE", "none", "TOML file of named proxy keys with limits."),
    (
        "upstreams-file",
        "UPSTREAMS_FILE",
        "none",
        "TOML file of upstreams chosen by the request's model.",
    ),
    (
        "inject-usage",
        "INJECT_USAGE",
        "1",
        "Ask upstream for stream usage (hidden from the client).",
    ),
    ("key-cooldown", "KEY_COOLDOWN", "600", "Seconds a failed server key rests."),
    (
        "quota-tz",
        "QUOTA_TZ",
        "UTC",
        "Time zone (IANA) of the quotas' days and months.",
    ),
    (
        "limits-on-error",
        "LIMITS_ON_ERROR",
        "allow",
        "allow or deny when Redis is down.",
    ),
)

#: (environment variable, default, doc) of the settings with no option:
#: secrets stay off the command line (where ps would show them).
ENVIRONMENT_ONLY: tuple[tuple[str, str, str], ...] = (
    ("PROXY_KEY", "none", "Accepted proxy keys, comma-separated."),
    ("OPENAI_KEY", "none", "Server-held upstream keys, comma-separated."),
    ("TENCENT_CLOUD_SID", "none", "Tencent Cloud SecretId (with _SKEY)."),
    ("TENCENT_CLOUD_SKEY", "none", "Tencent Cloud SecretKey (with _SID)."),
    ("METRICS_KEY", "none", "Bearer token required on /metrics."),
    (
        "LOG_BODIES",
        "0",
        "1: log the first 4096 bytes of request bodies (text or JSON).",
    ),
    ("ADMIN_KEY", "none", "Bearer token for GET /usage (off without it)."),
    ("REDIS_URL", "none", "redis://, rediss:// or unix:// for shared limits."),
    ("HTTPS_PROXY", "none", "Egress proxy for https upstreams (or https_proxy)."),
    ("HTTP_PROXY", "none", "Egress proxy for http upstreams (or http_proxy)."),
    ("ALL_PROXY", "none", "Egress proxy when the two above are unset."),
    ("NO_PROXY", "none", "Hosts reached directly, comma-separated."),
)


class BadSettings(SystemExit):
    """
    A bad setting or option: ends the process with status 1 and, on stderr,
    one line naming it and a pointer to C{--help}, instead of twistd's whole
    usage text followed by the error.

    @ivar message: the line naming the setting.
    """

    def __init__(self, message: str) -> None:
        self.message = message
        # A string exit code is what Python prints to stderr on its way out.
        super().__init__(
            f"twistd openai-proxy: {message}\n"
            "(twistd openai-proxy --help lists the settings)"
        )


def _doc(doc: str, env: str, default: str) -> str:
    return f"{doc} [{env}, default {default}]"


class Options(usage.Options):
    """
    Every setting also has an environment variable (see the README); an
    option given here wins over it.  Keys are read from the environment or
    from files, never from the command line.

    A bad setting or option raises L{BadSettings}.
    """

    synopsis = "[options]"
    longdesc = "A streaming relay for the OpenAI HTTP API."

    optFlags = [
        [
            "open",
            None,
            _doc(
                "Allow OPENAI_KEY without PROXY_KEY (anyone may spend it).",
                "OPEN_PROXY",
                "0",
            ),
        ],
    ]
    optParameters = [
        [name, None, None, _doc(doc, env, default)]
        for name, env, default, doc in _CORE_OPTIONS + MODERATION_OPTIONS
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["route"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on this endpoint description (repeatable); tcp: ones get backlog=1024 unless they set one, and PORT=N means tcp:N:backlog=1024. [PORT, default tcp:9000]"""
        self["listen"].append(description)

    def opt_route(self, route: str) -> None:
        """PREFIX=URL: keys starting with PREFIX go to URL (repeatable; adds to the default route; none turns routing off). [ROUTES, default fk=https://openai.api2d.net]"""
        self["route"].append(route)

    def opt_version(self) -> None:
        """Print this proxy's version and exit."""
        print(f"openai-proxy {package_version()}")
        raise SystemExit(0)

    def getUsage(self, width: int | None = None) -> str:
        lines = ["", "Settings with no option, from the environment only:"]
        column = 4 + max(len(env) for env, _, _ in ENVIRONMENT_ONLY)
        for env, default, doc in ENVIRONMENT_ONLY:
            # The variable first, as each option line starts with its option.
            lines += textwrap.wrap(
                _doc(doc, env, default),
                width=(width or 80) - 1,
                initial_indent=f"  {env:<{column - 2}}",
                subsequent_indent=" " * column,
                break_on_hyphens=False,
            )
        return super().getUsage(width) + "\n".join(lines) + "\n"

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # twistd prints the whole usage text before a usage error, so the
        # one line that matters scrolls away: print it alone instead.
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise BadSettings(str(e)) from None

    def postOptions(self) -> None:
        options = {k: v for k, v in self.items() if k not in ("listen", "route")}
        # A flag left off means "not given", so the environment may still say yes.
        options["open"] = "1" if self["open"] else None
        try:
            self["config"] = Config.load(
                options, os.environ, listen=self["listen"], routes=self["route"]
            )
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        logs.use_log_format(self, self["config"].log_format)
        _no_pid_file_in_the_foreground(self)


def _no_pid_file_in_the_foreground(options: usage.Options) -> None:
    # twistd writes twistd.pid by default.  In the foreground (containers,
    # supervisors) nothing needs it, and a stale one stops the next start
    # (in a container it often holds PID 1, which is always alive).  An
    # explicit --pidfile still wins.
    parent = getattr(options, "parent", None)
    if (
        parent is not None
        and parent.get("nodaemon")
        and parent.get("pidfile") == "twistd.pid"
    ):
        parent["pidfile"] = ""


def makeService(options: Options) -> service.IService:
    """Make the proxy's service from parsed options."""
    from twisted.internet import reactor

    from openai_proxy.app import ProxyApp
    from openai_proxy.ops.workers import (
        WorkersService,
        is_worker,
        listen_and_fork,
        with_default_backlog,
    )
    from openai_proxy.telemetry import metrics

    config: Config = options["config"]
    if config.workers > 1:
        _share_metrics(reactor)
    app = ProxyApp(config, reactor)
    top = service.MultiService()
    # The app first: services stop in reverse order, so the ports stop
    # accepting before the app drains the requests in flight.
    app.setServiceParent(top)
    served = listen_and_fork(
        config.listen,
        app.site,
        config.workers,
        reactor,
        options,
        on_child_exit=metrics.forget_process,
    )
    served.setServiceParent(top)
    if isinstance(served, WorkersService) and app.registry is not None:
        # One kill -HUP to the main process re-reads the keys file everywhere.
        app.on_sighup.append(lambda: served.signal_children("HUP"))
    if not is_worker():
        # Once per start: the workers' own makeService would repeat it.
        StartupLine(config).setServiceParent(top)
    if config.metrics_listen is not None and not is_worker():
        metrics.make_metrics_service(
            with_default_backlog(config.metrics_listen),
            app.metrics.resource(config.metrics_key),
            reactor,
        ).setServiceParent(top)
    return top


def _share_metrics(reactor: Any) -> None:
    # Several worker processes: their series go to files in one directory,
    # made by the main process and inherited by the children through the
    # environment, so that a scrape served by any of them reports the sum.
    from openai_proxy.telemetry import metrics

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory is None:
        directory = tempfile.mkdtemp(prefix="openai-proxy-metrics-")
        reactor.addSystemEventTrigger(
            "after", "shutdown", shutil.rmtree, directory, ignore_errors=True
        )
    metrics.share_between_processes(directory)
