#!lua name=kasagi_presence
--[[
The Redis Function library `kasagi_presence` (Redis >= 7.0): who is in a room, on every
relay (docs/protocol.md, presence). A library of its own beside `kasagi`, loaded by the
relay the same way (FUNCTION LOAD REPLACE at start and on a master that lacks it or runs
another version), so the two evolve apart.

Keys of one room, under its hash tag (one Cluster shard):
  KEYS[1] room:{R}:presence         hash  conn -> entry JSON {"conn","sub","info","j"}
  KEYS[2] room:{R}:presence-exp     zset  conn -> expiry (ms, the server's clock)
  KEYS[3] room:{R}:presence-events  channel: one message per function call that changed
                                    something, its events in order, one per line:
                                    {"e":"join"|"leave","m":<entry JSON>} joined by "\n"
Each relay re-writes its own entries every refresh (about every 20 s) with a time to live
(60 s by default); an entry not refreshed in time belongs to a relay that died, and the
next refresh or read of the room by any relay takes it out and announces its leave. Both
keys expire with the time to live too, so a room every relay left holds nothing.

In a Redis Cluster (cluster_enabled:1) events go out with SPUBLISH, as in `kasagi`.
One message per call, not one per event: a relay's batch of joins and leaves comes back to
every relay as one message (each message costs the server a PUBLISH and every subscribed
relay a read; per event that was most of what an event cost). An entry is one line of
compact JSON, so an entry holding a newline is refused (relays never write one).

Bump VERSION whenever a function changes.
]]

local VERSION = '4'
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

-- KEYS: the 3 keys; ARGV: ttl_ms, then triples kind ('a' add, 'r' remove), conn, entry:
-- what `add` and `remove` do, in order, in one call (a relay's queued writes of one room:
-- one function call, one TIME and one PEXPIRE of the keys for all of them).
local function write(keys, args)
  check(keys, 'kasagi_presence_write')
  local ttl = ttl_of(args[1], 'kasagi_presence_write')
  if (#args - 1) % 3 ~= 0 then
    error('ERR kasagi_presence_write: expected ttl_ms then (kind, conn, entry) triples')
  end
  check_entries(args, 4, 3, 'kasagi_presence_write')
  local events = {}
  local now = nil
  for i = 2, #args, 3 do
    local kind, conn, entry = args[i], args[i + 1], args[i + 2]
    if kind == 'a' then
      if now == nil then
        now = now_ms()
      end
      -- Nearly every add is of a connection not in the room: one command stores it.
      if redis.call('HSETNX', keys[1], conn, entry) == 1 then
        announce(events, 'join', entry)
      elseif redis.call('HGET', keys[1], conn) ~= entry then
        redis.call('HSET', keys[1], conn, entry)
        announce(events, 'join', entry)
      end
      redis.call('ZADD', keys[2], now + ttl, conn)
    elseif kind == 'r' then
      if redis.call('HGET', keys[1], conn) == entry then
        redis.call('HDEL', keys[1], conn)
        redis.call('ZREM', keys[2], conn)
        announce(events, 'leave', entry)
      end
    else
      error('ERR kasagi_presence_write: kind must be a or r')
    end
  end
  if now ~= nil then
    keep(keys, ttl)
  end
  publish(keys[3], events)
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
