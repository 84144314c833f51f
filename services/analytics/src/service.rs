//! Starting and stopping the analytics service.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use aimesh_kit::config::CommonConfig;
use aimesh_kit::data::redis::Redis;
use aimesh_kit::serving::runtime::ServiceRuntime;
use aimesh_kit::serving::server::Probe;

use crate::api::Analytics;
use crate::config::AnalyticsConfig;
use crate::store::{ClickHouse, IngestClaims, Store};

/// Longest default retention, in days: as long as a project may set (ten years).
const MAX_DEFAULT_RETENTION_DAYS: u16 = 3650;
/// How often each replica rereads the projects' retention.
const RETENTION_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// Connects to ClickHouse, creates the database if missing and applies the migrations.
pub async fn connect_clickhouse(config: &AnalyticsConfig) -> anyhow::Result<ClickHouse> {
    let clickhouse = ClickHouse::new(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::schema::migrate(&clickhouse).await.map_err(|e| anyhow::anyhow!("{e}")).context("migrating clickhouse")?;
    Ok(clickhouse)
}

/// Like [`connect_clickhouse`], first moving a single-node deployment's tables to the
/// configured cluster if they are still there (one replica at a time, by a lock in `redis`).
pub async fn connect_clickhouse_converting(config: &AnalyticsConfig, redis: &Redis) -> anyhow::Result<ClickHouse> {
    let clickhouse = ClickHouse::new(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::conversion::convert_single_node(&clickhouse, redis)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("moving single-node tables to the clickhouse cluster")?;
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
    if !(1..=MAX_DEFAULT_RETENTION_DAYS).contains(&config.default_retention_days) {
        anyhow::bail!("analytics.default_retention_days must be 1 to {MAX_DEFAULT_RETENTION_DAYS}");
    }
    let runtime = ServiceRuntime::start("analytics", common).await?;
    let clickhouse = connect_clickhouse_converting(&config, runtime.redis()).await?;
    let mut runtime = runtime.depending_on(Arc::new(clickhouse.clone()));
    let store = Store::open(clickhouse, IngestClaims::new(runtime.redis().clone()), &config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("reading analytics settings from clickhouse")?;
    let (verifier, access) = runtime.identity_access()?;
    let apply_interval = Duration::from_secs(config.retention_apply_interval_secs.max(1));
    let analytics = Analytics::new(store.clone(), access, config);
    let applier = store.clone();
    runtime.every(RETENTION_REFRESH_INTERVAL, move || refresh_retention(store.clone()));
    // Checked a few times per interval, so a due change waits at most a quarter of it more.
    let check = (apply_interval / 4).clamp(Duration::from_millis(250), RETENTION_REFRESH_INTERVAL);
    runtime.every(check, move || apply_due_retention(applier.clone(), apply_interval));
    runtime.serve(listener, analytics.routes(), &Analytics::GRPC_SERVICES, verifier, shutdown).await
}

/// Applies the retention changes that are due (see [`Store::apply_due_retention`]).
async fn apply_due_retention(store: Store, min_interval: Duration) {
    match store.apply_due_retention(min_interval).await {
        Ok(applied) => {
            if !applied.is_empty() {
                tracing::debug!(projects = applied.len(), "retention applied");
            }
            // Rows themselves expire by their TTL at ClickHouse's merges: a successful round
            // means every project's rows carry the retention they should.
            metrics::gauge!("retention_last_run_timestamp_seconds", "store" => "analytics")
                .set(chrono::Utc::now().timestamp() as f64);
        }
        Err(error) => tracing::warn!(%error, "cannot apply pending retention changes"),
    }
}

/// Rereads the projects' retention: another replica may have changed one.
async fn refresh_retention(store: Store) {
    if let Err(error) = store.refresh_retention().await {
        tracing::warn!(%error, "cannot reread project retention");
    }
}
