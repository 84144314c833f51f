//! Remembered admissions: [`super::RateLimiter::admit_credential`] looks in Redis whether an
//! address still has failed authentications left before its credential is looked up. For an
//! address that had plenty left a moment ago, asking again on every request of a busy client is a
//! round trip that learns nothing, so a process remembers "admitted" for a short while.
//!
//! What stays exact:
//! - Failures are counted in Redis every time ([`super::RateLimiter::charge_failed_auth`]), and a
//!   failure counted here forgets the address first, so from this process's second bad credential
//!   on, every decision about that address is Redis's own again.
//! - Only an address Redis admitted with at least [`MARGIN`] failures still left is remembered:
//!   an address close to its limit is asked about every time.
//!
//! What changes: failures counted by other processes are seen here up to [`LIFETIME`] late. An
//! address that exhausted its failures elsewhere may thus have one more credential looked up here
//! per [`LIFETIME`] (that lookup fails, is counted and ends the memory). The memory holds at most
//! [`CAPACITY`] addresses; beyond that, addresses are not remembered (asked every time).
//!
//! Metric: `rate_limit_admissions_remembered_total`, admissions answered from memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an admission is remembered.
pub const LIFETIME: Duration = Duration::from_secs(1);
/// Failures that must still be left for an admission to be remembered.
pub const MARGIN: u32 = 3;
/// Most addresses remembered at once.
const CAPACITY: usize = 10_000;

/// Addresses admitted recently, with when that lapses.
#[derive(Debug, Default)]
pub(super) struct Admissions {
    until: Mutex<HashMap<IpAddr, Instant>>,
}

impl Admissions {
    /// Whether `ip` was admitted less than [`LIFETIME`] ago and nothing forgot it since.
    pub(super) fn remembers(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let Ok(until) = self.until.lock() else { return false };
        let remembered = until.get(&ip).is_some_and(|lapses| *lapses > now);
        if remembered {
            metrics::counter!("rate_limit_admissions_remembered_total").increment(1);
        }
        remembered
    }

    /// Redis admitted `ip` with `remaining` failures left: remembered if that is at least
    /// [`MARGIN`].
    pub(super) fn admitted(&self, ip: IpAddr, remaining: u32) {
        if remaining < MARGIN {
            self.forget(ip);
            return;
        }
        let now = Instant::now();
        let Ok(mut until) = self.until.lock() else { return };
        if until.len() >= CAPACITY && !until.contains_key(&ip) {
            until.retain(|_, lapses| *lapses > now);
            if until.len() >= CAPACITY {
                return;
            }
        }
        until.insert(ip, now + LIFETIME);
    }

    /// A failure of `ip` is being counted: ask Redis about it from now on.
    pub(super) fn forget(&self, ip: IpAddr) {
        if let Ok(mut until) = self.until.lock() {
            until.remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn only_addresses_far_from_their_limit_are_remembered_until_forgotten() {
        let admissions = Admissions::default();
        admissions.admitted(ip(1), MARGIN - 1);
        assert!(!admissions.remembers(ip(1)), "close to its limit");
        admissions.admitted(ip(1), MARGIN);
        assert!(admissions.remembers(ip(1)));
        assert!(!admissions.remembers(ip(2)), "never admitted");
        admissions.forget(ip(1));
        assert!(!admissions.remembers(ip(1)), "forgotten when a failure is counted");
    }

    #[test]
    fn a_full_memory_remembers_no_new_address() {
        let admissions = Admissions::default();
        for n in 0..CAPACITY {
            let n = u32::try_from(n).expect("small");
            admissions.admitted(IpAddr::from(n.to_be_bytes()), MARGIN);
        }
        let newcomer = IpAddr::from([198, 51, 100, 1]);
        admissions.admitted(newcomer, MARGIN);
        assert!(!admissions.remembers(newcomer));
        assert!(admissions.remembers(IpAddr::from([0, 0, 0, 7])), "the remembered ones stay");
    }
}
