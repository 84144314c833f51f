//! The in-process limiter used while Redis cannot answer (`on_redis_failure = "open"`): the same
//! GCRA as `gcra.lua`, over a map in memory. Each process counts on its own, so with N replicas
//! a caller may get up to N times its limit while Redis is down: an approximation, on purpose.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::{Limit, Outcome};

/// Above this many buckets, full ones are dropped before a new one is added.
const PRUNE_ABOVE: usize = 10_000;

/// One GCRA step: whether a request of `cost` fits in `limit` at `now` given the bucket's
/// theoretical arrival time `tat` (both in microseconds), and the new TAT when it does.
pub(super) fn step(tat: Option<f64>, now: f64, limit: Limit, cost: u32) -> (Outcome, Option<f64>) {
    let period = limit.period.as_micros() as f64;
    let interval = period / f64::from(limit.count.max(1));
    let tat = tat.unwrap_or(now).max(now);
    let new_tat = tat + f64::from(cost) * interval;
    let allow_at = new_tat - period;
    // The epsilon keeps float division from turning 3 into 2.9999999, as in the script.
    let remaining = |tat: f64| ((period - (tat - now)) / interval + 1e-6).floor().max(0.0) as u64;
    if now < allow_at {
        let outcome = Outcome {
            allowed: false,
            remaining: remaining(tat),
            reset_us: (tat - now).ceil() as u64,
            retry_after_us: (allow_at - now).ceil() as u64,
        };
        return (outcome, None);
    }
    let outcome = Outcome {
        allowed: true,
        remaining: remaining(new_tat),
        reset_us: (new_tat - now).ceil() as u64,
        retry_after_us: 0,
    };
    (outcome, Some(new_tat))
}

/// GCRA buckets in this process's memory, keyed like the Redis keys.
#[derive(Debug)]
pub(super) struct LocalLimiter {
    epoch: Instant,
    buckets: Mutex<HashMap<String, f64>>,
}

impl LocalLimiter {
    pub(super) fn new() -> Self {
        Self { epoch: Instant::now(), buckets: Mutex::default() }
    }

    /// Decides one limit and, when allowed and `consume`, takes `cost` from it.
    pub(super) fn decide(&self, key: &str, limit: Limit, cost: u32, consume: bool) -> Outcome {
        let now = self.epoch.elapsed().as_micros() as f64;
        let Ok(mut buckets) = self.buckets.lock() else {
            // A panic while holding the lock cannot leave a bucket half written; let it pass.
            return Outcome { allowed: true, remaining: 0, reset_us: 0, retry_after_us: 0 };
        };
        let (outcome, new_tat) = step(buckets.get(key).copied(), now, limit, cost);
        if let Some(new_tat) = new_tat.filter(|_| consume) {
            if buckets.len() >= PRUNE_ABOVE && !buckets.contains_key(key) {
                buckets.retain(|_, tat| *tat > now);
            }
            buckets.insert(key.to_owned(), new_tat);
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SECOND: f64 = 1_000_000.0;

    #[test]
    fn a_full_bucket_lets_exactly_the_limit_through_then_refills() {
        let limit = Limit { count: 3, period: Duration::from_secs(3) };
        let mut tat = None;
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let (outcome, new_tat) = step(tat, 0.0, limit, 1);
            assert!(outcome.allowed);
            remaining.push(outcome.remaining);
            tat = new_tat;
        }
        assert_eq!(remaining, [2, 1, 0]);
        let (denied, unchanged) = step(tat, 0.0, limit, 1);
        assert!(!denied.allowed);
        assert_eq!(unchanged, None);
        assert_eq!(denied.retry_after_us, SECOND as u64, "one request comes back per second");
        assert_eq!(denied.reset_us, 3 * SECOND as u64);
        let (later, _) = step(tat, SECOND, limit, 1);
        assert!(later.allowed, "after one interval one more request fits");
        assert_eq!(later.remaining, 0);
    }

    #[test]
    fn cost_weighs_a_request() {
        let limit = Limit { count: 10, period: Duration::from_secs(60) };
        let (heavy, tat) = step(None, 0.0, limit, 8);
        assert!(heavy.allowed);
        assert_eq!(heavy.remaining, 2);
        let (too_heavy, _) = step(tat, 0.0, limit, 3);
        assert!(!too_heavy.allowed);
        assert_eq!(too_heavy.remaining, 2, "a denial consumes nothing");
        let (never, _) = step(None, 0.0, limit, 11);
        assert!(!never.allowed, "a cost above the limit never fits");
    }

    #[test]
    fn local_buckets_are_per_key() {
        let local = LocalLimiter::new();
        let limit = Limit { count: 2, period: Duration::from_secs(3600) };
        assert!(local.decide("a", limit, 1, false).allowed, "a look consumes nothing");
        assert!(local.decide("a", limit, 1, true).allowed);
        assert!(local.decide("a", limit, 1, true).allowed);
        assert!(!local.decide("a", limit, 1, false).allowed);
        assert!(!local.decide("a", limit, 1, true).allowed);
        assert!(local.decide("b", limit, 1, true).allowed);
    }
}
