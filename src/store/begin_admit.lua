-- begin_admit: `begin`, then, only if it took the lease, the quota admission (`quota_charge` in
-- mode 'admit'), in one step: one round trip where a governed sync made two. Single Redis only
-- (the project's windows have a hash tag of their own). The two scripts' bodies are prepended
-- as the functions `begin` and `charge` (store::quota::begin_admit_source).
-- KEYS[1..2] begin's keys (state, lease), KEYS[3..] the charge's keys.
-- ARGV[1..3] begin's arguments (target, lease token, lease TTL ms), ARGV[4..] the charge's.
-- Returns {begin outcome, cursor, charge outcome, index, value}: the charge fields are
-- {'', 0, 0} when the lease was not taken (nothing charged). When the charge refuses, the
-- lease just taken is given back in the same step: nothing is held while the work waits.
local b = begin({KEYS[1], KEYS[2]}, {ARGV[1], ARGV[2], ARGV[3]})
if b[1] ~= 'leased' then return {b[1], b[2], '', 0, 0} end
local keys, args = {}, {}
for i = 3, #KEYS do keys[#keys + 1] = KEYS[i] end
for i = 4, #ARGV do args[#args + 1] = ARGV[i] end
local c = charge(keys, args)
if c[1] ~= 'ok' and redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('DEL', KEYS[2])
end
return {b[1], b[2], c[1], c[2], c[3]}
