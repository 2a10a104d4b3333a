"""
The C{twistd openai-proxy} command: options, and the service they make.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.application import service
from twisted.python import usage

from openai_proxy import logs
from openai_proxy.config import Config, ConfigError
from openai_proxy.moderation.config import MODERATION_OPTIONS

#: (option, environment variable and default, doc) of the core settings.
_CORE_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("upstream", "UPSTREAM, default https://api.openai.com", "Upstream base URL."),
    ("proxy-key-file", "PROXY_KEY", "File of accepted proxy keys."),
    ("openai-key-file", "OPENAI_KEY", "File of server-held upstream keys."),
    ("timeout", "TIMEOUT, default 30000", "Upstream timeout in ms."),
    (
        "send-timeout",
        "SEND_TIMEOUT, default 60000",
        "ms a client may stop reading a response before it is cut off.",
    ),
    (
        "header-timeout",
        "HEADER_TIMEOUT, default 30000",
        "ms for a request's line and headers to arrive.",
    ),
    ("max-body", "MAX_BODY, default 52428800", "Largest request body in bytes."),
    (
        "max-moderated-body",
        "MAX_MODERATED_BODY, default 10485760",
        "Largest JSON body in bytes on a moderated path.",
    ),
    (
        "max-decoded-body",
        "MAX_DECODED_BODY, default 67108864",
        "Largest decoded size in bytes of a compressed moderated response.",
    ),
    (
        "cors-origins",
        "CORS_ORIGINS, default *",
        "Allowed CORS origins, comma-separated.",
    ),
    ("workers", "WORKERS, default 1", "Processes serving the ports: a number or auto."),
    ("grace", "GRACE, default 30", "Seconds to let requests finish on SIGTERM."),
    ("log-format", "LOG_FORMAT, default text", "text, or json (NDJSON on stdout)."),
    ("metrics-listen", "METRICS_LISTEN", "Serve /metrics here, not on the main port."),
)


class Options(usage.Options):
    """
    Every setting also has an environment variable (see the README); an
    option given here wins over it.  Keys are read from the environment or
    from files, never from the command line.
    """

    synopsis = "[options]"
    longdesc = "A streaming relay for the OpenAI HTTP API."

    optFlags = [
        [
            "open",
            None,
            "Allow OPENAI_KEY without PROXY_KEY (anyone may spend it). [OPEN_PROXY=1]",
        ],
    ]
    optParameters = [
        [name, None, None, f"{doc} [{env}]"]
        for name, env, doc in _CORE_OPTIONS + MODERATION_OPTIONS
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["route"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on this endpoint description (repeatable). [PORT, default tcp:9000]"""
        self["listen"].append(description)

    def opt_route(self, route: str) -> None:
        """PREFIX=URL: keys starting with PREFIX go to URL (repeatable). [ROUTES]"""
        self["route"].append(route)

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

    from openai_proxy import metrics
    from openai_proxy.app import ProxyApp
    from openai_proxy.workers import is_worker, listen_and_fork

    config: Config = options["config"]
    if config.workers > 1:
        _share_metrics(reactor)
    app = ProxyApp(config, reactor)
    top = service.MultiService()
    # The app first: services stop in reverse order, so the ports stop
    # accepting before the app drains the requests in flight.
    app.setServiceParent(top)
    listen_and_fork(
        config.listen,
        app.site,
        config.workers,
        reactor,
        options,
        on_child_exit=metrics.forget_process,
    ).setServiceParent(top)
    if config.metrics_listen is not None and not is_worker():
        metrics.make_metrics_service(
            config.metrics_listen, app.metrics.resource(config.metrics_key), reactor
        ).setServiceParent(top)
    return top


def _share_metrics(reactor: Any) -> None:
    # Several worker processes: their series go to files in one directory,
    # made by the main process and inherited by the children through the
    # environment, so that a scrape served by any of them reports the sum.
    from openai_proxy import metrics

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory is None:
        directory = tempfile.mkdtemp(prefix="openai-proxy-metrics-")
        reactor.addSystemEventTrigger(
            "after", "shutdown", shutil.rmtree, directory, ignore_errors=True
        )
    metrics.share_between_processes(directory)
