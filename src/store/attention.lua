-- attention: mark a registered mailbox as needing attention (permanent Gmail/auth error), park
-- its schedule (no renewal, no fallback sync) and write a lifecycle entry to its change stream.
-- KEYS[1] mailbox state hash, KEYS[2] the shard's schedule zset, KEYS[3] the shard's
-- renewal-failing zset, KEYS[4] the mailbox's claim key, KEYS[5] the shard's change stream
-- ARGV[1] reason (already truncated), ARGV[2] mailbox, ARGV[3] stream MAXLEN (approximate),
-- ARGV[4] what failed: sync | renewal, ARGV[5] kind: needs_reauthorization | failed
-- Returns 1 if newly marked, 2 if it was already marked (reason updated, no new entry),
-- 0 if the mailbox is not registered (never create a cursor-less state hash).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local already = redis.call('HEXISTS', KEYS[1], 'attention') == 1
redis.call('HSET', KEYS[1], 'attention', ARGV[1], 'attention_kind', ARGV[5])
redis.call('ZADD', KEYS[2], '+inf', ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[4])
if already then return 2 end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[3], '*', 'v', '1', 'mailbox', ARGV[2],
  'kind', 'mailbox_attention', 'history_id', redis.call('HGET', KEYS[1], 'cursor'),
  'reason', ARGV[1], 'source', ARGV[4], 'attention', ARGV[5])
return 1
