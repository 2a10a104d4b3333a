"""
WebSocket sessions (the Realtime API, Responses over WebSocket): the
handshake relayed to the upstream after the same checks as HTTP, then
messages relayed both ways with backpressure, through a chain of
L{filters.SessionFilter}s that govern what crosses (limits and usage,
moderation of what the model says).

May import: L{openai_proxy.http}, L{openai_proxy.keys} (the key check,
accounting and allow-lists a session is admitted with),
L{openai_proxy.upstream.client}, L{openai_proxy.moderation},
L{openai_proxy.telemetry}, L{openai_proxy.config}.  Never the HTTP
forwarding path (C{forward}, C{respond}), which hands sessions over to it.
"""
