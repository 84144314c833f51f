-- GCRA (generic cell rate algorithm) for one limit, the same steps as `gcra::step` in Rust.
-- KEYS[1]: the limit's theoretical arrival time (TAT), microseconds on this Redis's clock.
-- ARGV[1]: count, ARGV[2]: period in microseconds, ARGV[3]: cost of this request,
-- ARGV[4] (optional): "1" to only look (whether the cost would fit), consuming nothing.
-- Returns {allowed 1|0, remaining, reset_us (until the bucket is full), retry_after_us}.
-- Time comes from TIME here, never from clients, so replicas with skewed clocks agree; Redis 7
-- replicates the effects of a script, so a non-deterministic command before a write is fine.
local count = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local interval = period / count
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then
  tat = now
end
local new_tat = tat + cost * interval
local allow_at = new_tat - period
-- A tiny epsilon keeps float division from turning 3 into 2.9999999.
if now < allow_at then
  local remaining = math.max(0, math.floor((period - (tat - now)) / interval + 1e-6))
  return {0, remaining, math.ceil(tat - now), math.ceil(allow_at - now)}
end
if ARGV[4] == '1' then
  return {1, math.max(0, math.floor((period - (tat - now)) / interval + 1e-6)), math.ceil(tat - now), 0}
end
-- The key lives exactly until its bucket would be full again.
local ttl_ms = math.max(1, math.ceil((new_tat - now) / 1000))
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', ttl_ms)
local remaining = math.max(0, math.floor((period - (new_tat - now)) / interval + 1e-6))
return {1, remaining, math.ceil(new_tat - now), 0}
