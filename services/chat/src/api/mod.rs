//! The gRPC edge of chat (being written).

use std::sync::Arc;

use sqlx::PgPool;

use aimesh_kit::access::ProjectAccess;
use aimesh_kit::redis::Redis;

use crate::config::ChatConfig;

/// What every handler of chat works with.
#[derive(Debug)]
#[allow(dead_code)]
pub struct Chat {
    pool: PgPool,
    redis: Redis,
    access: ProjectAccess,
    config: ChatConfig,
}

impl Chat {
    pub fn new(pool: PgPool, redis: Redis, access: ProjectAccess, config: ChatConfig) -> Arc<Self> {
        Arc::new(Self { pool, redis, access, config })
    }

    /// Every gRPC service of chat, ready for the server.
    pub fn routes(self: &Arc<Self>) -> tonic::service::Routes {
        tonic::service::Routes::default()
    }

    /// The fully qualified names of those services, for grpc.health.v1.
    pub const GRPC_SERVICES: [&'static str; 0] = [];
}
