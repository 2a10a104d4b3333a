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

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from openai_proxy.failover import KeyPool
from openai_proxy.keys import NamedKey
from openai_proxy.limits import Decision, LimitsUnavailable, Report, Usage, periods
from openai_proxy.resp import RedisClient, RedisError, Reply, Script, bulk

_log = Logger()
_PREFIX = "openai-proxy:"
_LEASE = 600  # seconds a request holds its concurrency slot at most
_REFRESH = 1.0  # seconds between reads of the shared bench state
_TIMEOUT = 2  # seconds to connect, and to wait for a reply

# A window is a hash of per-second buckets with, beside them, its total
# ("t"), its oldest ("o") and newest ("n") seconds: trimming visits each
# second once as time passes, rather than all sixty buckets at every request
# (which cost Redis ~4x more CPU per request under steady traffic).
_WINDOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local sec = tonumber(t[1])
local function trim(key)
  local state = redis.call('HMGET', key, 't', 'o', 'n')
  local total, oldest, newest = tonumber(state[1]), tonumber(state[2]), tonumber(state[3])
  if total == nil or oldest == nil or newest == nil then return 0, nil end
  if newest + 60 <= now then
    redis.call('DEL', key)
    return 0, nil
  end
  local first = oldest
  while oldest < newest do
    local n = redis.call('HGET', key, oldest)
    if n then
      if oldest + 60 > now then break end
      total = total - tonumber(n)
      redis.call('HDEL', key, oldest)
    end
    oldest = oldest + 1
  end
  if oldest ~= first then
    if total < 0 then total = 0 end
    redis.call('HSET', key, 't', total, 'o', oldest)
  end
  return total, oldest
end
local function add(key, amount, oldest)
  redis.call('HINCRBY', key, sec, amount)
  redis.call('HINCRBY', key, 't', amount)
  if oldest == nil then
    redis.call('HSET', key, 'o', sec, 'n', sec)
  else
    redis.call('HSET', key, 'n', sec)
  end
  redis.call('EXPIRE', key, 120)
end
local function wait(key, total, limit, oldest)
  local need = total - limit + 1
  for s = oldest or sec, sec do
    local n = redis.call('HGET', key, s)
    if n then
      need = need - tonumber(n)
      if need <= 0 then return s + 60 - now end
    end
  end
  return 0
end
local function reset(oldest)
  if oldest == nil then return 0 end
  return oldest + 60 - now
end
"""

#: KEYS: requests window, tokens window, in-flight set, day usage, month
#: usage.  ARGV: rpm, tpm, concurrency (0: none), lease, key name, ticket
#: (the ticket last: all before it is the same for every request of a key).
ADMIT = (
    _WINDOW_LUA
    + """
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rtotal, roldest = 0, nil
if rpm > 0 then rtotal, roldest = trim(KEYS[1]) end
local ttotal, toldest = 0, nil
if tpm > 0 then ttotal, toldest = trim(KEYS[2]) end
local denied, retry = '', 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc then denied, retry = 'concurrency', 1 end
end
if denied == '' and rpm > 0 and rtotal >= rpm then
  denied, retry = 'requests', wait(KEYS[1], rtotal, rpm, roldest)
end
if denied == '' and tpm > 0 and ttotal >= tpm then
  denied, retry = 'tokens', wait(KEYS[2], ttotal, tpm, toldest)
end
if denied == '' then
  if rpm > 0 then
    add(KEYS[1], 1, roldest)
    rtotal = rtotal + 1
    roldest = roldest or sec
  end
  if conc > 0 then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[6])
    redis.call('EXPIRE', KEYS[3], ARGV[4])
  end
  redis.call('HINCRBY', KEYS[4], ARGV[5] .. '|requests', 1)
  redis.call('EXPIRE', KEYS[4], 172800)
  redis.call('HINCRBY', KEYS[5], ARGV[5] .. '|requests', 1)
  redis.call('EXPIRE', KEYS[5], 3024000)
end
return {denied, math.ceil(retry * 1000), rtotal, math.ceil(reset(roldest) * 1000),
        ttotal, math.ceil(reset(toldest) * 1000)}
"""
)

#: KEYS: tokens window, in-flight set, day usage, month usage.
#: ARGV: key name, "1" with a tpm, ticket, prompt tokens, completion tokens.
SETTLE = (
    _WINDOW_LUA
    + """
redis.call('ZREM', KEYS[2], ARGV[3])
local prompt, completion = tonumber(ARGV[4]), tonumber(ARGV[5])
if prompt + completion > 0 then
  if ARGV[2] == '1' then
    local _, oldest = trim(KEYS[1])
    add(KEYS[1], prompt + completion, oldest)
  end
  for i = 3, 4 do
    redis.call('HINCRBY', KEYS[i], ARGV[1] .. '|prompt_tokens', prompt)
    redis.call('HINCRBY', KEYS[i], ARGV[1] .. '|completion_tokens', completion)
  end
end
return 1
"""
)


_ADMIT = Script(ADMIT)
_SETTLE = Script(SETTLE)
_NO_USAGE = Usage()


class RedisStore:
    """
    The L{openai_proxy.limits.Limiter} over Redis; it also shares the
    server-key benches of C{pool} with the other processes.

    An admission is one C{EVALSHA} round trip, awaited; a settle is one more
    script sent without waiting for it (its failure is logged), so it costs
    the request nothing but the write, which Twisted sends together with
    whatever else is written in the same reactor turn.
    """

    def __init__(self, url: str, reactor: Any, pool: KeyPool) -> None:
        self._reactor = reactor
        self._pool = pool
        self._redis = RedisClient(
            url, reactor, scripts=(_ADMIT, _SETTLE), timeout=_TIMEOUT
        )
        self._refresh = LoopingCall(self._read_benches)
        self._refresh.clock = reactor
        self._bench_fields = [
            hashlib.sha256(k.encode("utf-8")).hexdigest()[:16] for k in pool.keys
        ]
        self._periods_at = -1
        self._period_keys = ("", "")
        # Per key name: the key, the day, and its scripts' encoded heads.
        self._admit_heads: dict[str, tuple[NamedKey, str, bytes]] = {}
        self._settle_heads: dict[str, tuple[NamedKey, str, bytes]] = {}
        pool.on_bench = self._share_bench

    def start(self) -> None:
        """Connect (in the background: Redis may come up later)."""
        self._redis.start()
        self._refresh.start(_REFRESH, now=False)

    async def stop(self) -> None:
        """Stop reading benches and close the connection."""
        if self._refresh.running:
            self._refresh.stop()
        await self._redis.stop()

    def ready(self) -> Deferred[None]:
        """Fires once connected to Redis (with its scripts loaded)."""
        return self._redis.when_up()

    def ping(self) -> Deferred[Any]:
        """
        Fires once Redis answered a PING: every command this store sent
        before (settles included) has been carried out.
        """
        return self._redis.call("PING")

    def is_up(self) -> bool:
        """Whether a connection to Redis is open."""
        return self._redis.up

    def _usage_keys(self) -> tuple[str, str]:
        # The day and month keys change once a day: format them once a second.
        now = self._reactor.seconds()
        second = int(now)
        if second != self._periods_at:
            day, month = periods(now)
            self._period_keys = (_usage_key(day), _usage_key(month))
            self._periods_at = second
        return self._period_keys

    def admit(self, key: NamedKey, ticket: str) -> Deferred[Decision]:
        day, month = self._usage_keys()
        cached = self._admit_heads.get(key.name)
        if cached is None or cached[0] is not key or cached[1] != day:
            head = _ADMIT.head(
                (*_windows(key.name), day, month),
                (key.rpm or 0, key.tpm or 0, key.concurrency or 0, _LEASE, key.name),
                1,
            )
            cached = self._admit_heads[key.name] = (key, day, head)
        d: Deferred[Decision] = Deferred()

        def decided(reply: Reply) -> None:
            try:
                decision = _decision(reply)
            except LimitsUnavailable as e:
                d.errback(e)
            else:
                d.callback(decision)

        if not self._redis.evalsha(_ADMIT, cached[2] + bulk(ticket), decided):
            d.errback(LimitsUnavailable("Redis is not connected"))
        return d

    def settle(self, key: NamedKey, ticket: str, usage: Usage | None) -> None:
        if usage is None or usage.prompt + usage.completion == 0:
            if key.concurrency is None:
                return  # nothing to free, nothing to charge
            usage = _NO_USAGE
        day, month = self._usage_keys()
        cached = self._settle_heads.get(key.name)
        if cached is None or cached[0] is not key or cached[1] != day:
            _, tokens_window, in_flight = _windows(key.name)
            head = _SETTLE.head(
                (tokens_window, in_flight, day, month),
                (key.name, 1 if key.tpm else 0),
                3,
            )
            cached = self._settle_heads[key.name] = (key, day, head)
        command = b"".join(
            (cached[2], bulk(ticket), bulk(usage.prompt), bulk(usage.completion))
        )
        # Not waited for: the request has its answer already.
        if not self._redis.evalsha(_SETTLE, command, _settled):
            _not_recorded("Redis is not connected")

    def report(self, now: float) -> Deferred[Report]:
        return Deferred.fromCoroutine(self._report(now))

    async def _report(self, now: float) -> Report:
        day, month = periods(now)
        # Both asked for before either is awaited: one round trip.
        today = self._redis.call("HGETALL", _usage_key(day))
        this_month = self._redis.call("HGETALL", _usage_key(month))
        try:
            today_flat = await today
            month_flat = await this_month
        except Exception as e:
            # When today failed, this_month is never awaited: its failure
            # would be logged as unhandled.
            this_month.addErrback(lambda _: None)
            raise LimitsUnavailable(f"Redis failed: {e}") from None
        return Report(day, month, _by_name(today_flat), _by_name(month_flat))

    def _share_bench(self, index: int, seconds: float) -> None:
        if self.is_up():
            until = time.time() + seconds
            d = self._redis.call(
                "HSET", _PREFIX + "bench", self._bench_fields[index], repr(until)
            )
            d.addErrback(lambda f: None)

    def _read_benches(self) -> Deferred[None] | None:
        """Apply the benches the other processes shared (every second)."""
        if not self.is_up() or not self._bench_fields:
            return None
        d = self._redis.call("HGETALL", _PREFIX + "bench")

        def apply(flat: Reply) -> None:
            benches = _pairs(flat)
            for index, field in enumerate(self._bench_fields):
                until = benches.get(field)
                if until is not None:
                    self._pool.bench_until(index, float(until))

        d.addCallback(apply)
        d.addErrback(lambda f: None)
        return d.addCallback(lambda _: None)


def _decision(reply: Reply) -> Decision:
    if isinstance(reply, RedisError):
        raise LimitsUnavailable(f"Redis failed: {reply}")
    if not isinstance(reply, list) or len(reply) != 6:
        raise LimitsUnavailable(f"Redis answered the admission with {reply!r}")
    denied, *numbers = reply
    retry_ms, requests, requests_reset, tokens, tokens_reset = (
        n if isinstance(n, int) else 0 for n in numbers
    )
    return Decision(
        denied.decode() if isinstance(denied, bytes) and denied else None,
        retry_ms / 1000,
        requests,
        requests_reset / 1000,
        tokens,
        tokens_reset / 1000,
    )


def _settled(reply: Reply) -> None:
    if isinstance(reply, RedisError):
        _not_recorded(str(reply))


def _not_recorded(why: str) -> None:
    _log.warn("usage not recorded: {why}", why=why)


def _pairs(flat: Reply) -> dict[str, bytes]:
    """The fields and values of an HGETALL reply."""
    if not isinstance(flat, list):
        return {}
    out = {}
    for field, value in zip(flat[::2], flat[1::2], strict=True):
        if isinstance(field, bytes) and isinstance(value, bytes):
            out[field.decode("utf-8", "replace")] = value
    return out


def _windows(name: str) -> tuple[str, str, str]:
    return (
        f"{_PREFIX}rpm:{name}",
        f"{_PREFIX}tpm:{name}",
        f"{_PREFIX}inflight:{name}",
    )


def _usage_key(period: str) -> str:
    return f"{_PREFIX}usage:{period}"


def _by_name(flat: Reply) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for field, value in _pairs(flat).items():
        name, _, what = field.rpartition("|")
        out.setdefault(name, {})[what] = int(value)
    return out
