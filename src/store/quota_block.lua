-- quota_block: Gmail answered a rate limit; block the budget until now + ARGV[1] ms (never
-- shortening a later block), so every replica waits instead of asking Gmail again.
-- KEYS[1] the budget's window hash (quota_charge.lua's field 'b').
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(ARGV[1])
local till = now + ms
if tonumber(redis.call('HGET', KEYS[1], 'b') or '0') < till then
  redis.call('HSET', KEYS[1], 'b', till)
end
if redis.call('PTTL', KEYS[1]) < ms then redis.call('PEXPIRE', KEYS[1], ms) end
return till
