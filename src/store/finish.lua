-- finish: record what the scheduler did under its claim, reschedule the mailbox, drop the claim.
-- KEYS[1] mailbox state hash, KEYS[2] the shard's schedule zset, KEYS[3] the claim key,
-- KEYS[4] the shard's renewal-failing zset
-- ARGV[1] claimer identity, ARGV[2] mailbox, ARGV[3] outcome: renewed | renew_failed | done |
-- deferred, ARGV[4] watch expiration (epoch s; renewed), ARGV[5] next renewal (epoch s) when
-- renewed, the retry base (ms) when renew_failed, the wait (ms) when deferred, ARGV[6] silence ms, ARGV[7] fallback jitter ms,
-- ARGV[8] now (epoch ms), ARGV[9] retry cap (ms) when renew_failed
-- Returns ok | lost (the claim ran out; nothing written) | gone (removed meanwhile)
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 'lost' end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[3])
  return 'gone'
end
local m = ARGV[2]
if ARGV[3] == 'deferred' then
  -- The quota governor said wait: look again then; nothing about the mailbox changes (no
  -- failure counted, the renewal and fallback times stay).
  redis.call('ZADD', KEYS[2], tonumber(ARGV[8]) + tonumber(ARGV[5]), m)
  redis.call('DEL', KEYS[3])
  return 'ok'
end
if ARGV[3] == 'renewed' then
  -- Renewal never touches the cursor.
  redis.call('HSET', KEYS[1], 'watch', ARGV[4], 'renew', ARGV[5])
  redis.call('HDEL', KEYS[1], 'renew_fails')
  redis.call('ZREM', KEYS[4], m)
elseif ARGV[3] == 'renew_failed' then
  -- Exponential backoff from the failure count kept here, so any replica continues it.
  local fails = redis.call('HINCRBY', KEYS[1], 'renew_fails', 1)
  local delay = math.min(tonumber(ARGV[5]) * 2 ^ math.min(fails - 1, 30), tonumber(ARGV[9]))
  redis.call('HSET', KEYS[1], 'renew', math.floor((tonumber(ARGV[8]) + delay) / 1000))
  local watch = tonumber(redis.call('HGET', KEYS[1], 'watch') or '0')
  redis.call('ZADD', KEYS[4], watch * 1000, m)
end
local st = redis.call('HMGET', KEYS[1], 'renew', 'synced', 'attention')
if st[3] then
  redis.call('ZADD', KEYS[2], '+inf', m)
else
  local now = tonumber(ARGV[8])
  local renew_at = (tonumber(st[1]) or 0) * 1000
  local synced = tonumber(st[2])
  local base = synced and synced * 1000 or now
  redis.call('ZADD', KEYS[2], math.min(renew_at, base + tonumber(ARGV[6]) + tonumber(ARGV[7])), m)
end
redis.call('DEL', KEYS[3])
return 'ok'
