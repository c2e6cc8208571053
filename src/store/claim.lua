-- claim: decide, for mailboxes whose schedule score is due, what the scheduler must do, and claim
-- those with work atomically (one claimer per mailbox across replicas).
-- KEYS[1] the shard's schedule zset, KEYS[2] the shard's renewal budget counter,
-- then for member i: KEYS[2+2i-1] its state hash, KEYS[2+2i] its claim key
-- ARGV[1] now (epoch ms), ARGV[2] claim TTL ms, ARGV[3] claimer identity, ARGV[4] silence ms,
-- ARGV[5] renewals allowed per budget window, ARGV[6] end of the budget window (epoch ms),
-- then for member i: ARGV[6+2i-1] the mailbox, ARGV[6+2i] its fallback jitter ms
-- Returns for each member: {mailbox, action, label filter ('' = whole mailbox)}, flattened;
-- action: renew | fallback | renew_fallback (claimed) | later | throttled | claimed | attention | gone
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local silence = tonumber(ARGV[4])
local cap = tonumber(ARGV[5])
local out = {}
local n = (#KEYS - 2) / 2
for i = 1, n do
  local state, claim = KEYS[2 + 2 * i - 1], KEYS[2 + 2 * i]
  local m, jitter = ARGV[6 + 2 * i - 1], tonumber(ARGV[6 + 2 * i])
  local st = redis.call('HMGET', state, 'cursor', 'attention', 'renew', 'synced', 'labels')
  local action
  if not st[1] then
    redis.call('ZREM', KEYS[1], m)
    action = 'gone'
  elseif st[2] then
    -- Parked until `mailbox add` clears the mark: never due.
    redis.call('ZADD', KEYS[1], '+inf', m)
    action = 'attention'
  elseif redis.call('EXISTS', claim) == 1 then
    action = 'claimed'
  else
    local renew_at = (tonumber(st[3]) or 0) * 1000
    local fallback_at = (tonumber(st[4]) or 0) * 1000 + silence
    local renew_due = renew_at <= now
    local fallback_due = fallback_at <= now
    if renew_due then
      local used = tonumber(redis.call('GET', KEYS[2]) or '0')
      if used < cap then
        redis.call('INCR', KEYS[2])
        if used == 0 then redis.call('PEXPIREAT', KEYS[2], ARGV[6]) end
        action = fallback_due and 'renew_fallback' or 'renew'
      elseif fallback_due then
        action = 'fallback'
      else
        -- Over this window's renewal budget: look again when the next window opens.
        redis.call('ZADD', KEYS[1], tonumber(ARGV[6]) + jitter % 1000, m)
        action = 'throttled'
      end
    elseif fallback_due then
      action = 'fallback'
    else
      -- Active since it was scheduled (notifications, syncs): look again later.
      redis.call('ZADD', KEYS[1], math.min(renew_at, fallback_at + jitter), m)
      action = 'later'
    end
    if action == 'renew' or action == 'fallback' or action == 'renew_fallback' then
      redis.call('SET', claim, ARGV[3], 'PX', ttl)
      -- Not due again before the claim runs out: a dead claimer's mailbox comes back then.
      redis.call('ZADD', KEYS[1], now + ttl, m)
    end
  end
  out[#out + 1] = m
  out[#out + 1] = action
  -- The renewal needs the watch's label filter: handed over here, not read again.
  out[#out + 1] = st[5] or ''
end
return out
