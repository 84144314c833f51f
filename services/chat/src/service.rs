//! Starting and stopping the chat service.

use std::sync::Arc;
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

use crate::api::Chat;
use crate::attachments::{Attachments, FilesService, NoFilesService};
use crate::config::ChatConfig;
use crate::conversations::{Conversations, Settings};

/// Sessions purged per transaction of the purge task.
const PURGE_BATCH: i64 = 50;

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
    let attachments = attachments(&common, &config)?;
    let conversations =
        Conversations::new(pool.clone(), redis.clone(), &bus, attachments, Settings::from_config(&config))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("starting live message delivery")?;
    let chat = Chat::new(conversations.clone(), access, shutdown.clone());
    let stop_purging = CancellationToken::new();
    let interval = Duration::from_secs(config.purge_interval_secs.max(1));
    let purging = tokio::spawn(run_purge(conversations, interval, stop_purging.clone()));

    let limiter = RateLimiter::new(redis.clone(), &common.rate_limit);
    let spec = ServiceSpec {
        name: "chat",
        routes: chat.routes(),
        grpc_services: Chat::GRPC_SERVICES.to_vec(),
        dependencies: vec![Dependency::Postgres(pool.clone()), Dependency::Redis(redis.clone())],
    };
    // Events of this service's outbox go to analytics until the server stops, then once more.
    let relay = aimesh_kit::outbox::spawn_relay(pool.clone(), &common)?;
    let served = server::serve(listener, spec, verifier, limiter, common.server.clone(), shutdown).await;
    relay.stop().await;
    stop_purging.cancel();
    let _ = purging.await;
    redis.quit().await;
    pool.close().await;
    served
}

/// The files service when one is configured and can be called (it needs the service token);
/// otherwise attachments are refused.
fn attachments(common: &CommonConfig, config: &ChatConfig) -> anyhow::Result<Arc<dyn Attachments>> {
    match (&config.files_url, &common.auth.service_token) {
        (Some(url), Some(token)) => Ok(Arc::new(FilesService::connect(url, token.clone())?)),
        (Some(_), None) => {
            tracing::warn!(
                "auth.service_token is not set: chat cannot call the files service; attachments are refused"
            );
            Ok(Arc::new(NoFilesService))
        }
        (None, _) => Ok(Arc::new(NoFilesService)),
    }
}

/// Every `interval` until `stop`: purges the sessions whose grace period is over, a batch at a
/// time. Every replica runs it; `SKIP LOCKED` gives each batch to one of them.
async fn run_purge(conversations: Conversations, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        loop {
            match conversations.purge_due(PURGE_BATCH).await {
                Ok(purged) if purged as i64 == PURGE_BATCH && !stop.is_cancelled() => {}
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "cannot purge sessions past their grace period; will retry");
                    break;
                }
            }
        }
    }
}
