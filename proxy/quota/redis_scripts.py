"""The Lua scripts of the Redis tracker: each call is one atomic step on one virtual key.

KEYS (all under one `{key_id}` hash tag, so a cluster keeps them in one slot):
1 admissions   sorted set, one member (the ticket) per counted admission, scored by time (µs)
2 charges      sorted set of token charges, members `serial:tokens`
3 charged      the tokens in `charges`, as a running sum so `admit` never walks the log
4 totals       hash: requests, tokens, micro_usd and the tokens of each kind since the key
               was first seen, and serials
5 reservations sorted set of the tickets of requests still running, scored by admission time
6 reserved     hash: ticket → `tokens:micro_usd`, and the sums `tokens` and `micro_usd`
7 spend        sorted set of spend buckets (index, scored by index)
8 spent        hash: bucket index → micro-dollars, `sum`, and the bucket `width` (µs)

ARGV: 1 now in µs (-1: Redis TIME), 2 quota window µs, 3 request limit (-1: no quota at all),
4 token limit (-1: none), 5 budget in micro-dollars (-1: none), 6 budget window µs,
7 the number of settles that ride along, then SETTLE_FIELDS values per settle (ticket, tokens,
micro-dollars, how many µs ago it ended: it is logged at that time, then the tokens of each
kind in `tracker.KINDS` order, added to the totals hash under their names), then the
script's own arguments. Every script first applies the settles
it carries (so one round trip both settles the last requests and admits the next one),
then does its own work. The answers mirror `window.SlidingWindow` exactly
(`tests/test_redis_tracker.py` runs both on the same sequences).
"""

from __future__ import annotations

from proxy.quota.tracker import KINDS

# Values per settle in ARGV: ticket, tokens, micro-dollars, age, then one per token kind.
SETTLE_FIELDS = 4 + len(KINDS)

# A reservation older than this is taken to be leaked (its process died before settling)
# and dropped; the request it belonged to, if still running, is charged when it settles.
RESERVATION_SECONDS = 600

_PRELUDE = """
local now = tonumber(ARGV[1])
if now < 0 then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local window, requests, token_limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local budget, budget_window = tonumber(ARGV[5]), tonumber(ARGV[6])
local has_limits = requests >= 0
local cutoff = now - window  -- entries at or before it have left the window
local width = math.max(1, math.floor(budget_window / 1000))
local IN_FLIGHT_WAIT = 1000000
local RESERVATION_US = %(reservation_us)d
local KINDS = {%(kinds)s}
local SETTLE_FIELDS = %(settle_fields)d

-- Integers as Redis wants them: tostring would write -0 or 1e+15.
local function int(n)
  return string.format('%%d', n)
end

local function tokens_of(member)
  return tonumber(string.match(member, ':(%%d+)$'))
end

local function expire_in(key, ms)
  redis.call('PEXPIRE', key, math.max(1, math.ceil(ms)))
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
  return redis.call('DECRBY', KEYS[3], int(left))
end

-- Microseconds until the oldest entry of a log leaves the window (0 when empty).
local function oldest_leaves(key)
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #oldest == 0 then return 0 end
  return tonumber(oldest[2]) + window - now
end

-- Microseconds until enough charges leave to bring `used` under the token limit.
local function token_wait(used)
  if used < token_limit then return 0 end
  local first = 0
  while true do
    local batch = redis.call('ZRANGE', KEYS[2], first, first + 99, 'WITHSCORES')
    if #batch == 0 then return IN_FLIGHT_WAIT end  -- full with reservations alone
    for i = 1, #batch, 2 do
      used = used - tokens_of(batch[i])
      if used < token_limit then return tonumber(batch[i + 1]) + window - now end
    end
    first = first + 100
  end
end

-- The sums reserved by requests still running; leaked reservations are dropped first.
local function reserved()
  local stale = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now - RESERVATION_US)
  for _, ticket in ipairs(stale) do
    local held = redis.call('HGET', KEYS[6], ticket)
    if held then
      local tokens, micro = string.match(held, '^(%%d+):(%%d+)$')
      redis.call('HINCRBY', KEYS[6], 'tokens', int(0 - tonumber(tokens)))
      redis.call('HINCRBY', KEYS[6], 'micro_usd', int(0 - tonumber(micro)))
      redis.call('HDEL', KEYS[6], ticket)
    end
    redis.call('ZREM', KEYS[5], ticket)
  end
  local sums = redis.call('HMGET', KEYS[6], 'tokens', 'micro_usd')
  return tonumber(sums[1]) or 0, tonumber(sums[2]) or 0
end

local function leaves_bucket(index)
  return (index + 1) * width + budget_window - now
end

-- Micro-dollars spent in the budget's window; a changed window starts the log anew,
-- keeping what was spent as of now (never forgotten early).
local function window_spend()
  local known = redis.call('HGET', KEYS[8], 'width')
  if known and tonumber(known) ~= width then
    local kept = tonumber(redis.call('HGET', KEYS[8], 'sum')) or 0
    redis.call('DEL', KEYS[7], KEYS[8])
    if kept > 0 then
      local index = math.floor(now / width)
      redis.call('ZADD', KEYS[7], int(index), int(index))
      redis.call('HSET', KEYS[8], int(index), int(kept), 'sum', int(kept), 'width', int(width))
    end
  end
  local last_gone = math.floor((now - budget_window) / width) - 1
  local gone = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', last_gone)
  if #gone > 0 then
    local left = 0
    for _, index in ipairs(gone) do
      left = left + (tonumber(redis.call('HGET', KEYS[8], index)) or 0)
      redis.call('HDEL', KEYS[8], index)
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', last_gone)
    return redis.call('HINCRBY', KEYS[8], 'sum', int(0 - left))
  end
  return tonumber(redis.call('HGET', KEYS[8], 'sum')) or 0
end

-- Microseconds until the spend plus `held` is under the budget.
local function budget_wait(held)
  local first = 0
  while true do
    local batch = redis.call('ZRANGE', KEYS[7], first, first + 99)
    if #batch == 0 then return IN_FLIGHT_WAIT end
    for _, index in ipairs(batch) do
      held = held - (tonumber(redis.call('HGET', KEYS[8], index)) or 0)
      if held < budget then return leaves_bucket(tonumber(index)) end
    end
    first = first + 100
  end
end

local function spend_leaves()
  local oldest = redis.call('ZRANGE', KEYS[7], 0, 0)
  if #oldest == 0 then return 0 end
  return leaves_bucket(tonumber(oldest[1]))
end

-- Release a reservation and charge what the request really cost (`first`: where its
-- tokens by kind start in ARGV).
local function settle(ticket, tokens, micro, at, first)
  local held = redis.call('HGET', KEYS[6], ticket)
  if held then
    local reserved_tokens, reserved_micro = string.match(held, '^(%%d+):(%%d+)$')
    redis.call('HINCRBY', KEYS[6], 'tokens', int(0 - tonumber(reserved_tokens)))
    redis.call('HINCRBY', KEYS[6], 'micro_usd', int(0 - tonumber(reserved_micro)))
    redis.call('HDEL', KEYS[6], ticket)
    redis.call('ZREM', KEYS[5], ticket)
  end
  redis.call('HINCRBY', KEYS[4], 'tokens', int(tokens))
  redis.call('HINCRBY', KEYS[4], 'micro_usd', int(micro))
  for k, name in ipairs(KINDS) do
    local count = tonumber(ARGV[first + k - 1])
    if count > 0 then redis.call('HINCRBY', KEYS[4], name, int(count)) end
  end
  if has_limits then
    window_tokens()
    if tokens > 0 and at > cutoff then
      local serial = redis.call('HINCRBY', KEYS[4], 'charges', 1)
      redis.call('ZADD', KEYS[2], int(at), serial .. ':' .. int(tokens))
      redis.call('INCRBY', KEYS[3], int(tokens))
      expire_in(KEYS[2], window / 1000)
      expire_in(KEYS[3], window / 1000)
    end
  end
  if budget >= 0 then
    window_spend()
    local index = math.floor(at / width)
    if micro > 0 and index > math.floor((now - budget_window) / width) - 1 then
      redis.call('ZADD', KEYS[7], int(index), int(index))
      redis.call('HINCRBY', KEYS[8], int(index), int(micro))
      redis.call('HINCRBY', KEYS[8], 'sum', int(micro))
      redis.call('HSET', KEYS[8], 'width', int(width))
      expire_in(KEYS[7], (budget_window + width) / 1000)
      expire_in(KEYS[8], (budget_window + width) / 1000)
    end
  end
end

local settles = tonumber(ARGV[7])
for i = 0, settles - 1 do
  local at = 8 + SETTLE_FIELDS * i
  settle(ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), now - tonumber(ARGV[at + 3]),
         at + 4)
end
local own = 8 + SETTLE_FIELDS * settles  -- the script's own arguments start here

-- What the windows hold now, as `tracker.Reading` lists it (waits only when over).
local function reading(admitted, ticket, reserved_tokens, reserved_micro)
  local size, leaves, used, charge_leaves, wait = 0, 0, 0, 0, 0
  if has_limits then
    size = redis.call('ZCARD', KEYS[1])
    leaves = oldest_leaves(KEYS[1])
    if token_limit >= 0 or not admitted then
      used = tonumber(redis.call('GET', KEYS[3])) or 0
    end
    charge_leaves = oldest_leaves(KEYS[2])
    if token_limit >= 0 then wait = token_wait(used + reserved_tokens) end
  end
  local spent, spend_wait, oldest_spend = 0, 0, 0
  if budget >= 0 then
    spent = tonumber(redis.call('HGET', KEYS[8], 'sum')) or 0
    oldest_spend = spend_leaves()
    if spent + reserved_micro >= budget then spend_wait = budget_wait(spent + reserved_micro) end
  end
  local answer = {admitted and 1 or 0, ticket, size, leaves, used, reserved_tokens, wait,
                  charge_leaves, spent, reserved_micro, spend_wait, oldest_spend}
  if admitted then  -- an admission answers no totals but its ticket (the serial)
    answer[13], answer[14], answer[15] = ticket, 0, 0
    return answer
  end
  local totals = redis.call('HMGET', KEYS[4], 'requests', 'tokens', 'micro_usd', unpack(KINDS))
  for i = 1, #totals do answer[12 + i] = tonumber(totals[i]) or 0 end
  return answer
end
"""

# ARGV[own], ARGV[own + 1]: the tokens and micro-dollars to reserve.
_ADMIT = """
local claim_tokens, claim_micro = tonumber(ARGV[own]), tonumber(ARGV[own + 1])
local full = false
local reserved_tokens, reserved_micro = reserved()
if has_limits then
  full = window_requests() >= requests
  if token_limit >= 0 then
    local used = window_tokens()  -- expired whatever the request count says, as in memory
    full = full or used + reserved_tokens >= token_limit
  end
end
if budget >= 0 then
  local spent = window_spend()
  full = full or spent + reserved_micro >= budget
end
if full then return reading(false, 0, reserved_tokens, reserved_micro) end
local ticket = redis.call('HINCRBY', KEYS[4], 'requests', 1)
if has_limits then
  redis.call('ZADD', KEYS[1], int(now), ticket)
  expire_in(KEYS[1], window / 1000)
end
if claim_tokens > 0 or claim_micro > 0 then
  redis.call('ZADD', KEYS[5], int(now), ticket)
  redis.call('HSET', KEYS[6], ticket, int(claim_tokens) .. ':' .. int(claim_micro))
  redis.call('HINCRBY', KEYS[6], 'tokens', int(claim_tokens))
  redis.call('HINCRBY', KEYS[6], 'micro_usd', int(claim_micro))
  expire_in(KEYS[5], RESERVATION_US / 1000)
  expire_in(KEYS[6], RESERVATION_US / 1000)
  reserved_tokens, reserved_micro = reserved_tokens + claim_tokens, reserved_micro + claim_micro
end
return reading(true, ticket, reserved_tokens, reserved_micro)
"""

# Settles only (those no admission carried in time), then nothing to answer.
_SETTLE = """
return 0
"""

_REPORT = """
if has_limits then
  window_requests()
  window_tokens()
end
if budget >= 0 then window_spend() end
return reading(false, 0, reserved())
"""

SCRIPTS = {
    name: (
        _PRELUDE
        % {
            "reservation_us": RESERVATION_SECONDS * 1_000_000,
            "kinds": ", ".join(f"'{kind}'" for kind in KINDS),
            "settle_fields": SETTLE_FIELDS,
        }
    )
    + body
    for name, body in (("admit", _ADMIT), ("settle", _SETTLE), ("report", _REPORT))
}
