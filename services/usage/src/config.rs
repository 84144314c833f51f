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
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 7103)), database: DatabaseUrls::default() }
    }
}
