//! Settings of the identity service (`[identity]` in the config file, `AIMESH_IDENTITY__*`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use aimesh_kit::config::DatabaseUrls;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct IdentityConfig {
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// The service's own database: primary, read replicas, direct address for migrations.
    #[serde(flatten)]
    pub database: DatabaseUrls,
    /// Lifetime of a login session's access token.
    pub access_token_ttl_secs: i64,
    /// Lifetime of a refresh token; refreshing issues a new pair.
    pub refresh_token_ttl_secs: i64,
    /// Base64 of the 32-byte AES-256-GCM key encrypting settings marked encrypted. Without it,
    /// encrypted settings are refused.
    pub settings_key: Option<String>,
    /// How often last-use times collected in Redis are written to PostgreSQL.
    pub last_use_flush_secs: u64,
    /// Throttling of failed logins and refreshes (`[identity.login_throttle]`).
    pub login_throttle: LoginThrottleConfig,
    /// Password hashes (argon2id, 19 MiB each) computed at once; a login, registration or
    /// password change past it waits up to `password_hash_wait_ms`. The default 4 bounds the
    /// hashing memory to about 76 MiB whatever the request rate. 1 to 256.
    pub password_hash_concurrency: usize,
    /// How long a request waits for a free hashing slot before it is refused with
    /// RESOURCE_EXHAUSTED (HTTP 429) and a retry-after. 1 to 60,000.
    pub password_hash_wait_ms: u64,
    /// How long an ended login session (revoked, or past its refresh token's expiry) is kept
    /// before the hourly purge deletes it: for audit and for telling a user why they were
    /// signed out. 1 to 8,760 (a year); default 168 (a week).
    pub session_purge_after_hours: u64,
}

/// Brute-force protection of logins (like Keycloak's): failures are counted in the shared Redis
/// per account, per (account, client address) and per client address, each counter with its
/// own threshold. Past a threshold each further failure locks that counter's subject for a wait
/// doubling from `lockout_base_secs` up to `lockout_max_secs`; while locked, every login for it
/// is refused with RESOURCE_EXHAUSTED and a retry-after, even with the right password, before
/// any password hashing. Counters expire `failure_window_secs` after their last failure (or
/// after the lock ends). A successful login resets its (account, address) counter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LoginThrottleConfig {
    /// Failures of one account, from anywhere, before it locks. 1 to 1,000.
    pub account_failures: u32,
    /// Failures of one account from one address before that pair locks. 1 to 1,000.
    pub account_address_failures: u32,
    /// Failed logins and refreshes from one address, for any account, before it locks.
    /// 1 to 100,000.
    pub address_failures: u32,
    /// The first lock's length; each further failure doubles it. 1 to 3,600.
    pub lockout_base_secs: u64,
    /// The longest lock. At least `lockout_base_secs`, at most 86,400.
    pub lockout_max_secs: u64,
    /// How long a counter remembers failures after the last one. 1 to 86,400.
    pub failure_window_secs: u64,
}

impl Default for LoginThrottleConfig {
    fn default() -> Self {
        Self {
            account_failures: 10,
            account_address_failures: 5,
            address_failures: 50,
            lockout_base_secs: 1,
            lockout_max_secs: 15 * 60,
            failure_window_secs: 15 * 60,
        }
    }
}

impl IdentityConfig {
    /// Refuses settings out of their bounds, naming the setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        let t = &self.login_throttle;
        let checks: [(&str, bool); 9] = [
            ("identity.password_hash_concurrency", (1..=256).contains(&self.password_hash_concurrency)),
            ("identity.session_purge_after_hours", (1..=8_760).contains(&self.session_purge_after_hours)),
            ("identity.password_hash_wait_ms", (1..=60_000).contains(&self.password_hash_wait_ms)),
            ("identity.login_throttle.account_failures", (1..=1_000).contains(&t.account_failures)),
            ("identity.login_throttle.account_address_failures", (1..=1_000).contains(&t.account_address_failures)),
            ("identity.login_throttle.address_failures", (1..=100_000).contains(&t.address_failures)),
            ("identity.login_throttle.lockout_base_secs", (1..=3_600).contains(&t.lockout_base_secs)),
            ("identity.login_throttle.lockout_max_secs", (t.lockout_base_secs..=86_400).contains(&t.lockout_max_secs)),
            ("identity.login_throttle.failure_window_secs", (1..=86_400).contains(&t.failure_window_secs)),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            Some((name, _)) => anyhow::bail!("{name} is out of its bounds (see its documentation)"),
            None => Ok(()),
        }
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7101)),
            database: DatabaseUrls::default(),
            access_token_ttl_secs: 24 * 3600,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            settings_key: None,
            last_use_flush_secs: 15,
            login_throttle: LoginThrottleConfig::default(),
            password_hash_concurrency: 4,
            password_hash_wait_ms: 2_000,
            session_purge_after_hours: 168,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_in_bounds_and_bad_settings_are_named() {
        assert!(IdentityConfig::default().validate().is_ok());
        let mut config = IdentityConfig::default();
        config.login_throttle.lockout_max_secs = config.login_throttle.lockout_base_secs - 1;
        let error = config.validate().expect_err("a longest lock below the first").to_string();
        assert!(error.contains("identity.login_throttle.lockout_max_secs"), "{error}");
        let config = IdentityConfig { password_hash_concurrency: 0, ..IdentityConfig::default() };
        assert!(config.validate().expect_err("no hashing slot").to_string().contains("password_hash_concurrency"));
        for hours in [0, 8_761] {
            let config = IdentityConfig { session_purge_after_hours: hours, ..IdentityConfig::default() };
            let error = config.validate().expect_err("a purge delay out of bounds").to_string();
            assert!(error.contains("identity.session_purge_after_hours"), "{error}");
        }
    }
}
