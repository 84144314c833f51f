//! The usage database: the catalog and its prices, usage records with their idempotency claims,
//! quotas and reservations. Functions taking a `PgConnection` run inside the caller's
//! transaction; the ledger composes them.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use aimesh_kit::data::audit::{self, Actor, Audit, changed};
use aimesh_kit::data::db::{sql, unique_violation};
use aimesh_kit::data::outbox::{EVENT_COLUMNS, OutboxEvent};
use aimesh_kit::wire::pagination::Page;

use crate::domain::{ModelStatus, Price, QuotaLimits, QuotaSubject, Windows};
use crate::error::{Result, UsageError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ModelRow {
    pub id: Uuid,
    pub provider: String,
    pub name: String,
    pub version: String,
    pub model_type: String,
    pub display_name: String,
    pub description: String,
    pub capabilities: Vec<String>,
    pub status: String,
    pub max_tokens: i32,
    pub context_window: i32,
    pub match_pattern: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct PriceRow {
    pub model_id: Uuid,
    pub input_per_million: Decimal,
    pub output_per_million: Decimal,
    pub cached_input_per_million: Decimal,
    pub effective_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

impl PriceRow {
    pub fn price(&self) -> Price {
        Price {
            input_per_million: self.input_per_million,
            output_per_million: self.output_per_million,
            cached_input_per_million: self.cached_input_per_million,
        }
    }
}

/// What a new catalog entry stores.
#[derive(Debug, Clone)]
pub struct NewModel {
    pub provider: String,
    pub name: String,
    pub version: String,
    pub model_type: &'static str,
    pub display_name: String,
    pub description: String,
    pub capabilities: Vec<String>,
    pub status: ModelStatus,
    pub max_tokens: i32,
    pub context_window: i32,
    pub match_pattern: String,
}

/// Fields of a model to change; `None` keeps the stored value.
#[derive(Debug, Clone, Default)]
pub struct ModelPatch {
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub context_window: Option<i32>,
    pub max_tokens: Option<i32>,
    pub capabilities: Option<Vec<String>>,
    pub match_pattern: Option<String>,
    pub status: Option<ModelStatus>,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct UsageRow {
    pub id: Uuid,
    pub request_id: String,
    pub project_id: Uuid,
    pub user_id: Uuid,
    pub api_key_id: Option<Uuid>,
    pub model_id: Uuid,
    pub chat_session_id: Option<Uuid>,
    pub reservation_id: Option<Uuid>,
    pub request_type: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub total_tokens: i64,
    pub cost: Decimal,
    pub duration_ms: i64,
    pub status: String,
    pub error_message: String,
    pub request_time: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// Optional filters of a usage listing.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub user_id: Option<Uuid>,
    pub model_id: Option<Uuid>,
    pub api_key_id: Option<Uuid>,
    pub status: Option<&'static str>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct QuotaRow {
    pub project_id: Uuid,
    pub scope: String,
    pub subject_id: Uuid,
    pub tokens_per_day: i64,
    pub cost_per_month: Decimal,
    pub requests_per_minute: i64,
    pub tokens_per_minute: i64,
    pub soft_limit_percent: i32,
    pub updated_at: DateTime<Utc>,
}

impl QuotaRow {
    pub fn subject(&self) -> Result<QuotaSubject> {
        QuotaSubject::from_db(&self.scope, self.subject_id)
    }

    pub fn limits(&self) -> QuotaLimits {
        QuotaLimits {
            tokens_per_day: self.tokens_per_day,
            cost_per_month: self.cost_per_month,
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            soft_limit_percent: self.soft_limit_percent,
        }
    }
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ReservationRow {
    pub id: Uuid,
    pub project_id: Uuid,
    pub user_id: Uuid,
    pub api_key_id: Option<Uuid>,
    /// The person who made it (see [`crate::domain::ReservationActor`]).
    pub maker_user_id: Uuid,
    pub model_id: Uuid,
    pub tokens: i64,
    pub cost: Decimal,
    pub cost_nanos: i64,
    pub state: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Actual usage of one group of records (same user, key and model) in a window, as the
/// counters hold it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct UsageGroup {
    pub user_id: Uuid,
    pub api_key_id: Option<Uuid>,
    pub model_id: Uuid,
    /// Created in the current day / minute (every group is in the current month).
    pub in_day: bool,
    pub in_minute: bool,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    /// Sum over records of each cost in 1e-9 USD rounded up, as the counters added them.
    pub cost_nanos: i64,
}

const MODEL_COLUMNS: &str = "id, provider, name, version, model_type, display_name, description, capabilities, \
                             status, max_tokens, context_window, match_pattern, created_at, updated_at";
const PRICE_COLUMNS: &str =
    "model_id, input_per_million, output_per_million, cached_input_per_million, effective_at, created_at";
const USAGE_COLUMNS: &str = "id, request_id, project_id, user_id, api_key_id, model_id, chat_session_id, \
                             reservation_id, request_type, input_tokens, output_tokens, cached_input_tokens, \
                             total_tokens, cost, duration_ms, status, error_message, request_time, created_at";
const QUOTA_COLUMNS: &str = "project_id, scope, subject_id, tokens_per_day, cost_per_month, requests_per_minute, \
                             tokens_per_minute, soft_limit_percent, updated_at";
const RESERVATION_COLUMNS: &str = "id, project_id, user_id, api_key_id, maker_user_id, model_id, tokens, cost, \
                                   cost_nanos, state, created_at, expires_at";

/// The advisory lock key of a project's counters: both halves of its id folded together (ids
/// are UUIDv7, whose first half is mostly a timestamp). Two projects sharing a key only share
/// the lock, which is harmless.
fn lock_key(project_id: Uuid) -> i64 {
    let (high, low) = project_id.as_u64_pair();
    i64::from_ne_bytes((high ^ low).to_ne_bytes())
}

aimesh_kit::pg_store!(
    /// The usage store over its PostgreSQL pool.
    Store
);

impl Store {
    // ---- catalog ----

    /// Inserts a model and, when given, its first price, in one transaction with its audit event.
    pub async fn insert_model(
        &self,
        model: &NewModel,
        price: Option<(Price, DateTime<Utc>)>,
        actor: &Actor,
    ) -> Result<ModelRow> {
        let mut tx = self.pool.begin().await?;
        let row: ModelRow = sqlx::query_as(sql(format!(
            "INSERT INTO ai_models (id, provider, name, version, model_type, display_name, description, \
             capabilities, status, max_tokens, context_window, match_pattern) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING {MODEL_COLUMNS}"
        )))
        .bind(Uuid::now_v7())
        .bind(&model.provider)
        .bind(&model.name)
        .bind(&model.version)
        .bind(model.model_type)
        .bind(&model.display_name)
        .bind(&model.description)
        .bind(&model.capabilities)
        .bind(model.status.as_str())
        .bind(model.max_tokens)
        .bind(model.context_window)
        .bind(&model.match_pattern)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| if unique_violation(&e).is_some() { UsageError::ModelExists } else { e.into() })?;
        let price = match price {
            Some((price, effective_at)) => Some(insert_price(&mut tx, row.id, &price, effective_at).await?),
            None => None,
        };
        let new = serde_json::json!({ "model": row, "price": price });
        let audit = catalog_audit(actor, "model.created", "model", row.id, changed(None::<()>, new));
        audit::record(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Changes a model, audited as `action` (`model.updated`, `model.retired`) with the model
    /// before and after.
    pub async fn update_model(
        &self,
        id: Uuid,
        patch: &ModelPatch,
        actor: &Actor,
        action: &'static str,
    ) -> Result<ModelRow> {
        let not_found = || UsageError::NotFound { what: "model", field: "model_id" };
        let mut tx = self.pool.begin().await?;
        let old: ModelRow =
            sqlx::query_as(sql(format!("SELECT {MODEL_COLUMNS} FROM ai_models WHERE id = $1 FOR UPDATE")))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(not_found)?;
        let row: ModelRow = sqlx::query_as(sql(format!(
            "UPDATE ai_models SET display_name = COALESCE($2, display_name), \
             description = COALESCE($3, description), context_window = COALESCE($4, context_window), \
             max_tokens = COALESCE($5, max_tokens), capabilities = COALESCE($6, capabilities), \
             match_pattern = COALESCE($7, match_pattern), status = COALESCE($8, status) \
             WHERE id = $1 RETURNING {MODEL_COLUMNS}"
        )))
        .bind(id)
        .bind(&patch.display_name)
        .bind(&patch.description)
        .bind(patch.context_window)
        .bind(patch.max_tokens)
        .bind(&patch.capabilities)
        .bind(&patch.match_pattern)
        .bind(patch.status.map(ModelStatus::as_str))
        .fetch_one(&mut *tx)
        .await?;
        audit::record(&mut tx, catalog_audit(actor, action, "model", id, changed(&old, &row))).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Adds a price of a model, audited with the price it replaces from `effective_at` on
    /// (the one in force then, if any).
    pub async fn insert_model_price(
        &self,
        model_id: Uuid,
        price: &Price,
        effective_at: DateTime<Utc>,
        actor: &Actor,
    ) -> Result<PriceRow> {
        let mut tx = self.pool.begin().await?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM ai_models WHERE id = $1)")
            .bind(model_id)
            .fetch_one(&mut *tx)
            .await?;
        if !exists {
            return Err(UsageError::NotFound { what: "model", field: "model_id" });
        }
        let old: Option<PriceRow> = sqlx::query_as(sql(format!(
            "SELECT {PRICE_COLUMNS} FROM model_prices WHERE model_id = $1 AND effective_at <= $2 \
             ORDER BY effective_at DESC LIMIT 1"
        )))
        .bind(model_id)
        .bind(effective_at)
        .fetch_optional(&mut *tx)
        .await?;
        let row = insert_price(&mut tx, model_id, price, effective_at).await?;
        let audit = catalog_audit(actor, "model_price.set", "model_price", model_id, changed(&old, &row));
        audit::record(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// The whole catalog, for the cache: every model and every price.
    pub async fn catalog(&self) -> Result<(Vec<ModelRow>, Vec<PriceRow>)> {
        let models = sqlx::query_as(sql(format!("SELECT {MODEL_COLUMNS} FROM ai_models ORDER BY created_at, id")))
            .fetch_all(&self.pool)
            .await?;
        let prices = sqlx::query_as(sql(format!(
            "SELECT {PRICE_COLUMNS} FROM model_prices ORDER BY model_id, effective_at DESC"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok((models, prices))
    }

    // ---- usage records ----

    /// The record a (project, request id) claimed, if any.
    pub async fn claimed_usage(&self, project_id: Uuid, request_id: &str) -> Result<Option<UsageRow>> {
        let mut conn = self.pool.acquire().await?;
        claimed_usage(&mut conn, project_id, request_id).await
    }

    /// A page of a project's records, newest request first.
    pub async fn list_usage(&self, project_id: Uuid, filter: &UsageFilter, page: &Page) -> Result<Vec<UsageRow>> {
        let (time, id) = page.bounds();
        Ok(sqlx::query_as(sql(format!(
            "SELECT {USAGE_COLUMNS} FROM model_usage_logs WHERE project_id = $1 \
             AND ($2::uuid IS NULL OR user_id = $2) AND ($3::uuid IS NULL OR model_id = $3) \
             AND ($4::uuid IS NULL OR api_key_id = $4) AND ($5::text IS NULL OR status = $5) \
             AND ($6::timestamptz IS NULL OR request_time >= $6) AND ($7::timestamptz IS NULL OR request_time < $7) \
             AND (request_time, id) < ($8, $9) ORDER BY request_time DESC, id DESC LIMIT $10"
        )))
        .bind(project_id)
        .bind(filter.user_id)
        .bind(filter.model_id)
        .bind(filter.api_key_id)
        .bind(filter.status)
        .bind(filter.start_time)
        .bind(filter.end_time)
        .bind(time)
        .bind(id)
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
        .await?)
    }

    // ---- quotas ----

    pub async fn quotas(&self, project_id: Uuid) -> Result<Vec<QuotaRow>> {
        Ok(sqlx::query_as(sql(format!(
            "SELECT {QUOTA_COLUMNS} FROM quotas WHERE project_id = $1 ORDER BY scope, subject_id"
        )))
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Creates or replaces the quota of one subject, audited with the limits before and after.
    pub async fn upsert_quota(
        &self,
        project_id: Uuid,
        subject: QuotaSubject,
        limits: &QuotaLimits,
        actor: &Actor,
    ) -> Result<QuotaRow> {
        let mut tx = self.pool.begin().await?;
        let old: Option<QuotaRow> = sqlx::query_as(sql(format!(
            "SELECT {QUOTA_COLUMNS} FROM quotas WHERE project_id = $1 AND scope = $2 AND subject_id = $3 FOR UPDATE"
        )))
        .bind(project_id)
        .bind(subject.scope().as_str())
        .bind(subject.id())
        .fetch_optional(&mut *tx)
        .await?;
        let row: QuotaRow = sqlx::query_as(sql(format!(
            "INSERT INTO quotas (project_id, scope, subject_id, tokens_per_day, cost_per_month, requests_per_minute, \
             tokens_per_minute, soft_limit_percent) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (project_id, scope, subject_id) DO UPDATE SET tokens_per_day = EXCLUDED.tokens_per_day, \
             cost_per_month = EXCLUDED.cost_per_month, requests_per_minute = EXCLUDED.requests_per_minute, \
             tokens_per_minute = EXCLUDED.tokens_per_minute, soft_limit_percent = EXCLUDED.soft_limit_percent \
             RETURNING {QUOTA_COLUMNS}"
        )))
        .bind(project_id)
        .bind(subject.scope().as_str())
        .bind(subject.id())
        .bind(limits.tokens_per_day)
        .bind(limits.cost_per_month)
        .bind(limits.requests_per_minute)
        .bind(limits.tokens_per_minute)
        .bind(limits.soft_limit_percent)
        .fetch_one(&mut *tx)
        .await?;
        let details = changed(old.as_ref().map(QuotaRow::limits), row.limits());
        audit::record(&mut tx, quota_audit(actor, "quota.set", project_id, subject, details)).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Deletes the quota of one subject, audited with the limits it had; NOT_FOUND when it has
    /// none.
    pub async fn delete_quota(&self, project_id: Uuid, subject: QuotaSubject, actor: &Actor) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let deleted: Option<QuotaRow> = sqlx::query_as(sql(format!(
            "DELETE FROM quotas WHERE project_id = $1 AND scope = $2 AND subject_id = $3 RETURNING {QUOTA_COLUMNS}"
        )))
        .bind(project_id)
        .bind(subject.scope().as_str())
        .bind(subject.id())
        .fetch_optional(&mut *tx)
        .await?;
        let old = deleted.ok_or(UsageError::NotFound { what: "quota", field: "subject_id" })?;
        let details = changed(old.limits(), None::<()>);
        audit::record(&mut tx, quota_audit(actor, "quota.deleted", project_id, subject, details)).await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- maintenance ----

    /// Creates the monthly partitions of the previous month, the current one and the next
    /// `months_ahead` (see `usage_ensure_partitions`).
    pub async fn ensure_partitions(&self, months_ahead: i32) -> Result<()> {
        sqlx::query("SELECT usage_ensure_partitions($1)").bind(months_ahead).execute(&self.pool).await?;
        Ok(())
    }

    /// Deletes what no request can need any more: reservations closed or expired a day ago, and
    /// idempotency claims of request times RecordUsage no longer accepts (older than 35 days,
    /// with a day of margin). Returns how many rows went.
    pub async fn prune(&self, now: DateTime<Utc>) -> Result<u64> {
        let reservations = sqlx::query("DELETE FROM quota_reservations WHERE expires_at < $1")
            .bind(now - chrono::Duration::days(1))
            .execute(&self.pool)
            .await?;
        let claims = sqlx::query("DELETE FROM usage_requests WHERE request_time < $1")
            .bind(now - crate::domain::MAX_REQUEST_TIME_AGE - chrono::Duration::days(1))
            .execute(&self.pool)
            .await?;
        Ok(reservations.rows_affected() + claims.rows_affected())
    }
}

/// The audit event of a catalog change: the catalog belongs to no project.
fn catalog_audit<'a>(
    actor: &'a Actor,
    action: &'static str,
    resource_type: &'static str,
    id: Uuid,
    details: serde_json::Value,
) -> Audit<'a> {
    Audit { actor, action, resource_type, resource_id: id.to_string(), project_id: None, details }
}

/// The audit event of a quota change; the resource is the subject: `project`, `user:<id>` or
/// `api_key:<id>`.
fn quota_audit<'a>(
    actor: &'a Actor,
    action: &'static str,
    project_id: Uuid,
    subject: QuotaSubject,
    details: serde_json::Value,
) -> Audit<'a> {
    let resource_id = match subject {
        QuotaSubject::Project => "project".to_owned(),
        QuotaSubject::User(id) | QuotaSubject::ApiKey(id) => format!("{}:{id}", subject.scope().as_str()),
    };
    Audit { actor, action, resource_type: "quota", resource_id, project_id: Some(project_id), details }
}

async fn insert_price(
    conn: &mut PgConnection,
    model_id: Uuid,
    price: &Price,
    effective_at: DateTime<Utc>,
) -> Result<PriceRow> {
    sqlx::query_as(sql(format!(
        "INSERT INTO model_prices (model_id, input_per_million, output_per_million, cached_input_per_million, \
         effective_at) VALUES ($1, $2, $3, $4, $5) RETURNING {PRICE_COLUMNS}"
    )))
    .bind(model_id)
    .bind(price.input_per_million)
    .bind(price.output_per_million)
    .bind(price.cached_input_per_million)
    .bind(effective_at)
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| if unique_violation(&e).is_some() { UsageError::PriceExists } else { e.into() })
}

// ---- inside a ledger transaction ----

/// Holds the project's counters lock in shared mode until the transaction ends: records,
/// reservations and releases of a project run side by side, a rebuild of its counters waits
/// for them and they wait for it.
pub async fn lock_counters_shared(conn: &mut PgConnection, project_id: Uuid) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)").bind(lock_key(project_id)).execute(&mut *conn).await?;
    Ok(())
}

/// Holds the project's counters lock exclusively until the transaction ends (a rebuild).
pub async fn lock_counters_exclusive(conn: &mut PgConnection, project_id: Uuid) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(lock_key(project_id)).execute(&mut *conn).await?;
    Ok(())
}

/// The record a (project, request id) claimed, if any.
pub async fn claimed_usage(conn: &mut PgConnection, project_id: Uuid, request_id: &str) -> Result<Option<UsageRow>> {
    Ok(sqlx::query_as(sql(format!(
        "SELECT {} FROM usage_requests r JOIN model_usage_logs u ON u.id = r.usage_id AND u.request_time = r.request_time \
         WHERE r.project_id = $1 AND r.request_id = $2",
        USAGE_COLUMNS.split(", ").map(|c| format!("u.{c}")).collect::<Vec<_>>().join(", ")
    )))
    .bind(project_id)
    .bind(request_id)
    .fetch_optional(&mut *conn)
    .await?)
}

/// What the first statement of a record found.
#[derive(Debug)]
pub enum RecordClaim {
    /// The (project, request id) was recorded before: that record stands.
    Duplicate,
    /// This request may record; the price of the model in force at its request time, if any.
    Claimed(Option<PriceRow>),
}

#[derive(sqlx::FromRow)]
struct ClaimWithPrice {
    claimed: bool,
    model_id: Option<Uuid>,
    input_per_million: Option<Decimal>,
    output_per_million: Option<Decimal>,
    cached_input_per_million: Option<Decimal>,
    effective_at: Option<DateTime<Utc>>,
    created_at: Option<DateTime<Utc>>,
}

/// One record of a batch, as its claim needs it.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    pub request_id: &'a str,
    /// The id the record gets if this claim wins.
    pub usage_id: Uuid,
    pub request_time: DateTime<Utc>,
    pub model_id: Uuid,
}

/// The start of a batch of records of one project, in one round trip since a record's latency
/// is its round trips: takes the project's counters lock in shared mode (see the ledger),
/// claims each (project, request id) for its `usage_id` (a concurrent duplicate in another
/// transaction makes this wait for it, then see it), and reads each model's price in force at
/// the request time. One answer per request, in order. Claims are inserted in request id
/// order, so two batches that share request ids wait for each other instead of deadlocking.
/// A request id twice in one batch is claimed once (the ledger sends each only once).
pub async fn claim_records(
    conn: &mut PgConnection,
    project_id: Uuid,
    requests: &[ClaimRequest<'_>],
) -> Result<Vec<RecordClaim>> {
    let rows: Vec<ClaimWithPrice> = sqlx::query_as(sql(format!(
        "WITH counters_lock AS (SELECT pg_advisory_xact_lock_shared($1)), \
         input AS (SELECT * FROM unnest($3::text[], $4::uuid[], $5::timestamptz[], $6::uuid[]) \
                   WITH ORDINALITY AS i (request_id, usage_id, request_time, model_id, n)), \
         claim AS (INSERT INTO usage_requests (project_id, request_id, usage_id, request_time) \
                   SELECT $2, i.request_id, i.usage_id, i.request_time FROM input AS i, counters_lock \
                   ORDER BY i.request_id \
                   ON CONFLICT (project_id, request_id) DO NOTHING RETURNING usage_id) \
         SELECT c.usage_id IS NOT NULL AS claimed, p.* FROM input AS i \
         LEFT JOIN claim AS c ON c.usage_id = i.usage_id \
         LEFT JOIN LATERAL (SELECT {PRICE_COLUMNS} FROM model_prices \
                            WHERE model_id = i.model_id AND effective_at <= i.request_time \
                            ORDER BY effective_at DESC LIMIT 1) AS p ON true \
         ORDER BY i.n"
    )))
    .bind(lock_key(project_id))
    .bind(project_id)
    .bind(requests.iter().map(|r| r.request_id.to_owned()).collect::<Vec<_>>())
    .bind(requests.iter().map(|r| r.usage_id).collect::<Vec<_>>())
    .bind(requests.iter().map(|r| r.request_time).collect::<Vec<_>>())
    .bind(requests.iter().map(|r| r.model_id).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    if rows.len() != requests.len() {
        return Err(aimesh_kit::ServiceError::internal("the usage claim answered a different number of rows").into());
    }
    Ok(rows.into_iter().zip(requests).map(|(row, request)| row.into_claim(request.request_time)).collect())
}

impl ClaimWithPrice {
    fn into_claim(self, request_time: DateTime<Utc>) -> RecordClaim {
        if !self.claimed {
            return RecordClaim::Duplicate;
        }
        let price =
            match (self.model_id, self.input_per_million, self.output_per_million, self.cached_input_per_million) {
                (Some(model_id), Some(input), Some(output), Some(cached)) => Some(PriceRow {
                    model_id,
                    input_per_million: input,
                    output_per_million: output,
                    cached_input_per_million: cached,
                    effective_at: self.effective_at.unwrap_or(request_time),
                    created_at: self.created_at.unwrap_or(request_time),
                }),
                _ => None,
            };
        RecordClaim::Claimed(price)
    }
}

/// Takes back the claims of records of this transaction that failed (no price, a reservation
/// that is not open), so a later try of the same request id may record.
pub async fn unclaim(conn: &mut PgConnection, project_id: Uuid, request_ids: &[String]) -> Result<()> {
    sqlx::query("DELETE FROM usage_requests WHERE project_id = $1 AND request_id = ANY($2)")
        .bind(project_id)
        .bind(request_ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Stores usage records and their outbox events (`events[i]` reports `rows[i]`), in one
/// statement whatever their number.
pub async fn insert_usage(conn: &mut PgConnection, rows: &[UsageRow], events: &[OutboxEvent]) -> Result<()> {
    let statement = sqlx::query(sql(format!(
        "WITH stored AS (INSERT INTO model_usage_logs ({USAGE_COLUMNS}) SELECT * FROM unnest(\
         $1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::uuid[], $6::uuid[], $7::uuid[], $8::uuid[], \
         $9::text[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::numeric[], $15::int8[], \
         $16::text[], $17::text[], $18::timestamptz[], $19::timestamptz[])) \
         INSERT INTO outbox_events ({EVENT_COLUMNS}) SELECT * FROM {}",
        OutboxEvent::unnest(20)
    )));
    fn column<T>(rows: &[UsageRow], f: impl Fn(&UsageRow) -> T) -> Vec<T> {
        rows.iter().map(f).collect()
    }
    let statement = statement
        .bind(column(rows, |r| r.id))
        .bind(column(rows, |r| r.request_id.clone()))
        .bind(column(rows, |r| r.project_id))
        .bind(column(rows, |r| r.user_id))
        .bind(column(rows, |r| r.api_key_id))
        .bind(column(rows, |r| r.model_id))
        .bind(column(rows, |r| r.chat_session_id))
        .bind(column(rows, |r| r.reservation_id))
        .bind(column(rows, |r| r.request_type.clone()))
        .bind(column(rows, |r| r.input_tokens))
        .bind(column(rows, |r| r.output_tokens))
        .bind(column(rows, |r| r.cached_input_tokens))
        .bind(column(rows, |r| r.total_tokens))
        .bind(column(rows, |r| r.cost))
        .bind(column(rows, |r| r.duration_ms))
        .bind(column(rows, |r| r.status.clone()))
        .bind(column(rows, |r| r.error_message.clone()))
        .bind(column(rows, |r| r.request_time))
        .bind(column(rows, |r| r.created_at));
    OutboxEvent::bind_all(events, statement).execute(&mut *conn).await?;
    Ok(())
}

pub async fn insert_reservation(conn: &mut PgConnection, row: &ReservationRow) -> Result<()> {
    sqlx::query(
        "INSERT INTO quota_reservations (id, project_id, user_id, api_key_id, maker_user_id, model_id, tokens, cost, \
         cost_nanos, state, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'open', $10, $11)",
    )
    .bind(row.id)
    .bind(row.project_id)
    .bind(row.user_id)
    .bind(row.api_key_id)
    .bind(row.maker_user_id)
    .bind(row.model_id)
    .bind(row.tokens)
    .bind(row.cost)
    .bind(row.cost_nanos)
    .bind(row.created_at)
    .bind(row.expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A reservation, locked until the transaction ends.
pub async fn reservation_for_update(conn: &mut PgConnection, id: Uuid) -> Result<Option<ReservationRow>> {
    Ok(sqlx::query_as(sql(format!("SELECT {RESERVATION_COLUMNS} FROM quota_reservations WHERE id = $1 FOR UPDATE")))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?)
}

/// Closes an open reservation as `settled` (by `usage_id`) or `released`.
pub async fn close_reservation(
    conn: &mut PgConnection,
    id: Uuid,
    state: &'static str,
    usage_id: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(
        "UPDATE quota_reservations SET state = $2, usage_id = $3, closed_at = $4 WHERE id = $1 AND state = 'open'",
    )
    .bind(id)
    .bind(state)
    .bind(usage_id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

// ---- the counters' truth ----

/// A project's actual usage accepted since `windows.month_start`, grouped as the counters
/// hold it. `request_time` bounds only let PostgreSQL skip partitions: a record's request
/// time is at most 35 days before and 5 minutes after its acceptance.
pub async fn usage_groups(conn: &mut PgConnection, project_id: Uuid, windows: &Windows) -> Result<Vec<UsageGroup>> {
    Ok(sqlx::query_as(
        "SELECT user_id, api_key_id, model_id, created_at >= $3 AS in_day, created_at >= $4 AS in_minute, \
         count(*)::bigint AS requests, sum(input_tokens)::bigint AS input_tokens, \
         sum(output_tokens)::bigint AS output_tokens, sum(total_tokens)::bigint AS total_tokens, \
         sum(ceil(cost * 1000000000))::bigint AS cost_nanos \
         FROM model_usage_logs WHERE project_id = $1 AND created_at >= $2 \
         AND request_time >= $2 - interval '36 days' \
         GROUP BY user_id, api_key_id, model_id, created_at >= $3, created_at >= $4",
    )
    .bind(project_id)
    .bind(windows.month_start)
    .bind(windows.day_start)
    .bind(windows.minute_start)
    .fetch_all(&mut *conn)
    .await?)
}

/// A project's reservations still holding room at `now`.
pub async fn open_reservations(
    conn: &mut PgConnection,
    project_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Vec<ReservationRow>> {
    Ok(sqlx::query_as(sql(format!(
        "SELECT {RESERVATION_COLUMNS} FROM quota_reservations \
         WHERE project_id = $1 AND state = 'open' AND expires_at > $2"
    )))
    .bind(project_id)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?)
}
