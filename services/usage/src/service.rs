//! Starting and stopping the usage service.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use aimesh_kit::config::CommonConfig;
use aimesh_kit::data::db;
use aimesh_kit::data::retention::{self, RetentionPolicies, RetentionSchedule};
use aimesh_kit::serving::runtime::ServiceRuntime;

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
    let pool = db::service_database(common, "usage", &config.database, &crate::MIGRATOR).await?;
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
    let schedule = RetentionSchedule::new("usage", config.default_retention_days, config.retention_interval_secs)?;
    let pool = connect_database(&common, &config).await?;
    let mut runtime = ServiceRuntime::start("usage", common).await?.with_database(pool, &config.database)?;
    let database = runtime.database()?;
    let (verifier, access) = runtime.identity_access()?;
    let ledger = Ledger::new(database.clone(), runtime.redis().clone(), runtime.bus());
    let usage = Usage::new(ledger, access);
    let store = Store::new(database);
    let policies = RetentionPolicies::new(runtime.common(), "usage", &["partitions", "records"], schedule)?;
    let (kept, stopping) = (store.pool().clone(), shutdown.clone());
    runtime.every(MAINTENANCE_INTERVAL, move || maintain(store.clone()));
    runtime.every(schedule.interval, move || {
        let (pool, policies, stopping) = (kept.clone(), policies.clone(), stopping.clone());
        async move {
            retention::round(&policies, |current| async move {
                crate::retention::apply(&pool, &current, || stopping.is_cancelled()).await
            })
            .await;
        }
    });
    runtime.serve(listener, usage.routes(), &Usage::GRPC_SERVICES, verifier, shutdown).await
}

/// Creates the monthly partitions ahead (so a new month never lands in the default partition)
/// and prunes spent reservations and idempotency claims. Each replica runs it every
/// [`MAINTENANCE_INTERVAL`]; the partition function serialises them and the rest is idempotent.
async fn maintain(store: Store) {
    if let Err(error) = store.ensure_partitions(PARTITIONS_AHEAD_MONTHS).await {
        tracing::error!(%error, "cannot create usage partitions ahead");
    }
    match store.prune(chrono::Utc::now()).await {
        Ok(pruned) => tracing::debug!(pruned, "pruned spent reservations and usage claims"),
        Err(error) => tracing::warn!(%error, "cannot prune spent reservations and usage claims"),
    }
}
