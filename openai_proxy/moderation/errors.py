"""The error a moderated request is answered with."""

from __future__ import annotations

from dataclasses import dataclass

from openai_proxy.http.errors import ProxyError


@dataclass(frozen=True)
class RequestRefused(ProxyError):
    """
    Moderation refuses the request before (or instead of) sending it
    upstream; the relay answers it like any L{ProxyError}.
    """
