-- register: add a mailbox (or re-enable it) idempotently, never moving its cursor backwards, and
-- schedule its watch renewal and fallback sync.
-- KEYS[1] mailbox state hash, KEYS[2] the shard's schedule zset, KEYS[3] the shard's
-- renewal-failing zset
-- ARGV[1] baseline cursor (the watch response's historyId), ARGV[2] watch expiration (epoch s),
-- ARGV[3] next renewal (epoch s), ARGV[4] schedule score (epoch ms), ARGV[5] mailbox,
-- ARGV[6] label filter ('' = the whole mailbox), ARGV[7] now (epoch s)
-- Returns {created (1/0), cursor}
local created = redis.call('HSETNX', KEYS[1], 'cursor', ARGV[1])
-- The baseline is what Gmail had at watch time: as good as a sync, so silence counts from here.
redis.call('HSETNX', KEYS[1], 'synced', ARGV[7])
redis.call('HDEL', KEYS[1], 'attention', 'attention_kind', 'renew_fails')
redis.call('HSET', KEYS[1], 'watch', ARGV[2], 'renew', ARGV[3])
if ARGV[6] == '' then
  redis.call('HDEL', KEYS[1], 'labels')
else
  redis.call('HSET', KEYS[1], 'labels', ARGV[6])
end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
redis.call('ZREM', KEYS[3], ARGV[5])
return {created, redis.call('HGET', KEYS[1], 'cursor')}
