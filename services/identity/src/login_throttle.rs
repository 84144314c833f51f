//! Brute-force protection of logins and refreshes (see [`LoginThrottleConfig`]): counters of
//! failures in the shared Redis per account, per (account, client address) and per client
//! address, each its own key and hash tag (`<prefix>:identity:login:<kind>:{<id>}`), each
//! decided by one server-side script, expiring by themselves.
//!
//! The client address is the one the gateway vouched for, else the socket peer
//! (`ClientAddress::of`), never a header the client chose, so rotating `x-forwarded-for` does
//! not escape the per-address counter.
//!
//! Redis unreachable: logins and refreshes fail closed with UNAVAILABLE. An in-process counter
//! would multiply every threshold by the number of replicas, and a guessing run could simply
//! wait for (or cause) a Redis outage; logins are rare next to the requests that existing
//! sessions and keys make, and those keep working without Redis.
//!
//! Failures are counted after the password check, so guesses sent in parallel before the lock
//! are all checked; the hashing bound (`identity.password_hash_concurrency`) keeps that burst
//! small.

use std::net::IpAddr;
use std::time::Duration;

use fred::types::scripts::Script;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use aimesh_kit::ServiceError;
use aimesh_kit::data::redis::{Redis, timed};

use crate::config::LoginThrottleConfig;
use crate::error::{IdentityError, Result};

/// The script deciding one counter.
const SCRIPT: &str = include_str!("login_throttle.lua");

/// The reason of a refusal while locked.
pub const LOGIN_THROTTLED: &str = "LOGIN_THROTTLED";

/// Counts failed logins and refuses the locked ones; clones share the connection.
#[derive(Clone)]
pub struct LoginThrottle {
    redis: Redis,
    script: Script,
    config: LoginThrottleConfig,
}

impl std::fmt::Debug for LoginThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginThrottle").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Who a login is for, as the counters know it: the account's id, or for a login naming no
/// account a digest of the name (so unknown names are limited alike, and no email is written to
/// Redis).
pub fn account_key(user_id: Option<Uuid>, login: &str) -> String {
    match user_id {
        Some(id) => id.to_string(),
        None => {
            let digest = Sha256::digest(login.trim().to_lowercase().as_bytes());
            digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
        }
    }
}

/// One counter and its threshold.
struct Counter {
    key: String,
    threshold: u32,
}

impl LoginThrottle {
    pub fn new(redis: Redis, config: LoginThrottleConfig) -> Self {
        Self { redis, script: Script::from_lua(SCRIPT), config }
    }

    fn key(&self, kind: &str, id: &str) -> String {
        self.redis.key("identity", &format!("login:{kind}:{{{id}}}"))
    }

    fn address_counter(&self, address: IpAddr) -> Counter {
        Counter { key: self.key("address", &address.to_string()), threshold: self.config.address_failures }
    }

    /// The counters of a login for `account` from `address`.
    fn login_counters(&self, account: &str, address: Option<IpAddr>) -> Vec<Counter> {
        let mut counters = vec![Counter { key: self.key("account", account), threshold: self.config.account_failures }];
        if let Some(address) = address {
            counters.push(Counter {
                key: self.key("account_address", &format!("{account}:{address}")),
                threshold: self.config.account_address_failures,
            });
            counters.push(self.address_counter(address));
        }
        counters
    }

    /// Runs the script on one counter; the answer is how long it stays locked.
    async fn run(&self, key: String, args: Vec<String>) -> Result<Duration> {
        let locked_ms: i64 =
            timed("login_throttle", self.script.evalsha_with_reload(self.redis.pool().next(), key, args))
                .await
                .map_err(ServiceError::unavailable)?;
        Ok(Duration::from_millis(u64::try_from(locked_ms).unwrap_or(0)))
    }

    /// The longest lock among `counters`, refused as [`IdentityError::TryLater`].
    async fn refuse_if_locked(&self, counters: Vec<Counter>) -> Result<()> {
        let checks = counters.into_iter().map(|c| self.run(c.key, vec!["check".to_owned()]));
        let locked = futures::future::try_join_all(checks).await?.into_iter().max().unwrap_or_default();
        if locked.is_zero() {
            return Ok(());
        }
        let seconds = locked.as_millis().div_ceil(1000).max(1);
        Err(IdentityError::TryLater {
            reason: LOGIN_THROTTLED,
            message: format!("too many failed logins; retry in {seconds} s"),
            retry_after: locked,
        })
    }

    /// Counts a failure on each of `counters`.
    async fn fail(&self, counters: Vec<Counter>) -> Result<()> {
        let (base, max, window) = (
            self.config.lockout_base_secs.saturating_mul(1000),
            self.config.lockout_max_secs.saturating_mul(1000),
            self.config.failure_window_secs.saturating_mul(1000),
        );
        let failures = counters.into_iter().map(|c| {
            let args =
                vec!["fail".to_owned(), c.threshold.to_string(), base.to_string(), max.to_string(), window.to_string()];
            self.run(c.key, args)
        });
        futures::future::try_join_all(failures).await?;
        Ok(())
    }

    /// Refuses a login for `account` from `address` while any of its counters is locked: call it
    /// before the password is checked, so a locked login costs no hashing.
    pub async fn check_login(&self, account: &str, address: Option<IpAddr>) -> Result<()> {
        self.refuse_if_locked(self.login_counters(account, address)).await
    }

    /// Counts a wrong password (or unknown login) for `account` from `address`.
    pub async fn login_failed(&self, account: &str, address: Option<IpAddr>) -> Result<()> {
        self.fail(self.login_counters(account, address)).await
    }

    /// Forgets the failures of `account` from `address` after a successful login; the account's
    /// and the address's counters keep theirs until they expire.
    pub async fn login_succeeded(&self, account: &str, address: Option<IpAddr>) {
        let Some(address) = address else { return };
        let key = self.key("account_address", &format!("{account}:{address}"));
        if let Err(error) = self.run(key, vec!["reset".to_owned()]).await {
            tracing::warn!(%error, "could not reset a login-failure counter; it expires by itself");
        }
    }

    /// Refuses a refresh, registration or invitation from `address` while the address is locked.
    pub async fn check_address(&self, address: Option<IpAddr>) -> Result<()> {
        match address {
            Some(address) => self.refuse_if_locked(vec![self.address_counter(address)]).await,
            None => Ok(()),
        }
    }

    /// Counts a failure from `address` that is no account's: a refresh with an unknown, expired
    /// or used token, or a registration or invitation that finds an email taken or unknown (a
    /// probe of which emails are registered).
    pub async fn address_failed(&self, address: Option<IpAddr>) -> Result<()> {
        match address {
            Some(address) => self.fail(vec![self.address_counter(address)]).await,
            None => Ok(()),
        }
    }
}
