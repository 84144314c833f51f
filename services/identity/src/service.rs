//! Starting and stopping the identity service.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use aimesh_kit::access::ProjectAccess;
use aimesh_kit::auth::CredentialVerifier;
use aimesh_kit::cache::InvalidationBus;
use aimesh_kit::config::CommonConfig;
use aimesh_kit::db;
use aimesh_kit::ratelimit::RateLimiter;
use aimesh_kit::redis::Redis;
use aimesh_kit::server::{self, Dependency, ServiceSpec};

use crate::api::Identity;
use crate::config::IdentityConfig;
use crate::credentials::{StoreCredentialSource, StoreRoleSource, run_last_use_drain};
use crate::domain::validate_email;
use crate::error::IdentityError;
use crate::store::{Actor, Store, UserPatch};

/// Connects to identity's own database, creating it if missing, and applies the migrations.
pub async fn connect_database(common: &CommonConfig, config: &IdentityConfig) -> anyhow::Result<PgPool> {
    db::service_database(common, "identity", config.database_url.as_deref(), &crate::MIGRATOR).await
}

/// Serves identity on `listener` until `shutdown` is cancelled, then stops gracefully: the
/// server drains, then the last-use times still in memory go to Redis and from there to PostgreSQL.
pub async fn run(
    listener: TcpListener,
    common: CommonConfig,
    config: IdentityConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = connect_database(&common, &config).await?;
    db::spawn_pool_metrics(pool.clone(), "identity");
    let redis = Redis::connect(&common.redis_urls, &common.redis).await.context("connecting to redis")?;
    redis.log_errors();
    let bus = InvalidationBus::start(&redis).await.context("subscribing to cache invalidations")?;
    let store = Store::new(pool.clone());
    let source = Arc::new(StoreCredentialSource::new(store.clone()));
    let verifier = CredentialVerifier::new(redis.clone(), &bus, &common.auth, source);
    let roles = Arc::new(StoreRoleSource::new(store.clone()));
    let access = ProjectAccess::new(redis.clone(), &bus, &common.auth, roles);
    let identity =
        Identity::new(store.clone(), verifier.clone(), access, config.clone()).context("identity.settings_key")?;

    let stop_drain = CancellationToken::new();
    let drain = tokio::spawn(run_last_use_drain(
        store,
        redis.clone(),
        Duration::from_secs(config.last_use_flush_secs.max(1)),
        stop_drain.clone(),
    ));

    let limiter = RateLimiter::new(redis.clone(), &common.rate_limit);
    let spec = ServiceSpec {
        name: "identity",
        routes: identity.routes(),
        grpc_services: Identity::GRPC_SERVICES.to_vec(),
        dependencies: vec![Dependency::Postgres(pool.clone()), Dependency::Redis(redis.clone())],
    };
    // `serve` writes the last requests' use times to Redis before it returns; the drain after it
    // takes them to PostgreSQL.
    // Events of this service's outbox go to analytics until the server stops, then once more.
    let relay = aimesh_kit::outbox::spawn_relay(pool.clone(), &common)?;
    let served = server::serve(listener, spec, verifier, limiter, common.server.clone(), shutdown).await;
    relay.stop().await;
    stop_drain.cancel();
    let _ = drain.await;
    redis.quit().await;
    pool.close().await;
    served
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
