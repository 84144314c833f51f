//! Settings of the chat service (`[chat]` in the config file, `AIMESH_CHAT__*`).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use aimesh_kit::auth::StreamPolicy;
use aimesh_kit::config::DatabaseUrls;

/// The longest `stream_recheck_secs` honoured: access must not go unchecked for longer.
const MAX_STREAM_RECHECK_SECS: u64 = 60;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ChatConfig {
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// The service's own database: primary, read replicas, direct address for migrations.
    #[serde(flatten)]
    pub database: DatabaseUrls,
    /// Largest message content, in bytes of UTF-8.
    pub max_message_bytes: usize,
    /// How long a soft-deleted session can be restored before it is purged.
    pub purge_after_days: u32,
    /// How long a quiet watcher waits before looking at PostgreSQL for messages whose live
    /// publication was lost (Redis pub/sub is at most once).
    pub watch_poll_ms: u64,
    /// How often each replica looks for sessions past their purge time.
    pub purge_interval_secs: u64,
    /// How often an open watch or export re-checks that its caller still has access (the
    /// credential, the role in the project, the session); 1 to 60.
    pub stream_recheck_secs: u64,
    /// How long a watch or export may stay open; it then ends with UNAVAILABLE
    /// (`STREAM_LIFETIME_REACHED`) and the client reconnects.
    pub stream_max_lifetime_secs: u64,
    /// Watches and exports one person (all their login sessions together) or one API key may
    /// hold open at once, across replicas.
    pub max_streams_per_principal: u32,
    /// Days a conversation is kept after its last activity for a project without a retention
    /// of its own; 0 keeps it forever (the default), at most 3650 (docs/retention.md).
    pub default_retention_days: u32,
    /// Time between two retention rounds, 1 to 86400.
    pub retention_interval_secs: u64,
}

impl ChatConfig {
    /// The bounds of chat's streams, the settings above clamped to what works.
    pub fn stream_policy(&self) -> StreamPolicy {
        StreamPolicy {
            recheck_every: Duration::from_secs(self.stream_recheck_secs.clamp(1, MAX_STREAM_RECHECK_SECS)),
            max_lifetime: Duration::from_secs(self.stream_max_lifetime_secs.max(1)),
            max_per_principal: self.max_streams_per_principal.max(1),
        }
    }
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7102)),
            database: DatabaseUrls::default(),
            max_message_bytes: 256 * 1024,
            purge_after_days: 30,
            watch_poll_ms: 5_000,
            purge_interval_secs: 300,
            stream_recheck_secs: 5,
            stream_max_lifetime_secs: 3600,
            max_streams_per_principal: 16,
            default_retention_days: 0,
            retention_interval_secs: 3600,
        }
    }
}
