"""
Choosing the upstream by model: the upstreams of C{UPSTREAMS_FILE} in force,
each with its own pool of keys, the order a request tries them in, and the
re-read of the file on C{SIGHUP}.

The upstreams whose C{models} match a request's model are tried in file
order.  Among those with a C{weight}, the first one tried is drawn in
proportion to it, and takes the place of the first of them in that order:
so an unweighted upstream listed before them still comes first, and the
others follow as failover.
"""

from __future__ import annotations

import fnmatch
import random
import re
from collections.abc import Callable, Mapping, Sequence

from twisted.logger import Logger

from openai_proxy.upstream.channels import (
    Upstream,
    UpstreamsFileError,
    read_upstreams_file,
)
from openai_proxy.upstream.client import Upstreams
from openai_proxy.upstream.failover import KeyPool

_log = Logger()
#: Different model names remembered with the upstreams matching them.
_REMEMBERED = 4096
#: The longest model names (in all, per request) remembered.
_REMEMBERED_LENGTH = 256


class Channel:
    """
    One upstream as the proxy sends to it: its base URL as treq sends it,
    its C{Host} header, its pool of keys (benched apart from any other's),
    and how a key and its extra headers go out.
    """

    def __init__(self, upstream: Upstream, pool: KeyPool | None = None) -> None:
        self.upstream = upstream
        self.name = upstream.name
        self.pool = pool if pool is not None else KeyPool(upstream.keys)
        table = Upstreams(upstream.base_url)
        self.base = table.base_for("")
        self.host = table.host_of(self.base)
        self.host_header = table.host_header(self.base)
        self.headers = tuple(
            (name.encode("ascii"), value.encode("utf-8"))
            for name, value in upstream.headers
        )
        name = b"api-key" if upstream.auth_header == "api-key" else b"authorization"
        prefix = b"" if name == b"api-key" else b"Bearer "
        self._auth = {k: (name, prefix + k.encode("ascii")) for k in upstream.keys}
        # One regular expression for all the globs: a match costs one call.
        self._matches = re.compile(
            "|".join(f"(?:{fnmatch.translate(g)})" for g in upstream.models)
        ).match

    def serves(self, model: str) -> bool:
        """Whether this upstream's C{models} match C{model}."""
        return self._matches(model) is not None

    def auth(self, key: str) -> tuple[bytes, bytes]:
        """The header that carries C{key} (one of its keys) to this upstream."""
        return self._auth[key]

    def __repr__(self) -> str:
        return f"<Channel {self.name} {self.host}>"


class UpstreamRegistry:
    """
    The upstreams in force.  L{plan} says which a request naming some models
    tries, in order; L{choose} which one a single model goes to first
    (the WebSocket relay asks it); L{reload} re-reads the file and keeps the
    old upstreams when the new file is bad.

    @param random: returns a float in [0, 1): the draw between weighted
        upstreams (tests pass their own).
    """

    def __init__(
        self,
        path: str | None,
        upstreams: Sequence[Upstream] = (),
        *,
        env: Mapping[str, str] | None = None,
        random: Callable[[], float] = random.random,
        on_change: Callable[[tuple[Channel, ...]], None] | None = None,
    ) -> None:
        self.path = path
        self._env = env
        self._random = random
        self._on_change = on_change
        self.channels: tuple[Channel, ...] = ()
        self._set(tuple(upstreams))

    def _set(self, upstreams: tuple[Upstream, ...]) -> None:
        # A pool survives a reload while its upstream keeps the same keys,
        # and so do its benches.
        old = {c.name: c for c in self.channels}
        channels = []
        for upstream in upstreams:
            before = old.get(upstream.name)
            same = before is not None and before.upstream.keys == upstream.keys
            channels.append(Channel(upstream, before.pool if same and before else None))
        self.channels = tuple(channels)
        #: Per model names: the upstreams serving them, and the weighted
        #: ones among them when there are two or more (else none).
        self._matching: dict[
            tuple[str, ...], tuple[tuple[Channel, ...], tuple[Channel, ...]]
        ] = {}
        if self._on_change is not None:
            self._on_change(self.channels)

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        """The upstreams in force, in file order."""
        return tuple(c.upstream for c in self.channels)

    def plan(self, models: Sequence[str]) -> list[Channel]:
        """
        The upstreams a request naming C{models} tries, in order: those
        serving every one of them (a body may name its model more than
        once; each must be served), the weighted draw first among the
        weighted ones.  Empty when none serves them, or no model is named:
        the request then goes to C{UPSTREAM}.
        """
        if not models or not self.channels:
            return []
        wanted = tuple(models)
        found = self._matching.get(wanted)
        if found is None:
            matching = tuple(
                c for c in self.channels if all(c.serves(m) for m in wanted)
            )
            weighted = tuple(c for c in matching if c.upstream.weight is not None)
            found = (matching, weighted if len(weighted) > 1 else ())
            # Only names of a sensible size are remembered: a client's
            # megabyte-long "model" must not stay in memory.
            if sum(len(m) for m in wanted) <= _REMEMBERED_LENGTH:
                if len(self._matching) >= _REMEMBERED:
                    self._matching.clear()
                self._matching[wanted] = found
        matching, weighted = found
        if not weighted:
            return list(matching)
        return self._ordered(matching, weighted)

    def choose(self, model: str) -> Channel | None:
        """
        The upstream a request for C{model} goes to first (weights drawn),
        or L{None} for C{UPSTREAM}.
        """
        order = self.plan((model,))
        return order[0] if order else None

    def _ordered(
        self, matching: tuple[Channel, ...], weighted: tuple[Channel, ...]
    ) -> list[Channel]:
        # The weighted draw takes the place of the first weighted upstream.
        total = sum(c.upstream.weight or 0 for c in weighted)
        point = self._random() * total
        drawn = weighted[-1]
        for channel in weighted:
            point -= channel.upstream.weight or 0
            if point < 0:
                drawn = channel
                break
        order = list(matching)
        order.remove(drawn)
        order.insert(matching.index(weighted[0]), drawn)
        return order

    def reload(self) -> bool:
        """
        Re-read the upstreams file.  Returns whether the new upstreams took
        effect; on a bad file the old ones stay and the reason is logged.
        """
        if self.path is None:
            return False
        try:
            upstreams = read_upstreams_file(self.path, self._env)
        except UpstreamsFileError as e:
            _log.error(
                "upstreams file not reloaded, keeping the old upstreams: {why}", why=e
            )
            return False
        self._set(upstreams)
        _log.info("upstreams file reloaded: {count} upstream(s)", count=len(upstreams))
        return True
