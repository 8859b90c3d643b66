"""The Lua scripts of the Redis tracker: each call is one atomic step on one or more scopes.

A scope is a virtual key, its team, or one of its model groups (`tracker.Scope`); a script
gets KEYS_PER_SCOPE keys per scope, in this order (all of a scope under one `{id}` hash
tag; a key's model groups share the key's tag, a team has its own):
1 admissions   sorted set, one member (the ticket) per counted admission, scored by time (µs)
2 charges      sorted set of token charges, members `serial:tokens`
3 charged      the tokens in `charges`, as a running sum so `admit` never walks the log
4 totals       hash: requests, tokens, micro_usd and the tokens of each kind since the key
               was first seen, and serials
5 reservations sorted set of the tickets of requests still running, scored by admission time
6 reserved     hash: ticket → `tokens:micro_usd`, and the sums `tokens` and `micro_usd`
7 spend        sorted set of spend buckets (index, scored by index)
8 spent        hash: bucket index → micro-dollars, `sum`, and the bucket `width` (µs)
9 in_flight    sorted set of the leases holding a slot, scored by when each expires (µs)

ARGV: 1 now in µs (-1: Redis TIME), 2 the number of scopes; then per scope: its quota window
µs, request limit (-1: no quota at all), token limit (-1: none), budget in micro-dollars
(-1: none), budget window µs, max_in_flight (-1: none), the number of settles that ride
along, then SETTLE_FIELDS values per settle (ticket, tokens,
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
KEYS_PER_SCOPE = 9
# Values per scope in ARGV before its settles: quota window µs, request limit, token
# limit, budget µ$, budget window µs, max_in_flight, the number of settles.
POLICY_FIELDS = 7

# A reservation older than this is taken to be leaked (its process died before settling)
# and dropped; the request it belonged to, if still running, is charged when it settles.
RESERVATION_SECONDS = 600

# A Redis at its maxmemory with noeviction refuses a script's command that may grow it
# only while the script has written nothing (it cannot stop one half-way): a write that
# changes nothing comes first, so each script runs whole, as the admissions
# that begin by trimming their window always did. Before, the settles and renewals (their
# first write a HINCRBY or a ZADD) were refused and the admissions ran: tokens uncharged,
# and the tracker said lost and back again at each request. The tracker's keys stay few
# and expire; Redis's own memory alerts are the operator's sign that it is full.
_WHOLE = """
if KEYS[1] then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(-inf') end
"""

_PRELUDE = (
    _WHOLE
    + """
local now = tonumber(ARGV[1])
if now < 0 then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local IN_FLIGHT_WAIT = 1000000
local RESERVATION_US = %(reservation_us)d
local KINDS = {%(kinds)s}
local SETTLE_FIELDS = %(settle_fields)d
local KEYS_PER_SCOPE = %(keys_per_scope)d
local POLICY_FIELDS = %(policy_fields)d

-- Where each scope's policy and settles sit in ARGV; the script's own arguments follow.
local scopes = {}
local own = 3
for s = 1, tonumber(ARGV[2]) do
  scopes[s] = own
  own = own + POLICY_FIELDS + SETTLE_FIELDS * tonumber(ARGV[own + POLICY_FIELDS - 1])
end

-- The scope in use: its keys and its policy (every function below reads these).
local K, window, requests, token_limit, budget, budget_window, max_in_flight
local has_limits, cutoff, width
local function use(s)
  local base, at = (s - 1) * KEYS_PER_SCOPE, scopes[s]
  K = {}
  for i = 1, KEYS_PER_SCOPE do K[i] = KEYS[base + i] end
  window, requests, token_limit = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  budget, budget_window = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  max_in_flight = tonumber(ARGV[at + 5])
  has_limits = requests >= 0
  cutoff = now - window  -- entries at or before it have left the window
  width = math.max(1, math.floor(budget_window / 1000))
end

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

-- Counted admissions in the window (more than `requests` after keys.json lowered the
-- limit: they stay counted until they leave, as in the memory ring).
local function window_requests()
  redis.call('ZREMRANGEBYSCORE', K[1], '-inf', cutoff)
  return redis.call('ZCARD', K[1])
end

-- Tokens charged in the window, from the running sum.
local function window_tokens()
  local gone = redis.call('ZRANGEBYSCORE', K[2], '-inf', cutoff)
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', K[2], '-inf', cutoff) end
  if redis.call('ZCARD', K[2]) == 0 then
    redis.call('DEL', K[3])
    return 0
  end
  if redis.call('EXISTS', K[3]) == 0 then  -- evicted alone (maxmemory): sum the log
    local used = 0
    for _, member in ipairs(redis.call('ZRANGE', K[2], 0, -1)) do
      used = used + tokens_of(member)
    end
    redis.call('SET', K[3], used, 'PX', math.max(1, redis.call('PTTL', K[2])))
    return used
  end
  local left = 0
  for _, member in ipairs(gone) do left = left + tokens_of(member) end
  return redis.call('DECRBY', K[3], int(left))
end

-- Microseconds until the oldest entry of a log leaves the window (0 when empty).
local function oldest_leaves(key, rank)
  rank = rank or 0
  local oldest = redis.call('ZRANGE', key, rank, rank, 'WITHSCORES')
  if #oldest == 0 then return 0 end
  return tonumber(oldest[2]) + window - now
end

-- Microseconds until enough charges leave to bring `used` under the token limit.
local function token_wait(used)
  if used < token_limit then return 0 end
  local first = 0
  while true do
    local batch = redis.call('ZRANGE', K[2], first, first + 99, 'WITHSCORES')
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
  local stale = redis.call('ZRANGEBYSCORE', K[5], '-inf', now - RESERVATION_US)
  for _, ticket in ipairs(stale) do
    local held = redis.call('HGET', K[6], ticket)
    if held then
      local tokens, micro = string.match(held, '^(%%d+):(%%d+)$')
      redis.call('HINCRBY', K[6], 'tokens', int(0 - tonumber(tokens)))
      redis.call('HINCRBY', K[6], 'micro_usd', int(0 - tonumber(micro)))
      redis.call('HDEL', K[6], ticket)
    end
    redis.call('ZREM', K[5], ticket)
  end
  local sums = redis.call('HMGET', K[6], 'tokens', 'micro_usd')
  return tonumber(sums[1]) or 0, tonumber(sums[2]) or 0
end

local function leaves_bucket(index)
  return (index + 1) * width + budget_window - now
end

-- Micro-dollars spent in the budget's window. A changed window (keys.json reloaded) takes
-- each bucket's spend where its end falls in buckets of the new width, as window.SpendLog
-- does: at most a bucket late, never early.
local function window_spend()
  local known = redis.call('HGET', K[8], 'width')
  if known and tonumber(known) ~= width then
    local old = tonumber(known)
    local order, moved, kept = {}, {}, 0
    for _, index in ipairs(redis.call('ZRANGE', K[7], 0, -1)) do
      local micro = tonumber(redis.call('HGET', K[8], index)) or 0
      local at = math.floor(((tonumber(index) + 1) * old - 1) / width)
      if moved[at] == nil then
        moved[at] = 0
        order[#order + 1] = at
      end
      moved[at] = moved[at] + micro
      kept = kept + micro
    end
    redis.call('DEL', K[7], K[8])
    if kept > 0 then
      for _, at in ipairs(order) do
        redis.call('ZADD', K[7], int(at), int(at))
        redis.call('HSET', K[8], int(at), int(moved[at]))
      end
      redis.call('HSET', K[8], 'sum', int(kept), 'width', int(width))
      expire_in(K[7], (budget_window + width) / 1000)
      expire_in(K[8], (budget_window + width) / 1000)
    end
  end
  local last_gone = math.floor((now - budget_window) / width) - 1
  local gone = redis.call('ZRANGEBYSCORE', K[7], '-inf', last_gone)
  if #gone > 0 then
    local left = 0
    for _, index in ipairs(gone) do
      left = left + (tonumber(redis.call('HGET', K[8], index)) or 0)
      redis.call('HDEL', K[8], index)
    end
    redis.call('ZREMRANGEBYSCORE', K[7], '-inf', last_gone)
    return redis.call('HINCRBY', K[8], 'sum', int(0 - left))
  end
  return tonumber(redis.call('HGET', K[8], 'sum')) or 0
end

-- Microseconds until the spend plus `held` is under the budget.
local function budget_wait(held)
  local first = 0
  while true do
    local batch = redis.call('ZRANGE', K[7], first, first + 99)
    if #batch == 0 then return IN_FLIGHT_WAIT end
    for _, index in ipairs(batch) do
      held = held - (tonumber(redis.call('HGET', K[8], index)) or 0)
      if held < budget then return leaves_bucket(tonumber(index)) end
    end
    first = first + 100
  end
end

local function spend_leaves()
  local oldest = redis.call('ZRANGE', K[7], 0, 0)
  if #oldest == 0 then return 0 end
  return leaves_bucket(tonumber(oldest[1]))
end

-- Release a reservation and charge what the request really cost (`first`: where its
-- tokens by kind start in ARGV).
local function settle(ticket, tokens, micro, at, first)
  local held = redis.call('HGET', K[6], ticket)
  if held then
    local reserved_tokens, reserved_micro = string.match(held, '^(%%d+):(%%d+)$')
    redis.call('HINCRBY', K[6], 'tokens', int(0 - tonumber(reserved_tokens)))
    redis.call('HINCRBY', K[6], 'micro_usd', int(0 - tonumber(reserved_micro)))
    redis.call('HDEL', K[6], ticket)
    redis.call('ZREM', K[5], ticket)
  end
  redis.call('HINCRBY', K[4], 'tokens', int(tokens))
  redis.call('HINCRBY', K[4], 'micro_usd', int(micro))
  for k, name in ipairs(KINDS) do
    local count = tonumber(ARGV[first + k - 1])
    if count > 0 then redis.call('HINCRBY', K[4], name, int(count)) end
  end
  if has_limits then
    window_tokens()
    if tokens > 0 and at > cutoff then
      local serial = redis.call('HINCRBY', K[4], 'charges', 1)
      redis.call('ZADD', K[2], int(at), serial .. ':' .. int(tokens))
      redis.call('INCRBY', K[3], int(tokens))
      expire_in(K[2], window / 1000)
      expire_in(K[3], window / 1000)
    end
  end
  if budget >= 0 then
    window_spend()
    local index = math.floor(at / width)
    if micro > 0 and index > math.floor((now - budget_window) / width) - 1 then
      redis.call('ZADD', K[7], int(index), int(index))
      redis.call('HINCRBY', K[8], int(index), int(micro))
      redis.call('HINCRBY', K[8], 'sum', int(micro))
      redis.call('HSET', K[8], 'width', int(width))
      expire_in(K[7], (budget_window + width) / 1000)
      expire_in(K[8], (budget_window + width) / 1000)
    end
  end
end

-- Slots held by leases not yet expired (leases are scored by when they expire); -1: no cap.
local function slots()
  if max_in_flight < 0 then return -1 end
  redis.call('ZREMRANGEBYSCORE', K[9], '-inf', now)
  return redis.call('ZCARD', K[9])
end

for s = 1, #scopes do
  use(s)
  local first = scopes[s] + POLICY_FIELDS
  for i = 0, tonumber(ARGV[first - 1]) - 1 do
    local at = first + SETTLE_FIELDS * i
    settle(ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]),
           now - tonumber(ARGV[at + 3]), at + 4)
  end
end

-- What the windows hold now, as `tracker.Reading` lists it (waits only when over).
local function reading(admitted, ticket, reserved_tokens, reserved_micro, full, held, slots_full)
  local size, leaves, used, charge_leaves, wait = 0, 0, 0, 0, 0
  if has_limits then
    size = redis.call('ZCARD', K[1])
    -- The admission whose leaving brings the window under its limit (the oldest, unless a
    -- lowered limit left more than it in the window).
    leaves = oldest_leaves(K[1], math.max(0, size - requests))
    if token_limit >= 0 or not admitted then
      used = tonumber(redis.call('GET', K[3])) or 0
    end
    charge_leaves = oldest_leaves(K[2])
    if token_limit >= 0 then wait = token_wait(used + reserved_tokens) end
  end
  local spent, spend_wait, oldest_spend = 0, 0, 0
  if budget >= 0 then
    spent = tonumber(redis.call('HGET', K[8], 'sum')) or 0
    oldest_spend = spend_leaves()
    if spent + reserved_micro >= budget then spend_wait = budget_wait(spent + reserved_micro) end
  end
  local answer = {admitted and 1 or 0, ticket, size, leaves, used, reserved_tokens, wait,
                  charge_leaves, spent, reserved_micro, spend_wait, oldest_spend,
                  full and 1 or 0, held or -1, slots_full and 1 or 0}
  if admitted then  -- an admission answers no totals but its ticket (the serial)
    answer[16], answer[17], answer[18] = ticket, 0, 0
    return answer
  end
  local totals = redis.call('HMGET', K[4], 'requests', 'tokens', 'micro_usd', unpack(KINDS))
  for i = 1, #totals do answer[15 + i] = tonumber(totals[i]) or 0 end
  return answer
end
"""
)

# ARGV[own], ARGV[own + 1]: the tokens and micro-dollars to reserve; ARGV[own + 2]: the
# lease that takes a slot in each scope with a max_in_flight, ARGV[own + 3]: its life in µs.
# Every scope is checked before any is counted: admitted in all, or counted in none.
_ADMIT = """
local claim_tokens, claim_micro = tonumber(ARGV[own]), tonumber(ARGV[own + 1])
local lease, lease_us = ARGV[own + 2], tonumber(ARGV[own + 3])
local checked = {}
local refused = false
for s = 1, #scopes do
  use(s)
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
  local held = slots()
  local slots_full = held >= 0 and held >= max_in_flight
  refused = refused or full or slots_full
  checked[s] = {reserved_tokens, reserved_micro, full, held, slots_full}
end
local answers = {}
for s = 1, #scopes do
  use(s)
  local c = checked[s]
  local reserved_tokens, reserved_micro, held = c[1], c[2], c[4]
  if refused then
    if has_limits then
      -- Nothing is written, but the logs live one window on: a window keys.json lengthened
      -- since their last write must not lose them at the old one's end (memory keeps them).
      expire_in(K[1], window / 1000)
      if token_limit >= 0 then
        expire_in(K[2], window / 1000)
        expire_in(K[3], window / 1000)
      end
    end
    answers[s] = reading(false, 0, reserved_tokens, reserved_micro, c[3], held, c[5])
  else
    local ticket = redis.call('HINCRBY', K[4], 'requests', 1)
    if has_limits then
      redis.call('ZADD', K[1], int(now), ticket)
      expire_in(K[1], window / 1000)
    end
    if claim_tokens > 0 or claim_micro > 0 then
      redis.call('ZADD', K[5], int(now), ticket)
      redis.call('HSET', K[6], ticket, int(claim_tokens) .. ':' .. int(claim_micro))
      redis.call('HINCRBY', K[6], 'tokens', int(claim_tokens))
      redis.call('HINCRBY', K[6], 'micro_usd', int(claim_micro))
      expire_in(K[5], RESERVATION_US / 1000)
      expire_in(K[6], RESERVATION_US / 1000)
      reserved_tokens, reserved_micro = reserved_tokens + claim_tokens, reserved_micro + claim_micro
    end
    if held >= 0 then
      redis.call('ZADD', K[9], int(now + lease_us), lease)
      expire_in(K[9], lease_us / 1000)
      held = held + 1
    end
    answers[s] = reading(true, ticket, reserved_tokens, reserved_micro, false, held, false)
  end
end
return answers
"""

# Settles only (those no admission carried in time), then nothing to answer.
_SETTLE = """
return 0
"""

_REPORT = """
local answers = {}
for s = 1, #scopes do
  use(s)
  if has_limits then
    window_requests()
    window_tokens()
  end
  if budget >= 0 then window_spend() end
  local reserved_tokens, reserved_micro = reserved()
  answers[s] = reading(false, 0, reserved_tokens, reserved_micro, false, slots(), false)
end
return answers
"""

# Slots: KEYS are lease sets, ARGV[1] the lease life in µs, then one lease per key. A lease
# not there any more (Redis restarted empty) is added back: its request still runs.
RENEW = (
    _WHOLE
    + """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local life = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, string.format('%d', now + life), ARGV[1 + i])
  redis.call('PEXPIRE', key, math.ceil(life / 1000))
end
return 0
"""
)

# Mark deferred work owed (a background response, a batch: `RedisTracker.owe`): its SET
# after a write that changes nothing it would not (a DEL of the value it replaces), so a
# full Redis runs it whole, as the scripts above; and take it (`claim`) in a script, not a
# MULTI, whose every queued command a full Redis refuses (EXECABORT). Before, a full Redis
# refused both: the response's or the batch's charge was lost, and the tracker said lost
# and back again.
OWE = """
redis.call('DEL', KEYS[1])
return redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
"""
CLAIM = """
local value = redis.call('GET', KEYS[1])
if value then redis.call('DEL', KEYS[1]) end
return value
"""

# Give back the slots of the lease ARGV[own] in every scope with a max_in_flight, after
# applying the settles carried (the request's own, held a moment before): one round trip.
_RELEASE = """
local lease = ARGV[own]
for s = 1, #scopes do
  use(s)
  if max_in_flight >= 0 then redis.call('ZREM', K[9], lease) end
end
return 0
"""

SCRIPTS = {
    name: (
        _PRELUDE
        % {
            "reservation_us": RESERVATION_SECONDS * 1_000_000,
            "kinds": ", ".join(f"'{kind}'" for kind in KINDS),
            "settle_fields": SETTLE_FIELDS,
            "keys_per_scope": KEYS_PER_SCOPE,
            "policy_fields": POLICY_FIELDS,
        }
    )
    + body
    for name, body in (
        ("admit", _ADMIT),
        ("settle", _SETTLE),
        ("report", _REPORT),
        ("release", _RELEASE),
    )
}
