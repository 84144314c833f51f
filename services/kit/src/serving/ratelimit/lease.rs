//! Leases: a process that decides the same limit often takes a few tokens of it from Redis in
//! advance, in the same script call as a request's own cost, and spends them on the next requests
//! without a round trip. A hot limit then costs a round trip per lease, not per request.
//!
//! What stays as without leases:
//! - Nothing is let through that Redis did not count: a leased token is taken from the shared
//!   bucket before the request it admits, so all processes together never exceed a limit.
//! - Near a limit, every decision is Redis's own: the script grants a lease only while at least
//!   twice the lease is left after the request, so the last tokens of a period are decided one
//!   request at a time, as before.
//! - Cold limits are not leased: a limit is leased only while this process decides it
//!   [`HOT_DECISIONS`] times within [`HOT_WINDOW`] (50 a second). A person's or a key's limit
//!   at ordinary rates, every limit in tests of exact counts at human pace, and failed
//!   authentications are decided in Redis every time.
//!
//! What changes:
//! - A token is spent up to [`LEASE_LIFETIME`] after Redis counted it: within any window of the
//!   period, a process may let through at most one lease more than the shared bucket shows.
//! - A lease that lapses unused is given back with the next call for that limit (the script's
//!   refund); if no call comes, those tokens are missing until the bucket refills by itself.
//! - A lease is at most `rate_limit.lease_max_tokens` (128 by default, 0 turns leasing off) and
//!   at most a twentieth of the limit, and about what the process spent in the last window.
//! - `ratelimit-remaining` of a leased decision is what Redis said was left when the lease was
//!   taken, plus what is left of this process's lease.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Limit, Outcome};

/// A lease is spent within this time of being taken, or given back.
pub const LEASE_LIFETIME: Duration = Duration::from_secs(1);
/// Decisions of one limit within [`HOT_WINDOW`] that make it hot (leased).
pub const HOT_DECISIONS: u32 = 5;
pub const HOT_WINDOW: Duration = Duration::from_millis(100);
/// A lease is at most this fraction of its limit's count.
const LEASE_SHARE_OF_LIMIT: u32 = 20;
/// Above this many limits, lapsed and cold ones are dropped before a new one is added.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug)]
struct Entry {
    /// Tokens leased and not spent.
    tokens: u32,
    /// When the tokens lapse.
    lapses: Instant,
    /// What Redis said when the lease was taken: left in the bucket, and until it is full.
    remaining: u64,
    reset_at: Instant,
    /// The current hotness window and the decisions in it; the last full window's count.
    window_start: Instant,
    in_window: u32,
    last_window: u32,
    /// Since when a call for more tokens is under way: meanwhile others decide their own
    /// request in Redis. A call whose request was dropped midway is forgotten after
    /// [`LEASE_LIFETIME`].
    refilling: Option<Instant>,
}

/// What to ask Redis for along with a request that no lease covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ask {
    /// Tokens to lease beyond the request's cost.
    pub lease: u32,
    /// Lapsed tokens to give back.
    pub refund: u32,
}

/// This process's leases, by Redis key.
#[derive(Debug)]
pub struct Leases {
    max_tokens: u32,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Leases {
    /// Leases of at most `max_tokens` each; 0: none.
    pub fn new(max_tokens: u32) -> Self {
        Self { max_tokens, entries: Mutex::default() }
    }

    /// Spends `cost` from the lease of `key` when it holds that much; otherwise says what to ask
    /// Redis for along with the request (and then [`Leases::granted`] must follow).
    pub fn take(&self, key: &str, limit: Limit, cost: u32) -> Result<Outcome, Ask> {
        if self.max_tokens == 0 {
            return Err(Ask::default());
        }
        let now = Instant::now();
        let Ok(mut entries) = self.entries.lock() else { return Err(Ask::default()) };
        if entries.len() > PRUNE_ABOVE && !entries.contains_key(key) {
            entries.retain(|_, e| e.tokens > 0 && e.lapses > now || now.duration_since(e.window_start) < HOT_WINDOW);
        }
        let entry = entries.entry(key.to_owned()).or_insert_with(|| Entry {
            tokens: 0,
            lapses: now,
            remaining: 0,
            reset_at: now,
            window_start: now,
            in_window: 0,
            last_window: 0,
            refilling: None,
        });
        if now.duration_since(entry.window_start) >= HOT_WINDOW {
            // A window with no decision at all in between counts as cold.
            let idle = now.duration_since(entry.window_start) >= 2 * HOT_WINDOW;
            entry.last_window = if idle { 0 } else { entry.in_window };
            entry.window_start = now;
            entry.in_window = 0;
        }
        entry.in_window += 1;
        if entry.tokens >= cost && entry.lapses > now {
            entry.tokens -= cost;
            return Ok(Outcome {
                allowed: true,
                remaining: entry.remaining + u64::from(entry.tokens),
                reset_us: entry.reset_at.saturating_duration_since(now).as_micros() as u64,
                retry_after_us: 0,
            });
        }
        let refund = if entry.lapses <= now { std::mem::take(&mut entry.tokens) } else { 0 };
        let hot = entry.in_window.max(entry.last_window) >= HOT_DECISIONS;
        let refilling = entry.refilling.is_some_and(|since| now.duration_since(since) < LEASE_LIFETIME);
        if !hot || refilling {
            return Err(Ask { lease: 0, refund });
        }
        entry.refilling = Some(now);
        let cap = self.max_tokens.min(limit.count / LEASE_SHARE_OF_LIMIT);
        let lease = cap.min(entry.in_window.max(entry.last_window).saturating_mul(cost));
        Err(Ask { lease, refund })
    }

    /// Redis answered a request that asked `ask` for `key`: keeps the tokens it leased.
    pub fn granted(&self, key: &str, ask: Ask, leased: u32, outcome: &Outcome) {
        if ask.lease == 0 && leased == 0 {
            return;
        }
        let now = Instant::now();
        let Ok(mut entries) = self.entries.lock() else { return };
        let Some(entry) = entries.get_mut(key) else { return };
        if ask.lease > 0 {
            entry.refilling = None;
        }
        if leased > 0 {
            entry.tokens += leased;
            entry.lapses = now + LEASE_LIFETIME;
            entry.remaining = outcome.remaining;
            entry.reset_at = now + Duration::from_micros(outcome.reset_us);
        }
    }

    /// Redis did not answer a request that asked `ask`: another may ask again.
    pub fn failed(&self, key: &str, ask: Ask) {
        if ask.lease == 0 {
            return;
        }
        if let Ok(mut entries) = self.entries.lock()
            && let Some(entry) = entries.get_mut(key)
        {
            entry.refilling = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_minute(count: u32) -> Limit {
        Limit::per_minute(count)
    }

    fn granted_outcome() -> Outcome {
        Outcome { allowed: true, remaining: 900, reset_us: 5_000_000, retry_after_us: 0 }
    }

    #[test]
    fn a_cold_limit_asks_for_no_lease() {
        let leases = Leases::new(32);
        for _ in 0..HOT_DECISIONS - 1 {
            assert_eq!(leases.take("k", per_minute(6000), 1), Err(Ask::default()));
        }
    }

    #[test]
    fn a_hot_limit_leases_spends_locally_and_asks_once_at_a_time() {
        let leases = Leases::new(32);
        let limit = per_minute(6000);
        for _ in 0..HOT_DECISIONS - 1 {
            assert!(leases.take("k", limit, 1).is_err());
        }
        let ask = leases.take("k", limit, 1).expect_err("no lease yet");
        assert_eq!(ask, Ask { lease: HOT_DECISIONS, refund: 0 }, "about the last window's decisions");
        // Another request meanwhile decides its own cost only.
        assert_eq!(leases.take("k", limit, 1), Err(Ask::default()));
        leases.granted("k", ask, ask.lease, &granted_outcome());
        for left in (0..HOT_DECISIONS).rev() {
            let spent = leases.take("k", limit, 1).expect("from the lease");
            assert_eq!(spent.remaining, 900 + u64::from(left), "Redis's count plus what the lease holds");
        }
        assert!(leases.take("k", limit, 1).is_err(), "spent");
    }

    #[test]
    fn a_lease_is_capped_by_the_setting_and_a_twentieth_of_the_limit_and_off_at_zero() {
        // Heavy requests, so that a window's demand exceeds every cap.
        let hot = |leases: &Leases, limit| {
            for _ in 0..HOT_DECISIONS - 1 {
                let _ = leases.take("k", limit, 100);
            }
            leases.take("k", limit, 100).expect_err("no lease granted")
        };
        assert_eq!(hot(&Leases::new(32), per_minute(1_000_000)).lease, 32);
        assert_eq!(hot(&Leases::new(32), per_minute(200)).lease, 10);
        assert_eq!(hot(&Leases::new(32), per_minute(19)).lease, 0, "small limits are never leased");
        assert_eq!(hot(&Leases::new(0), per_minute(1_000_000)), Ask::default());
    }

    #[test]
    fn a_lapsed_lease_is_given_back_with_the_next_call() {
        let leases = Leases::new(32);
        let limit = per_minute(6000);
        for _ in 0..HOT_DECISIONS - 1 {
            let _ = leases.take("k", limit, 1);
        }
        let ask = leases.take("k", limit, 1).expect_err("no lease yet");
        leases.granted("k", ask, 3, &granted_outcome());
        if let Ok(mut entries) = leases.entries.lock()
            && let Some(entry) = entries.get_mut("k")
        {
            entry.lapses = Instant::now() - Duration::from_millis(1);
        }
        let ask = leases.take("k", limit, 1).expect_err("lapsed");
        assert_eq!(ask.refund, 3);
    }
}
