//! Starting and stopping the chat service.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use aimesh_kit::auth::StreamAccess;
use aimesh_kit::config::CommonConfig;
use aimesh_kit::data::db;
use aimesh_kit::data::retention::{self, Policies, RetentionPolicies, RetentionSchedule};
use aimesh_kit::serving::runtime::ServiceRuntime;

use crate::api::Chat;
use crate::attachments::{Attachments, FilesService, NoFilesService};
use crate::config::ChatConfig;
use crate::conversations::{Conversations, Settings};

/// Sessions purged per transaction of the purge task.
const PURGE_BATCH: i64 = 50;

/// Connects to the chat database, creating it if missing, and applies the migrations.
pub async fn connect_database(common: &CommonConfig, config: &ChatConfig) -> anyhow::Result<PgPool> {
    db::service_database(common, "chat", &config.database, &crate::MIGRATOR).await
}

/// Serves chat on `listener` until `shutdown` is cancelled, then stops gracefully.
pub async fn run(
    listener: TcpListener,
    common: CommonConfig,
    config: ChatConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let schedule = RetentionSchedule::new("chat", config.default_retention_days, config.retention_interval_secs)?;
    let pool = connect_database(&common, &config).await?;
    let mut runtime = ServiceRuntime::start("chat", common).await?.with_database(pool, &config.database)?;
    let database = runtime.database()?;
    let (verifier, access) = runtime.identity_access()?;
    let attachments = attachments(runtime.common())?;
    let conversations = Conversations::new(
        database,
        runtime.redis().clone(),
        runtime.bus(),
        attachments,
        Settings::from_config(&config),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
    .context("starting live message delivery")?;
    let streams = StreamAccess::new("chat", runtime.redis().clone(), verifier.clone(), config.stream_policy());
    let chat = Chat::new(conversations.clone(), access, streams, shutdown.clone());
    let purging = shutdown.clone();
    let retained = conversations.clone();
    runtime.every(Duration::from_secs(config.purge_interval_secs.max(1)), move || {
        purge_due(conversations.clone(), purging.clone())
    });
    let policies = RetentionPolicies::new(runtime.common(), "chat", &["sessions", "messages"], schedule)?;
    let stopping = shutdown.clone();
    runtime.every(schedule.interval, move || {
        let (conversations, policies, stopping) = (retained.clone(), policies.clone(), stopping.clone());
        async move {
            retention::round(&policies, |current| apply_retention(conversations, current, stopping)).await;
        }
    });
    runtime.serve(listener, chat.routes(), &Chat::GRPC_SERVICES, verifier, shutdown).await
}

/// The files service (`services.files`) when it can be called (that needs the service token);
/// otherwise attachments are refused.
fn attachments(common: &CommonConfig) -> anyhow::Result<Arc<dyn Attachments>> {
    match &common.auth.service_token {
        Some(token) => Ok(Arc::new(FilesService::connect(&common.services.files, token.clone())?)),
        None => {
            tracing::warn!(
                "auth.service_token is not set: chat cannot call the files service; attachments are refused"
            );
            Ok(Arc::new(NoFilesService))
        }
    }
}

/// Deletes the sessions past their project's retention, a batch at a time, until none is left
/// or `shutdown` begins; returns what went, for the round's metrics.
async fn apply_retention(
    conversations: Conversations,
    policies: Arc<Policies>,
    shutdown: CancellationToken,
) -> crate::error::Result<retention::Deleted> {
    let (mut sessions, mut messages) = (0u64, 0u64);
    if !policies.keeps_everything() {
        loop {
            let (deleted, in_them) = conversations.delete_past_retention(&policies, PURGE_BATCH).await?;
            sessions += deleted as u64;
            messages += in_them;
            if (deleted as i64) < PURGE_BATCH || shutdown.is_cancelled() {
                break;
            }
        }
    }
    Ok(vec![("sessions", sessions), ("messages", messages)])
}

/// Purges the sessions whose grace period is over, a batch at a time, until none is due or
/// `shutdown` begins. Every replica runs it; `SKIP LOCKED` gives each batch to one of them.
async fn purge_due(conversations: Conversations, shutdown: CancellationToken) {
    loop {
        match conversations.purge_due(PURGE_BATCH).await {
            Ok(purged) if purged as i64 == PURGE_BATCH && !shutdown.is_cancelled() => {}
            Ok(_) => break,
            Err(error) => {
                tracing::warn!(%error, "cannot purge sessions past their grace period; will retry");
                break;
            }
        }
    }
}
