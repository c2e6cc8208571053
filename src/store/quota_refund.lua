-- quota_refund: undo a quota_charge.lua that answered 'ok' at `at`, because a later part of the
-- same admission (the project's budgets, another hash slot on a cluster) refused.
-- KEYS[1..n] window hashes, KEYS[n+1] the in-flight zset when ARGV[3] is not ''.
-- ARGV[1] units, ARGV[2] at (epoch ms, as returned by the charge), ARGV[3] slot token or '',
-- ARGV[4] n, then ARGV[4+i] bucket ms of window i.
local units = tonumber(ARGV[1])
local at = tonumber(ARGV[2])
local n = tonumber(ARGV[4])
for i = 1, n do
  local field = string.format('%d', math.floor(at / tonumber(ARGV[4 + i])))
  if redis.call('HEXISTS', KEYS[i], field) == 1 then
    redis.call('HINCRBY', KEYS[i], field, -units)
  end
end
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[n + 1], ARGV[3]) end
return 1
