"""
The process's life: how the proxy starts, runs in several processes, stops
and tells an orchestrator that it is alive.

Worker processes sharing the listening ports (C{workers}), the start-up
line (C{startup}), draining in-flight requests on SIGTERM and the readiness
flag (C{drain}), and the container's health probe (C{healthcheck}), run as
C{python -m openai_proxy.ops.healthcheck} without starting a proxy.

May import: L{openai_proxy.config}, L{openai_proxy.telemetry}.  Never the
request path: requests reach this part only as the Twisted objects they are.
"""
