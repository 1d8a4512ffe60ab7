#!lua name=kasagi_presence
--[[
The Redis Function library `kasagi_presence` (Redis >= 7.0): who is in a room, on every
relay (docs/protocol.md, presence). A library of its own beside `kasagi`, loaded by the
relay the same way (FUNCTION LOAD REPLACE at start and on a master that lacks it or runs
another version), so the two evolve apart.

Keys of one room, under its hash tag (one Cluster shard):
  KEYS[1] room:{R}:presence         hash  conn -> entry JSON {"conn","sub","info","j"}
  KEYS[2] room:{R}:presence-exp     zset  conn -> expiry (ms, the server's clock)
  KEYS[3] room:{R}:presence-events  channel: one message per function call with events,
                                    its events in order, one per line:
                                    {"e":"join"|"leave","m":<entry JSON>} joined by "\n"
Each relay re-writes its own entries every refresh (about every 20 s) with a time to live
(60 s by default); an entry not refreshed in time belongs to a relay that died, and the
next refresh or read of the room by any relay takes it out and announces its leave. Both
keys expire with the time to live too, so a room every relay left holds nothing.

In a Redis Cluster (cluster_enabled:1) events go out with SPUBLISH, as in `kasagi`.
One message per call, not one per event: a relay's batch of joins and leaves comes back to
every relay as one message (each message costs the server a PUBLISH and every subscribed
relay a read; per event that was most of what an event cost). An entry is one line of
compact JSON, so an entry holding a newline is refused (relays never write one); the
message of `kasagi_presence_write` is made by the relay, of the entries it writes.

Bump VERSION whenever a function changes.
]]

local VERSION = '5'
-- Expired entries taken out per call: bounds one call's work (the rest go next call).
local REAP_MAX = 1000

local cluster_mode = nil

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The events of one call, published together by `publish` (one message, one per line).
local function announce(events, kind, entry)
  events[#events + 1] = '{"e":"' .. kind .. '","m":' .. entry .. '}'
end

local function publish(channel, events)
  if #events == 0 then
    return
  end
  if cluster_mode == nil then
    cluster_mode = string.find(redis.call('INFO', 'cluster'), 'cluster_enabled:1', 1, true) ~= nil
  end
  local message = table.concat(events, '\n')
  if cluster_mode then
    redis.call('SPUBLISH', channel, message)
  else
    redis.call('PUBLISH', channel, message)
  end
end

-- Every entry of a call is checked before anything is written (an error part-way would
-- leave writes unannounced).
local function check_entries(args, first, step, name)
  for i = first, #args, step do
    if string.find(args[i], '\n', 1, true) then
      error('ERR ' .. name .. ': an entry may not contain a newline')
    end
  end
end

local function check(keys, name)
  if #keys ~= 3 then
    error('ERR ' .. name .. ': expected 3 keys (presence, presence-exp, presence-events)')
  end
end

local function ttl_of(arg, name)
  local ttl = tonumber(arg)
  if ttl == nil or ttl <= 0 then
    error('ERR ' .. name .. ': the time to live must be a positive number of ms')
  end
  return math.floor(ttl)
end

-- Take out up to REAP_MAX entries past their expiry, their leaves added to `events`.
local function reap(keys, now, events)
  local gone = redis.call('ZRANGEBYSCORE', keys[2], '-inf', now, 'LIMIT', 0, REAP_MAX)
  for _, conn in ipairs(gone) do
    local entry = redis.call('HGET', keys[1], conn)
    redis.call('ZREM', keys[2], conn)
    if entry then
      redis.call('HDEL', keys[1], conn)
      announce(events, 'leave', entry)
    end
  end
end

local function keep(keys, ttl)
  redis.call('PEXPIRE', keys[1], ttl)
  redis.call('PEXPIRE', keys[2], ttl)
end

-- KEYS: the 3 keys; ARGV: ttl_ms, conn, entry. Store and announce the join.
local function add(keys, args)
  check(keys, 'kasagi_presence_add')
  local ttl = ttl_of(args[1], 'kasagi_presence_add')
  check_entries(args, 3, 1, 'kasagi_presence_add')
  local conn, entry = args[2], args[3]
  local now = now_ms()
  local old = redis.call('HGET', keys[1], conn)
  redis.call('HSET', keys[1], conn, entry)
  redis.call('ZADD', keys[2], now + ttl, conn)
  keep(keys, ttl)
  if old ~= entry then
    local events = {}
    announce(events, 'join', entry)
    publish(keys[3], events)
  end
  return 1
end

-- KEYS: the 3 keys; ARGV: conn, entry. Drop and announce the leave if still `entry`.
local function remove(keys, args)
  check(keys, 'kasagi_presence_remove')
  local conn, entry = args[1], args[2]
  local old = redis.call('HGET', keys[1], conn)
  if old ~= entry then
    return 0
  end
  redis.call('HDEL', keys[1], conn)
  redis.call('ZREM', keys[2], conn)
  local events = {}
  announce(events, 'leave', entry)
  publish(keys[3], events)
  return 1
end

-- KEYS: the 3 keys; ARGV: ttl_ms, n, then n (conn, entry) pairs to store, then the
-- conns to drop, then the message to publish ('' for none): a relay's queued writes of
-- one room, in one call whose cost hardly grows with them (one HSET, ZADD, HDEL and ZREM
-- for all; per write, redis.call cost more than the command it ran). The relay nets its
-- writes first (a conn is stored or dropped, not both) and makes the message itself, of
-- the joins and leaves it announces, in order: so an add of an entry already stored (a
-- repeated call) is announced again, and the relays drop the repeat (they remember the
-- members they know and the leaves they saw).
local function write(keys, args)
  check(keys, 'kasagi_presence_write')
  local ttl = ttl_of(args[1], 'kasagi_presence_write')
  local n = tonumber(args[2])
  if n == nil or n < 0 or n ~= math.floor(n) or 2 + 2 * n > #args - 1 then
    error('ERR kasagi_presence_write: expected ttl_ms, n, n (conn, entry) pairs, conns, message')
  end
  local last_set = 2 + 2 * n
  if n > 0 then
    redis.call('HSET', keys[1], unpack(args, 3, last_set))
    local expiry = now_ms() + ttl
    local scored = {}
    for i = 3, last_set, 2 do
      scored[#scored + 1] = expiry
      scored[#scored + 1] = args[i]
    end
    redis.call('ZADD', keys[2], unpack(scored))
    keep(keys, ttl)
  end
  if #args - 1 > last_set then
    redis.call('HDEL', keys[1], unpack(args, last_set + 1, #args - 1))
    redis.call('ZREM', keys[2], unpack(args, last_set + 1, #args - 1))
  end
  local message = args[#args]
  if message ~= '' then
    publish(keys[3], {message})
  end
  return 1
end

-- KEYS: the 3 keys; ARGV: ttl_ms, then conn, entry pairs (this relay's entries).
local function refresh(keys, args)
  check(keys, 'kasagi_presence_refresh')
  local ttl = ttl_of(args[1], 'kasagi_presence_refresh')
  check_entries(args, 3, 2, 'kasagi_presence_refresh')
  local events = {}
  local now = now_ms()
  reap(keys, now, events)
  for i = 2, #args - 1, 2 do
    local conn, entry = args[i], args[i + 1]
    local old = redis.call('HGET', keys[1], conn)
    if old ~= entry then
      redis.call('HSET', keys[1], conn, entry)
      announce(events, 'join', entry)
    end
    redis.call('ZADD', keys[2], now + ttl, conn)
  end
  keep(keys, ttl)
  publish(keys[3], events)
  return 1
end

-- KEYS: the 3 keys. Every entry of the room, expired ones taken out first.
local function members(keys, args)
  check(keys, 'kasagi_presence_members')
  local events = {}
  reap(keys, now_ms(), events)
  publish(keys[3], events)
  return redis.call('HVALS', keys[1])
end

redis.register_function('kasagi_presence_add', add)
redis.register_function('kasagi_presence_remove', remove)
redis.register_function('kasagi_presence_write', write)
redis.register_function('kasagi_presence_refresh', refresh)
redis.register_function('kasagi_presence_members', members)
redis.register_function{
  function_name = 'kasagi_presence_version',
  callback = function() return VERSION end,
  flags = { 'no-writes' },
}
