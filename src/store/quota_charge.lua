-- quota_charge: check sliding-window quota budgets and charge them, and take an in-flight slot,
-- in one step. Time is Redis's own (TIME), so every replica counts on one clock.
-- KEYS[1..n] window hashes: field = bucket number (epoch ms / bucket ms), value = units charged
--   in it; field 'b' = blocked until (epoch ms), set by quota_block.lua from a Gmail rate limit.
-- KEYS[n+1] the user's in-flight zset (member = slot token, score = its expiry, epoch ms), only
--   when ARGV[3] is not ''.
-- ARGV[1] units, ARGV[2] mode: 'admit' (refuse what does not fit) | 'record' (charge anyway),
-- ARGV[3] slot token or '', ARGV[4] slot cap, ARGV[5] slot TTL ms, ARGV[6] n,
-- then for window i: ARGV[6+3i-2] limit, ARGV[6+3i-1] span ms, ARGV[6+3i] bucket ms.
-- A bucket counts while now < its start + span + bucket: at least `span` after every charge in
-- it, so the window is never more lenient than a true sliding window of `span`.
-- Returns {'ok', 0, now} | {'spent', i, wait ms} | {'blocked', i, wait ms} | {'in_flight', 0, -1}.
-- Nothing is written unless it returns 'ok'.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local units = tonumber(ARGV[1])
local token = ARGV[3]
local n = tonumber(ARGV[6])
local function spec(i)
  return tonumber(ARGV[6 + 3 * i - 2]), tonumber(ARGV[6 + 3 * i - 1]), tonumber(ARGV[6 + 3 * i])
end
if ARGV[2] == 'admit' then
  for i = 1, n do
    local blocked = tonumber(redis.call('HGET', KEYS[i], 'b') or '0')
    if blocked > now then return {'blocked', i, blocked - now} end
  end
  if token ~= '' then
    redis.call('ZREMRANGEBYSCORE', KEYS[n + 1], '-inf', now)
    if redis.call('ZCARD', KEYS[n + 1]) >= tonumber(ARGV[4]) then return {'in_flight', 0, -1} end
  end
  for i = 1, n do
    local limit, span, bucket = spec(i)
    local flat = redis.call('HGETALL', KEYS[i])
    local used, live = 0, {}
    for j = 1, #flat, 2 do
      local f = flat[j]
      if f ~= 'b' then
        local start = tonumber(f) * bucket
        if start + span + bucket <= now then
          redis.call('HDEL', KEYS[i], f)
        else
          local v = tonumber(flat[j + 1])
          used = used + v
          live[#live + 1] = {start, v}
        end
      end
    end
    if used + units > limit then
      -- The wait: until enough of the oldest buckets have left the window.
      table.sort(live, function(a, b) return a[1] < b[1] end)
      local wait = span + bucket
      local left = used
      for _, e in ipairs(live) do
        left = left - e[2]
        if left + units <= limit then
          wait = e[1] + span + bucket - now
          break
        end
      end
      return {'spent', i, wait}
    end
  end
end
for i = 1, n do
  local _, span, bucket = spec(i)
  redis.call('HINCRBY', KEYS[i], string.format('%d', math.floor(now / bucket)), units)
  -- Only ever extended: a block may need the hash to live longer than its buckets.
  if redis.call('PTTL', KEYS[i]) < span + 2 * bucket then
    redis.call('PEXPIRE', KEYS[i], span + 2 * bucket)
  end
end
if token ~= '' then
  local ttl = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[n + 1], now + ttl, token)
  -- Every slot expires within ttl of now, so the zset may too (a killed worker's slots go).
  redis.call('PEXPIRE', KEYS[n + 1], ttl)
end
return {'ok', 0, now}
