"""
The C{twistd openai-proxy} command: options, and the service they make.
"""

from __future__ import annotations

import os

from twisted.application import service, strports
from twisted.python import usage

from openai_proxy import logs
from openai_proxy.config import Config, ConfigError
from openai_proxy.moderation.config import MODERATION_OPTIONS


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
        [
            "upstream",
            None,
            None,
            "Upstream base URL. [UPSTREAM, default https://api.openai.com]",
        ],
        ["proxy-key-file", None, None, "File of accepted proxy keys. [PROXY_KEY]"],
        [
            "openai-key-file",
            None,
            None,
            "File of server-held upstream keys. [OPENAI_KEY]",
        ],
        ["timeout", None, None, "Upstream timeout in ms. [TIMEOUT, default 30000]"],
        [
            "max-body",
            None,
            None,
            "Largest request body in bytes. [MAX_BODY, default 52428800]",
        ],
        [
            "cors-origins",
            None,
            None,
            "Allowed CORS origins, comma-separated. [CORS_ORIGINS, *]",
        ],
    ] + [[name, None, None, f"{doc} [{env}]"] for name, env, doc in MODERATION_OPTIONS]

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


def makeService(options: Options) -> service.IService:
    """Make the proxy's service from parsed options."""
    from twisted.internet import reactor

    from openai_proxy.app import ProxyApp
    from openai_proxy.metrics import make_metrics_service

    config: Config = options["config"]
    app = ProxyApp(config, reactor)
    top = service.MultiService()
    app.setServiceParent(top)
    # The app first: services stop in reverse order, so the ports stop
    # accepting before the app drains the requests in flight.
    for description in config.listen:
        strports.service(description, app.site).setServiceParent(top)
    if config.metrics_listen is not None:
        make_metrics_service(
            config.metrics_listen, app.metrics.resource(config.metrics_key), reactor
        ).setServiceParent(top)
    return top
