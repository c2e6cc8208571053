-- commit: append change entries and advance the cursor, atomically (invariants I2, I3, I4).
-- KEYS[1] mailbox state hash, KEYS[2] mailbox lease, KEYS[3] the shard's change stream,
-- KEYS[4] the user's quota in-flight zset (same hash tag as the mailbox's keys)
-- ARGV[1] lease token, ARGV[2] expected cursor (the one the entries follow),
-- ARGV[3] new cursor, ARGV[4] lease TTL ms, ARGV[5] stream MAXLEN (approximate),
-- ARGV[6] mailbox, ARGV[7] '1' to release the lease, ARGV[8] now (epoch s),
-- ARGV[9] the in-flight slot token to remove with the lease ('' for none),
-- ARGV[10..] entries: a field/value count n, then n strings; repeated.
-- Returns {outcome, cursor}: ok | lease_lost | unknown | conflict | backwards
local function gt(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {'lease_lost', ''} end
local cursor = redis.call('HGET', KEYS[1], 'cursor')
if not cursor then return {'unknown', ''} end
-- Compare-and-advance: the entries were read after ARGV[2]; if the cursor moved, writing them
-- could duplicate what another sync wrote.
if cursor ~= ARGV[2] then return {'conflict', cursor} end
if gt(cursor, ARGV[3]) then return {'backwards', cursor} end
-- Scripts do not roll back: validate every entry before the first write.
local i = 10
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  if not n or n < 0 or n % 2 ~= 0 or i + n > #ARGV then
    return redis.error_reply('commit: malformed entry list at ' .. i)
  end
  i = i + n + 1
end
i = 10
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local fields = {'v', '1', 'mailbox', ARGV[6]}
  for j = i + 1, i + n do fields[#fields + 1] = ARGV[j] end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', unpack(fields))
  i = i + n + 1
end
redis.call('HSET', KEYS[1], 'cursor', ARGV[3], 'synced', ARGV[8])
if ARGV[7] == '1' then
  redis.call('DEL', KEYS[2])
  -- The sync's quota slot goes with its lease: the step that ends the work frees both.
  if ARGV[9] ~= '' then redis.call('ZREM', KEYS[4], ARGV[9]) end
else
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return {'ok', ARGV[3]}
