"""Child processes (fake upstream, proxy), and what /proc says about them."""

from __future__ import annotations

import atexit
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_children: list[subprocess.Popen[bytes]] = []
#: The key clients send, and the one the proxy sends upstream.
PROXY_KEY = "pk-bench-0123456789"
OPENAI_KEY = "sk-bench-0123456789abcdefghij"


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (inherited by children) toward C{wanted}; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (max(wanted, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            continue
    return soft


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_kb(pid: int) -> int:
    """Resident set size in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children_of(pid: int) -> list[int]:
    """Live child processes of C{pid}."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _spawn(
    argv: list[str], env: dict[str, str], log: Path | None
) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=ROOT,
        stdout=out if log else subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # killed as a group, and not by the terminal's ^C
    )
    _children.append(proc)
    return proc


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start another program (redis-server, say), its output to C{log}."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    return _spawn(argv, _env(), log)


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it after C{grace} seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    if proc in _children:
        _children.remove(proc)


@atexit.register
def stop_all() -> None:
    """Kill every child still running (at exit, or on ^C)."""
    for proc in list(_children):
        stop(proc, grace=3.0)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def start_upstream(
    tms_delay: float = 0.02, tls: tuple[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start the fake upstream (https with C{tls}: cert, key); return it and its port."""
    argv = [sys.executable, "-m", "benchmarks.upstream", "--port", "0"]
    argv += ["--tms-delay", str(tms_delay)]
    if tls is not None:
        argv += ["--tls-cert", tls[0], "--tls-key", tls[1]]
    proc = _spawn(argv, _env(), None)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("READY"):
        raise RuntimeError(f"fake upstream did not start: {line!r}")
    return proc, int(line.split()[1])


def twistd() -> str:
    local = Path(sys.executable).parent / "twistd"
    found = str(local) if local.exists() else shutil.which("twistd")
    if not found:
        raise SystemExit("twistd not found: pip install . (or Twisted) first")
    return found


@dataclass
class Proxy:
    """A running proxy: its process (and workers), port and log file."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    workers: int
    pids: list[int] = field(default_factory=list)

    def cpu(self) -> float:
        """CPU seconds of every proxy process."""
        return sum(cpu_seconds(p) for p in self.pids)

    def rss(self) -> int:
        """Total VmRSS of every proxy process, KiB."""
        return sum(rss_kb(p) for p in self.pids)


def start_proxy(
    upstream_port: int,
    workers: int = 1,
    upstream: str | None = None,
    *,
    wrapper: tuple[str, ...] = (),
    start_limit: float = 30.0,
    **env: str,
) -> Proxy:
    """
    Start C{twistd -n --pidfile= openai-proxy} against the fake upstream (at
    C{upstream}, by default plain http on C{upstream_port}) and wait until it
    (and every worker) serves.  C{wrapper}: a command to run it under
    (valgrind, say), which may need more than C{start_limit} seconds to
    start it.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "proxy.log"
    port = free_port()
    settings = {
        "UPSTREAM": upstream or f"http://127.0.0.1:{upstream_port}",
        "PORT": f"tcp:{port}:interface=127.0.0.1:backlog=4096",
        "PROXY_KEY": PROXY_KEY,
        "OPENAI_KEY": OPENAI_KEY,
        "TIMEOUT": "60000",
        "WORKERS": str(workers),
    }
    settings.update(env)
    argv = [*wrapper, twistd(), "-n", "--pidfile="]
    argv += ["openai-proxy", "--workers", str(workers)]
    with open(log, "ab") as f:
        f.write(f"\n==== {' '.join(argv)}\n".encode())
    proc = _spawn(argv, _env(**settings), log)
    proxy = Proxy(proc, port, log, workers)
    deadline = time.monotonic() + start_limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode}; see {log}")
        if _healthy(port) and len(children_of(proc.pid)) >= workers - 1:
            proxy.pids = [proc.pid, *children_of(proc.pid)]
            return proxy
        time.sleep(0.05)
    raise RuntimeError(f"proxy did not start in {start_limit:.0f} s; see {log}")


#: Loaded by node before the Node original's app.js: its upstream calls go
#: to SEED_UPSTREAM instead of the hard-coded https://api.openai.com.
SEED_PRELOAD = Path(__file__).with_name("seed_upstream.js")


def start_seed(app_js: str, upstream_port: int) -> Proxy:
    """
    Start the Node original (C{node app.js}, its dependencies installed next
    to it) against the fake upstream, with a server-held key and no proxy
    key, and wait until it serves.
    """
    node = shutil.which("node")
    if not node:
        raise SystemExit("--seed needs node on the PATH")
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "seed.log"
    port = free_port()
    env = dict(os.environ)
    env.pop("PROXY_KEY", None)
    env.update(
        PORT=str(port),
        OPENAI_KEY=OPENAI_KEY,
        TIMEOUT="60000",
        SEED_UPSTREAM=f"http://127.0.0.1:{upstream_port}",
    )
    argv = [node, "-r", str(SEED_PRELOAD), os.path.abspath(app_js)]
    with open(log, "ab") as f:
        f.write(f"\n==== {' '.join(argv)}\n".encode())
    out = open(log, "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=os.path.dirname(os.path.abspath(app_js)),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _children.append(proc)
    seed = Proxy(proc, port, log, 1, [proc.pid])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"seed exited with {proc.returncode}; see {log}")
        if _listening(port):
            return seed
        time.sleep(0.05)
    raise RuntimeError(f"seed did not start in 30 s; see {log}")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(100).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
