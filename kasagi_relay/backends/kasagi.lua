#!lua name=kasagi
--[[
The Redis Function library `kasagi` (Redis >= 7.0): the one atomic write path of a room,
shared by every relay and by any other publisher (redis-cli, ioredis, KasagiEngine).

Keys follow docs/protocol.md: room:{R}:seq, :ops, :channel, :keys, :snapshot (plus :lock,
the relay's compaction lock, and :sizes, below). Every function takes the keys of one
room, so the library is cluster-safe (one hash tag).

room:{R}:sizes is a list of running byte totals that bounds the history by bytes without
reading it: element i is the total size of the delta JSON of every op up to seq
`base + i`, where base = (last seq) - (LLEN - 1) since seqs are contiguous; its first
element is the op just before the oldest one kept (0 for a room's first op). Ops stored
before library version 3 have no total: the first trim by bytes that the snapshot covers
drops them. Unless passed as an extra key (kasagi_publish's 5th, kasagi_trim's 4th), it
is derived from the ops key, in the same hash slot: callers keep passing the keys of
version 2, which the relay does too so that it can still publish through a version 2
library during a rolling upgrade (the totals are then approximate until the history
they describe is trimmed; the trim still never passes the snapshot).

In a Redis Cluster (cluster_enabled:1 in INFO), kasagi_publish announces the delta with
SPUBLISH (sharded pub/sub: only the room's shard carries it) instead of PUBLISH, which a
cluster would broadcast to every node; subscribers there use SSUBSCRIBE
(docs/protocol.md). The function finds out by itself, so every caller keeps calling
`FCALL kasagi_publish 4 ...` the same way on one server, under Sentinel or in a cluster.

Bump VERSION whenever a function changes: relays compare it with `kasagi_version` and
load their copy (FUNCTION LOAD REPLACE) on a master that lacks or differs from it.
]]

local VERSION = '5'
-- docs/protocol.md: an idempotency key is remembered for 5 minutes.
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

local function sizes_key(keys, i)
  return keys[i] or (string.gsub(keys[2], ':ops$', ':sizes'))
end

-- Append the running total for op `seq` (whose delta JSON is `size` bytes).
local function note_size(key, seq, size)
  local n = redis.call('LLEN', key)
  if n > seq then
    -- Longer than the room's history can be (the room was deleted without its sizes).
    redis.call('DEL', key)
    n = 0
  end
  local total = 0
  if n == 0 then
    redis.call('RPUSH', key, 0)
  else
    total = tonumber(redis.call('LINDEX', key, -1))
  end
  redis.call('RPUSH', key, total + size)
end

-- Whether this server runs in cluster mode: asked once (it cannot change without a
-- restart, which reloads the library and forgets this).
local cluster_mode = nil
local function announce(channel_key, message)
  if cluster_mode == nil then
    cluster_mode = string.find(redis.call('INFO', 'cluster'), 'cluster_enabled:1', 1, true) ~= nil
  end
  if cluster_mode then
    redis.call('SPUBLISH', channel_key, message)
  else
    redis.call('PUBLISH', channel_key, message)
  end
end

local function key_conflict(ikey, seq)
  -- The relay reads the seq after the code; nothing was stored.
  return redis.error_reply('KEYCONFLICT ' .. seq .. ' idempotency key ' .. ikey ..
    ' was used for another delta')
end

-- FCALL kasagi_publish 4|5 seq ops channel keys [sizes]  kind delta-json [idempotency-key]
--   -> seq
-- A key stored with another delta (kind and JSON) is an error KEYCONFLICT <seq>.
local function publish(keys, args)
  local seq_key, ops_key, channel_key, keys_key = keys[1], keys[2], keys[3], keys[4]
  local kind, d, ikey = args[1], args[2], args[3]
  if #keys ~= 4 and #keys ~= 5 then
    return redis.error_reply('ERR kasagi_publish: expected 4 or 5 keys (seq ops channel keys [sizes])')
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
  note_size(sizes_key(keys, 5), seq, #d)
  announce(channel_key, '{"seq":' .. seq .. ',"' .. kind .. '":' .. d .. '}')
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

-- FCALL kasagi_snapshot_live 3 snapshot seq ops  snap-seq data digest [digest...]
--   -> 1 written, 0 not newer, -1 refused
-- A relay's live state at snap-seq (compaction without reading the history back), written
-- only while the stream still holds the last ops the relay applied: the i-th digest is
-- sha1 hex of the channel message {"seq":N,"<kind>":<delta>} (what kasagi_publish
-- announced) of op snap-seq - (i - 1), at most MAX_DIGESTS of them. After a failover a
-- relay may hold a delta the new master never got (or stores another delta at its seq);
-- storing that state would make every relay load it. Refused (-1) then, and when snap-seq
-- is past the room's seq: the relay compacts from the history instead. The snapshot's tick
-- is left as it was, as kasagi_snapshot is passed it back. Checked first: not newer than
-- the stored snapshot (whose ops the trim may have dropped) is 0.
local MAX_DIGESTS = 16
local function snapshot_live(keys, args)
  local snap_key, seq_key, ops_key = keys[1], keys[2], keys[3]
  local snap_seq = tonumber(args[1])
  local n = #args - 2
  if #keys ~= 3 or snap_seq == nil or snap_seq < 1 or n < 1 or n > MAX_DIGESTS or n > snap_seq then
    return redis.error_reply('ERR kasagi_snapshot_live: expected 3 keys (snapshot seq ops)' ..
      ' and snap-seq data digest [digest...] (at most ' .. MAX_DIGESTS .. ', one per op)')
  end
  local stored = tonumber(redis.call('HGET', snap_key, 'seq') or '-1')
  if snap_seq <= stored then
    return 0
  end
  local last = tonumber(redis.call('GET', seq_key) or '0')
  if snap_seq > last then
    return -1
  end
  local first = snap_seq - n + 1
  local entries = redis.call('XRANGE', ops_key, first .. '-0', snap_seq .. '-0')
  if #entries ~= n then
    return -1
  end
  for i = 1, n do
    local entry = entries[n - i + 1]
    local seq = snap_seq - i + 1
    if entry[1] ~= seq .. '-0' then
      return -1
    end
    -- Read back as the relay does (redis_store._entry_op): a missing field is patch / null.
    local kind, d = 'patch', 'null'
    local fields = entry[2]
    for j = 1, #fields, 2 do
      if fields[j] == 'k' then
        kind = fields[j + 1]
      elseif fields[j] == 'd' then
        d = fields[j + 1]
      end
    end
    if redis.sha1hex('{"seq":' .. seq .. ',"' .. kind .. '":' .. d .. '}') ~= args[i + 2] then
      return -1
    end
  end
  redis.call('HSET', snap_key, 'data', args[2], 'seq', snap_seq)
  return 1
end

-- The first seq from which the ops' delta JSON totals at most `max_bytes`, from the
-- running totals (a binary search: nothing of the history itself is read).
local function bytes_cut(key, last, max_bytes)
  local n = redis.call('LLEN', key)
  if n < 2 then
    return 1
  end
  local base = last - (n - 1)
  local threshold = tonumber(redis.call('LINDEX', key, -1)) - max_bytes
  -- The first index whose total reaches the threshold: the ops after it fit.
  local lo, hi = 0, n - 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if tonumber(redis.call('LINDEX', key, mid)) >= threshold then
      hi = mid
    else
      lo = mid + 1
    end
  end
  return base + lo + 1
end

-- FCALL kasagi_trim 3|4 seq ops snapshot [sizes]  keep-from max-len [max-bytes]
--   -> entries removed
-- Keeps at most max-len entries and max-bytes bytes of delta JSON (0 or absent: no byte
-- limit), none before keep-from; never drops an op the snapshot does not cover: the
-- state would be lost.
local function trim(keys, args)
  local seq_key, ops_key, snap_key = keys[1], keys[2], keys[3]
  local size_key = sizes_key(keys, 4)
  local keep_from, max_len = tonumber(args[1]), tonumber(args[2])
  local max_bytes = tonumber(args[3] or '0')
  if keep_from == nil or max_len == nil or max_bytes == nil then
    return redis.error_reply('ERR kasagi_trim: expected keep-from max-len [max-bytes]')
  end
  local last = tonumber(redis.call('GET', seq_key) or '0')
  local covered = tonumber(redis.call('HGET', snap_key, 'seq') or '0')
  local cut = math.max(keep_from, last - max_len + 1, 1)
  if max_bytes > 0 and cut <= covered then
    cut = math.max(cut, bytes_cut(size_key, last, max_bytes))
  end
  cut = math.min(cut, covered + 1)
  if cut <= 1 then
    return 0
  end
  -- Keep the total of op cut - 1: the base the kept ops' sizes are measured from.
  local n = redis.call('LLEN', size_key)
  local drop = (cut - 1) - (last - (n - 1))
  if n > 0 and drop > 0 then
    redis.call('LTRIM', size_key, drop, -1)
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
redis.register_function('kasagi_snapshot_live', snapshot_live)
redis.register_function('kasagi_trim', trim)
redis.register_function('kasagi_unlock', unlock)
redis.register_function{
  function_name = 'kasagi_version',
  callback = function() return VERSION end,
  flags = { 'no-writes' },
}
