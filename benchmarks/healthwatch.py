"""
``python -m benchmarks.healthwatch PORT``: asks ``GET /healthz`` on
127.0.0.1:PORT every 20 ms, with blocking sockets, until SIGTERM, and prints
each round trip's latency in seconds, one per line (a failed probe prints
``error``).

It runs as a process of its own so that what it measures is the proxy's
stall, not that of the benchmark process, whose event loop is busy moving
hundreds of megabytes for the hostile clients and the fake upstream.
"""

from __future__ import annotations

import signal
import socket
import sys
import time

_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
_running = True


def _stop(signum: int, frame: object) -> None:
    global _running
    _running = False


def probe(port: int, timeout: float = 30.0) -> float:
    """One C{/healthz} round trip, in seconds (to the close)."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(_REQUEST)
        while sock.recv(65536):
            pass
    return time.perf_counter() - started


def main(argv: list[str]) -> int:
    port = int(argv[1])
    signal.signal(signal.SIGTERM, _stop)
    while _running:
        try:
            line = f"{probe(port):.6f}"
        except OSError:
            line = "error"
        print(line, flush=True)
        time.sleep(0.02)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
