-- attention: mark a registered mailbox as needing attention (permanent Gmail/auth error).
-- KEYS[1] mailbox state hash; ARGV[1] reason (already truncated by the caller).
-- Only when the mailbox still exists: never create a cursor-less state hash.
-- Returns 1 if marked, 0 if the mailbox is not registered.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'attention', ARGV[1])
  return 1
end
return 0
