"""The tracker in Redis: every process and every instance shares one sliding window per key.

Same semantics as `tracker.MemoryTracker` (a sliding log, not fixed buckets; the same
`Admission` and `report()` answers), kept in four Redis keys per virtual key, named from
its `key_id` digest (never the key itself) with a `{…}` hash tag so a cluster keeps them
in one slot:

- `llm-gateway:{id}:admissions`: sorted set, one member per counted admission, scored by
  its time in microseconds;
- `llm-gateway:{id}:charges`: sorted set of token charges, members `serial:tokens`;
- `llm-gateway:{id}:charged`: the tokens in `charges`, kept as a running sum so `admit`
  never walks the log;
- `llm-gateway:{id}:totals`: hash of totals since the key was first seen (and serials).

Invariant: `admit` checks and counts in ONE Lua script, so no other client can run
between the check and the count (no read-then-write race), and a refused request is not
counted. The time is Redis's own `TIME`, read inside the script, so every instance sees
one clock. The window keys expire (PEXPIRE) one window after their last write, so memory
stays bounded by the active keys; the totals hash stays. Each script is loaded once and
called by its SHA (redis-py's `register_script` falls back to loading it on NOSCRIPT,
e.g. after Redis restarted).

Failure: socket timeouts are short and nothing is retried (a retried script may already
have counted), so a lost Redis fails within about a second; every Redis error becomes
`TrackerUnavailable`, and `quota` applies QUOTA_ON_REDIS_ERROR (an admit that timed out
may still run once Redis wakes: it then counts a request that was let through or refused,
which errs toward the limit, never past it). The pool checks each
connection before use and reconnects, so the tracker recovers by itself when Redis is back.
Needs Redis 5 or later (scripts replicate their effects, so `TIME` before writes is allowed).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from proxy.tracker import Admission, Limits, TrackerUnavailable

KEY_PREFIX = "llm-gateway:"
# Short, so that a lost Redis costs a request one second at most, not the default five.
TIMEOUT_SECONDS = 1.0
# Concurrent scripts in flight per process; further callers wait up to TIMEOUT_SECONDS for
# one. An admit holds a connection for one round trip (about 0.1 ms), so 64 carry far more
# than one process serves; times workers and instances, it stays well under Redis's 10,000.
MAX_CONNECTIONS = 64
# A connection idle this long is PINGed before use (NAT and proxies drop idle TCP silently).
HEALTH_CHECK_SECONDS = 30
# Lua numbers are doubles: clamp a charge where sums stay exact.
MAX_CHARGE = 2**53
REASON_CHARS = 200
_PASSWORD_IN_USERINFO = re.compile(r"^([a-z]+://[^:@/]*:)[^@/]*@")
_PASSWORD_IN_QUERY = re.compile(r"([?&]password=)[^&]*")
_CONNECT_ERROR = re.compile(r"Error (-?\d+) connecting to \S+?\.? (.*?)\.?$")

# KEYS: admissions, charges, charged, totals. ARGV[1]: now in µs (-1: Redis TIME),
# ARGV[2]: window in µs, ARGV[3]: request limit, ARGV[4]: token limit (-1: none).
_PRELUDE = """
local window, requests, token_limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = tonumber(ARGV[1])
if now < 0 then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local cutoff = now - window  -- entries at or before it have left the window

local function tokens_of(member)
  return tonumber(string.match(member, ':(%d+)$'))
end

-- Counted admissions in the window; only the newest `requests` are kept, as the memory
-- ring keeps them when a key's limit is lowered.
local function window_requests()
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -requests - 1)
  return redis.call('ZCARD', KEYS[1])
end

-- Tokens charged in the window, from the running sum.
local function window_tokens()
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff) end
  if redis.call('ZCARD', KEYS[2]) == 0 then
    redis.call('DEL', KEYS[3])
    return 0
  end
  if redis.call('EXISTS', KEYS[3]) == 0 then  -- evicted alone (maxmemory): sum the log
    local used = 0
    for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
      used = used + tokens_of(member)
    end
    redis.call('SET', KEYS[3], used, 'PX', math.max(1, redis.call('PTTL', KEYS[2])))
    return used
  end
  local left = 0
  for _, member in ipairs(gone) do left = left + tokens_of(member) end
  return redis.call('DECRBY', KEYS[3], left)
end

-- Microseconds until the oldest entry of a log leaves the window (0 when empty).
local function oldest_leaves(key)
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #oldest == 0 then return 0 end
  return tonumber(oldest[2]) + window - now
end

-- Microseconds until enough charges leave to bring `used` under the token limit.
local function token_wait(used)
  local first = 0
  while true do
    local batch = redis.call('ZRANGE', KEYS[2], first, first + 99, 'WITHSCORES')
    if #batch == 0 then return 0 end
    for i = 1, #batch, 2 do
      used = used - tokens_of(batch[i])
      if used < token_limit then return tonumber(batch[i + 1]) + window - now end
    end
    first = first + 100
  end
end
"""

_ADMIT = """
local size = window_requests()
local used, tokens_full = 0, false
if token_limit >= 0 then
  used = window_tokens()
  tokens_full = used >= token_limit
end
local admitted = size < requests and not tokens_full
if admitted then
  local serial = redis.call('HINCRBY', KEYS[4], 'requests', 1)
  redis.call('ZADD', KEYS[1], now, serial)
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
  size = size + 1
end
local wait, charge_leaves = 0, 0
if token_limit >= 0 then
  if tokens_full then wait = token_wait(used) end
  charge_leaves = oldest_leaves(KEYS[2])
end
return {admitted and 1 or 0, size, oldest_leaves(KEYS[1]), used, wait, charge_leaves}
"""

# ARGV[5]: the tokens to charge.
_CHARGE = """
window_requests()
window_tokens()
local tokens = ARGV[5]
redis.call('HINCRBY', KEYS[4], 'tokens', tokens)
if tonumber(tokens) > 0 then
  local serial = redis.call('HINCRBY', KEYS[4], 'charges', 1)
  redis.call('ZADD', KEYS[2], now, serial .. ':' .. tokens)
  redis.call('INCRBY', KEYS[3], tokens)
  redis.call('PEXPIRE', KEYS[2], math.ceil(window / 1000))
  redis.call('PEXPIRE', KEYS[3], math.ceil(window / 1000))
end
return 0
"""

_REPORT = """
local size = window_requests()
local used = window_tokens()
local reset
if token_limit >= 0 and used >= token_limit then
  reset = token_wait(used)
else
  reset = oldest_leaves(KEYS[2])
end
local totals = redis.call('HMGET', KEYS[4], 'requests', 'tokens')
return {size, oldest_leaves(KEYS[1]), used, reset, tonumber(totals[1]) or 0, tonumber(totals[2]) or 0}
"""

SCRIPTS = {
    name: _PRELUDE + body
    for name, body in (("admit", _ADMIT), ("charge", _CHARGE), ("report", _REPORT))
}


class RedisTracker:
    """The tracker over one Redis, shared by every gateway process that points at it."""

    def __init__(self, url: str, clock: Callable[[], float] | None = None) -> None:
        # `clock` (seconds) replaces Redis TIME, for tests that step through windows.
        self._clock = clock
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=TIMEOUT_SECONDS,  # the wait for a free connection
            socket_timeout=TIMEOUT_SECONDS,
            socket_connect_timeout=TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=HEALTH_CHECK_SECONDS,
            client_name="llm-gateway",
            # RESP2: works down to Redis 5, and keeps the pool's check that drops a connection
            # the server closed before it is used (redis-py skips it for RESP3 push support).
            protocol=2,
        )
        self._client = redis.asyncio.Redis.from_pool(pool)
        self._admit = self._client.register_script(SCRIPTS["admit"])
        self._charge = self._client.register_script(SCRIPTS["charge"])
        self._report = self._client.register_script(SCRIPTS["report"])

    async def admit(self, key_id: str, limits: Limits) -> Admission:
        """Admit and count one request, or refuse it without counting. Raises TrackerUnavailable."""
        admitted, size, oldest_us, used, token_wait_us, charge_us = await self._run(
            self._admit, key_id, limits
        )
        full = size >= limits.requests
        request_wait = oldest_us / 1e6 if admitted or full else 0.0
        tokens_full = limits.tokens is not None and used >= limits.tokens
        token_wait = token_wait_us / 1e6 if tokens_full else 0.0
        remaining_tokens = reset_tokens = None
        if limits.tokens is not None:
            remaining_tokens = max(0, limits.tokens - used)
            reset_tokens = token_wait if tokens_full else charge_us / 1e6
        return Admission(
            admitted=bool(admitted),
            limits=limits,
            remaining_requests=limits.requests - size,
            reset_requests_seconds=request_wait,
            remaining_tokens=remaining_tokens,
            reset_tokens_seconds=reset_tokens,
            retry_after_seconds=0.0 if admitted else max(request_wait, token_wait),
        )

    async def charge(self, key_id: str, limits: Limits, tokens: int) -> None:
        """Add a finished response's tokens to the key's window and totals. Raises TrackerUnavailable."""
        await self._run(self._charge, key_id, limits, max(0, min(tokens, MAX_CHARGE)))

    async def report(self, key_id: str, limits: Limits) -> dict[str, Any]:
        """The key's window and totals, as `GET /usage` answers them. Raises TrackerUnavailable."""
        size, oldest_us, used, reset_us, total_requests, total_tokens = await self._run(
            self._report, key_id, limits
        )
        token_limit = limits.tokens
        return {
            "window_seconds": limits.window_seconds,
            "requests": {
                "used": size,
                "limit": limits.requests,
                "remaining": max(0, limits.requests - size),
                "reset_seconds": oldest_us / 1e6,
            },
            "tokens": {
                "used": used,
                "limit": token_limit,
                "remaining": None if token_limit is None else max(0, token_limit - used),
                "reset_seconds": reset_us / 1e6,
            },
            "totals": {"requests": total_requests, "tokens": total_tokens},
        }

    async def close(self) -> None:
        """Close the pool; the state stays in Redis."""
        await self._client.aclose()

    async def _run(
        self, script: AsyncScript, key_id: str, limits: Limits, *extra: int
    ) -> Sequence[int]:
        now_us = -1 if self._clock is None else round(self._clock() * 1e6)
        token_limit = -1 if limits.tokens is None else limits.tokens
        args = [now_us, round(limits.window_seconds * 1e6), limits.requests, token_limit, *extra]
        try:
            return await script(keys=window_keys(key_id), args=args)
        except (RedisError, OSError) as error:
            raise TrackerUnavailable(f"Redis: {reason(error)}") from error


def window_keys(key_id: str) -> list[str]:
    """The Redis keys of one virtual key, in the scripts' KEYS order."""
    base = f"{KEY_PREFIX}{{{key_id}}}:"
    return [base + "admissions", base + "charges", base + "charged", base + "totals"]


def reason(error: Exception) -> str:
    """A short, key-free cause of a Redis failure, e.g. 'Connection refused'."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and isinstance(cause.errno, int) and cause.errno > 0:
        return os.strerror(cause.errno)  # asyncio's own text names the address instead
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror[:REASON_CHARS]
    # redis-py may re-raise its "Error 111 connecting to host:port. …" without the OSError.
    connecting = _CONNECT_ERROR.match(str(error))
    if connecting and int(connecting[1]) > 0:
        return os.strerror(int(connecting[1]))
    if connecting:
        return connecting[2][:REASON_CHARS]
    return (str(error).strip() or type(error).__name__)[:REASON_CHARS]


def masked(url: str) -> str:
    """The URL with its password (user info or ?password=) replaced by ***, fit for an error line."""
    return _PASSWORD_IN_QUERY.sub(r"\1***", _PASSWORD_IN_USERINFO.sub(r"\1***@", url))


def check(url: str) -> None:
    """Connect, PING and load the scripts, as at start. Raises TrackerUnavailable saying what failed."""
    client = redis.Redis.from_url(
        url,
        socket_timeout=2 * TIMEOUT_SECONDS,
        socket_connect_timeout=2 * TIMEOUT_SECONDS,
        protocol=2,
    )
    try:
        try:
            client.ping()
        except (RedisError, OSError) as error:
            raise TrackerUnavailable(f"cannot connect ({reason(error)})") from None
        try:
            for source in SCRIPTS.values():
                client.script_load(source)
        except (RedisError, OSError) as error:
            raise TrackerUnavailable(f"cannot load the quota scripts ({reason(error)})") from None
    finally:
        client.close()
