"""
Limits, usage and server-key benches kept in Redis (C{REDIS_URL}), so that
they hold across worker processes and replicas.

Each admission is one server-side script (one round trip): it trims the
key's windows, decides, and counts the request, atomically.  The script uses
Redis's clock, so replicas with skewed clocks still share one window.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from openai_proxy.failover import KeyPool
from openai_proxy.keys import NamedKey
from openai_proxy.limits import Decision, LimitsUnavailable, Report, Usage, periods

_log = Logger()
_PREFIX = "openai-proxy:"
_LEASE = 600  # seconds a request holds its concurrency slot at most
_REFRESH = 1.0  # seconds between reads of the shared bench state
_TIMEOUT = 2  # seconds to connect, and to wait for a reply

_WINDOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local sec = t[1]
local function window(key)
  local flat = redis.call('HGETALL', key)
  local entries, total = {}, 0
  for i = 1, #flat, 2 do
    local s, n = tonumber(flat[i]), tonumber(flat[i + 1])
    if s + 60 <= now then
      redis.call('HDEL', key, flat[i])
    else
      total = total + n
      entries[#entries + 1] = {s, n}
    end
  end
  table.sort(entries, function(a, b) return a[1] < b[1] end)
  return total, entries
end
local function wait(entries, total, limit)
  local need = total - limit + 1
  for _, e in ipairs(entries) do
    need = need - e[2]
    if need <= 0 then return e[1] + 60 - now end
  end
  return 0
end
local function reset(entries)
  if #entries == 0 then return 0 end
  return entries[1][1] + 60 - now
end
"""

#: KEYS: requests window, tokens window, in-flight set, day usage, month
#: usage.  ARGV: rpm, tpm, concurrency (0: none), ticket, lease, key name.
ADMIT = (
    _WINDOW_LUA
    + """
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rtotal, rentries = 0, {}
if rpm > 0 then rtotal, rentries = window(KEYS[1]) end
local ttotal, tentries = 0, {}
if tpm > 0 then ttotal, tentries = window(KEYS[2]) end
local denied, retry = '', 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc then denied, retry = 'concurrency', 1 end
end
if denied == '' and rpm > 0 and rtotal >= rpm then
  denied, retry = 'requests', wait(rentries, rtotal, rpm)
end
if denied == '' and tpm > 0 and ttotal >= tpm then
  denied, retry = 'tokens', wait(tentries, ttotal, tpm)
end
if denied == '' then
  if rpm > 0 then
    redis.call('HINCRBY', KEYS[1], sec, 1)
    redis.call('EXPIRE', KEYS[1], 120)
    rtotal = rtotal + 1
    if #rentries == 0 then rentries = {{tonumber(sec), 1}} end
  end
  if conc > 0 then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[4])
    redis.call('EXPIRE', KEYS[3], ARGV[5])
  end
  redis.call('HINCRBY', KEYS[4], ARGV[6] .. '|requests', 1)
  redis.call('EXPIRE', KEYS[4], 172800)
  redis.call('HINCRBY', KEYS[5], ARGV[6] .. '|requests', 1)
  redis.call('EXPIRE', KEYS[5], 3024000)
end
return {denied, math.ceil(retry * 1000), rtotal, math.ceil(reset(rentries) * 1000),
        ttotal, math.ceil(reset(tentries) * 1000)}
"""
)

#: KEYS: tokens window, in-flight set, day usage, month usage.
#: ARGV: ticket, prompt tokens, completion tokens, key name, "1" with a tpm.
SETTLE = """
local sec = redis.call('TIME')[1]
redis.call('ZREM', KEYS[2], ARGV[1])
local prompt, completion = tonumber(ARGV[2]), tonumber(ARGV[3])
if prompt + completion > 0 then
  if ARGV[5] == '1' then
    redis.call('HINCRBY', KEYS[1], sec, prompt + completion)
    redis.call('EXPIRE', KEYS[1], 120)
  end
  for i = 3, 4 do
    redis.call('HINCRBY', KEYS[i], ARGV[4] .. '|prompt_tokens', prompt)
    redis.call('HINCRBY', KEYS[i], ARGV[4] .. '|completion_tokens', completion)
  end
end
return 1
"""


def connect(url: str) -> Any:
    """A lazy, reconnecting txredisapi connection for a C{REDIS_URL}."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    password = unquote(parts.password) if parts.password else None
    username = unquote(parts.username) if parts.username else None
    common: dict[str, Any] = {
        "password": password,
        "username": username,
        "connectTimeout": _TIMEOUT,
        "replyTimeout": _TIMEOUT,
    }
    if parts.scheme == "unix":
        db = int(query.get("db", ["0"])[0])
        return txredisapi.lazyUnixConnection(parts.path, dbid=db, **common)
    db = int(parts.path.strip("/") or 0)
    return txredisapi.lazyConnection(
        parts.hostname or "localhost",
        parts.port or 6379,
        dbid=db,
        ssl_context_factory=parts.scheme == "rediss",
        **common,
    )


class RedisStore:
    """
    The L{openai_proxy.limits.Limiter} over Redis; it also shares the
    server-key benches of C{pool} with the other processes.
    """

    def __init__(self, url: str, reactor: Any, pool: KeyPool) -> None:
        self._url = url
        self._reactor = reactor
        self._pool = pool
        self._conn: Any = None
        self._refresh = LoopingCall(self._read_benches)
        self._refresh.clock = reactor
        self._bench_fields = [
            hashlib.sha256(k.encode("utf-8")).hexdigest()[:16] for k in pool.keys
        ]
        pool.on_bench = self._share_bench

    def start(self) -> None:
        """Connect (in the background: Redis may come up later)."""
        self._conn = connect(self._url)
        self._refresh.start(_REFRESH, now=False)

    async def stop(self) -> None:
        """Stop reading benches and close the connection."""
        if self._refresh.running:
            self._refresh.stop()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.disconnect()

    async def ready(self) -> None:
        """Wait until Redis answers (a lazy connection queues until then)."""
        await self._conn.ping()

    def is_up(self) -> bool:
        """Whether a connection to Redis is open."""
        return self._conn is not None and self._conn._factory.size > 0

    async def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        if not self.is_up():
            raise LimitsUnavailable("Redis is not connected")
        try:
            return await self._conn.eval(script, keys, args)
        except Exception as e:
            raise LimitsUnavailable(f"Redis failed: {e}") from None

    def admit(self, key: NamedKey, ticket: str) -> Deferred[Decision]:
        return Deferred.fromCoroutine(self._admit(key, ticket))

    async def _admit(self, key: NamedKey, ticket: str) -> Decision:
        day, month = periods(self._reactor.seconds())
        reply = await self._call(
            ADMIT,
            [*_windows(key.name), _usage_key(day), _usage_key(month)],
            [
                key.rpm or 0,
                key.tpm or 0,
                key.concurrency or 0,
                ticket,
                _LEASE,
                key.name,
            ],
        )
        denied, retry_ms, requests, requests_reset, tokens, tokens_reset = reply
        return Decision(
            denied or None,
            retry_ms / 1000,
            int(requests),
            requests_reset / 1000,
            int(tokens),
            tokens_reset / 1000,
        )

    def settle(self, key: NamedKey, ticket: str, usage: Usage | None) -> None:
        if key.concurrency is None and usage is None:
            return
        usage = usage or Usage()
        day, month = periods(self._reactor.seconds())
        requests_window, tokens_window, in_flight = _windows(key.name)
        d = Deferred.fromCoroutine(
            self._call(
                SETTLE,
                [tokens_window, in_flight, _usage_key(day), _usage_key(month)],
                [
                    ticket,
                    usage.prompt,
                    usage.completion,
                    key.name,
                    "1" if key.tpm else "0",
                ],
            )
        )
        d.addErrback(
            lambda f: _log.warn("usage not recorded: {why}", why=f.getErrorMessage())
        )

    def report(self, now: float) -> Deferred[Report]:
        return Deferred.fromCoroutine(self._report(now))

    async def _report(self, now: float) -> Report:
        day, month = periods(now)
        if not self.is_up():
            raise LimitsUnavailable("Redis is not connected")
        try:
            today = await self._conn.hgetall(_usage_key(day))
            this_month = await self._conn.hgetall(_usage_key(month))
        except Exception as e:
            raise LimitsUnavailable(f"Redis failed: {e}") from None
        return Report(day, month, _by_name(today), _by_name(this_month))

    def _share_bench(self, index: int, seconds: float) -> None:
        if self.is_up():
            until = time.time() + seconds
            d = self._conn.hset(_PREFIX + "bench", self._bench_fields[index], until)
            d.addErrback(lambda f: None)

    def _read_benches(self) -> Deferred[None] | None:
        if not self.is_up() or not self._bench_fields:
            return None
        d: Deferred[Any] = self._conn.hgetall(_PREFIX + "bench")

        def apply(benches: dict[str, Any]) -> None:
            for index, field in enumerate(self._bench_fields):
                until = benches.get(field)
                if until is not None:
                    self._pool.bench_until(index, float(until))

        d.addCallback(apply)
        d.addErrback(lambda f: None)
        return d


def _windows(name: str) -> tuple[str, str, str]:
    return (
        f"{_PREFIX}rpm:{name}",
        f"{_PREFIX}tpm:{name}",
        f"{_PREFIX}inflight:{name}",
    )


def _usage_key(period: str) -> str:
    return f"{_PREFIX}usage:{period}"


def _by_name(flat: dict[str, Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for field, value in (flat or {}).items():
        name, _, what = str(field).rpartition("|")
        out.setdefault(name, {})[what] = int(value)
    return out
