-- lease: renew or release a mailbox lease only if it is still ours.
-- KEYS[1] mailbox lease; ARGV[1] token; ARGV[2] TTL ms, or '0' to release.
-- Returns 1 if the lease was ours, 0 otherwise.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
