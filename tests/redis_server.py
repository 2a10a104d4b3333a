"""A real redis-server for one test: loopback, a free port, no persistence."""

from __future__ import annotations

import datetime
import os
import shutil
import socket
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

REDIS_SERVER = shutil.which("redis-server")
SKIP = (
    None
    if REDIS_SERVER
    else "redis-server is not installed (apt-get install redis-server)"
)


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: a CA, and a certificate it signed for localhost, with its key."""

    ca: str
    cert: str
    key: str


def make_tls_files(directory: str) -> TLSFiles:
    """Write a fresh CA and a localhost certificate into C{directory}."""
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(
        subject: str, key: Any, issuer: str, signer: Any, ca: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
        )
        if not ca:
            names = [x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test CA", ca_key, "test CA", ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate("localhost", key, "test CA", ca_key, False)
    files = TLSFiles(
        *(os.path.join(directory, n) for n in ("ca.pem", "cert.pem", "key.pem"))
    )
    for path, data in (
        (files.ca, ca.public_bytes(serialization.Encoding.PEM)),
        (files.cert, cert.public_bytes(serialization.Encoding.PEM)),
        (
            files.key,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
        ),
    ):
        with open(path, "wb") as f:
            f.write(data)
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Watch(ProcessProtocol):
    """
    A server process's output: C{ready} fires once it says C{marker} (on
    stdout or stderr), C{ended} when it has exited.
    """

    def __init__(self, marker: bytes = b"Ready to accept connections") -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._marker = marker
        self._seen = b""

    def outReceived(self, data: bytes) -> None:
        self._seen += data
        if not self.ready.called and self._marker in self._seen:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(self._seen.decode(errors="replace")))
        self.ended.callback(None)


class RedisServer:
    """C{await RedisServer.start(test)}: running until the test's cleanup."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._watch = Watch()
        self._process: Any = None
        self._args: list[str] = []

    @classmethod
    async def start(
        cls, test: Any, *options: str, tls: TLSFiles | None = None
    ) -> RedisServer:
        """
        Start one, with extra command-line C{options} (C{--requirepass X});
        with C{tls}, it serves TLS only (C{rediss://localhost:PORT/0}).
        """
        server = cls()
        if tls is not None:
            server.url = f"rediss://localhost:{server.port}/0"
            options = (
                *("--port", "0", "--tls-port", str(server.port)),
                *("--tls-cert-file", tls.cert, "--tls-key-file", tls.key),
                *("--tls-ca-cert-file", tls.ca, "--tls-auth-clients", "no"),
                *options,
            )
        assert REDIS_SERVER is not None
        server._args = [
            REDIS_SERVER,
            "--save",
            "",
            "--appendonly",
            "no",
            "--port",
            str(server.port),
            "--bind",
            "127.0.0.1",
            *options,
        ]
        server._spawn()
        test.addCleanup(server.stop)
        await server._watch.ready
        return server

    def _spawn(self) -> None:
        self._watch = Watch()
        self._process = reactor.spawnProcess(
            self._watch, self._args[0], self._args, env=None
        )

    async def restart(self) -> None:
        """
        Stop the server and start it again on the same port (with its data
        only if started with persistence, e.g. C{--appendonly yes}).
        """
        await self.stop()
        self._spawn()
        await self._watch.ready

    def stop(self) -> Deferred[None]:
        """Stop the server (if still running); fires once it has exited."""
        if self._process is not None and self._process.pid is not None:
            self._process.signalProcess("TERM")
        return self._watch.ended if not self._watch.ended.called else _done()


def _done() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    d.callback(None)
    return d
