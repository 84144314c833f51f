-- GCRA (generic cell rate algorithm) for one limit, the same steps as `gcra::step` in Rust.
-- KEYS[1]: the limit's theoretical arrival time (TAT), microseconds on this Redis's clock.
-- ARGV[1]: count, ARGV[2]: period in microseconds, ARGV[3]: cost of this request,
-- ARGV[4] (optional): "1" to only look (whether the cost would fit), consuming nothing.
-- ARGV[5] (optional): tokens to lease beyond the cost (see `lease.rs`), granted whole and only
-- while at least twice as many are left after the request, else none.
-- ARGV[6] (optional): leased tokens given back unused, returned before deciding.
-- Returns {allowed 1|0, remaining, reset_us (until the bucket is full), retry_after_us, leased}.
-- Time comes from TIME here, never from clients, so replicas with skewed clocks agree; Redis 7
-- replicates the effects of a script, so a non-deterministic command before a write is fine.
local count = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local wanted = tonumber(ARGV[5]) or 0
local refund = tonumber(ARGV[6]) or 0
local interval = period / count
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
tat = tat - refund * interval
if tat < now then
  tat = now
end
-- A tiny epsilon keeps float division from turning 3 into 2.9999999.
local function left(at)
  return math.max(0, math.floor((period - (at - now)) / interval + 1e-6))
end
local new_tat = tat + cost * interval
local allow_at = new_tat - period
if now < allow_at then
  if refund > 0 then
    redis.call('SET', KEYS[1], string.format('%.17g', tat), 'PX', math.max(1, math.ceil((tat - now) / 1000)))
  end
  return {0, left(tat), math.ceil(tat - now), math.ceil(allow_at - now), 0}
end
if ARGV[4] == '1' then
  return {1, left(tat), math.ceil(tat - now), 0, 0}
end
local leased = 0
if wanted > 0 and left(new_tat) >= 2 * wanted then
  leased = wanted
  new_tat = new_tat + leased * interval
end
-- The key lives exactly until its bucket would be full again.
local ttl_ms = math.max(1, math.ceil((new_tat - now) / 1000))
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', ttl_ms)
return {1, left(new_tat), math.ceil(new_tat - now), 0, leased}
