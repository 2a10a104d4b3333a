"""
Limits, usage and server-key benches kept in Redis (C{REDIS_URL}), so that
they hold across worker processes and replicas.

Each admission is one server-side script (one round trip): it trims the
key's windows, decides, and counts the request, atomically.  The script uses
Redis's clock, so replicas with skewed clocks still share one window.
"""

from __future__ import annotations

import calendar
import hashlib
import time
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from openai_proxy.keys.limits import Decision, LimitsUnavailable, Usage
from openai_proxy.keys.named import NamedKey
from openai_proxy.keys.quotas import QUOTA_KINDS, QuotaCalendar, quota_reset
from openai_proxy.keys.resp import (
    Arg,
    LostReply,
    RedisClient,
    RedisError,
    Reply,
    Script,
    bulk,
)
from openai_proxy.keys.usagereport import HOURS_KEPT_DAYS, Current, Report
from openai_proxy.upstream.failover import KeyPool

_log = Logger()
_PREFIX = "openai-proxy:"
#: Seconds a concurrency slot is held without being renewed: a slot whose
#: settle was lost (Redis down when the request ended, the process killed)
#: is free again within this.
LEASE = 60.0
#: Seconds between renewals of the leases of the requests still in flight.
RENEW_EVERY = 20.0
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
#: usage.  ARGV: rpm, tpm, concurrency (0: none), lease, key name, requests
#: per day, tokens per day, tokens per month (0: none), ticket (the ticket
#: last: all before it is the same for every request of a key).  A quota is
#: checked against the day and month usage counts, which the script has at
#: hand: no round trip of its own.
ADMIT = (
    _WINDOW_LUA
    + """
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rpd, tpd, tpmo = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local rtotal, roldest = 0, nil
if rpm > 0 then rtotal, roldest = trim(KEYS[1]) end
local ttotal, toldest = 0, nil
if tpm > 0 then ttotal, toldest = trim(KEYS[2]) end
local denied, retry, qused = '', 0, 0
local function tokens(key)
  local c = redis.call('HMGET', key, ARGV[5] .. '|prompt_tokens', ARGV[5] .. '|completion_tokens')
  return (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0)
end
if rpd > 0 then
  local used = tonumber(redis.call('HGET', KEYS[4], ARGV[5] .. '|requests')) or 0
  if used >= rpd then denied, qused = 'requests_per_day', used end
end
if denied == '' and tpd > 0 then
  local used = tokens(KEYS[4])
  if used >= tpd then denied, qused = 'tokens_per_day', used end
end
if denied == '' and tpmo > 0 then
  local used = tokens(KEYS[5])
  if used >= tpmo then denied, qused = 'tokens_per_month', used end
end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if denied == '' and redis.call('ZCARD', KEYS[3]) >= conc then
    denied, retry = 'concurrency', 1
  end
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
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[9])
    redis.call('EXPIRE', KEYS[3], math.ceil(tonumber(ARGV[4])))
  end
  redis.call('HINCRBY', KEYS[4], ARGV[5] .. '|requests', 1)
  redis.call('EXPIRE', KEYS[4], 172800)
  redis.call('HINCRBY', KEYS[5], ARGV[5] .. '|requests', 1)
  redis.call('EXPIRE', KEYS[5], 3024000)
else
  redis.call('HINCRBY', KEYS[4], ARGV[5] .. '|refused_' .. denied, 1)
  redis.call('EXPIRE', KEYS[4], 172800)
  redis.call('HINCRBY', KEYS[5], ARGV[5] .. '|refused_' .. denied, 1)
  redis.call('EXPIRE', KEYS[5], 3024000)
end
return {denied, math.ceil(retry * 1000), rtotal, math.ceil(reset(roldest) * 1000),
        ttotal, math.ceil(reset(toldest) * 1000), qused}
"""
)

#: KEYS: tokens window, in-flight set, day usage, month usage, the day's
#: tokens per hour.  ARGV: key name, "1" with a tpm, ticket, prompt tokens,
#: completion tokens, hour of the day.
SETTLE = (
    f"local HOURS_TTL = {HOURS_KEPT_DAYS * 86400}\n"
    + _WINDOW_LUA
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
  redis.call('HINCRBY', KEYS[5], ARGV[1] .. '|' .. ARGV[6], prompt + completion)
  redis.call('EXPIRE', KEYS[5], HOURS_TTL)
end
return 1
"""
)


#: KEYS: in-flight sets.  ARGV: the lease, then for each set the number of
#: its tickets and the tickets.  Sets (again, after a Redis restart) each
#: ticket's lease to end a lease from now, by Redis's clock.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[1])
local until_ = now + lease
local arg = 2
for _, key in ipairs(KEYS) do
  local count = tonumber(ARGV[arg])
  for i = arg + 1, arg + count do
    redis.call('ZADD', key, until_, ARGV[i])
  end
  arg = arg + count + 1
  redis.call('EXPIRE', key, math.ceil(lease))
end
return #KEYS
"""


#: KEYS: per key, its requests window, tokens window and in-flight set.
#: Returns per key: requests and tokens in the window, requests in flight.
#: Read-only: the windows' buckets are summed, not trimmed.
CURRENT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function live(key)
  local total = 0
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    local second = tonumber(flat[i])
    if second and second + 60 > now then total = total + tonumber(flat[i + 1]) end
  end
  return total
end
local out = {}
for i = 1, #KEYS, 3 do
  out[#out + 1] = live(KEYS[i])
  out[#out + 1] = live(KEYS[i + 1])
  out[#out + 1] = redis.call('ZCOUNT', KEYS[i + 2], now, '+inf')
end
return out
"""

_ADMIT = Script(ADMIT)
_SETTLE = Script(SETTLE)
_RENEW = Script(RENEW)
_NO_USAGE = Usage()


class RedisStore:
    """
    The L{openai_proxy.keys.limits.Limiter} over Redis; it also shares the
    server-key benches of C{pool} with the other processes.

    An admission is one C{EVALSHA} round trip, awaited; a settle is one more
    script sent without waiting for it (its failure is logged), so it costs
    the request nothing but the write, which Twisted sends together with
    whatever else is written in the same reactor turn.

    A concurrency slot is a lease of C{lease} seconds (by Redis's clock),
    which this process renews every C{renew_every} seconds for its requests
    still in flight, all in one script: a request of any length keeps its
    slot, and a slot whose settle was lost is free again within a lease.
    """

    def __init__(
        self,
        url: str,
        reactor: Any,
        pool: KeyPool,
        *,
        lease: float | None = None,
        renew_every: float | None = None,
        calendar: QuotaCalendar | None = None,
    ) -> None:
        self._reactor = reactor
        self.calendar = QuotaCalendar() if calendar is None else calendar
        self._pool = pool
        self._lease = LEASE if lease is None else lease
        self._redis = RedisClient(
            url, reactor, scripts=(_ADMIT, _SETTLE, _RENEW), timeout=_TIMEOUT
        )
        self._refresh = LoopingCall(self._read_benches)
        self._refresh.clock = reactor
        # Per ticket admitted with a slot and not settled yet: its key.
        self._live: dict[str, NamedKey] = {}
        self._renewal = LoopingCall(self._renew)
        self._renewal.clock = reactor
        self._renew_every = RENEW_EVERY if renew_every is None else renew_every
        self._renew_when_up = False
        self._bench_fields = [
            hashlib.sha256(k.encode("utf-8")).hexdigest()[:16] for k in pool.keys
        ]
        self._periods_at = -1
        self._period_keys = ("", "")
        self._hours_key = ""
        self._hour = b""
        # Per key name: the key, the day, and its scripts' encoded heads.
        self._admit_heads: dict[str, tuple[NamedKey, str, bytes]] = {}
        self._settle_heads: dict[str, tuple[NamedKey, str, bytes]] = {}
        pool.on_bench = self._share_bench

    def start(self) -> None:
        """Connect (in the background: Redis may come up later)."""
        self._redis.start()
        self._refresh.start(_REFRESH, now=False)
        self._renewal.start(self._renew_every, now=False)

    async def stop(self) -> None:
        """Stop reading benches and renewing leases, and close the connection."""
        if self._refresh.running:
            self._refresh.stop()
        if self._renewal.running:
            self._renewal.stop()
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
            day, month = self.calendar.periods(now)
            self._period_keys = (_usage_key(day), _usage_key(month))
            # Tokens per hour are kept by UTC day, whatever the calendar.
            self._hours_key = _hours_key(_utc_day(second))
            self._hour = bulk(second // 3600 % 24)
            self._periods_at = second
        return self._period_keys

    def admit(self, key: NamedKey, ticket: str) -> Deferred[Decision]:
        day, month = self._usage_keys()
        cached = self._admit_heads.get(key.name)
        if cached is None or cached[0] is not key or cached[1] != day:
            head = _ADMIT.head(
                (*_windows(key.name), day, month),
                (
                    key.rpm or 0,
                    key.tpm or 0,
                    key.concurrency or 0,
                    repr(self._lease),
                    key.name,
                    key.requests_per_day or 0,
                    key.tokens_per_day or 0,
                    key.tokens_per_month or 0,
                ),
                1,
            )
            cached = self._admit_heads[key.name] = (key, day, head)
        d: Deferred[Decision] = Deferred()

        def decided(reply: Reply) -> None:
            try:
                decision = self._decision(reply)
            except LimitsUnavailable as e:
                d.errback(e)
            else:
                if decision.denied is None and key.concurrency:
                    self._live[ticket] = key  # its lease is renewed from now on
                d.callback(decision)

        if not self._redis.evalsha(_ADMIT, cached[2] + bulk(ticket), decided):
            d.errback(LimitsUnavailable("Redis is not connected"))
        return d

    def settle(self, key: NamedKey, ticket: str, usage: Usage | None) -> None:
        # No longer renewed: if this settle is lost, the lease runs out.
        self._live.pop(ticket, None)
        if usage is None or usage.prompt + usage.completion == 0:
            if key.concurrency is None:
                return  # nothing to free, nothing to charge
            usage = _NO_USAGE
        self._settle_script(key, ticket, usage)

    def _settle_script(self, key: NamedKey, ticket: str, usage: Usage) -> None:
        day, month = self._usage_keys()
        cached = self._settle_heads.get(key.name)
        if cached is None or cached[0] is not key or cached[1] != day:
            _, tokens_window, in_flight = _windows(key.name)
            head = _SETTLE.head(
                (tokens_window, in_flight, day, month, self._hours_key),
                (key.name, 1 if key.tpm else 0),
                4,
            )
            cached = self._settle_heads[key.name] = (key, day, head)
        command = b"".join(
            (
                cached[2],
                bulk(ticket),
                bulk(usage.prompt),
                bulk(usage.completion),
                self._hour,
            )
        )
        # Not waited for: the request has its answer already.
        if not self._redis.evalsha(_SETTLE, command, _settled):
            _not_recorded("Redis is not connected")

    def charge(self, key: NamedKey, usage: Usage) -> None:
        # The settle script with a ticket that holds no slot: it only charges.
        if usage.prompt + usage.completion > 0:
            self._settle_script(key, "-", usage)

    @property
    def in_flight(self) -> int:
        """How many of this process's requests hold a slot whose lease it renews."""
        return len(self._live)

    def _decision(self, reply: Reply) -> Decision:
        decision = _decision(reply)
        if decision.denied in QUOTA_KINDS:
            # The day and month are this process's (the usage keys it
            # named), and so is when they end.
            now = self._reactor.seconds()
            reset_at = quota_reset(self.calendar, decision.denied, now)
            decision = decision._replace(
                retry_after=reset_at - now, quota_reset=reset_at
            )
        return decision

    def _renew(self) -> None:
        """Renew the leases of every request in flight: one script for all."""
        if not self._live:
            return
        if not self._redis.up:
            # Renewed as soon as Redis is back: after a restart that lost
            # the slots, the requests still running count again at once.
            if not self._renew_when_up:
                self._renew_when_up = True
                self._redis.when_up().addCallback(self._renew_again)
            return
        by_set: dict[str, list[str]] = {}
        for ticket, key in self._live.items():
            by_set.setdefault(_windows(key.name)[2], []).append(ticket)
        args: list[Arg] = [repr(self._lease)]
        for tickets in by_set.values():
            args += [len(tickets), *tickets]
        self._redis.evalsha(_RENEW, _RENEW.head(list(by_set), args, 0), _renewed)

    def _renew_again(self, _: object) -> None:
        self._renew_when_up = False
        self._renew()

    def report(self, now: float, names: Sequence[str] = ()) -> Deferred[Report]:
        return Deferred.fromCoroutine(self._report(now, names))

    async def _report(self, now: float, names: Sequence[str]) -> Report:
        day, month = self.calendar.periods(now)
        # Every command sent before any is awaited: one round trip.
        today = self._redis.call("HGETALL", _usage_key(day))
        this_month = self._redis.call("HGETALL", _usage_key(month))
        days = _hour_days(self.calendar.month_start(now), now)
        hours = [self._redis.call("HGETALL", _hours_key(d)) for d in days]
        windows = [w for name in names for w in _windows(name)]
        current = self._redis.call("EVAL", CURRENT, len(windows), *windows)
        # All awaited together, so that when Redis is down the replies not
        # yet awaited do not fail unobserved (an unhandled error each).
        replies = gatherResults(
            [today, this_month, current, *hours], consumeErrors=True
        )
        try:
            flat = [_checked(reply) for reply in await replies]
        except Exception as e:
            if isinstance(e, FirstError):
                e = e.subFailure.value  # type: ignore[assignment]
            raise LimitsUnavailable(f"Redis failed: {e}") from None
        today_flat, month_flat, current_flat, *hours_flat = flat
        return Report(
            day,
            month,
            _by_name(today_flat),
            _by_name(month_flat),
            _current(names, current_flat),
            _hours_by_name(days, hours_flat),
            self.calendar,
        )

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
    if not isinstance(reply, list) or len(reply) != 7:
        raise LimitsUnavailable(f"Redis answered the admission with {reply!r}")
    denied, *numbers = reply
    retry_ms, requests, requests_reset, tokens, tokens_reset, quota_used = (
        n if isinstance(n, int) else 0 for n in numbers
    )
    return Decision(
        denied.decode() if isinstance(denied, bytes) and denied else None,
        retry_ms / 1000,
        requests,
        requests_reset / 1000,
        tokens,
        tokens_reset / 1000,
        quota_used,
    )


def _settled(reply: Reply) -> None:
    if isinstance(reply, LostReply):
        # Sent, but whether Redis carried it out is unknown: not reported
        # as lost (the outage itself is, once).
        _log.info("settle unconfirmed: {why}", why=str(reply))
    elif isinstance(reply, RedisError):
        _not_recorded(str(reply))


def _renewed(reply: Reply) -> None:
    # A lost connection is reported once, and the next renewal follows.
    if isinstance(reply, RedisError) and not isinstance(reply, LostReply):
        _log.warn("slot leases not renewed: {why}", why=str(reply))


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


def _hours_key(day: str) -> str:
    return f"{_PREFIX}hours:{day}"


def _hour_days(month_start: float, now: float) -> list[str]:
    # The UTC days of this month (of the calendar: it may begin on the UTC
    # day before), and the two before today (the last 48 hours may reach
    # into last month).
    first = int(min(month_start, now - 2 * 86400)) // 86400
    return [_utc_day(d * 86400) for d in range(first, int(now) // 86400 + 1)]


def _utc_day(second: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(second))


def _checked(reply: Reply) -> Reply:
    if isinstance(reply, RedisError):
        raise reply
    return reply


def _current(names: Sequence[str], flat: Reply) -> dict[str, Current]:
    numbers = (
        [n if isinstance(n, int) else 0 for n in flat] if isinstance(flat, list) else []
    )
    out = {}
    for i, name in enumerate(names):
        found = numbers[3 * i : 3 * i + 3]
        out[name] = Current(*found) if len(found) == 3 else Current()
    return out


def _hours_by_name(days: list[str], flats: list[Reply]) -> dict[str, dict[int, int]]:
    out: dict[str, dict[int, int]] = {}
    for day, flat in zip(days, flats, strict=True):
        first = calendar.timegm(time.strptime(day, "%Y-%m-%d")) // 3600
        for field, value in _pairs(flat).items():
            name, _, hour = field.rpartition("|")
            if hour.isdigit():
                hours = out.setdefault(name, {})
                hours[first + int(hour)] = int(value)
    return out


def _by_name(flat: Reply) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for field, value in _pairs(flat).items():
        name, _, what = field.rpartition("|")
        out.setdefault(name, {})[what] = int(value)
    return out
