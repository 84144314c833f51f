//! Starting and stopping the analytics service.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use aimesh_kit::cache::InvalidationBus;
use aimesh_kit::config::CommonConfig;
use aimesh_kit::ratelimit::RateLimiter;
use aimesh_kit::redis::Redis;
use aimesh_kit::server::{self, Dependency, Probe, ServiceSpec};

use crate::api::Analytics;
use crate::config::AnalyticsConfig;
use crate::store::{ClickHouse, IngestClaims, Store};

/// How often each replica rereads the projects' retention (another replica may change one).
const RETENTION_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// Connects to ClickHouse, creates the database if missing and applies the migrations.
pub async fn connect_clickhouse(config: &AnalyticsConfig) -> anyhow::Result<ClickHouse> {
    let clickhouse = ClickHouse::new(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::schema::migrate(&clickhouse).await.map_err(|e| anyhow::anyhow!("{e}")).context("migrating clickhouse")?;
    Ok(clickhouse)
}

impl Probe for ClickHouse {
    fn name(&self) -> &'static str {
        "clickhouse"
    }

    fn is_healthy(&self) -> BoxFuture<'_, bool> {
        Box::pin(ClickHouse::is_healthy(self))
    }
}

/// Serves analytics on `listener` until `shutdown` is cancelled, then stops gracefully.
pub async fn run(
    listener: TcpListener,
    common: CommonConfig,
    config: AnalyticsConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let clickhouse = connect_clickhouse(&config).await?;
    let redis = Redis::connect(&common.redis_urls, &common.redis).await.context("connecting to redis")?;
    redis.log_errors();
    let store = Store::open(clickhouse.clone(), IngestClaims::new(redis.clone()), &config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("reading analytics settings from clickhouse")?;
    let bus = InvalidationBus::start(&redis).await.context("subscribing to cache invalidations")?;
    let (verifier, access) = aimesh_kit::access::remote(&redis, &bus, &common.auth)?;
    let limiter = RateLimiter::new(redis.clone(), &common.rate_limit);
    let analytics = Analytics::new(store.clone(), access, config);
    let stop_refresh = CancellationToken::new();
    let refresh = tokio::spawn(refresh_retention(store, stop_refresh.clone()));

    let spec = ServiceSpec {
        name: "analytics",
        routes: analytics.routes(),
        grpc_services: Analytics::GRPC_SERVICES.to_vec(),
        dependencies: vec![Dependency::Other(Arc::new(clickhouse)), Dependency::Redis(redis.clone())],
    };
    let served = server::serve(listener, spec, verifier, limiter, common.server.clone(), shutdown).await;
    stop_refresh.cancel();
    let _ = refresh.await;
    redis.quit().await;
    served
}

/// Every [`RETENTION_REFRESH_INTERVAL`] until `stop`, rereads the projects' retention.
async fn refresh_retention(store: Store, stop: CancellationToken) {
    let mut tick = tokio::time::interval(RETENTION_REFRESH_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(error) = store.refresh_retention().await {
            tracing::warn!(%error, "cannot reread project retention");
        }
    }
}
