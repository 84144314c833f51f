//! Settings of the chat service (`[chat]` in the config file, `AIMESH_CHAT__*`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ChatConfig {
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// The service's own database; defaults to `aimesh_chat` on `postgres_url`.
    pub database_url: Option<String>,
    /// Largest message content, in bytes of UTF-8.
    pub max_message_bytes: usize,
    /// How long a soft-deleted session can be restored before it is purged.
    pub purge_after_days: u32,
    /// How long a quiet watcher waits before looking at PostgreSQL for messages whose live
    /// publication was lost (Redis pub/sub is at most once).
    pub watch_poll_ms: u64,
    /// How often each replica looks for sessions past their purge time.
    pub purge_interval_secs: u64,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7102)),
            database_url: None,
            max_message_bytes: 256 * 1024,
            purge_after_days: 30,
            watch_poll_ms: 5_000,
            purge_interval_secs: 300,
        }
    }
}
