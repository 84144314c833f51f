//! Starting and stopping the identity service.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use aimesh_kit::auth::CredentialVerifier;
use aimesh_kit::auth::ProjectAccess;
use aimesh_kit::config::CommonConfig;
use aimesh_kit::data::db;
use aimesh_kit::serving::runtime::ServiceRuntime;

use crate::api::Identity;
use crate::config::IdentityConfig;
use crate::credentials::{StoreCredentialSource, StoreRoleSource, drain_last_use};
use crate::domain::validate_email;
use crate::error::IdentityError;
use crate::store::{Actor, Store, UserPatch};

/// Connects to identity's own database, creating it if missing, and applies the migrations.
pub async fn connect_database(common: &CommonConfig, config: &IdentityConfig) -> anyhow::Result<PgPool> {
    db::service_database(common, "identity", &config.database, &crate::MIGRATOR).await
}

/// Serves identity on `listener` until `shutdown` is cancelled, then stops gracefully: the
/// server drains, then the last-use times still in memory go to Redis and from there to PostgreSQL.
pub async fn run(
    listener: TcpListener,
    common: CommonConfig,
    config: IdentityConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    let pool = connect_database(&common, &config).await?;
    let mut runtime = ServiceRuntime::start("identity", common).await?.with_database(pool, &config.database)?;
    let database = runtime.database()?;
    let (redis, bus, auth) = (runtime.redis().clone(), runtime.bus(), &runtime.common().auth);
    let store = Store::new(database);
    let source = Arc::new(StoreCredentialSource::new(store.clone()));
    let verifier = CredentialVerifier::new(redis.clone(), bus, auth, source);
    let roles = Arc::new(StoreRoleSource::new(store.clone()));
    let access = ProjectAccess::new(redis.clone(), bus, auth, roles);
    let identity = Identity::new(
        store.clone(),
        verifier.clone(),
        access,
        redis.clone(),
        bus,
        &runtime.common().rate_limit,
        config.clone(),
    )
    .context("identity.settings_key")?;
    let (purging, purge_after) = (store.clone(), Duration::from_secs(config.session_purge_after_hours * 3600));
    runtime.every(SESSION_PURGE_INTERVAL, move || {
        let store = purging.clone();
        async move {
            if let Err(error) = purge_ended_sessions(&store, purge_after).await {
                tracing::warn!(%error, "could not purge ended login sessions; retrying later");
            }
        }
    });
    // The server writes the last requests' use times to Redis before it returns; the drain at
    // the stop takes them to PostgreSQL.
    runtime.every_and_at_stop(Duration::from_secs(config.last_use_flush_secs.max(1)), move || {
        let (store, redis) = (store.clone(), redis.clone());
        async move {
            if let Err(error) = drain_last_use(&store, &redis).await {
                tracing::warn!(%error, "could not store last-use times; retrying later");
            }
        }
    });
    runtime.serve(listener, identity.routes(), &Identity::GRPC_SERVICES, verifier, shutdown).await
}

/// How often ended login sessions are purged.
const SESSION_PURGE_INTERVAL: Duration = Duration::from_secs(3600);
/// Login sessions deleted per statement of a purge.
const SESSION_PURGE_BATCH: i64 = 1000;

/// One purge of login sessions that ended more than `after` ago (see
/// [`Store::purge_ended_sessions`]), counted in `retention_rows_deleted_total{store="identity",
/// kind="login_sessions"}` and, when it succeeds, `retention_last_run_timestamp_seconds
/// {store="identity"}`; returns how many sessions went.
pub async fn purge_ended_sessions(store: &Store, after: Duration) -> anyhow::Result<u64> {
    let purged = store.purge_ended_sessions(after, SESSION_PURGE_BATCH).await?;
    aimesh_kit::data::retention::record_round("identity", &vec![("login_sessions", purged)]);
    Ok(purged)
}

/// Makes the account with `email` a system admin: the operator's way to get the first admin
/// (`aimesh grant-admin`), since no RPC may grant a role its caller does not already hold.
/// Returns the account's id. The change is audited like any other; live sessions of the account
/// pick up the role when their cached verification expires (`auth.local_ttl_secs`).
pub async fn grant_admin(pool: &PgPool, email: &str) -> anyhow::Result<uuid::Uuid> {
    let email = validate_email(email).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Store::new(pool.clone());
    let user = store.user_by_login(&email).await?.ok_or(IdentityError::NotFound("user"))?;
    let patch = UserPatch { role: Some("admin"), ..UserPatch::default() };
    let actor = Actor { user_id: None, ip: String::new(), user_agent: "aimesh grant-admin".into() };
    store.update_user(user.id, patch, &actor).await?;
    Ok(user.id)
}
