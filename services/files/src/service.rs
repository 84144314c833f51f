//! Starting and stopping the files service.

use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use aimesh_kit::config::CommonConfig;
use aimesh_kit::data::cache::InvalidationBus;
use aimesh_kit::data::db;
use aimesh_kit::data::redis::Redis;
use aimesh_kit::data::retention::{self, RetentionPolicies, RetentionSchedule};
use aimesh_kit::serving::runtime::ServiceRuntime;

use crate::api::Files;
use crate::config::FilesConfig;
use crate::library::{GcSettings, Library, Limits};
use crate::signing::UrlSigner;
use crate::storage::ObjectStorage;
use crate::store::Store;

/// Connects to the files database, creating it if missing, and applies the migrations.
pub async fn connect_database(common: &CommonConfig, config: &FilesConfig) -> anyhow::Result<PgPool> {
    db::service_database(common, "files", &config.database, &crate::MIGRATOR).await
}

/// The files domain over `database`, with the object store and limits of `config`, caching
/// live files in `redis` and hearing their invalidations on `bus`.
pub fn library(
    common: &CommonConfig,
    config: &FilesConfig,
    database: impl Into<aimesh_kit::data::replicas::Database>,
    redis: Redis,
    bus: &InvalidationBus,
) -> anyhow::Result<Library> {
    let storage = ObjectStorage::open(config)?;
    let link_key = common.auth.link_signing_key.as_ref().map(|key| key.expose());
    let signer = UrlSigner::from_settings(config.url_signing_key.as_deref(), link_key).map_err(anyhow::Error::msg)?;
    let limits = Limits {
        max_file_bytes: config.max_file_bytes,
        project_quota_bytes: config.project_quota_bytes,
        allowed_types: config.allowed_types.clone(),
    };
    Ok(Library::new(Store::new(database), storage, signer, limits, GcSettings::from_config(config), redis, bus))
}

/// Serves files on `listener` until `shutdown` is cancelled, then stops gracefully.
pub async fn run(
    listener: TcpListener,
    common: CommonConfig,
    config: FilesConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let schedule = RetentionSchedule::new("files", config.default_retention_days, config.retention_interval_secs)?;
    let pool = connect_database(&common, &config).await?;
    let mut runtime = ServiceRuntime::start("files", common).await?.with_database(pool, &config.database)?;
    let library = library(runtime.common(), &config, runtime.database()?, runtime.redis().clone(), runtime.bus())?;
    tracing::info!(backend = library.storage().backend().as_str(), "files object store ready");
    let (verifier, access) = runtime.identity_access()?;
    let (collector, retained) = (library.clone(), library.clone());
    runtime.every(Duration::from_secs(config.gc_interval_secs.max(1)), move || collect_garbage(collector.clone()));
    let policies = RetentionPolicies::new(runtime.common(), "files", &["files"], schedule)?;
    let stopping = shutdown.clone();
    runtime.every(schedule.interval, move || {
        let (library, policies, stopping) = (retained.clone(), policies.clone(), stopping.clone());
        async move {
            retention::round(&policies, |current| async move {
                let files = library.delete_past_retention(&current, || stopping.is_cancelled()).await?;
                Ok::<_, crate::error::FilesError>(vec![("files", files)])
            })
            .await;
        }
    });
    let files = Files::new(library, access);
    runtime.serve(listener, files.routes(), &Files::GRPC_SERVICES, verifier, shutdown).await
}

/// Deletes unused objects and abandoned uploads. Every replica runs it; `SKIP LOCKED` gives each
/// object to one of them.
async fn collect_garbage(library: Library) {
    match library.collect_garbage().await {
        Ok(collected) if collected.objects + collected.abandoned_uploads > 0 => {
            tracing::info!(
                objects = collected.objects,
                abandoned_uploads = collected.abandoned_uploads,
                "collected unused objects"
            );
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot collect unused objects; will retry"),
    }
}
