"""
Load and latency benchmarks for the proxy: ``python -m benchmarks --help``.

The harness starts its own fake upstream (L{benchmarks.upstream}, a separate
process) and the proxy the way users run it (``twistd -n --pidfile=
openai-proxy``), drives load with ``wrk`` and small socket clients, and
writes ``benchmarks/results/latest.json``.  Everything is on 127.0.0.1.
"""
