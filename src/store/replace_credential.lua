-- replace_credential: swap a mailbox's sealed credential only if it is still the value the
-- caller read, so a rotation never overwrites a token stored meanwhile by `mailbox add`.
-- KEYS[1] the shard's credentials hash
-- ARGV[1] mailbox, ARGV[2] the value read (expected), ARGV[3] the new value
-- Returns 'replaced', 'changed' (another value is there now) or 'gone' (no value any more).
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 'gone' end
if current ~= ARGV[2] then return 'changed' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 'replaced'
