#!lua name=kasagi
--[[
The Redis Function library `kasagi` (Redis >= 7.0): the one atomic write path of a room,
shared by every relay and by any other publisher (redis-cli, ioredis, KasagiEngine).

Keys follow PROTOCOL.md: room:{R}:seq, :ops, :channel, :keys, :snapshot (plus :lock,
the relay's compaction lock). Every function takes the keys of one room, so the library
is cluster-safe (one hash tag).

Bump VERSION whenever a function changes: relays compare it with `kasagi_version` and
load their copy (FUNCTION LOAD REPLACE) on a master that lacks or differs from it.
]]

local VERSION = '2'
-- PROTOCOL.md: an idempotency key is remembered for 5 minutes.
local KEY_TTL_MS = 300000
-- Field of the keys hash holding the incremental pruning cursor (a NUL can't be typed
-- by accident into an idempotency key).
local CURSOR_FIELD = '\0cursor'
-- Fields examined per new key: more than one per insert, so expired keys are
-- collected faster than new ones arrive and the hash stays near its live size.
local PRUNE_COUNT = '8'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function prune_keys(keys_key, now)
  local cursor = redis.call('HGET', keys_key, CURSOR_FIELD) or '0'
  local res = redis.call('HSCAN', keys_key, cursor, 'COUNT', PRUNE_COUNT)
  local items = res[2]
  for i = 1, #items, 2 do
    local field, value = items[i], items[i + 1]
    if field ~= CURSOR_FIELD then
      local expires = tonumber(string.match(value, ':(%d+)$') or '0')
      if expires <= now then
        redis.call('HDEL', keys_key, field)
      end
    end
  end
  redis.call('HSET', keys_key, CURSOR_FIELD, res[1])
end

-- The seq idempotency key `ikey` got within KEY_TTL_MS, or nil.
local function seen_seq(keys_key, ikey, now)
  local entry = redis.call('HGET', keys_key, ikey)
  if entry then
    local first, expires = string.match(entry, '^(%d+):(%d+)$')
    if first and tonumber(expires) > now then
      -- A write on purpose: WAIT only covers the calling connection's own writes, so a
      -- retry on a fresh connection must write something for its WAIT to cover the
      -- first attempt (which may still be unreplicated).
      redis.call('PEXPIRE', keys_key, KEY_TTL_MS)
      return tonumber(first)
    end
  end
  return nil
end

-- FCALL kasagi_publish 4 seq ops channel keys  kind delta-json [idempotency-key]  -> seq
local function publish(keys, args)
  local seq_key, ops_key, channel_key, keys_key = keys[1], keys[2], keys[3], keys[4]
  local kind, d, ikey = args[1], args[2], args[3]
  if #keys ~= 4 then
    return redis.error_reply('ERR kasagi_publish: expected 4 keys (seq ops channel keys)')
  end
  if kind ~= 'patch' and kind ~= 'merge' then
    return redis.error_reply('ERR kasagi_publish: kind must be patch or merge')
  end
  if d == nil or d == '' then
    return redis.error_reply('ERR kasagi_publish: missing delta JSON')
  end
  if ikey == '' then
    ikey = nil
  end
  local now = now_ms()
  if ikey ~= nil then
    local first = seen_seq(keys_key, ikey, now)
    if first then
      return first
    end
  end
  -- XADD is the first write: if it fails (a stream ahead of the seq key), the call
  -- errors with nothing changed instead of burning a seq.
  local seq = tonumber(redis.call('GET', seq_key) or '0') + 1
  redis.call('XADD', ops_key, seq .. '-0', 'k', kind, 'd', d)
  redis.call('SET', seq_key, seq)
  redis.call('PUBLISH', channel_key, '{"seq":' .. seq .. ',"' .. kind .. '":' .. d .. '}')
  if ikey ~= nil then
    redis.call('HSET', keys_key, ikey, seq .. ':' .. (now + KEY_TTL_MS))
    prune_keys(keys_key, now)
    -- An idle room's keys vanish entirely once the last one has expired.
    redis.call('PEXPIRE', keys_key, KEY_TTL_MS)
  end
  return seq
end

-- FCALL kasagi_seen 1 keys  idempotency-key  -> the seq that key got, or nil
-- What kasagi_publish would answer for a retry of that key, without publishing anything
-- when the key is unknown: a relay asks it before refusing a keyed delta that no longer
-- applies (its first attempt may have been stored even though its ack was lost).
local function seen(keys, args)
  if #keys ~= 1 or args[1] == nil or args[1] == '' then
    return redis.error_reply('ERR kasagi_seen: expected 1 key (keys) and an idempotency key')
  end
  return seen_seq(keys[1], args[1], now_ms())
end

-- FCALL kasagi_snapshot 2 snapshot seq  snap-seq data tick  -> 1 written, 0 not newer
local function snapshot(keys, args)
  local snap_key, seq_key = keys[1], keys[2]
  local snap_seq = tonumber(args[1])
  if snap_seq == nil or args[2] == nil then
    return redis.error_reply('ERR kasagi_snapshot: expected snap-seq data [tick]')
  end
  local last = tonumber(redis.call('GET', seq_key) or '0')
  if snap_seq > last then
    return redis.error_reply('ERR kasagi_snapshot: snapshot seq ' .. snap_seq ..
      ' is past the room seq ' .. last)
  end
  local stored = tonumber(redis.call('HGET', snap_key, 'seq') or '-1')
  if snap_seq <= stored then
    return 0
  end
  redis.call('HSET', snap_key, 'data', args[2], 'seq', snap_seq, 'tick', args[3] or '0')
  return 1
end

-- FCALL kasagi_trim 3 seq ops snapshot  keep-from max-len  -> entries removed
-- Never drops an op the snapshot does not cover: the state would be lost.
local function trim(keys, args)
  local seq_key, ops_key, snap_key = keys[1], keys[2], keys[3]
  local keep_from, max_len = tonumber(args[1]), tonumber(args[2])
  if keep_from == nil or max_len == nil then
    return redis.error_reply('ERR kasagi_trim: expected keep-from max-len')
  end
  local last = tonumber(redis.call('GET', seq_key) or '0')
  local covered = tonumber(redis.call('HGET', snap_key, 'seq') or '0')
  local cut = math.min(math.max(keep_from, last - max_len + 1), covered + 1)
  if cut <= 1 then
    return 0
  end
  return redis.call('XTRIM', ops_key, 'MINID', cut .. '-0')
end

-- FCALL kasagi_unlock 1 lock  token  -> 1 released, 0 not ours
local function unlock(keys, args)
  if redis.call('GET', keys[1]) == args[1] then
    return redis.call('DEL', keys[1])
  end
  return 0
end

redis.register_function('kasagi_publish', publish)
redis.register_function('kasagi_seen', seen)
redis.register_function('kasagi_snapshot', snapshot)
redis.register_function('kasagi_trim', trim)
redis.register_function('kasagi_unlock', unlock)
redis.register_function{
  function_name = 'kasagi_version',
  callback = function() return VERSION end,
  flags = { 'no-writes' },
}
