//! The gRPC edge of usage. (Being written: the model, usage and quota services.)

use std::sync::Arc;

use sqlx::PgPool;

use aimesh_kit::access::ProjectAccess;
use aimesh_kit::redis::Redis;

use crate::config::UsageConfig;

/// What every handler of usage works with.
#[derive(Debug)]
pub struct Usage {
    pub(crate) pool: PgPool,
    pub(crate) redis: Redis,
    pub(crate) access: ProjectAccess,
    pub(crate) config: UsageConfig,
}

impl Usage {
    pub fn new(pool: PgPool, redis: Redis, access: ProjectAccess, config: UsageConfig) -> Arc<Self> {
        Arc::new(Self { pool, redis, access, config })
    }

    /// Every gRPC service of usage, ready for the server.
    pub fn routes(self: &Arc<Self>) -> tonic::service::Routes {
        tonic::service::Routes::default()
    }

    /// The fully qualified names of those services, for grpc.health.v1.
    pub const GRPC_SERVICES: [&'static str; 0] = [];
}
