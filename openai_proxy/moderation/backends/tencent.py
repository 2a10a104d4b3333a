"""The C{tencent} backend: Tencent Cloud TMS C{TextModeration} via its SDK."""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from openai_proxy.moderation.backends import BackendError
from openai_proxy.moderation.policy import Verdict


@dataclass(frozen=True)
class TencentSettings:
    """
    How to reach TMS.  C{endpoint} is a host[:port], or a URL whose
    C{http://} prefix selects plain HTTP (for tests and private gateways).
    C{proxy} is the egress proxy URL to reach it through (L{None}: direct).
    """

    secret_id: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str = "ap-singapore"
    endpoint: str = "tms.tencentcloudapi.com"
    biztype: str | None = None
    timeout: float = 5.0
    proxy: str | None = field(default=None, repr=False)


def split_endpoint(endpoint: str) -> tuple[str, str]:
    """
    Return C{(protocol, host[:port])} for an endpoint setting: an
    C{http://} prefix selects C{"http"}, anything else C{"https"}.
    """
    for scheme in ("http", "https"):
        prefix = scheme + "://"
        if endpoint.lower().startswith(prefix):
            return scheme, endpoint[len(prefix) :].rstrip("/")
    return "https", endpoint.rstrip("/")


class TencentBackend:
    """
    Ask TMS for a C{Suggestion} (C{Pass}/C{Review}/C{Block}) from a thread
    pool of C{threads} threads (the SDK blocks), each with its own client:
    a client holds a C{requests.Session}, which is not safe to share.
    """

    name = "tencent"

    def __init__(
        self, settings: TencentSettings, reactor: IReactorFromThreads, threads: int
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="tms")
        self._local = threading.local()

    def start(self) -> None:
        """Start the thread pool."""
        self._pool.start()

    def stop(self) -> Deferred[None]:
        """
        Stop the thread pool: fires once the calls in progress have ended
        (bounded by the SDK's request timeout).  The joining happens in the
        reactor's own thread pool, so the reactor keeps serving meanwhile.
        """
        reactor: Any = self._reactor
        return deferToThreadPool(reactor, reactor.getThreadPool(), self._pool.stop)

    def check(self, text: str, upstream_key: str) -> Deferred[Verdict]:
        """Moderate C{text} in a pool thread; errback on any SDK error."""
        return deferToThreadPool(self._reactor, self._pool, self._moderate, text)

    def _moderate(self, text: str) -> Verdict:
        # Runs in a pool thread.
        from tencentcloud.tms.v20201229 import models

        request = models.TextModerationRequest()
        # A lone surrogate (a cut emoji, escaped in the JSON) has no UTF-8
        # form: it is judged as the replacement character.
        content = text.encode("utf-8", "replace")
        request.Content = base64.b64encode(content).decode("ascii")
        if self._settings.biztype:
            request.BizType = self._settings.biztype
        response = self._client().TextModeration(request)
        suggestion = response.Suggestion
        try:
            return Verdict(suggestion)
        except ValueError:
            raise BackendError(f"unknown TMS suggestion {suggestion!r}") from None

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = _make_client(self._settings)
        return client


def _make_client(settings: TencentSettings) -> Any:
    from tencentcloud.common.credential import Credential
    from tencentcloud.common.profile.client_profile import ClientProfile
    from tencentcloud.common.profile.http_profile import HttpProfile
    from tencentcloud.tms.v20201229.tms_client import TmsClient

    protocol, endpoint = split_endpoint(settings.endpoint)
    http = HttpProfile(
        protocol=protocol,
        endpoint=endpoint,
        reqTimeout=settings.timeout,
        proxy=settings.proxy,
    )
    client = TmsClient(
        Credential(settings.secret_id, settings.secret_key),
        settings.region,
        ClientProfile(httpProfile=http),
    )
    # Without a proxy, the SDK reads HTTPS_PROXY/HTTP_PROXY itself (its
    # NO_PROXY test is a substring match), and requests reads them again
    # (ALL_PROXY too): the proxy's own choice, made once with EGRESS_PROXY
    # and NO_PROXY, is the only one.  (The attributes are those of
    # tencentcloud-sdk-python-common's ProxyConnection, as of 3.1.195.)
    connection = client.request.conn
    connection._session.trust_env = False
    proxy = settings.proxy
    connection.proxy = {"http": proxy, "https": proxy} if proxy else None
    return client
