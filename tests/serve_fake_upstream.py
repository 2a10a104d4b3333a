"""
Run L{FakeOpenAI} on a loopback port until SIGTERM, and print its base URL
on the first line of stdout.  For the deployment proofs under deploy/, which
run the proxy from an image or a cloud-function package in another process:

    python -m tests.serve_fake_upstream
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.web.server import Site

from tests.fake_upstream import FakeOpenAI


def main() -> None:
    port = reactor.listenTCP(0, Site(FakeOpenAI()), interface="127.0.0.1")
    print(f"http://127.0.0.1:{port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
