-- register: add a mailbox (or re-enable it) idempotently, never moving its cursor backwards.
-- KEYS[1] mailbox state hash, KEYS[2] the shard's watch-expiry sorted set
-- ARGV[1] baseline cursor (the watch response's historyId), ARGV[2] watch expiration (epoch ms),
-- ARGV[3] mailbox
-- Returns {created (1/0), cursor}
local created = redis.call('HSETNX', KEYS[1], 'cursor', ARGV[1])
redis.call('HDEL', KEYS[1], 'attention')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return {created, redis.call('HGET', KEYS[1], 'cursor')}
