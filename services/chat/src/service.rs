//! Starting and stopping the chat service.

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use aimesh_kit::cache::InvalidationBus;
use aimesh_kit::config::CommonConfig;
use aimesh_kit::db;
use aimesh_kit::redis::Redis;
use aimesh_kit::server::{self, Dependency, ServiceSpec};

use crate::api::Chat;
use crate::config::ChatConfig;

/// Connects to the chat database, creating it if missing, and applies the migrations.
pub async fn connect_database(common: &CommonConfig, config: &ChatConfig) -> anyhow::Result<PgPool> {
    db::service_database(common, "chat", config.database_url.as_deref(), &crate::MIGRATOR).await
}

/// Serves chat on `listener` until `shutdown` is cancelled, then stops gracefully.
pub async fn run(
    listener: TcpListener,
    common: CommonConfig,
    config: ChatConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = connect_database(&common, &config).await?;
    db::spawn_pool_metrics(pool.clone(), "chat");
    let redis = Redis::connect(&common.redis_urls, &common.redis).await.context("connecting to redis")?;
    redis.log_errors();
    let bus = InvalidationBus::start(&redis).await.context("subscribing to cache invalidations")?;
    let (verifier, access) = aimesh_kit::access::remote(&redis, &bus, &common.auth)?;
    let chat = Chat::new(pool.clone(), redis.clone(), access, config);
    let spec = ServiceSpec {
        name: "chat",
        routes: chat.routes(),
        grpc_services: Chat::GRPC_SERVICES.to_vec(),
        dependencies: vec![Dependency::Postgres(pool.clone()), Dependency::Redis(redis.clone())],
    };
    let served = server::serve(listener, spec, verifier, common.server.clone(), shutdown).await;
    redis.quit().await;
    pool.close().await;
    served
}
