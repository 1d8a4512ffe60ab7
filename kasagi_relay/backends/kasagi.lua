#!lua name=kasagi
--[[
The Redis Function library `kasagi` (Redis >= 7.0): the one atomic write path of a room,
shared by every relay and by any other publisher (redis-cli, ioredis, KasagiEngine).

Keys follow docs/protocol.md: room:{R}:seq, :ops, :channel, :keys, :snapshot (plus :lock,
the relay's compaction lock). Every function takes the keys of one room, so the library
is cluster-safe (one hash tag).

Bump VERSION whenever a function changes: relays compare it with `kasagi_version` and
load their copy (FUNCTION LOAD REPLACE) on a master that lacks or differs from it.
]]

local VERSION = '3'
-- docs/protocol.md: an idempotency key is remembered for 5 minutes.
local KEY_TTL_MS = 300000
-- Field of the keys hash holding the incremental pruning cursor (a NUL can't be typed
-- by accident into an idempotency key).
local CURSOR_FIELD = '\0cursor'
-- Fields examined per new key: more than one per insert, so expired keys are
-- collected faster than new ones arrive and the hash stays near its live size.
local PRUNE_COUNT = '8'
-- Stream entries read per step while trimming the history by bytes.
local TRIM_BATCH = 64

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The digest an idempotency key is stored with (domain.delta_digest in the relay).
local function delta_digest(kind, d)
  return redis.sha1hex(kind .. ':' .. d)
end

local function prune_keys(keys_key, now)
  local cursor = redis.call('HGET', keys_key, CURSOR_FIELD) or '0'
  local res = redis.call('HSCAN', keys_key, cursor, 'COUNT', PRUNE_COUNT)
  local items = res[2]
  for i = 1, #items, 2 do
    local field, value = items[i], items[i + 1]
    if field ~= CURSOR_FIELD then
      local expires = tonumber(string.match(value, '^%d+:(%d+)') or '0')
      if expires <= now then
        redis.call('HDEL', keys_key, field)
      end
    end
  end
  redis.call('HSET', keys_key, CURSOR_FIELD, res[1])
end

-- Idempotency key `ikey` within KEY_TTL_MS: the seq it got and whether it was stored
-- with another delta than `digest` (nil digest: any delta matches); nil when unknown.
-- Values are "<seq>:<expiry-ms>:<digest>". An entry without a digest (written by library
-- version 2 and older, gone within KEY_TTL_MS of the upgrade) matches any delta, as it did.
local function seen_seq(keys_key, ikey, now, digest)
  local entry = redis.call('HGET', keys_key, ikey)
  if entry then
    local first, expires, stored = string.match(entry, '^(%d+):(%d+):?(%x*)$')
    if first and tonumber(expires) > now then
      if digest and stored ~= '' and stored ~= digest then
        return tonumber(first), true
      end
      -- A write on purpose: WAIT only covers the calling connection's own writes, so a
      -- retry on a fresh connection must write something for its WAIT to cover the
      -- first attempt (which may still be unreplicated).
      redis.call('PEXPIRE', keys_key, KEY_TTL_MS)
      return tonumber(first), false
    end
  end
  return nil, false
end

local function key_conflict(ikey, seq)
  -- The relay reads the seq after the code; nothing was stored.
  return redis.error_reply('KEYCONFLICT ' .. seq .. ' idempotency key ' .. ikey ..
    ' was used for another delta')
end

-- FCALL kasagi_publish 4 seq ops channel keys  kind delta-json [idempotency-key]  -> seq
-- A key stored with another delta (kind and JSON) is an error KEYCONFLICT <seq>.
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
  local digest = nil
  if ikey ~= nil then
    digest = delta_digest(kind, d)
    local first, conflict = seen_seq(keys_key, ikey, now, digest)
    if conflict then
      return key_conflict(ikey, first)
    end
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
    redis.call('HSET', keys_key, ikey, seq .. ':' .. (now + KEY_TTL_MS) .. ':' .. digest)
    prune_keys(keys_key, now)
    -- An idle room's keys vanish entirely once the last one has expired.
    redis.call('PEXPIRE', keys_key, KEY_TTL_MS)
  end
  return seq
end

-- FCALL kasagi_seen 1 keys  idempotency-key [digest]  -> the seq that key got, or nil
-- What kasagi_publish would answer for a retry of that key, without publishing anything
-- when the key is unknown: a relay asks it before refusing a keyed delta that no longer
-- applies (its first attempt may have been stored even though its ack was lost). With
-- the delta's digest (sha1 hex of "<kind>:<delta-json>"), a key stored with another
-- delta is the error KEYCONFLICT <seq>, as for kasagi_publish.
local function seen(keys, args)
  if #keys ~= 1 or args[1] == nil or args[1] == '' then
    return redis.error_reply('ERR kasagi_seen: expected 1 key (keys) and an idempotency key')
  end
  local digest = args[2]
  if digest == '' then
    digest = nil
  end
  local first, conflict = seen_seq(keys[1], args[1], now_ms(), digest)
  if conflict then
    return key_conflict(args[1], first)
  end
  return first
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

-- The first seq >= `lowest` from which the newest entries' delta JSON totals at most
-- `max_bytes`: walks back from the newest entry, reading only what it keeps (and one
-- more), which is at most max-len entries.
local function bytes_cut(ops_key, lowest, max_bytes)
  local total = 0
  local high = '+'
  while true do
    local entries = redis.call('XREVRANGE', ops_key, high, lowest .. '-0', 'COUNT', TRIM_BATCH)
    for _, entry in ipairs(entries) do
      local fields, size = entry[2], 0
      for i = 1, #fields, 2 do
        if fields[i] == 'd' then
          size = #fields[i + 1]
        end
      end
      total = total + size
      if total > max_bytes then
        return tonumber(string.match(entry[1], '^(%d+)')) + 1
      end
    end
    if #entries < TRIM_BATCH then
      return lowest
    end
    high = '(' .. entries[#entries][1]
  end
end

-- FCALL kasagi_trim 3 seq ops snapshot  keep-from max-len [max-bytes]  -> entries removed
-- Keeps at most max-len entries and max-bytes bytes of delta JSON (0 or absent: no byte
-- limit), none before keep-from; never drops an op the snapshot does not cover: the
-- state would be lost.
local function trim(keys, args)
  local seq_key, ops_key, snap_key = keys[1], keys[2], keys[3]
  local keep_from, max_len = tonumber(args[1]), tonumber(args[2])
  local max_bytes = tonumber(args[3] or '0')
  if keep_from == nil or max_len == nil or max_bytes == nil then
    return redis.error_reply('ERR kasagi_trim: expected keep-from max-len [max-bytes]')
  end
  local last = tonumber(redis.call('GET', seq_key) or '0')
  local covered = tonumber(redis.call('HGET', snap_key, 'seq') or '0')
  local cut = math.max(keep_from, last - max_len + 1, 1)
  if max_bytes > 0 and cut <= covered then
    cut = bytes_cut(ops_key, cut, max_bytes)
  end
  cut = math.min(cut, covered + 1)
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
