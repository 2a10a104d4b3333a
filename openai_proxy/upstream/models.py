"""
C{GET /v1/models} across upstreams: each one asked at once, its list
narrowed to the models it serves, and the lists joined.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import treq
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from openai_proxy.upstream.client import RelayClient

_log = Logger()


@dataclass(frozen=True)
class ModelSource:
    """One upstream to ask for its models, and which of them it serves."""

    name: str
    client: RelayClient
    url: bytes
    headers: Headers
    #: L{None}: every model it lists.
    serves: Callable[[str], bool] | None = None


async def list_models(
    sources: Sequence[ModelSource], timeout: float, reactor: IReactorTime
) -> list[dict[str, Any]]:
    """
    The union of what each source lists (its C{data}), each narrowed to the
    models it serves; a model listed by several sources appears once (the
    first source's entry).  A source that fails, is slow past C{timeout}
    seconds or answers anything but a list is left out and logged.
    """
    asked: list[Deferred[list[Any]]] = [
        Deferred.fromCoroutine(_ask(source, timeout, reactor)) for source in sources
    ]
    answers = await DeferredList(asked, consumeErrors=True)
    seen: set[str] = set()
    models: list[dict[str, Any]] = []
    for source, (ok, result) in zip(sources, answers, strict=True):
        if not ok:
            failure: Failure = result  # type: ignore[assignment]
            _log.warn(
                "upstream {name} left out of /v1/models: {why}",
                name=source.name,
                why=failure.getErrorMessage(),
            )
            continue
        for entry in result:
            model = entry.get("id") if isinstance(entry, dict) else None
            if not isinstance(model, str) or model in seen:
                continue
            if source.serves is None or source.serves(model):
                seen.add(model)
                models.append(entry)
    return models


async def _ask(source: ModelSource, timeout: float, reactor: IReactorTime) -> list[Any]:
    response = await source.client.relay(
        b"GET", source.url, source.headers, None, timeout
    )
    # The whole answer within the same time as its head: a list is small.
    body = await treq.content(response).addTimeout(timeout, reactor)
    if response.code != 200:
        raise ValueError(f"it answered {response.code}")
    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError):
        data = None
    if not isinstance(data, list):
        raise ValueError("its answer is not a list of models")
    return data
