-- remove: delete a mailbox's state, lease, claim, schedule entries and stored credential; its
-- change entries stay, followed by a lifecycle entry saying it was removed.
-- KEYS[1] state hash, KEYS[2] lease, KEYS[3] claim, KEYS[4] the shard's schedule zset,
-- KEYS[5] the shard's renewal-failing zset, KEYS[6] the shard's change stream,
-- KEYS[7] the shard's credentials hash
-- ARGV[1] mailbox, ARGV[2] stream MAXLEN (approximate)
-- Returns 1 if removed, 0 if it was not registered.
local cursor = redis.call('HGET', KEYS[1], 'cursor')
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
-- Also when not registered: `mailbox add` stores the token before users.watch, which may fail.
redis.call('HDEL', KEYS[7], ARGV[1])
if not cursor then return 0 end
redis.call('DEL', KEYS[1])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[2], '*', 'v', '1', 'mailbox', ARGV[1],
  'kind', 'mailbox_removed', 'history_id', cursor)
return 1
