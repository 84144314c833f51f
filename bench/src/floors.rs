//! Floors: for each write RPC, the least sequence of store operations its durability promise
//! needs, run raw from the bench against the same stores, the same tables and the same pool size
//! as the service, with no RPC, no authentication, no rate limit and no transaction beyond what
//! the statement itself is. The scenario's throughput as a share of its floor is the headline.
//!
//! The floors reuse the services' own statements and scripts (`aimesh_usage::store`,
//! `aimesh_usage::counters`, `aimesh_chat::store`), so a change to what a write stores moves the
//! floor with it.
//!
//! - Reserve: the INSERT of the reservation, then the reserve script (limits checked and the
//!   estimate added for the project, the user and the key), one round trip each.
//! - RecordUsage: one statement storing the record with its outbox event, then the counters
//!   script. The service also claims the request id (idempotency) and may settle a reservation;
//!   the floor leaves both out.
//! - AppendMessage: the one statement chat runs (the session's counters, the message, its outbox
//!   event). Publishing to live watchers is not part of the promise and is left out.

use std::sync::Arc;

use chrono::Utc;
use rust_decimal::Decimal;
use uuid::Uuid;

use aimesh_chat::domain::{MessageRole, NewMessage, Parent};
use aimesh_kit::config::DatabaseConfig;
use aimesh_kit::data::redis::Redis;
use aimesh_tests::Mesh;
use aimesh_usage::counters::{Counters, Decision, LimitedSubject, Outcome};
use aimesh_usage::domain::{QuotaLimits, QuotaSubject};
use aimesh_usage::store::{ReservationRow, UsageRow};

use crate::report::{Figures, Load, measure};

/// Who writes: the ids the scenario's requests carry.
#[derive(Debug, Clone, Copy)]
pub struct Writer {
    pub project: Uuid,
    pub user: Uuid,
    pub api_key: Uuid,
    pub model: Uuid,
}

/// A pool on `url` as large as the services' pools.
async fn pool(url: Option<&String>, pool_size: u32) -> anyhow::Result<sqlx::PgPool> {
    let url = url.ok_or_else(|| anyhow::anyhow!("the mesh has no database url"))?;
    let settings = DatabaseConfig { max_connections: pool_size, ..Default::default() };
    Ok(aimesh_kit::data::db::connect(url, &settings).await?)
}

async fn counters(mesh: &Mesh) -> anyhow::Result<Counters> {
    let common = &mesh.config.common;
    Ok(Counters::new(Redis::connect(&common.redis_urls, &common.redis).await?))
}

/// The reserve floor: INSERT of the reservation, then the reserve script of the project,
/// the user and the key (the project's limits as the bench set them).
pub async fn reserve(
    mesh: &Mesh,
    writer: Writer,
    project_limits: QuotaLimits,
    pool_size: u32,
    load: Load,
) -> anyhow::Result<Figures> {
    let pool = pool(mesh.config.usage.database.url.as_ref(), pool_size).await?;
    let counters = Arc::new(counters(mesh).await?);
    let subjects: Arc<[LimitedSubject]> = Arc::from(vec![
        LimitedSubject { subject: QuotaSubject::Project, limits: Some(project_limits) },
        LimitedSubject { subject: QuotaSubject::User(writer.user), limits: None },
        LimitedSubject { subject: QuotaSubject::ApiKey(writer.api_key), limits: None },
    ]);
    Ok(measure("floor: INSERT + reserve script", load, move |_| {
        let (pool, counters, subjects) = (pool.clone(), Arc::clone(&counters), Arc::clone(&subjects));
        async move {
            let now = Utc::now();
            let row = ReservationRow {
                id: Uuid::now_v7(),
                project_id: writer.project,
                user_id: writer.user,
                api_key_id: Some(writer.api_key),
                maker_user_id: writer.user,
                model_id: writer.model,
                tokens: 1500,
                cost: Decimal::new(75, 4),
                cost_nanos: 7_500_000,
                state: "open".into(),
                created_at: now,
                expires_at: now + chrono::Duration::seconds(5),
            };
            let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
            aimesh_usage::store::insert_reservation(&mut conn, &row).await.map_err(|e| e.to_string())?;
            drop(conn);
            let decision = counters
                .reserve(row.project_id, now, row.id, row.expires_at, row.tokens, row.cost_nanos, &subjects)
                .await
                .map_err(|e| e.to_string())?;
            match decision {
                Decision::Granted { .. } => Ok(()),
                other => Err(format!("the reserve script answered {other:?}")),
            }
        }
    })
    .await)
}

/// The record floor: the record and its outbox event in one statement, then the counters
/// script.
pub async fn record_usage(mesh: &Mesh, writer: Writer, pool_size: u32, load: Load) -> anyhow::Result<Figures> {
    let pool = pool(mesh.config.usage.database.url.as_ref(), pool_size).await?;
    let counters = Arc::new(counters(mesh).await?);
    let run = Uuid::new_v4().simple().to_string();
    Ok(measure("floor: INSERT record and event + counters script", load, move |n| {
        let (pool, counters) = (pool.clone(), Arc::clone(&counters));
        let request_id = format!("floor-{run}-{n}");
        async move {
            let now = Utc::now();
            let row = UsageRow {
                id: Uuid::now_v7(),
                request_id,
                project_id: writer.project,
                user_id: writer.user,
                api_key_id: Some(writer.api_key),
                model_id: writer.model,
                chat_session_id: None,
                reservation_id: None,
                request_type: "chat".into(),
                input_tokens: 1200,
                output_tokens: 300,
                cached_input_tokens: 200,
                total_tokens: 1500,
                cost: Decimal::new(5, 3),
                duration_ms: 900,
                status: "success".into(),
                error_message: String::new(),
                request_time: now,
                created_at: now,
            };
            let rows = [row];
            let events = [aimesh_usage::ledger::usage_event(&rows[0])];
            let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
            aimesh_usage::store::insert_usage(&mut conn, &rows, &events).await.map_err(|e| e.to_string())?;
            drop(conn);
            let counted = aimesh_usage::ledger::counted_usage(&rows);
            match counters.record(writer.project, now, &[], &counted).await.map_err(|e| e.to_string())? {
                Outcome::Done => Ok(()),
                Outcome::Rebuild => Err("the counters script asked for a rebuild".into()),
            }
        }
    })
    .await)
}

/// The append floor: chat's one statement, on the same sessions as the scenario.
pub async fn append_message(
    mesh: &Mesh,
    writer: Writer,
    sessions: Vec<Uuid>,
    pool_size: u32,
    load: Load,
) -> anyhow::Result<Figures> {
    let pool = pool(mesh.config.chat.database.url.as_ref(), pool_size).await?;
    let store = aimesh_chat::store::Store::new(pool);
    let sessions = Arc::new(sessions);
    Ok(measure("floor: chat's INSERT statement", load, move |n| {
        let (store, sessions) = (store.clone(), Arc::clone(&sessions));
        async move {
            let session = sessions[usize::try_from(n).unwrap_or(0) % sessions.len()];
            let message = NewMessage {
                role: if n.is_multiple_of(2) { MessageRole::User } else { MessageRole::Assistant },
                content: crate::chat::message_text(n),
                content_type: "text".into(),
                metadata: serde_json::json!({}),
                tokens: 16,
                parent: Parent::Latest,
                client_message_id: None,
                attachment_ids: Vec::new(),
                user_id: writer.user,
            };
            store.append(session, writer.project, &message).await.map(drop).map_err(|e| e.to_string())
        }
    })
    .await)
}
