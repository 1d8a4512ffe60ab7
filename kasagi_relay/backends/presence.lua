#!lua name=kasagi_presence
--[[
The Redis Function library `kasagi_presence` (Redis >= 7.0): who is in a room, on every
relay (docs/protocol.md, presence). A library of its own beside `kasagi`, loaded by the
relay the same way (FUNCTION LOAD REPLACE at start and on a master that lacks it or runs
another version), so the two evolve apart.

Keys of one room, under its hash tag (one Cluster shard):
  KEYS[1] room:{R}:presence         hash  conn -> entry JSON {"conn","sub","info","j"}
  KEYS[2] room:{R}:presence-exp     zset  conn -> expiry (ms, the server's clock)
  KEYS[3] room:{R}:presence-events  channel: {"e":"join"|"leave","m":<entry JSON>}
Each relay re-writes its own entries every refresh (about every 20 s) with a time to live
(60 s by default); an entry not refreshed in time belongs to a relay that died, and the
next refresh or read of the room by any relay takes it out and announces its leave. Both
keys expire with the time to live too, so a room every relay left holds nothing.

In a Redis Cluster (cluster_enabled:1) events go out with SPUBLISH, as in `kasagi`.

Bump VERSION whenever a function changes.
]]

local VERSION = '3'
-- Expired entries taken out per call: bounds one call's work (the rest go next call).
local REAP_MAX = 1000

local cluster_mode = nil

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function announce(channel, kind, entry)
  local message = '{"e":"' .. kind .. '","m":' .. entry .. '}'
  if cluster_mode == nil then
    cluster_mode = string.find(redis.call('INFO', 'cluster'), 'cluster_enabled:1', 1, true) ~= nil
  end
  if cluster_mode then
    redis.call('SPUBLISH', channel, message)
  else
    redis.call('PUBLISH', channel, message)
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

-- Take out up to REAP_MAX entries past their expiry, announcing each leave.
local function reap(keys, now)
  local gone = redis.call('ZRANGEBYSCORE', keys[2], '-inf', now, 'LIMIT', 0, REAP_MAX)
  for _, conn in ipairs(gone) do
    local entry = redis.call('HGET', keys[1], conn)
    redis.call('ZREM', keys[2], conn)
    if entry then
      redis.call('HDEL', keys[1], conn)
      announce(keys[3], 'leave', entry)
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
  local conn, entry = args[2], args[3]
  local now = now_ms()
  local old = redis.call('HGET', keys[1], conn)
  redis.call('HSET', keys[1], conn, entry)
  redis.call('ZADD', keys[2], now + ttl, conn)
  keep(keys, ttl)
  if old ~= entry then
    announce(keys[3], 'join', entry)
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
  announce(keys[3], 'leave', entry)
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
  local now = nil
  for i = 2, #args, 3 do
    local kind, conn, entry = args[i], args[i + 1], args[i + 2]
    if kind == 'a' then
      if now == nil then
        now = now_ms()
      end
      -- Nearly every add is of a connection not in the room: one command stores it.
      if redis.call('HSETNX', keys[1], conn, entry) == 1 then
        announce(keys[3], 'join', entry)
      elseif redis.call('HGET', keys[1], conn) ~= entry then
        redis.call('HSET', keys[1], conn, entry)
        announce(keys[3], 'join', entry)
      end
      redis.call('ZADD', keys[2], now + ttl, conn)
    elseif kind == 'r' then
      if redis.call('HGET', keys[1], conn) == entry then
        redis.call('HDEL', keys[1], conn)
        redis.call('ZREM', keys[2], conn)
        announce(keys[3], 'leave', entry)
      end
    else
      error('ERR kasagi_presence_write: kind must be a or r')
    end
  end
  if now ~= nil then
    keep(keys, ttl)
  end
  return 1
end

-- KEYS: the 3 keys; ARGV: ttl_ms, then conn, entry pairs (this relay's entries).
local function refresh(keys, args)
  check(keys, 'kasagi_presence_refresh')
  local ttl = ttl_of(args[1], 'kasagi_presence_refresh')
  local now = now_ms()
  reap(keys, now)
  for i = 2, #args - 1, 2 do
    local conn, entry = args[i], args[i + 1]
    local old = redis.call('HGET', keys[1], conn)
    if old ~= entry then
      redis.call('HSET', keys[1], conn, entry)
      announce(keys[3], 'join', entry)
    end
    redis.call('ZADD', keys[2], now + ttl, conn)
  end
  keep(keys, ttl)
  return 1
end

-- KEYS: the 3 keys. Every entry of the room, expired ones taken out first.
local function members(keys, args)
  check(keys, 'kasagi_presence_members')
  reap(keys, now_ms())
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
