"""
Several processes serving the same listening socket(s): one daemon uses
every core with no balancer in front.

The main process (worker 0) binds each C{tcp:} listen description itself,
serves on it, and starts C{workers - 1} child processes.  Each child gets
the listening sockets as inherited file descriptors and the plugin's parsed
options over a pipe, runs the plugin's C{makeService} again (so it builds
exactly the same application), and there L{listen_and_fork} adopts the
inherited sockets (C{IReactorSocket.adoptStreamPort}) instead of binding.
The kernel hands each new connection to whichever process accepts first.

Lifecycle:
 - a child that exits is started again, after a back-off that doubles from
   0.1 s up to 30 s (reset once a child has run for 10 s);
 - stopping the main service (C{SIGTERM} to twistd) stops listening, sends
   C{SIGTERM} to every child, and waits for them (their own services drain
   in-flight requests), killing any still alive after C{grace} seconds;
 - a child whose parent dies stops too: the pipe it reads its settings from
   reaches end-of-file, and on Linux it also gets C{SIGTERM}
   (C{PR_SET_PDEATHSIG});
 - L{WorkersService.signal_children} passes a signal on (the application
   does so with C{SIGHUP}, so one C{kill -HUP} re-reads the keys file in
   every process); a child is started with C{SIGHUP} blocked, so one that
   comes before its application handles it waits instead of killing it.

Only plain C{tcp:} descriptions can be shared; asking for more than one
worker with any other raises L{ConfigError}.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from twisted.application.service import IService, MultiService, Service
from twisted.application.strports import service as strports_service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReadDescriptor,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny
from zope.interface import implementer

from openai_proxy.config import check_listen

_log = Logger()

#: The setting's name in messages, as users write it.
#: The child's command: nothing on the command line, everything on its stdin.
CHILD_ARGV = ("-c", "from openai_proxy.ops.workers import child_main; child_main()")
#: The first inherited listening socket's descriptor in a child.
_FIRST_FD = 3
_MIN_BACKOFF = 0.1
_MAX_BACKOFF = 30.0
# A child that lived this long is healthy: the next restart is immediate-ish.
_HEALTHY_RUN = 10.0
_PR_SET_PDEATHSIG = 1

# Set in a child by child_main: the inherited sockets, (fd, address family).
_inherited: tuple[tuple[int, int], ...] | None = None


def is_worker() -> bool:
    """
    True in a child process started by L{listen_and_fork}.  A C{makeService}
    that binds anything besides the shared listen descriptions (a metrics
    port, say) must skip that when this is true: the main process has it.
    """
    return _inherited is not None


def listen_and_fork(
    listen: Sequence[str],
    site: IProtocolFactory,
    workers: int,
    reactor: Any,
    options: Mapping[str, Any],
    *,
    service_maker: str = "openai_proxy.tap.makeService",
    grace: float = 60.0,
    on_child_exit: Callable[[int], None] | None = None,
) -> IService:
    """
    Return the service that serves C{site} on every description in
    C{listen}, from C{workers} processes.

    With C{workers == 1} this is what C{strports.service} gives for each
    description (with the default backlog below).  With more, every description must be a plain C{tcp:}
    one: the service binds them when started (as twistd's privileged start)
    and starts C{workers - 1} children, each of which unpickles C{options}
    (a plain copy of the plugin's parsed options: they must pickle) and calls
    C{service_maker(options)} (a dotted name), whose own call to this
    function then adopts the inherited sockets.  In a child this function
    ignores C{workers} and returns the adopting service.

    @param grace: seconds to wait for children to finish draining on stop
        before killing them.
    A C{tcp:}/C{tcp6:} description that sets no C{backlog=} gets
    L{DEFAULT_BACKLOG} (see L{with_default_backlog}).

    @raise ConfigError: when C{workers > 1} and a description is not C{tcp:}.
    """
    listen = [with_default_backlog(d) for d in listen]
    if _inherited is not None:
        return _AdoptedPorts(_inherited, site, reactor)
    if workers <= 1:
        top = MultiService()
        for description in listen:
            strports_service(description, site, reactor=reactor).setServiceParent(top)
        return top
    check_listen(listen, workers)
    tcp = [endpoints.serverFromString(reactor, d) for d in listen]
    parent = getattr(options, "parent", None)
    spec = _Spec(
        service_maker=service_maker,
        options=dict(options),
        logger=_dotted(parent.get("logger")) if parent is not None else None,
        parent_pid=os.getpid(),
        families=(),
    )
    return WorkersService(
        tcp, site, workers - 1, reactor, spec, grace=grace, on_child_exit=on_child_exit
    )


#: The listen backlog of C{tcp:} descriptions that set none, like nginx's
#: 511 or more: Twisted's default of 50 overflows in a burst of 100 new
#: connections, and each connection that overflows waits about a second for
#: its SYN to be retransmitted.  The kernel caps it at C{net.core.somaxconn}.
DEFAULT_BACKLOG = 1024


def with_default_backlog(description: str) -> str:
    """
    C{description} with C{:backlog=}L{DEFAULT_BACKLOG} added when it is a
    C{tcp:} or C{tcp6:} description that does not set C{backlog=} itself;
    any other description unchanged.
    """
    # Endpoint descriptions are colon-separated, with backslash escapes.
    parts = re.split(r"(?<!\\):", description)
    if parts[0].strip().lower() not in ("tcp", "tcp6"):
        return description
    if any(p.strip().lower().startswith("backlog=") for p in parts[1:]):
        return description
    return f"{description}:backlog={DEFAULT_BACKLOG}"


def _dotted(logger: object) -> str | None:
    # twistd turns --logger into the factory itself by the time services are
    # made; a child needs its name to import it again.
    if logger is None or isinstance(logger, str):
        return logger
    return f"{getattr(logger, '__module__', '')}.{getattr(logger, '__qualname__', '')}"


@dataclass(frozen=True)
class _Spec:
    """What a child needs: sent pickled, length-prefixed, on its stdin."""

    service_maker: str
    options: dict[str, Any]
    logger: str | None
    parent_pid: int
    families: tuple[int, ...]


class _AdoptedPorts(Service):
    """In a child: listen on the inherited sockets."""

    def __init__(
        self, fds: Sequence[tuple[int, int]], site: IProtocolFactory, reactor: Any
    ):
        self._fds = tuple(fds)
        self._site = site
        self._reactor = reactor
        self._ports: list[IListeningPort] = []
        self._sockets: list[list[socket.socket]] = []
        self._families: tuple[int, ...] = ()

    def startService(self) -> None:
        super().startService()
        for fd, family in self._fds:
            self._ports.append(self._reactor.adoptStreamPort(fd, family, self._site))
            # adoptStreamPort works on a duplicate; the original is ours to close.
            os.close(fd)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ports, self._ports = self._ports, []
        return DeferredList([maybeDeferred(p.stopListening) for p in ports])


class WorkersService(Service):
    """
    In the main process: bind the shared sockets, serve on them, and keep
    C{children} child processes serving on them too (see the module
    docstring for restarts and stopping).

    C{pids} are the running children's process ids.
    """

    def __init__(
        self,
        endpoints: Sequence[
            endpoints.TCP4ServerEndpoint | endpoints.TCP6ServerEndpoint
        ],
        site: IProtocolFactory,
        children: int,
        reactor: Any,
        spec: _Spec,
        *,
        grace: float = 60.0,
        on_child_exit: Callable[[int], None] | None = None,
    ) -> None:
        self._endpoints = tuple(endpoints)
        self._on_child_exit = on_child_exit
        self._site = site
        self._children = children
        self._reactor = reactor
        self._spec = spec
        self._grace = grace
        self._ports: list[IListeningPort] = []
        self._procs: dict[int, _Child] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._backoff = [_MIN_BACKOFF] * children
        self._stopped: Deferred[None] | None = None
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self._procs.values() if c.pid is not None]

    def privilegedStartService(self) -> None:
        # Bound here, like strports services: twistd may drop privileges next.
        super().privilegedStartService()
        # One SO_REUSEPORT socket per worker and description, so the kernel
        # spreads new connections evenly.  (With a single shared socket,
        # whichever process wakes first accepts a whole burst: 20 wrk
        # connections all went to one process.)  The children's sockets stay
        # open here, so a restarted child takes over its predecessor's
        # queue and no connection waiting in it is lost.
        mine = [_reuseport_socket(e) for e in self._endpoints]
        # Port 0 means "any": the other workers bind the port the first got.
        bound = [int(sock.getsockname()[1]) for sock in mine]
        self._sockets = [
            [
                _reuseport_socket(e, p)
                for e, p in zip(self._endpoints, bound, strict=True)
            ]
            for _ in range(self._children)
        ]
        self._families = tuple(int(sock.family) for sock in mine)
        for sock in mine:
            port = self._reactor.adoptStreamPort(sock.fileno(), sock.family, self._site)
            self._ports.append(port)
            sock.close()  # adoptStreamPort listens on a duplicate

    def startService(self) -> None:
        if not self._ports:
            self.privilegedStartService()
        super().startService()
        families = self._families
        self._payload = _frame(
            pickle.dumps(
                _Spec(
                    self._spec.service_maker,
                    self._spec.options,
                    self._spec.logger,
                    os.getpid(),
                    families,
                )
            )
        )
        for index in range(self._children):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        child_fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2}
        for i, sock in enumerate(self._sockets[index]):
            child_fds[_FIRST_FD + i] = sock.fileno()
        child = _Child(self, index, time.monotonic())
        # The child is born with SIGHUP blocked (a signal mask survives
        # exec; an ignored signal would not, Twisted resets it): a SIGHUP
        # passed on while it starts waits for its application's handler
        # instead of killing it.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            self._reactor.spawnProcess(
                child,
                sys.executable,
                [sys.executable, *CHILD_ARGV],
                env=dict(os.environ),
                childFDs=child_fds,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        # Kept open: end-of-file on it tells the child its parent is gone.
        child.transport.writeToChild(0, self._payload)  # type: ignore[union-attr]
        self._procs[index] = child
        _log.info("worker {index} started, pid {pid}", index=index + 1, pid=child.pid)

    def _ended(self, child: _Child, reason: Failure) -> None:
        if self._procs.get(child.index) is child:
            del self._procs[child.index]
        if self._on_child_exit is not None and child.pid is not None:
            self._on_child_exit(child.pid)
        if self._stopped is not None:
            if not self._procs:
                self._stopped.callback(None)
            return
        if not self.running:
            return
        lived = time.monotonic() - child.started
        if lived >= _HEALTHY_RUN:
            self._backoff[child.index] = _MIN_BACKOFF
        delay = self._backoff[child.index]
        self._backoff[child.index] = min(_MAX_BACKOFF, delay * 2)
        self.restarts += 1
        _log.warn(
            "worker {index} (pid {pid}) exited ({why}); restarting in {delay:.1f}s",
            index=child.index + 1,
            pid=child.pid,
            why=reason.getErrorMessage(),
            delay=delay,
        )
        self._restarts[child.index] = self._reactor.callLater(
            delay, self._spawn, child.index
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        ports, self._ports = self._ports, []
        for port in ports:
            port.stopListening()
        if not self._procs:
            self._close_sockets()
            return succeed(None)
        self._stopped = Deferred()
        self._stopped.addBoth(_then, self._close_sockets)
        for child in self._procs.values():
            child.signal("TERM")
        killer = self._reactor.callLater(self._grace, self._kill_all)
        self._stopped.addBoth(_cancel_then, killer)
        return self._stopped

    def signal_children(self, name: str) -> None:
        """Send the signal C{name} (C{"HUP"}, say) to every running child."""
        for child in self._procs.values():
            child.signal(name)

    def _close_sockets(self) -> None:
        for socks in self._sockets:
            for sock in socks:
                sock.close()
        self._sockets = []

    def _kill_all(self) -> None:
        for child in self._procs.values():
            _log.warn(
                "worker pid {pid} still running after grace: killing", pid=child.pid
            )
            child.signal("KILL")


def _cancel_then(result: object, call: IDelayedCall) -> object:
    if call.active():
        call.cancel()
    return result


def _then(result: object, call: Callable[[], None]) -> object:
    call()
    return result


def _reuseport_socket(endpoint: Any, port: int | None = None) -> socket.socket:
    """
    A listening, non-blocking socket with SO_REUSEPORT for a TCP endpoint
    (its port, or C{port}), as C{listenTCP} would make it otherwise.
    """
    # The endpoint classes keep their settings in private attributes; the
    # description was parsed by Twisted, so they are the ones it would use.
    v6 = isinstance(endpoint, endpoints.TCP6ServerEndpoint)
    interface = endpoint._interface or ("::" if v6 else "0.0.0.0")
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, endpoint._port if port is None else port))
        sock.listen(endpoint._backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise CannotListenError(interface, endpoint._port, e) from e
    return sock


class _Child(ProcessProtocol):
    def __init__(self, service: WorkersService, index: int, started: float) -> None:
        self.service = service
        self.index = index
        self.started = started
        self.pid: int | None = None

    def makeConnection(self, transport: Any) -> None:
        self.pid = transport.pid
        super().makeConnection(transport)

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)  # type: ignore[union-attr]
        except Exception:
            pass  # already gone: processEnded is on its way

    def processEnded(self, reason: Failure) -> None:
        self.service._ended(self, reason)


def _frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            raise SystemExit(
                "openai-proxy worker: parent went away before sending settings"
            )
        data += more
    return data


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the stdin watch still stops us
    if os.getppid() != parent_pid:
        # The parent died before prctl took effect.
        raise SystemExit(0)


@implementer(IReadDescriptor)
class _ParentWatch:
    """Reads the settings pipe; end-of-file means the parent is gone."""

    def __init__(self, on_gone: Callable[[], None]) -> None:
        self._on_gone = on_gone

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "parent-watch"

    def doRead(self) -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        if not data:
            self._on_gone()

    def connectionLost(self, reason: Failure) -> None:
        pass


def child_main() -> None:
    """
    A child's entry point (see L{CHILD_ARGV}): read the settings from
    stdin, build the application with the plugin's C{makeService}, adopt
    the inherited sockets, and run until C{SIGTERM} or the parent's death.
    """
    global _inherited
    # The parent passes SIGHUP on (to re-read the keys file): until the
    # application handles it (and unblocks it), one must not end this
    # worker.  The parent spawned it blocked already; this keeps it so.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    size = struct.unpack(">I", _read_exactly(0, 4))[0]
    spec: _Spec = pickle.loads(_read_exactly(0, size))
    _die_with_parent(spec.parent_pid)
    _inherited = tuple((_FIRST_FD + i, f) for i, f in enumerate(spec.families))

    from twisted.internet import reactor

    observer = (
        namedAny(spec.logger)() if spec.logger else textFileLogObserver(sys.stdout)
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    top: IService = namedAny(spec.service_maker)(spec.options)
    watch = _ParentWatch(_stop_reactor(reactor))
    os.set_blocking(0, False)
    reactor.addReader(cast(IReadDescriptor, watch))
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    _log.info("worker pid {pid} serving", pid=os.getpid())
    reactor.run()


def _stop_reactor(reactor: Any) -> Callable[[], None]:
    def stop() -> None:
        _log.info("parent gone: stopping")
        for reader in list(reactor.getReaders()):
            if isinstance(reader, _ParentWatch):
                reactor.removeReader(reader)
        reactor.stop()

    return stop
