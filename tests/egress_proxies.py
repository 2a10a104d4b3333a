"""
Real egress proxies for one test, on free loopback ports: Debian's
C{tinyproxy} (HTTP CONNECT, Basic auth) and C{danted} (SOCKS5), started
from config files written to a temporary directory, as Redis is started by
L{tests.redis_server}.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest

from tests.redis_server import Watch, free_port

_SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
TINYPROXY = shutil.which("tinyproxy", path=_SBIN)
DANTED = shutil.which("danted", path=_SBIN)
SKIP_TINYPROXY = (
    None if TINYPROXY else "tinyproxy is not installed (apt-get install tinyproxy)"
)
SKIP_DANTE = (
    None if DANTED else "danted is not installed (apt-get install dante-server)"
)


class _Daemon:
    """A server process started by a test and stopped at its cleanup."""

    def __init__(self, args: list[str], marker: bytes) -> None:
        self.watch = Watch(marker)
        self._process: Any = reactor.spawnProcess(self.watch, args[0], args, env=None)

    def stop(self) -> Deferred[None]:
        if not self.watch.ended.called and self._process.pid is not None:
            self._process.signalProcess("TERM")
        return self.watch.ended

    @property
    def output(self) -> str:
        """What it has said so far (its log)."""
        return self.watch._seen.decode("utf-8", "replace")


class TinyProxy:
    """
    C{await TinyProxy.start(test, ...)}: an HTTP proxy on 127.0.0.1.
    C{url} is its URL with the credentials, C{address} without.
    """

    def __init__(self, port: int, auth: tuple[str, str] | None) -> None:
        self.port = port
        self.address = f"http://127.0.0.1:{port}"
        self.url = self.address
        if auth is not None:
            self.url = f"http://{auth[0]}:{auth[1]}@127.0.0.1:{port}"
        self.daemon: _Daemon | None = None

    @classmethod
    async def start(
        cls,
        test: Any,
        *,
        auth: tuple[str, str] | None = None,
        connect_ports: tuple[int, ...] = (),
    ) -> TinyProxy:
        """
        Start one; with C{auth}, it asks for that user and password; with
        C{connect_ports}, it refuses a CONNECT to any other port (with 403).
        """
        proxy = cls(free_port(), auth)
        directory = test.mktemp()
        os.makedirs(directory)
        lines = [
            f"Port {proxy.port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            "Allow 127.0.0.1",
            "MaxClients 50",
            "LogLevel Info",
            *(f"ConnectPort {p}" for p in connect_ports),
        ]
        if auth is not None:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        conf = os.path.join(directory, "tinyproxy.conf")
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        assert TINYPROXY is not None
        proxy.daemon = _Daemon([TINYPROXY, "-d", "-c", conf], b"Accepting connections")
        test.addCleanup(proxy.daemon.stop)
        await proxy.daemon.watch.ready
        return proxy


class Dante:
    """
    C{await Dante.start(test, ...)}: a SOCKS5 proxy (no authentication) on
    127.0.0.1; C{url(scheme)} is its URL.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.daemon: _Daemon | None = None

    def url(self, scheme: str = "socks5h") -> str:
        """Its URL with C{scheme} (C{socks5} or C{socks5h})."""
        return f"{scheme}://127.0.0.1:{self.port}"

    @classmethod
    async def start(
        cls, test: Any, *, blocked_port: int | None = None, usernames: bool = False
    ) -> Dante:
        """
        Start one; it refuses connections to C{blocked_port}, if given; with
        C{usernames}, it asks for a user and password (a system user's: see
        L{system_user}).
        """
        proxy = cls(free_port())
        directory = test.mktemp()
        os.makedirs(directory)
        lines = [
            "logoutput: stderr",
            f"internal: 127.0.0.1 port = {proxy.port}",
            "external: 127.0.0.1",
            f"socksmethod: {'username' if usernames else 'none'}",
            "clientmethod: none",
        ]
        if os.geteuid() == 0:
            lines += ["user.privileged: root", "user.notprivileged: nobody"]
        lines.append("client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }")
        if blocked_port is not None:
            lines.append(
                f"socks block {{ from: 0.0.0.0/0 to: 0.0.0.0/0 port = {blocked_port} }}"
            )
        lines.append("socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }")
        conf = os.path.join(directory, "danted.conf")
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        assert DANTED is not None
        proxy.daemon = _Daemon([DANTED, "-f", conf, "-N", "1"], b" running")
        test.addCleanup(proxy.daemon.stop)
        await proxy.daemon.watch.ready
        return proxy


def system_user(test: Any) -> tuple[str, str]:
    """
    A system user with a password, for dante's C{username} method (which
    checks the system's users), removed at C{test}'s cleanup.  Only as root.

    @raise SkipTest: when not root, or C{useradd} is missing or fails.
    """
    if os.geteuid() != 0 or not shutil.which("useradd", path=_SBIN):
        raise SkipTest(
            "dante's username method checks system users: creating one needs "
            "root and useradd"
        )
    name = f"egress{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    useradd = shutil.which("useradd", path=_SBIN)
    chpasswd = shutil.which("chpasswd", path=_SBIN)
    userdel = shutil.which("userdel", path=_SBIN)
    assert useradd and chpasswd and userdel
    made = subprocess.run(
        [useradd, "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
    )
    if made.returncode != 0:
        raise SkipTest(f"useradd failed: {made.stderr.decode(errors='replace')}")
    test.addCleanup(subprocess.run, [userdel, name], capture_output=True)
    subprocess.run(
        [chpasswd], input=f"{name}:{password}".encode(), check=True, capture_output=True
    )
    return name, password
