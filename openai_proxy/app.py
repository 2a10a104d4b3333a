"""
The proxy assembled: connection pool, client, moderation, metrics, drain,
resource and site, as one service whose stop undoes what its start did, in
the right order.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from openai_proxy.admin.usagepage import UsagePage, describe_store
from openai_proxy.config import Config
from openai_proxy.http.server import ProxySite
from openai_proxy.keys.accounting import Accounting
from openai_proxy.keys.auth import KeyPolicy
from openai_proxy.keys.limits import Limiter, LocalLimiter
from openai_proxy.keys.named import KeyRegistry
from openai_proxy.keys.quotas import QuotaCalendar
from openai_proxy.moderation import Moderation
from openai_proxy.ops.drain import DrainService, Readiness
from openai_proxy.realtime.moderate import moderation_hook
from openai_proxy.resource import ProxyResource
from openai_proxy.telemetry import logs
from openai_proxy.telemetry.metrics import Metrics
from openai_proxy.upstream.channels import Upstream
from openai_proxy.upstream.choose import Channel, UpstreamRegistry
from openai_proxy.upstream.client import RelayClient, make_client, make_pool
from openai_proxy.upstream.failover import KeyPool

_PROBE_INTERVAL = 5.0  # seconds between attempts to reach the moderation backend
_SETTLE_WAIT = 2.0  # seconds a stop waits for the requests cut off to settle
#: Proxy keys shorter than this are warned about at start-up.
SHORT_KEY = 16

_log = Logger()


class ProxyApp(Service):
    """
    Everything one proxy process serves with, built once from a L{Config}.
    C{site} is what the listening services serve.

    Add it to the parent service I{before} the listening services: a
    C{MultiService} stops its children in reverse order, so the ports stop
    accepting first, and then this drains what is in flight before it stops
    the moderation threads and closes the upstream connections.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.pool = make_pool(reactor)
        self.client = make_client(reactor, self.pool, egress=config.egress)
        self.metrics = Metrics()
        self.drain = DrainService(config.grace, reactor)
        # The openai backend can only be probed with a server-held key: with
        # clients' own keys there is nothing to try before a request comes.
        probed = config.moderation.backend is not None and not (
            config.moderation.backend == "openai" and not config.openai_keys
        )
        self.readiness = Readiness(*(["moderation"] if probed else []))
        if not probed:
            self.readiness.mark_ready()
        self.moderation = Moderation(
            config.moderation,
            reactor,
            # The relay's client: it keeps no cookies, and shares its endpoints.
            openai_client_factory=lambda: (self.client, config.upstream),
            on_call=self._moderation_call,
            tencent_proxy=config.tms_proxy(),
        )
        self._probe = LoopingCall(self._probe_moderation)
        self._probe.clock = reactor
        metrics_here = None
        if config.metrics_listen is None:
            metrics_here = self.metrics.resource(config.metrics_key)
        self.registry = (
            None
            if config.keys_file is None
            else KeyRegistry(config.keys_file, config.named_keys)
        )
        self.upstreams = (
            None
            if config.upstreams_file is None
            else UpstreamRegistry(
                config.upstreams_file,
                config.upstreams,
                on_change=_redact_upstream_secrets,
            )
        )
        self.key_pool = KeyPool(config.openai_keys)
        self.keys = KeyPolicy(
            config.proxy_keys,
            config.openai_keys,
            registry=self.registry,
            pool=self.key_pool,
            by_model=self.upstreams is not None,
        )
        self.store: Any = None
        calendar = QuotaCalendar(config.quota_tz)
        self.limiter: Limiter = LocalLimiter(calendar=calendar)
        if config.redis_url is not None:
            from openai_proxy.keys.redisstore import RedisStore

            self.store = RedisStore(
                config.redis_url, reactor, self.key_pool, calendar=calendar
            )
            self.limiter = self.store
        self.accounting = Accounting(
            self.limiter,
            self.metrics,
            on_error=config.limits_on_error,
            inject_usage=config.inject_usage,
        )
        registry = self.registry
        usage_page = None
        if registry is not None:
            usage_page = UsagePage(
                config.admin_key,
                self.limiter,
                lambda: registry.keys,
                self.key_pool,
                describe_store(config.redis_url, config.workers),
            )
        self._old_sighup: Any = None
        self._reactor = reactor
        #: Called after each SIGHUP's reload of the keys file (the main
        #: process passes the signal on to its workers here).
        self.on_sighup: list[Callable[[], None]] = []
        self.resource = ProxyResource(
            config,
            reactor,
            self.client,
            moderation=self.moderation,
            metrics=self.metrics,
            drain=self.drain,
            readiness=self.readiness,
            metrics_resource=metrics_here,
            keys=self.keys,
            accounting=self.accounting,
            usage_page=usage_page,
            upstreams=self.upstreams,
            client_for=self.upstream_client,
            realtime_moderation=moderation_hook(
                self.moderation, self.metrics.stream_blocked
            ),
            store_up=None if self.store is None else self.store.is_up,
            deny_without_store=config.limits_on_error == "deny",
        )
        self.site = ProxySite(
            self.resource,
            config.max_body,
            allow_any_origin="*" in config.cors_origins,
            header_timeout=config.header_timeout,
            authorize=self.resource.authorize,
            on_refused=self.metrics.refused,
        )
        short = sum(1 for key in config.proxy_keys if len(key) < SHORT_KEY)
        if short:
            # Never the keys themselves: how many, and what to do.
            _log.warn(
                "{count} {keys} (PROXY_KEY) {verb} shorter than {length} "
                "characters and easy to guess; use long random keys",
                count=short,
                keys="proxy key" if short == 1 else "proxy keys",
                verb="is" if short == 1 else "are",
                length=SHORT_KEY,
            )
        logs.register_secrets(
            [
                *config.proxy_keys,
                *config.openai_keys,
                config.metrics_key,
                config.admin_key,
                config.redis_url,
                config.moderation.tencent_secret_id,
                config.moderation.tencent_secret_key,
                *(s for p in config.egress.proxies() for s in p.secrets()),
            ]
        )

    def upstream_client(self, upstream: Upstream) -> RelayClient:
        """
        The client requests to C{upstream} (of C{UPSTREAMS_FILE}) go out
        through: the relay's own, its connections to C{upstream} pinned to
        the upstream's own egress proxy when it names one (pooled like the
        rest).
        """
        endpoints = self.client.endpoints
        if upstream.proxy is not None and endpoints is not None:
            # Per request, so that a SIGHUP's new proxy takes effect.
            endpoints.use_proxy(upstream.base_url, upstream.proxy)
        return self.client

    def startService(self) -> None:
        super().startService()
        # SIGHUP never ends the proxy: it re-reads KEYS_FILE, or is logged
        # as having nothing to do.  It was held from start-up (see
        # openai_proxy.tap): one sent meanwhile is handled now.
        self._old_sighup = signal.signal(signal.SIGHUP, self._sighup)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        if self.store is not None:
            self.store.start()
        self.moderation.startService()
        self.drain.startService()
        if not self.readiness.is_ready:
            self._probe.start(_PROBE_INTERVAL, now=True)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    def _sighup(self, signum: int, frame: Any) -> None:
        # Signal handlers run between bytecodes: re-read the file from the
        # reactor instead, where nothing is half-done.
        self._reactor.callFromThread(self._reload)

    def _reload(self) -> None:
        if self.registry is None and self.upstreams is None:
            _log.info("SIGHUP: no KEYS_FILE or UPSTREAMS_FILE, nothing to re-read")
        if self.registry is not None:
            self.registry.reload()
        if self.upstreams is not None:
            self.upstreams.reload()
        for hook in self.on_sighup:
            hook()

    async def _stop(self) -> None:
        if self._probe.running:
            self._probe.stop()
        # In-flight streams may still need moderation: drain first.
        await self.drain.stopService()
        if self.store is not None:
            # Requests cut at GRACE settle a few reactor turns after their
            # connections were aborted: Redis must still be there for them.
            try:
                await self.accounting.settled().addTimeout(_SETTLE_WAIT, self._reactor)
            except error.TimeoutError:
                _log.warn(
                    "{count} request(s) not settled at shutdown; their slots "
                    "expire with their leases",
                    count=self.accounting.unsettled,
                )
            await self.store.stop()
        await self.moderation.stopService()
        await self.pool.closeCachedConnections()
        # Only now: a SIGHUP while draining must not end the process.
        old = self._old_sighup
        if old is not None and signal.getsignal(signal.SIGHUP) == self._sighup:
            signal.signal(signal.SIGHUP, old)
        self._old_sighup = None

    def _moderation_call(self, backend: str, result: str, seconds: float) -> None:
        self.metrics.moderation_call(backend, result, seconds)
        if result != "error":
            self.readiness.mark("moderation")

    def _probe_moderation(self) -> Deferred[None] | None:
        # /readyz waits until the backend has answered once; a probe at
        # start-up (then every few seconds until it answers) gets there
        # without waiting for a user's request.
        if self.readiness.is_ready:
            self._probe.stop()
            return None
        key = self.config.openai_keys[0] if self.config.openai_keys else ""
        d: Deferred[None] = self.moderation.probe(key)
        return d


def _redact_upstream_secrets(channels: tuple[Channel, ...]) -> None:
    # The keys of UPSTREAMS_FILE, and its proxies' credentials, as they are
    # read (a reload may bring new ones).
    secrets: list[str | None] = []
    for channel in channels:
        upstream = channel.upstream
        secrets.extend(upstream.keys)
        if upstream.proxy is not None:
            secrets.extend((upstream.proxy.username, upstream.proxy.password))
    logs.register_secrets(secrets)
