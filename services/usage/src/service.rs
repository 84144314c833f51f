//! Starting and stopping the usage service.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use aimesh_kit::cache::InvalidationBus;
use aimesh_kit::config::CommonConfig;
use aimesh_kit::db;
use aimesh_kit::ratelimit::RateLimiter;
use aimesh_kit::redis::Redis;
use aimesh_kit::server::{self, Dependency, ServiceSpec};

use crate::api::Usage;
use crate::config::UsageConfig;
use crate::ledger::Ledger;
use crate::store::Store;

/// Monthly partitions of usage records exist this many months ahead of the current one.
const PARTITIONS_AHEAD_MONTHS: i32 = 3;
/// How often partitions are created ahead and spent rows pruned.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(3600);

/// Connects to the usage database, creating it if missing, applies the migrations and creates
/// the monthly partitions ahead.
pub async fn connect_database(common: &CommonConfig, config: &UsageConfig) -> anyhow::Result<PgPool> {
    let pool = db::service_database(common, "usage", config.database_url.as_deref(), &crate::MIGRATOR).await?;
    Store::new(pool.clone())
        .ensure_partitions(PARTITIONS_AHEAD_MONTHS)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("creating usage partitions")?;
    Ok(pool)
}

/// Serves usage on `listener` until `shutdown` is cancelled, then stops gracefully.
pub async fn run(
    listener: TcpListener,
    common: CommonConfig,
    config: UsageConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = connect_database(&common, &config).await?;
    db::spawn_pool_metrics(pool.clone(), "usage");
    let redis = Redis::connect(&common.redis_urls, &common.redis).await.context("connecting to redis")?;
    redis.log_errors();
    let bus = InvalidationBus::start(&redis).await.context("subscribing to cache invalidations")?;
    let (verifier, access) = aimesh_kit::access::remote(&redis, &bus, &common.auth)?;
    let ledger = Ledger::new(pool.clone(), redis.clone(), &bus);
    let usage = Usage::new(ledger, access);
    let stop_maintenance = CancellationToken::new();
    let maintenance = tokio::spawn(run_maintenance(Store::new(pool.clone()), stop_maintenance.clone()));

    let limiter = RateLimiter::new(redis.clone(), &common.rate_limit);
    let spec = ServiceSpec {
        name: "usage",
        routes: usage.routes(),
        grpc_services: Usage::GRPC_SERVICES.to_vec(),
        dependencies: vec![Dependency::Postgres(pool.clone()), Dependency::Redis(redis.clone())],
    };
    // Events of this service's outbox go to analytics until the server stops, then once more.
    let relay = aimesh_kit::outbox::spawn_relay(pool.clone(), &common)?;
    let served = server::serve(listener, spec, verifier, limiter, common.server.clone(), shutdown).await;
    relay.stop().await;
    stop_maintenance.cancel();
    let _ = maintenance.await;
    redis.quit().await;
    pool.close().await;
    served
}

/// Every [`MAINTENANCE_INTERVAL`] until `stop`: creates the monthly partitions ahead (so a new
/// month never lands in the default partition) and prunes spent reservations and idempotency
/// claims. Each replica runs it; the partition function serialises them and the rest is idempotent.
async fn run_maintenance(store: Store, stop: CancellationToken) {
    let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(error) = store.ensure_partitions(PARTITIONS_AHEAD_MONTHS).await {
            tracing::error!(%error, "cannot create usage partitions ahead");
        }
        match store.prune(chrono::Utc::now()).await {
            Ok(pruned) => tracing::debug!(pruned, "pruned spent reservations and usage claims"),
            Err(error) => tracing::warn!(%error, "cannot prune spent reservations and usage claims"),
        }
    }
}
