-- One counter of failed logins: a hash of `failures` and `locked_until` (milliseconds on this
-- Redis's clock), so replicas with skewed clocks agree.
-- KEYS[1]: the counter.
-- ARGV[1]: 'check' (how long is it locked?), 'fail' (count a failure) or 'reset' (forget it).
-- For 'fail': ARGV[2] threshold, ARGV[3] first lock (ms), ARGV[4] longest lock (ms), ARGV[5] how
-- long the counter outlives its last failure or lock (ms).
-- Returns the milliseconds the counter's subject stays locked; 0: not locked.
local op = ARGV[1]
if op == 'reset' then
  redis.call('DEL', KEYS[1])
  return 0
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local locked_until = tonumber(redis.call('HGET', KEYS[1], 'locked_until')) or 0
if op == 'check' then
  return math.max(0, locked_until - now)
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local threshold = tonumber(ARGV[2])
if failures >= threshold then
  -- Doubling per failure past the threshold; the exponent is capped so the number stays finite.
  local wait = math.min(tonumber(ARGV[3]) * 2 ^ math.min(failures - threshold, 40), tonumber(ARGV[4]))
  locked_until = math.max(locked_until, now + wait)
  redis.call('HSET', KEYS[1], 'locked_until', string.format('%d', locked_until))
end
redis.call('PEXPIRE', KEYS[1], math.max(0, locked_until - now) + tonumber(ARGV[5]))
return math.max(0, locked_until - now)
