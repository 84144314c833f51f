//! Settings of the usage service (`[usage]` in the config file, `AIMESH_USAGE__*`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use aimesh_kit::config::DatabaseUrls;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct UsageConfig {
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// The service's own database: primary, read replicas, direct address for migrations.
    #[serde(flatten)]
    pub database: DatabaseUrls,
    /// Days usage records are kept for a project without a retention of its own; 0 keeps them
    /// forever (the default), at most 3650 (docs/retention.md).
    pub default_retention_days: u32,
    /// Time between two retention rounds, 1 to 86400.
    pub retention_interval_secs: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7103)),
            database: DatabaseUrls::default(),
            default_retention_days: 0,
            retention_interval_secs: 3600,
        }
    }
}
