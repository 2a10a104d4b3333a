"""
The proxy assembled: connection pool, client, resource and site, as one
service whose stop closes what the start opened.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from openai_proxy.config import Config
from openai_proxy.resource import ProxyResource
from openai_proxy.server import ProxySite
from openai_proxy.upstream import make_client, make_pool


class ProxyApp(Service):
    """
    Everything one proxy process serves with, built once from a L{Config}.
    C{site} is what the listening services serve.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.pool = make_pool(reactor)
        self.client = make_client(reactor, self.pool)
        self.moderation = None
        self.resource = ProxyResource(
            config, reactor, self.client, moderation=self.moderation
        )
        self.site = ProxySite(
            self.resource, config.max_body, allow_any_origin="*" in config.cors_origins
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d: Deferred[None] = self.pool.closeCachedConnections()
        return d
