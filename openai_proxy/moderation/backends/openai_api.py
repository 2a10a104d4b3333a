"""The C{openai} backend: the upstream's own C{/v1/moderations} endpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed

from openai_proxy.moderation.backends import BackendError
from openai_proxy.moderation.policy import Verdict

#: Returns a treq C{HTTPClient} (a fresh one, or one whose cookie jar keeps
#: nothing, so no user's cookies reach another) and the upstream base URL,
#: to which C{/v1/moderations} is appended (e.g. C{"https://api.openai.com"}).
OpenAIClientFactory = Callable[[], tuple[Any, str]]


class OpenAIBackend:
    """
    POST C{{"input": text}} to the upstream's moderation endpoint with the
    request's own upstream key; a C{flagged} result is L{Verdict.BLOCK}.
    """

    name = "openai"

    def __init__(self, client_factory: OpenAIClientFactory) -> None:
        self._factory = client_factory

    def start(self) -> None:
        """Nothing to acquire: the caller owns the HTTP client."""

    def stop(self) -> Deferred[None]:
        """Nothing to release."""
        return succeed(None)

    def check(self, text: str, upstream_key: str) -> Deferred[Verdict]:
        """Errbacks on a network error, a non-200 answer or a bad body."""
        client, base = self._factory()
        d: Deferred[Any] = client.post(
            base.rstrip("/") + "/v1/moderations",
            data=json.dumps({"input": text}).encode("utf-8"),
            headers={
                b"Authorization": b"Bearer " + upstream_key.encode("latin-1"),
                b"Content-Type": b"application/json",
            },
            allow_redirects=False,
        )
        d.addCallback(_read)
        return d


def _read(response: Any) -> Deferred[Verdict]:
    d: Deferred[bytes] = response.content()
    if response.code != 200:
        # Read (and drop) the body so the connection can be reused; the
        # body is not logged: it may echo what the user wrote.
        def fail(_: bytes) -> Verdict:
            raise BackendError(f"moderations endpoint answered {response.code}")

        return d.addCallback(fail)
    return d.addCallback(_verdict)


def _verdict(body: bytes) -> Verdict:
    try:
        results = json.loads(body)["results"]
        flagged = any(result["flagged"] for result in results)
    except (ValueError, KeyError, TypeError) as e:
        raise BackendError(f"unexpected moderations answer: {e!r}") from None
    return Verdict.BLOCK if flagged else Verdict.PASS
