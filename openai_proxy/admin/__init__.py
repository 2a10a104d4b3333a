"""
What the proxy shows its operator beyond metrics: C{GET /usage}, the named
keys' usage as JSON for scripts and as an HTML page with charts drawn on
the server.

May import: L{openai_proxy.keys}, L{openai_proxy.http},
L{openai_proxy.upstream}, L{openai_proxy.telemetry}.  Never the top-level
path, which mounts it.
"""
