//! Settings of the identity service (`[identity]` in the config file, `AIMESH_IDENTITY__*`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct IdentityConfig {
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// The service's own database; defaults to `aimesh_identity` on `postgres_url`.
    pub database_url: Option<String>,
    /// Lifetime of a login session's access token.
    pub access_token_ttl_secs: i64,
    /// Lifetime of a refresh token; refreshing issues a new pair.
    pub refresh_token_ttl_secs: i64,
    /// Base64 of the 32-byte AES-256-GCM key encrypting settings marked encrypted. Without it,
    /// encrypted settings are refused.
    pub settings_key: Option<String>,
    /// How often last-use times collected in Redis are written to PostgreSQL.
    pub last_use_flush_secs: u64,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7101)),
            database_url: None,
            access_token_ttl_secs: 24 * 3600,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            settings_key: None,
            last_use_flush_secs: 15,
        }
    }
}
