//! Starting and stopping the analytics service.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use aimesh_kit::config::CommonConfig;
use aimesh_kit::serving::runtime::ServiceRuntime;
use aimesh_kit::serving::server::Probe;

use crate::api::Analytics;
use crate::config::AnalyticsConfig;
use crate::store::{ClickHouse, IngestClaims, Store};

/// How often each replica rereads the projects' retention.
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
    let mut runtime = ServiceRuntime::start("analytics", common).await?.depending_on(Arc::new(clickhouse.clone()));
    let store = Store::open(clickhouse, IngestClaims::new(runtime.redis().clone()), &config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("reading analytics settings from clickhouse")?;
    let (verifier, access) = runtime.identity_access()?;
    let analytics = Analytics::new(store.clone(), access, config);
    runtime.every(RETENTION_REFRESH_INTERVAL, move || refresh_retention(store.clone()));
    runtime.serve(listener, analytics.routes(), &Analytics::GRPC_SERVICES, verifier, shutdown).await
}

/// Rereads the projects' retention: another replica may have changed one.
async fn refresh_retention(store: Store) {
    if let Err(error) = store.refresh_retention().await {
        tracing::warn!(%error, "cannot reread project retention");
    }
}
