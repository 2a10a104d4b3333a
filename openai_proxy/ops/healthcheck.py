"""
The container's health check: C{python -m openai_proxy.ops.healthcheck}.

It asks C{/healthz} where C{PORT} says the proxy listens (a number, or an
endpoint description such as C{tcp:9010:interface=0.0.0.0},
C{ssl:443:privateKey=...} or C{unix:/run/proxy.sock}; unset means 9000) and
exits 0 when the answer is 200, else 1 with one line on stderr saying why.
A wildcard interface is reached on loopback.  Standard library only, so that
it starts fast and never touches the proxy's settings beyond C{PORT}.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass

#: Seconds allowed for connecting and for the answer.
TIMEOUT = 2.0


@dataclass(frozen=True)
class Target:
    """Where to ask: C{scheme} is C{http}, C{https} or C{unix}."""

    scheme: str
    host: str
    port: int = 0


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint description into its positional and keyword arguments,
    as Twisted does: C{:} separates them, a backslash escapes the next
    character, and C{key=value} is a keyword.  The kind (C{tcp}, ...) is the
    first positional argument.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    current: list[str] = []
    key: str | None = None  # set at the first unescaped "=" of an argument
    escaped = False
    for char in description + ":":
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "=" and key is None:
            key, current = "".join(current), []
        elif char == ":":
            if key is None:
                args.append("".join(current))
            else:
                kwargs[key] = "".join(current)
            current, key = [], None
        else:
            current.append(char)
    return args, kwargs


def target(port_setting: str | None) -> Target:
    """
    The L{Target} for the C{PORT} setting C{port_setting}.

    @raise ValueError: for a description whose kind cannot be asked here.
    """
    value = (port_setting or "").strip() or "9000"
    if value.isdigit():
        return Target("http", "127.0.0.1", int(value))
    args, kwargs = split_description(value)
    kind = args[0].strip().lower()
    if kind == "unix":
        path = kwargs.get("address") or (args[1] if len(args) > 1 else "")
        if not path:
            raise ValueError(f"no socket path in {value!r}")
        return Target("unix", path)
    if kind not in ("tcp", "tcp6", "ssl"):
        raise ValueError(f"cannot check a {kind!r} listen description")
    number = kwargs.get("port") or (args[1] if len(args) > 1 else "")
    if not number.isdigit():
        raise ValueError(f"no port number in {value!r}")
    interface = kwargs.get("interface", "")
    if interface in ("", "0.0.0.0"):
        interface = "::1" if kind == "tcp6" else "127.0.0.1"
    elif interface == "::":
        interface = "::1"
    return Target("https" if kind == "ssl" else "http", interface, int(number))


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _connection(where: Target, timeout: float) -> http.client.HTTPConnection:
    if where.scheme == "unix":
        return _UnixConnection(where.host, timeout)
    if where.scheme == "https":
        # Our own certificate, asked for on loopback: its name will not be
        # "127.0.0.1", and whether it is trusted is not this check's concern.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(
            where.host, where.port, timeout=timeout, context=context
        )
    return http.client.HTTPConnection(where.host, where.port, timeout=timeout)


def check(where: Target, timeout: float = TIMEOUT) -> str | None:
    """Ask C{/healthz} at C{where}: L{None} when it answers 200, else why not."""
    connection = _connection(where, timeout)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        body = response.read(200)
    except (OSError, http.client.HTTPException) as e:
        return f"{where.scheme}://{where.host}:{where.port}/healthz: {e}"
    finally:
        connection.close()
    if response.status != 200:
        return f"/healthz answered {response.status}: {body.decode('utf-8', 'replace')}"
    return None


def main(env: Mapping[str, str] | None = None) -> int:
    """Run the check against C{env} (default C{os.environ}); the exit status."""
    try:
        where = target((os.environ if env is None else env).get("PORT"))
    except ValueError as e:
        print(f"healthcheck: PORT: {e}", file=sys.stderr)
        return 1
    problem = check(where)
    if problem is not None:
        print(f"healthcheck: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
