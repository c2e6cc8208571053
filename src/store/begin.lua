-- begin: decide whether a sync is needed and, if so, take the mailbox lease. One round trip.
-- KEYS[1] mailbox state hash, KEYS[2] mailbox lease
-- ARGV[1] target historyId (canonical decimal), ARGV[2] lease token, ARGV[3] lease TTL ms
-- Returns {outcome, cursor}: unknown | attention | up_to_date | leased | busy
local function gt(a, b) -- a > b for canonical decimal strings (Lua numbers lose precision > 2^53)
  if #a ~= #b then return #a > #b end
  return a > b
end
local st = redis.call('HMGET', KEYS[1], 'cursor', 'attention')
local cursor = st[1]
if not cursor then return {'unknown', ''} end
if st[2] then return {'attention', cursor} end
if not gt(ARGV[1], cursor) then return {'up_to_date', cursor} end
-- A retried call (after a dropped connection) finds its own token: that is still our lease.
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) or redis.call('GET', KEYS[2]) == ARGV[2] then
  return {'leased', cursor}
end
return {'busy', cursor}
