//! The live counters of quotas and stats in Redis, and the Lua scripts that change them.
//!
//! Every key of a project carries the project id as its hash tag, so all of them live in one
//! Redis Cluster slot and one script sees them all at once: checking every limit and adding a
//! reservation to every counter is a single atomic step, with no check-then-increment race
//! between replicas. Keys (under `redis.key("usage", ..)`, `{P}` the project id):
//!
//! - `{P}:windows`: the marker, a hash naming the day, month and minute whose counters are known
//!   to be complete (`day`, `month`, `minute`). Absent: Redis lost the project (flushed, new,
//!   idle for 35 days) and the counters are rebuilt from PostgreSQL before anything is decided.
//! - `{P}:day:<yyyymmdd>`: `t:<s>` tokens counted against tokens_per_day of subject `<s>` (`p`
//!   the project, `u:<user>`, `k:<api key>`); `s:{r,i,o,c}:<s>` today's requests, input and
//!   output tokens and cost of actual usage for stats (`<s>` is `p`, `u:<user>` or `m:<model>`).
//! - `{P}:month:<yyyymm>`: `c:<s>` cost counted against cost_per_month.
//! - `{P}:minute:<minutes since epoch>`: `r:<s>` requests and `t:<s>` tokens of the minute.
//! - `{P}:reservations` (hash id -> what the reservation added where) and
//!   `{P}:reservation-expiry` (sorted set id -> expiry in ms): open reservations. Every script
//!   first gives back the room of expired ones (at most 100 per call).
//!
//! Each window hash holds a `_` field from its creation, so "absent" always means "never created"
//! or "lost". A window absent while the marker names it was lost (evicted, deleted): that too
//! triggers a rebuild. A window absent while the marker names an older one is simply new.
//!
//! Quota counters hold reservations plus actual usage; stats hold actual usage only. Costs are
//! integers of 1e-9 USD, each record's or reservation's cost rounded up. Amounts are passed to
//! Lua as decimal strings and stay below 2^53 (see `domain::MAX_PRICE_PER_MILLION`), so Lua's
//! doubles hold them exactly; `string.format('%d')` turns them back into integers for HINCRBY.
//!
//! Counting is by the time usage was accepted (records) or reserved (reservations), not by the
//! request time a client reports: a late record counts in today's windows.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use fred::interfaces::HashesInterface;
use fred::types::scripts::Script;
use serde::Serialize;
use uuid::Uuid;

use aimesh_kit::data::redis::{Redis, RedisError, timed};

use crate::domain::{QuotaLimits, QuotaScope, QuotaSubject, Windows};

/// A granted reservation that leaves a quota at this percentage of a limit or more counts in
/// `usage_quota_near_limit_total{scope}`; a refused one in `usage_quota_exceeded_total{scope}`.
const NEAR_LIMIT_PERCENT: i64 = 80;

/// How long the marker outlives the project's last use.
const MARKER_TTL_MS: i64 = 35 * 24 * 60 * 60 * 1000;
/// How long the reservation keys outlive the last reservation: longer than any reservation.
const RESERVATIONS_TTL_MS: i64 = 2 * 60 * 60 * 1000;

/// What every script shares: KEYS are the marker, the day, month and minute hashes, the
/// reservations hash and the expiry set; ARGV[1..8] are now (ms), the day, month and minute
/// ids, their expiry times (ms) and the marker's lifetime (ms).
const PRELUDE: &str = r#"
local function int(n) return string.format('%d', n) end
local function add(key, field, amount)
  if amount ~= 0 then redis.call('HINCRBY', key, field, int(amount)) end
end
-- false when the counters must be rebuilt from PostgreSQL first; creates new windows.
local function ensure_windows()
  if redis.call('EXISTS', KEYS[1]) == 0 then return false end
  local windows = {{KEYS[2], 'day', ARGV[2], ARGV[5]}, {KEYS[3], 'month', ARGV[3], ARGV[6]},
                   {KEYS[4], 'minute', ARGV[4], ARGV[7]}}
  for _, w in ipairs(windows) do
    if redis.call('EXISTS', w[1]) == 0 then
      if redis.call('HGET', KEYS[1], w[2]) == w[3] then return false end
      redis.call('HSET', w[1], '_', '1')
      redis.call('PEXPIREAT', w[1], w[4])
      redis.call('HSET', KEYS[1], w[2], w[3])
    end
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  return true
end
-- Gives back what a reservation added to the current windows; past windows are not enforced
-- any more, so what it added there stays.
local function give_back(raw)
  local e = cjson.decode(raw)
  local t = tonumber(e.t)
  local c = tonumber(e.c)
  for _, f in ipairs(e.s) do
    if e.d == ARGV[2] then add(KEYS[2], 't:' .. f, -t) end
    if e.mo == ARGV[3] then add(KEYS[3], 'c:' .. f, -c) end
    if e.mi == ARGV[4] then
      add(KEYS[4], 'r:' .. f, -1)
      add(KEYS[4], 't:' .. f, -t)
    end
  end
end
-- Removes a reservation, giving its room back if it is still here (a rebuild keeps only open
-- ones, so a reservation is never given back twice).
local function take(id)
  local raw = redis.call('HGET', KEYS[5], id)
  if raw then
    give_back(raw)
    redis.call('HDEL', KEYS[5], id)
  end
  redis.call('ZREM', KEYS[6], id)
end
local function purge()
  local expired = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', ARGV[1], 'LIMIT', 0, 100)
  for _, id in ipairs(expired) do take(id) end
end
local function count(fields, tokens, cost)
  for _, f in ipairs(fields) do
    add(KEYS[2], 't:' .. f, tokens)
    add(KEYS[3], 'c:' .. f, cost)
    add(KEYS[4], 'r:' .. f, 1)
    add(KEYS[4], 't:' .. f, tokens)
  end
end
"#;

/// ARGV[9] reservation id, [10] its entry, [11] its expiry (ms), [12] tokens, [13] cost,
/// [14] lifetime of the reservation keys (ms), [15] the subjects with their limits (JSON),
/// [16] the percentage of a limit from which a subject is near it.
/// Checks every limit of every subject; only if all pass, adds the reservation everywhere.
/// Answers `{'OK', scopes near a limit (comma separated), warnings...}` or `{'LIMIT', limit,
/// used, allowed, scope}`.
const RESERVE: &str = r#"
if not ensure_windows() then return {'REBUILD'} end
purge()
local tokens = tonumber(ARGV[12])
local cost = tonumber(ARGV[13])
local subjects = cjson.decode(ARGV[15])
local near_percent = tonumber(ARGV[16])
local warnings = {}
local near = {}
for _, s in ipairs(subjects) do
  local soft = tonumber(s.soft)
  local is_near = false
  local checks = {{KEYS[2], 't:' .. s.f, tokens, tonumber(s.tpd), 'tokens_per_day'},
                  {KEYS[3], 'c:' .. s.f, cost, tonumber(s.cpm), 'cost_per_month'},
                  {KEYS[4], 'r:' .. s.f, 1, tonumber(s.rpm), 'requests_per_minute'},
                  {KEYS[4], 't:' .. s.f, tokens, tonumber(s.tpm), 'tokens_per_minute'}}
  for _, c in ipairs(checks) do
    if c[4] > 0 then
      local used = tonumber(redis.call('HGET', c[1], c[2]) or '0')
      local after = used + c[3]
      if after > c[4] then return {'LIMIT', s.n .. ' ' .. c[5], int(used), int(c[4]), s.sc} end
      if after * 100 >= c[4] * near_percent then is_near = true end
      if soft > 0 and after * 100 >= c[4] * soft then
        table.insert(warnings, s.n .. ' ' .. c[5] .. ' at ' .. int(math.floor(after * 100 / c[4])) .. '%')
      end
    end
  end
  if is_near then table.insert(near, s.sc) end
end
local fields = {}
for _, s in ipairs(subjects) do table.insert(fields, s.f) end
count(fields, tokens, cost)
redis.call('HSET', KEYS[5], ARGV[9], ARGV[10])
redis.call('ZADD', KEYS[6], ARGV[11], ARGV[9])
redis.call('PEXPIRE', KEYS[5], ARGV[14])
redis.call('PEXPIRE', KEYS[6], ARGV[14])
return {'OK', table.concat(near, ','), unpack(warnings)}
"#;

/// ARGV[9] the reservations the records settle (JSON list of ids), [10..12] what the records
/// add to the day, month and minute windows, as flat JSON lists [field, amount, ...]. Counts
/// actual usage whatever the limits: it happened.
const RECORD: &str = r#"
if not ensure_windows() then return {'REBUILD'} end
purge()
for _, id in ipairs(cjson.decode(ARGV[9])) do take(id) end
for i, key in ipairs({KEYS[2], KEYS[3], KEYS[4]}) do
  local flat = cjson.decode(ARGV[9 + i])
  for j = 1, #flat, 2 do add(key, flat[j], tonumber(flat[j + 1])) end
end
return {'OK'}
"#;

/// ARGV[9] the reservation to give back. Without counters there is nothing to give back: the
/// rebuild reads the released state from PostgreSQL.
const RELEASE: &str = r#"
if ensure_windows() then
  purge()
  take(ARGV[9])
end
return {'OK'}
"#;

/// Whether the counters are complete (creating new windows, purging expired reservations).
const CHECK: &str = r#"
if not ensure_windows() then return {'REBUILD'} end
purge()
return {'OK'}
"#;

/// Replaces every counter of the project: ARGV[9..11] the day, month and minute fields as flat
/// JSON lists [field, value, ...], [12] reservations as [id, entry, expiry ms, ...], [13] the
/// reservation keys' lifetime (ms).
const REBUILD: &str = r#"
for i = 1, 6 do redis.call('DEL', KEYS[i]) end
local function fill(key, flat, expire_at)
  redis.call('HSET', key, '_', '1')
  for i = 1, #flat, 2 do redis.call('HSET', key, flat[i], flat[i + 1]) end
  redis.call('PEXPIREAT', key, expire_at)
end
fill(KEYS[2], cjson.decode(ARGV[9]), ARGV[5])
fill(KEYS[3], cjson.decode(ARGV[10]), ARGV[6])
fill(KEYS[4], cjson.decode(ARGV[11]), ARGV[7])
local reservations = cjson.decode(ARGV[12])
for i = 1, #reservations, 3 do
  redis.call('HSET', KEYS[5], reservations[i], reservations[i + 1])
  redis.call('ZADD', KEYS[6], reservations[i + 2], reservations[i])
end
if #reservations > 0 then
  redis.call('PEXPIRE', KEYS[5], ARGV[13])
  redis.call('PEXPIRE', KEYS[6], ARGV[13])
end
redis.call('HSET', KEYS[1], 'day', ARGV[2], 'month', ARGV[3], 'minute', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
return {'OK'}
"#;

/// What a script reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The counters are incomplete: rebuild them from PostgreSQL, then try again.
    Rebuild,
}

/// What the reserve script decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Reserved everywhere; soft limits passed, if any.
    Granted {
        warnings: Vec<String>,
    },
    /// Refused by `limit` ("project tokens_per_day"); nothing changed.
    Refused {
        limit: String,
        used: i64,
        allowed: i64,
    },
    Rebuild,
}

/// A subject of a reservation with its limits (all zero when it has no quota: its counters
/// still count, so a quota set later sees the usage so far).
#[derive(Debug, Clone)]
pub struct LimitedSubject {
    pub subject: QuotaSubject,
    pub limits: Option<QuotaLimits>,
}

/// What a reservation adds, where: kept in Redis to give it back later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReservationEntry {
    t: String,
    c: String,
    d: String,
    mo: String,
    mi: String,
    s: Vec<String>,
}

impl ReservationEntry {
    /// A reservation of `tokens` and `cost_nanos` made at `created_at` for `subjects`.
    pub fn new(tokens: i64, cost_nanos: i64, created_at: DateTime<Utc>, subjects: &[QuotaSubject]) -> Self {
        let windows = Windows::at(created_at);
        Self {
            t: tokens.to_string(),
            c: cost_nanos.to_string(),
            d: windows.day,
            mo: windows.month,
            mi: windows.minute,
            s: subjects.iter().map(|s| s.counter_field()).collect(),
        }
    }

    fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Every counter of a project as PostgreSQL says it should be (see [`Counters::replace`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub day: BTreeMap<String, i64>,
    pub month: BTreeMap<String, i64>,
    pub minute: BTreeMap<String, i64>,
    /// Open reservations: id, entry, expiry.
    pub reservations: Vec<(Uuid, ReservationEntry, DateTime<Utc>)>,
}

impl CounterSnapshot {
    /// Adds `amount` to `field` of a window (absent fields count as 0).
    pub fn add(map: &mut BTreeMap<String, i64>, field: String, amount: i64) {
        if amount != 0 {
            *map.entry(field).or_default() += amount;
        }
    }
}

/// The live counters of every project, over the shared Redis.
#[derive(Debug, Clone)]
pub struct Counters {
    redis: Redis,
    reserve: Script,
    record: Script,
    release: Script,
    check: Script,
    rebuild: Script,
}

fn script(body: &str) -> Script {
    Script::from_lua(format!("{PRELUDE}{body}"))
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "[]".to_owned())
}

/// The fields of a window as a flat JSON list `[field, value, ...]`, values as decimal strings.
fn flat(map: &BTreeMap<String, i64>) -> String {
    json(&map.iter().flat_map(|(k, v)| [k.clone(), v.to_string()]).collect::<Vec<_>>())
}

impl Counters {
    /// The counters in `redis`; the quota series exist, at 0, from now on.
    pub fn new(redis: Redis) -> Self {
        for scope in QuotaScope::ALL {
            metrics::counter!("usage_quota_near_limit_total", "scope" => scope.as_str()).increment(0);
            metrics::counter!("usage_quota_exceeded_total", "scope" => scope.as_str()).increment(0);
        }
        Self {
            redis,
            reserve: script(RESERVE),
            record: script(RECORD),
            release: script(RELEASE),
            check: script(CHECK),
            rebuild: script(REBUILD),
        }
    }

    /// The six keys of a project in `windows`, in the order the scripts expect.
    pub fn keys(&self, project_id: Uuid, windows: &Windows) -> Vec<String> {
        let key = |rest: String| self.redis.key("usage", &format!("{{{project_id}}}:{rest}"));
        vec![
            key("windows".to_owned()),
            key(format!("day:{}", windows.day)),
            key(format!("month:{}", windows.month)),
            key(format!("minute:{}", windows.minute)),
            key("reservations".to_owned()),
            key("reservation-expiry".to_owned()),
        ]
    }

    fn common_args(now: DateTime<Utc>, windows: &Windows) -> Vec<String> {
        vec![
            now.timestamp_millis().to_string(),
            windows.day.clone(),
            windows.month.clone(),
            windows.minute.clone(),
            windows.day_expire_ms.to_string(),
            windows.month_expire_ms.to_string(),
            windows.minute_expire_ms.to_string(),
            MARKER_TTL_MS.to_string(),
        ]
    }

    /// Runs `script`, timed as the Redis command `operation`.
    async fn run(
        &self,
        operation: &'static str,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Vec<String>, RedisError> {
        timed(operation, script.evalsha_with_reload(self.redis.pool().next(), keys, args)).await
    }

    /// Checks the limits of every subject and, if all pass, reserves `tokens` and `cost_nanos`
    /// (and one request) for each.
    #[allow(clippy::too_many_arguments)]
    pub async fn reserve(
        &self,
        project_id: Uuid,
        now: DateTime<Utc>,
        reservation_id: Uuid,
        expires_at: DateTime<Utc>,
        tokens: i64,
        cost_nanos: i64,
        subjects: &[LimitedSubject],
    ) -> Result<Decision, RedisError> {
        let windows = Windows::at(now);
        let plain: Vec<QuotaSubject> = subjects.iter().map(|s| s.subject).collect();
        let entry = ReservationEntry::new(tokens, cost_nanos, now, &plain);
        let limits: Vec<serde_json::Value> = subjects
            .iter()
            .map(|s| {
                let l = s.limits.unwrap_or(QuotaLimits {
                    tokens_per_day: 0,
                    cost_per_month: rust_decimal::Decimal::ZERO,
                    requests_per_minute: 0,
                    tokens_per_minute: 0,
                    soft_limit_percent: 0,
                });
                serde_json::json!({
                    "f": s.subject.counter_field(),
                    "n": s.subject.label(),
                    "sc": s.subject.scope().as_str(),
                    "tpd": l.tokens_per_day.to_string(),
                    "cpm": l.cost_per_month_nanos().to_string(),
                    "rpm": l.requests_per_minute.to_string(),
                    "tpm": l.tokens_per_minute.to_string(),
                    "soft": l.soft_limit_percent.to_string(),
                })
            })
            .collect();
        let mut args = Self::common_args(now, &windows);
        args.extend([
            reservation_id.to_string(),
            entry.json(),
            expires_at.timestamp_millis().to_string(),
            tokens.to_string(),
            cost_nanos.to_string(),
            RESERVATIONS_TTL_MS.to_string(),
            json(&limits),
            NEAR_LIMIT_PERCENT.to_string(),
        ]);
        let reply = self.run("reserve", &self.reserve, self.keys(project_id, &windows), args).await?;
        let number = |i: usize| reply.get(i).and_then(|s| s.parse::<i64>().ok()).unwrap_or_default();
        Ok(match reply.first().map(String::as_str) {
            Some("OK") => {
                for scope in
                    reply.get(1).map(String::as_str).unwrap_or_default().split(',').filter_map(QuotaScope::parse)
                {
                    metrics::counter!("usage_quota_near_limit_total", "scope" => scope.as_str()).increment(1);
                }
                Decision::Granted { warnings: reply.get(2..).unwrap_or_default().to_vec() }
            }
            Some("LIMIT") => {
                if let Some(scope) = reply.get(4).and_then(|scope| QuotaScope::parse(scope)) {
                    metrics::counter!("usage_quota_exceeded_total", "scope" => scope.as_str()).increment(1);
                }
                Decision::Refused {
                    limit: reply.get(1).cloned().unwrap_or_default(),
                    used: number(2),
                    allowed: number(3),
                }
            }
            _ => Decision::Rebuild,
        })
    }

    /// Counts the actual usage of records: `usage` holds what they add to the current day,
    /// month and minute windows (its reservations are not read), `settles` the reservations
    /// they settle, given back first if the counters still hold them.
    pub async fn record(
        &self,
        project_id: Uuid,
        now: DateTime<Utc>,
        settles: &[Uuid],
        usage: &CounterSnapshot,
    ) -> Result<Outcome, RedisError> {
        let windows = Windows::at(now);
        let mut args = Self::common_args(now, &windows);
        args.extend([
            json(&settles.iter().map(Uuid::to_string).collect::<Vec<_>>()),
            flat(&usage.day),
            flat(&usage.month),
            flat(&usage.minute),
        ]);
        let reply = self.run("record", &self.record, self.keys(project_id, &windows), args).await?;
        Ok(outcome(&reply))
    }

    /// Gives a reservation's room back, if the counters still hold it.
    pub async fn release(&self, project_id: Uuid, now: DateTime<Utc>, reservation_id: Uuid) -> Result<(), RedisError> {
        let windows = Windows::at(now);
        let mut args = Self::common_args(now, &windows);
        args.push(reservation_id.to_string());
        self.run("release", &self.release, self.keys(project_id, &windows), args).await.map(drop)
    }

    /// Whether the project's counters are complete at `now`.
    pub async fn check(&self, project_id: Uuid, now: DateTime<Utc>) -> Result<Outcome, RedisError> {
        let windows = Windows::at(now);
        let reply =
            self.run("check", &self.check, self.keys(project_id, &windows), Self::common_args(now, &windows)).await?;
        Ok(outcome(&reply))
    }

    /// Replaces every counter of the project with `snapshot`, in one step.
    pub async fn replace(
        &self,
        project_id: Uuid,
        now: DateTime<Utc>,
        snapshot: &CounterSnapshot,
    ) -> Result<(), RedisError> {
        let windows = Windows::at(now);
        let reservations: Vec<String> = snapshot
            .reservations
            .iter()
            .flat_map(|(id, entry, expires_at)| {
                [id.to_string(), entry.json(), expires_at.timestamp_millis().to_string()]
            })
            .collect();
        let mut args = Self::common_args(now, &windows);
        args.extend([
            flat(&snapshot.day),
            flat(&snapshot.month),
            flat(&snapshot.minute),
            json(&reservations),
            RESERVATIONS_TTL_MS.to_string(),
        ]);
        self.run("rebuild", &self.rebuild, self.keys(project_id, &windows), args).await.map(drop)
    }

    /// The raw fields of the project's day, month and minute windows at `now` (the `_` field
    /// left out); for stats and tests.
    pub async fn read(&self, project_id: Uuid, now: DateTime<Utc>) -> Result<CounterSnapshot, RedisError> {
        let windows = Windows::at(now);
        let keys = self.keys(project_id, &windows);
        let mut snapshot = CounterSnapshot::default();
        for (key, map) in
            [(&keys[1], &mut snapshot.day), (&keys[2], &mut snapshot.month), (&keys[3], &mut snapshot.minute)]
        {
            let fields: HashMap<String, i64> = timed("counters_read", self.redis.pool().hgetall(key.as_str())).await?;
            map.extend(fields.into_iter().filter(|(field, value)| field != "_" && *value != 0));
        }
        Ok(snapshot)
    }
}

fn outcome(reply: &[String]) -> Outcome {
    if reply.first().map(String::as_str) == Some("OK") { Outcome::Done } else { Outcome::Rebuild }
}
