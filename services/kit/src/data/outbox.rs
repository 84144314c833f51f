//! The transactional outbox: events that must not be lost (audit, usage) are written to a table
//! of the service's own database in the same transaction as the change they report
//! ([`enqueue`]), and an [`OutboxRelay`] hands them in batches to an [`OutboxSink`] (analytics,
//! through [`AnalyticsSink`]), marking them delivered on success and retrying with capped
//! exponential backoff otherwise; delivered rows are pruned after `retention`. Every service
//! with an outbox runs a relay beside its server ([`spawn_relay`]).
//!
//! Delivery is at least once: a relay that crashes after the sink accepted a batch but before
//! its commit delivers that batch again. The consumer deduplicates by `event_id`. Batches are
//! in `id` (write) order, but a batch that failed is retried after later events went out, and
//! several replicas (and each relay's `workers`) deliver side by side, so consumers must not
//! rely on order across batches.
//!
//! An event the sink refuses for good (analytics rejects it as malformed: no retry would ever
//! succeed) is a dead letter: in the transaction that settles its batch it moves from
//! `outbox_events` to `outbox_dead_letters` with the reason, where operators list it
//! ([`list_dead_letters`]) and, once the cause is fixed, replay it ([`replay_dead_letters`]:
//! back into the outbox as pending). `aimesh outbox` is the command line over both.
//!
//! Every service that uses the outbox calls [`migrate`] on its database; the tables' schema is
//! the kit's (`migrations/outbox`), not copied into each service.
//!
//! Metrics (label `database` is the database of the relay's pool): `outbox_delivered_total
//! {database, topic}` events delivered, `outbox_dead_lettered_total{database, topic}` events
//! refused for good, `outbox_delivery_failures_total{database}` failed batch deliveries; gauges
//! `outbox_pending{database}` rows waiting, `outbox_oldest_pending_age_seconds{database}` how
//! long the oldest of them has waited (0 when none), `outbox_dead_letters{database}` dead letters
//! kept, set after every pass that finds the outbox below one batch (a failed one included) and
//! every [`GAUGE_INTERVAL`] while full batches go out back to back.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgArguments;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::wire::error::ServiceError;
use crate::wire::pagination::Page;

/// The kit's own migrations of the outbox table, tracked apart from the service's.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations/outbox");
    migrator.dangerous_set_table_name("_aimesh_outbox_migrations");
    migrator
}

/// Creates or upgrades the outbox table in `pool`'s database; run at start-up after the
/// service's own migrations (several replicas may do so at once).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    migrator().run(pool).await
}

/// How often a running relay prunes delivered rows.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// How often the gauges are published at the latest while full batches go out back to back (a
/// backlog is when the age of its oldest event matters most).
pub const GAUGE_INTERVAL: Duration = Duration::from_secs(10);

/// The largest Ingest message a relay sends and analytics takes (gRPC's default is 4 MiB, which
/// a batch of a few thousand events passes): a batch larger than the receiver accepts would be
/// refused on every retry and never delivered.
pub const MAX_INGEST_MESSAGE_BYTES: usize = 64 << 20;

/// Longest `last_error` kept, so a sink that returns a whole response body cannot bloat rows.
const MAX_ERROR_LEN: usize = 1000;

/// One event on its way to analytics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutboxEvent {
    /// Unique per event; what the consumer deduplicates by.
    pub event_id: Uuid,
    /// The stream it belongs to: `audit`, `usage`, `product`.
    pub topic: String,
    /// What happened, such as `api_key.revoked`.
    pub event_type: String,
    pub project_id: Option<Uuid>,
    /// When it happened, in microseconds (what PostgreSQL keeps).
    pub occurred_at: DateTime<Utc>,
    pub payload: serde_json::Value,
    /// The W3C `traceparent` of the request that wrote it, when that request was traced.
    pub traceparent: Option<String>,
}

impl OutboxEvent {
    /// An event that happens now, with a fresh time-ordered id.
    pub fn new(
        topic: impl Into<String>,
        event_type: impl Into<String>,
        project_id: Option<Uuid>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            topic: topic.into(),
            event_type: event_type.into(),
            project_id,
            // PostgreSQL keeps microseconds; truncating here makes the relayed event equal the written one.
            occurred_at: Utc::now().trunc_subsecs(6),
            payload,
            traceparent: crate::telemetry::current_traceparent(),
        }
    }
}

/// The columns an event is written with, in this order (event_id, topic, event_type, project_id,
/// payload, occurred_at, traceparent): for a statement that writes an event together with the
/// change it reports, in one round trip (`INSERT INTO outbox_events ({EVENT_COLUMNS}) SELECT ...`).
pub const EVENT_COLUMNS: &str = "event_id, topic, event_type, project_id, payload, occurred_at, traceparent";

/// Writes `event` to the outbox inside the caller's transaction: it is relayed only if that
/// transaction commits.
pub async fn enqueue(conn: &mut PgConnection, event: &OutboxEvent) -> Result<(), sqlx::Error> {
    let statement = format!("INSERT INTO outbox_events ({EVENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)");
    event.bind_to(sqlx::query(sqlx::AssertSqlSafe(statement))).execute(&mut *conn).await?;
    Ok(())
}

/// A statement that values can be bound to: `sqlx::query` and `sqlx::query_as` alike.
pub trait Bind<'q>: Sized {
    fn bind_value<T>(self, value: T) -> Self
    where
        T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>;
}

impl<'q> Bind<'q> for sqlx::query::Query<'q, Postgres, PgArguments> {
    fn bind_value<T>(self, value: T) -> Self
    where
        T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>,
    {
        self.bind(value)
    }
}

impl<'q, O> Bind<'q> for sqlx::query::QueryAs<'q, Postgres, O, PgArguments> {
    fn bind_value<T>(self, value: T) -> Self
    where
        T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>,
    {
        self.bind(value)
    }
}

impl OutboxEvent {
    /// Binds the event's values to the next seven parameters of `query`, in [`EVENT_COLUMNS`]
    /// order.
    pub fn bind_to<'q, Q: Bind<'q>>(&'q self, query: Q) -> Q {
        query
            .bind_value(self.event_id)
            .bind_value(&self.topic)
            .bind_value(&self.event_type)
            .bind_value(self.project_id)
            .bind_value(&self.payload)
            .bind_value(self.occurred_at)
            .bind_value(&self.traceparent)
    }

    /// The rows of many events, for a statement that writes them together with the changes
    /// they report, in one round trip: `INSERT INTO outbox_events ({EVENT_COLUMNS}) SELECT * FROM
    /// {unnest(n)}`, the seven columns bound as arrays from `$n` on by [`OutboxEvent::bind_all`].
    pub fn unnest(first_parameter: usize) -> String {
        let n = first_parameter;
        format!(
            "unnest(${n}::uuid[], ${}::text[], ${}::text[], ${}::uuid[], ${}::jsonb[], ${}::timestamptz[], ${}::text[])",
            n + 1,
            n + 2,
            n + 3,
            n + 4,
            n + 5,
            n + 6
        )
    }

    /// Binds the columns of `events` as seven arrays to the next seven parameters of `query`, in
    /// [`EVENT_COLUMNS`] order (see [`OutboxEvent::unnest`]).
    pub fn bind_all<'q, Q: Bind<'q>>(events: &[OutboxEvent], query: Q) -> Q {
        query
            .bind_value(events.iter().map(|e| e.event_id).collect::<Vec<_>>())
            .bind_value(events.iter().map(|e| e.topic.clone()).collect::<Vec<_>>())
            .bind_value(events.iter().map(|e| e.event_type.clone()).collect::<Vec<_>>())
            .bind_value(events.iter().map(|e| e.project_id).collect::<Vec<_>>())
            .bind_value(events.iter().map(|e| e.payload.clone()).collect::<Vec<_>>())
            .bind_value(events.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
            .bind_value(events.iter().map(|e| e.traceparent.clone()).collect::<Vec<_>>())
    }
}

/// Why a sink did not take a batch; the whole batch is retried later.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    message: String,
}

impl SinkError {
    /// A failure described by `message`.
    pub fn new(message: impl std::fmt::Display) -> Self {
        Self { message: message.to_string() }
    }
}

/// What a sink did with a batch it took: the events it refused for good, each with why; the
/// others count as delivered (`Delivery::default()`: every one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Events no retry would make the sink take (malformed ones): they become dead letters.
    pub rejected: Vec<Rejection>,
}

/// An event a sink refused for good, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub event_id: Uuid,
    /// For people: what is wrong with the event (analytics: the offending field and why).
    pub reason: String,
}

/// Where relayed events go (analytics). Must accept a batch it has seen before (at least once).
pub trait OutboxSink: Send + Sync + 'static {
    /// Takes the whole batch, but for the events it names as refused for good, or fails as a
    /// whole (then the whole batch is retried).
    fn deliver<'a>(&'a self, events: &'a [OutboxEvent]) -> BoxFuture<'a, Result<Delivery, SinkError>>;
}

/// Why a relay pass failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The outbox table could not be read or updated; nothing changed.
    #[error("outbox database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The sink refused the batch; its rows were rescheduled.
    #[error("outbox sink failed: {0}")]
    Sink(#[from] SinkError),
}

/// How a relay paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelaySettings {
    /// Most events per delivery.
    pub batch_size: u32,
    /// Deliveries in flight at once: workers that each lock and deliver their own batch.
    pub workers: u32,
    /// Pause after a pass that found less than a full batch.
    pub poll_interval: Duration,
    /// Delay before the first retry of a failed event; doubles with each further failure.
    pub initial_backoff: Duration,
    /// Longest delay between retries.
    pub max_backoff: Duration,
    /// A sink taking longer than this counts as failed, so row locks are not held forever.
    pub delivery_timeout: Duration,
    /// How long delivered rows are kept before they are pruned.
    pub retention: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch_size: 100,
            workers: 1,
            poll_interval: Duration::from_secs(1),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            delivery_timeout: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    event_id: Uuid,
    topic: String,
    event_type: String,
    project_id: Option<Uuid>,
    payload: serde_json::Value,
    occurred_at: DateTime<Utc>,
    traceparent: Option<String>,
}

/// Moves events from one database's outbox to a sink. Several replicas, and several workers
/// of one relay, may relay the same table at once: each batch's rows are locked (`FOR UPDATE
/// SKIP LOCKED`) until its delivery is settled, so no two deliveries send the same rows
/// concurrently.
pub struct OutboxRelay {
    pool: PgPool,
    sink: Arc<dyn OutboxSink>,
    settings: RelaySettings,
    database: String,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("database", &self.database)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl OutboxRelay {
    /// A relay of the outbox in `pool`'s database to `sink`.
    pub fn new(pool: PgPool, sink: Arc<dyn OutboxSink>, settings: RelaySettings) -> Self {
        let database = pool.connect_options().get_database().unwrap_or("postgres").to_owned();
        // Counted only when they happen; at 0 from the start, so that rates and alerts see them.
        metrics::counter!("outbox_delivery_failures_total", "database" => database.clone()).increment(0);
        for topic in ["usage", "audit", "product"] {
            metrics::counter!("outbox_dead_lettered_total", "database" => database.clone(), "topic" => topic)
                .increment(0);
        }
        Self { pool, sink, settings, database }
    }

    /// Relays with `workers` workers until `shutdown`, then drains what is due and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let workers = (0..self.settings.workers.max(1)).map(|worker| self.work(worker == 0, &shutdown));
        futures::future::join_all(workers).await;
        tracing::info!(database = %self.database, "outbox relay stopped");
    }

    /// One worker: batches back to back while they are full, otherwise one every
    /// `poll_interval`. The `housekeeper` (one per relay) also prunes delivered rows every
    /// [`PRUNE_INTERVAL`] and publishes the gauges (see the module's doc).
    async fn work(&self, housekeeper: bool, shutdown: &CancellationToken) {
        let mut last_prune = tokio::time::Instant::now();
        let mut last_gauges: Option<tokio::time::Instant> = None;
        while !shutdown.is_cancelled() {
            if housekeeper && last_prune.elapsed() >= PRUNE_INTERVAL {
                last_prune = tokio::time::Instant::now();
                if let Err(error) = self.prune().await {
                    tracing::warn!(database = %self.database, %error, "cannot prune delivered outbox events");
                }
            }
            let full = self.pass().await;
            if housekeeper && (!full || last_gauges.is_none_or(|at| at.elapsed() >= GAUGE_INTERVAL)) {
                last_gauges = Some(tokio::time::Instant::now());
                if let Err(error) = self.publish_gauges().await {
                    tracing::debug!(database = %self.database, %error, "cannot measure the outbox");
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.settings.poll_interval) => {}
            }
        }
        // Events written by the last requests should not wait for the next start.
        while self.pass().await {}
    }

    /// One pass that logs its failure; whether a full batch went out (so more may be waiting).
    async fn pass(&self) -> bool {
        match self.relay_once().await {
            Ok(settled) => settled >= self.settings.batch_size as usize,
            Err(RelayError::Sink(error)) => {
                tracing::warn!(database = %self.database, %error, "outbox delivery failed, will retry");
                false
            }
            Err(RelayError::Database(error)) => {
                tracing::error!(database = %self.database, %error, "outbox relay cannot read its table");
                false
            }
        }
    }

    /// One batch: locks up to `batch_size` due events, hands them to the sink, marks them
    /// delivered on success (moving those it refused for good to the dead letters) or
    /// reschedules them with backoff on failure. Returns how many left the outbox: delivered or
    /// dead-lettered.
    pub async fn relay_once(&self) -> Result<usize, RelayError> {
        let mut tx = begin_relay_transaction(&self.pool).await?;
        let rows: Vec<OutboxRow> =
            sqlx::query_as(DUE_BATCH).bind(i64::from(self.settings.batch_size)).fetch_all(&mut *tx).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
        let events: Vec<OutboxEvent> = rows
            .into_iter()
            .map(|row| OutboxEvent {
                event_id: row.event_id,
                topic: row.topic,
                event_type: row.event_type,
                project_id: row.project_id,
                occurred_at: row.occurred_at,
                traceparent: row.traceparent,
                payload: row.payload,
            })
            .collect();

        let delivery = tokio::time::timeout(self.settings.delivery_timeout, self.sink.deliver(&events)).await;
        let error = match delivery {
            Ok(Ok(delivery)) => {
                let dead = settle(&mut tx, &ids, &delivery.rejected).await?;
                tx.commit().await?;
                for event in &events {
                    let name = if dead.contains(&event.event_id) {
                        "outbox_dead_lettered_total"
                    } else {
                        "outbox_delivered_total"
                    };
                    metrics::counter!(name, "database" => self.database.clone(), "topic" => event.topic.clone())
                        .increment(1);
                }
                if !dead.is_empty() {
                    tracing::warn!(database = %self.database, events = dead.len(),
                        "the sink refused outbox events for good; they are kept as dead letters (aimesh outbox dead-letters)");
                }
                return Ok(events.len());
            }
            Ok(Err(error)) => error,
            Err(_elapsed) => SinkError::new(format!("delivery timed out after {:?}", self.settings.delivery_timeout)),
        };

        metrics::counter!("outbox_delivery_failures_total", "database" => self.database.clone()).increment(1);
        let last_error: String = error.to_string().chars().take(MAX_ERROR_LEN).collect();
        // clock_timestamp(), not now(): now() is when the transaction began, before the delivery
        // attempt that may have taken up to delivery_timeout. The exponent is capped so power()
        // cannot overflow; the jitter only shortens, so max_backoff stays an upper bound.
        sqlx::query(
            "UPDATE outbox_events SET attempts = attempts + 1, last_error = $4, \
             next_attempt_at = clock_timestamp() + make_interval(secs => \
                 LEAST($2 * power(2.0::float8, LEAST(attempts, 30)), $3) * (0.8 + 0.2 * random())) \
             WHERE id = ANY($1)",
        )
        .bind(&ids)
        .bind(self.settings.initial_backoff.as_secs_f64())
        .bind(self.settings.max_backoff.as_secs_f64())
        .bind(last_error)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Err(RelayError::Sink(error))
    }

    /// Deletes rows delivered longer than `retention` ago, in bounded batches so no statement
    /// holds many locks; returns how many went.
    pub async fn prune(&self) -> Result<u64, sqlx::Error> {
        let mut pruned = 0;
        loop {
            let deleted = sqlx::query(
                "DELETE FROM outbox_events WHERE id IN (SELECT id FROM outbox_events \
                 WHERE delivered_at < now() - make_interval(secs => $1) LIMIT 10000)",
            )
            .bind(self.settings.retention.as_secs_f64())
            .execute(&self.pool)
            .await?
            .rows_affected();
            pruned += deleted;
            if deleted < 10000 {
                return Ok(pruned);
            }
        }
    }

    /// Measures the outbox in one round trip and sets its gauges: `outbox_pending`,
    /// `outbox_oldest_pending_age_seconds` and `outbox_dead_letters`.
    pub async fn publish_gauges(&self) -> Result<(), sqlx::Error> {
        let (pending, oldest_age, dead_letters): (i64, f64, i64) = sqlx::query_as(GAUGES).fetch_one(&self.pool).await?;
        let database = self.database.clone();
        metrics::gauge!("outbox_pending", "database" => database.clone()).set(pending as f64);
        metrics::gauge!("outbox_oldest_pending_age_seconds", "database" => database.clone()).set(oldest_age);
        metrics::gauge!("outbox_dead_letters", "database" => database).set(dead_letters as f64);
        Ok(())
    }
}

/// Pending events, the age of the oldest in seconds (0 when none), and dead letters kept. The
/// oldest is by `created_at` (when it entered the outbox): `occurred_at` may lie in the past.
const GAUGES: &str = "SELECT count(*), \
     COALESCE(GREATEST(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at)), 0), 0)::float8, \
     (SELECT count(*) FROM outbox_dead_letters) \
     FROM outbox_events WHERE delivered_at IS NULL";

/// Moves the events of a batch (`ids`) that the sink refused for good to the dead letters, with
/// their reasons, and marks the others delivered, inside the batch's transaction; returns the
/// event ids that became dead letters.
async fn settle(tx: &mut PgConnection, ids: &[i64], rejected: &[Rejection]) -> Result<HashSet<Uuid>, sqlx::Error> {
    let mut dead = HashSet::new();
    if !rejected.is_empty() {
        let event_ids: Vec<Uuid> = rejected.iter().map(|r| r.event_id).collect();
        let reasons: Vec<String> = rejected.iter().map(|r| r.reason.chars().take(MAX_ERROR_LEN).collect()).collect();
        // A rejection naming an event outside the batch matches no row and changes nothing.
        let moved: Vec<Uuid> = sqlx::query_scalar(
            "WITH moved AS (DELETE FROM outbox_events o USING unnest($2::uuid[], $3::text[]) AS r(event_id, reason) \
                 WHERE o.id = ANY($1) AND o.event_id = r.event_id \
                 RETURNING o.id, o.event_id, o.topic, o.event_type, o.project_id, o.payload, o.occurred_at, \
                     o.traceparent, o.attempts + 1 AS attempts, r.reason) \
             INSERT INTO outbox_dead_letters (event_id, topic, event_type, project_id, payload, occurred_at, \
                 traceparent, attempts, reason) \
             SELECT event_id, topic, event_type, project_id, payload, occurred_at, traceparent, attempts, reason \
             FROM moved ORDER BY id \
             ON CONFLICT (event_id) DO UPDATE SET attempts = EXCLUDED.attempts, reason = EXCLUDED.reason, \
                 dead_lettered_at = EXCLUDED.dead_lettered_at \
             RETURNING event_id",
        )
        .bind(ids)
        .bind(event_ids)
        .bind(reasons)
        .fetch_all(&mut *tx)
        .await?;
        dead.extend(moved);
    }
    sqlx::query("UPDATE outbox_events SET delivered_at = clock_timestamp() WHERE id = ANY($1)")
        .bind(ids)
        .execute(&mut *tx)
        .await?;
    Ok(dead)
}

/// Dead letters listed per page when the operator names no number.
pub const DEFAULT_DEAD_LETTER_PAGE: i64 = 100;
/// The most dead letters one page holds.
pub const MAX_DEAD_LETTER_PAGE: i64 = 1000;
/// The most event ids one replay names.
pub const MAX_REPLAY_EVENT_IDS: usize = 10_000;

/// An event the sink refused for good, as kept in `outbox_dead_letters`.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    /// Its place in the list: what the next page starts after.
    pub id: i64,
    pub event_id: Uuid,
    pub topic: String,
    pub event_type: String,
    pub project_id: Option<Uuid>,
    pub occurred_at: DateTime<Utc>,
    pub payload: serde_json::Value,
    pub traceparent: Option<String>,
    /// Deliveries tried, the refused one included.
    pub attempts: i32,
    /// Why the sink refused it.
    pub reason: String,
    pub dead_lettered_at: DateTime<Utc>,
}

/// The page of dead letters after id `after` (from the start when `None`), `limit` of them
/// ([`DEFAULT_DEAD_LETTER_PAGE`] when `None`, 1 to [`MAX_DEAD_LETTER_PAGE`]).
pub fn dead_letter_page(after: Option<i64>, limit: Option<i64>) -> Result<Page<i64>, ServiceError> {
    let limit = limit.unwrap_or(DEFAULT_DEAD_LETTER_PAGE);
    if !(1..=MAX_DEAD_LETTER_PAGE).contains(&limit) {
        return Err(ServiceError::invalid_field("limit", format!("must be 1 to {MAX_DEAD_LETTER_PAGE}")));
    }
    if after.is_some_and(|after| after < 0) {
        return Err(ServiceError::invalid_field("after", "must not be negative"));
    }
    Ok(Page::starting_after(after, limit))
}

/// One page of `pool`'s dead letters, oldest first, and the page after it (`None` on the last).
pub async fn list_dead_letters(
    pool: &PgPool,
    page: &Page<i64>,
) -> Result<(Vec<DeadLetter>, Option<Page<i64>>), sqlx::Error> {
    let rows: Vec<DeadLetter> = sqlx::query_as(
        "SELECT id, event_id, topic, event_type, project_id, occurred_at, payload, traceparent, attempts, reason, \
             dead_lettered_at FROM outbox_dead_letters WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(page.after().copied().unwrap_or(0))
    .bind(page.fetch_limit())
    .fetch_all(pool)
    .await?;
    Ok(page.split(rows, |last| last.id))
}

/// Which dead letters to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// These events (at most [`MAX_REPLAY_EVENT_IDS`]); ids that are no dead letter are skipped.
    Events(Vec<Uuid>),
    /// Every dead letter.
    All,
}

impl Replay {
    /// Refuses a selection out of its bounds, naming the field.
    pub fn validate(&self) -> Result<(), ServiceError> {
        match self {
            Self::Events(ids) if ids.is_empty() => Err(ServiceError::invalid_field("event_id", "name at least one")),
            Self::Events(ids) if ids.len() > MAX_REPLAY_EVENT_IDS => {
                Err(ServiceError::invalid_field("event_id", format!("at most {MAX_REPLAY_EVENT_IDS} at once")))
            }
            _ => Ok(()),
        }
    }
}

/// Moves the selected dead letters back into the outbox as pending, due now, with no attempts,
/// in one transaction (one statement), in their original order; returns the ids of the events
/// moved. Replaying again changes nothing: a replayed event is no dead letter any more (unless
/// the sink refuses it again).
pub async fn replay_dead_letters(pool: &PgPool, selection: &Replay) -> Result<Vec<Uuid>, ReplayError> {
    selection.validate()?;
    let (all, ids) = match selection {
        Replay::All => (true, Vec::new()),
        Replay::Events(ids) => (false, ids.clone()),
    };
    // An event still in the outbox (a dead letter cannot be, but an operator's hand may have put
    // it there) is made pending again rather than duplicated: event_id is unique there.
    let replayed = sqlx::query_scalar(
        "WITH replayed AS (DELETE FROM outbox_dead_letters WHERE $1 OR event_id = ANY($2) \
             RETURNING id, event_id, topic, event_type, project_id, payload, occurred_at, traceparent) \
         INSERT INTO outbox_events (event_id, topic, event_type, project_id, payload, occurred_at, traceparent) \
         SELECT event_id, topic, event_type, project_id, payload, occurred_at, traceparent FROM replayed ORDER BY id \
         ON CONFLICT (event_id) DO UPDATE SET delivered_at = NULL, attempts = 0, next_attempt_at = now(), \
             last_error = NULL, created_at = now() \
         RETURNING event_id",
    )
    .bind(all)
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(replayed)
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The selection is out of its bounds; nothing changed.
    #[error("{0}")]
    Invalid(#[from] ServiceError),
    /// The database refused; nothing changed.
    #[error("outbox database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// The oldest due events, up to `batch_size` of them, locked until `tx` ends.
const DUE_BATCH: &str = "SELECT id, event_id, topic, event_type, project_id, payload, occurred_at, traceparent FROM outbox_events \
     WHERE delivered_at IS NULL AND next_attempt_at <= now() ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED";

/// A transaction of the relay, with sorting ruled out, so that [`DUE_BATCH`] reads the index
/// of due events (`outbox_events_due`) in id order and stops after one batch. On a table
/// autovacuum has not analyzed yet (a new service's, for its first minute or more, however many
/// rows it holds) PostgreSQL guesses a few hundred due rows and prefers fetching all of them and
/// sorting: behind a backlog of 100,000 that is a 60 MB on-disk sort, about 110 ms of a core,
/// for every batch.
async fn begin_relay_transaction(pool: &PgPool) -> Result<sqlx::Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL enable_sort = off").execute(&mut *tx).await?;
    Ok(tx)
}

impl RelaySettings {
    /// The settings `outbox` in the configuration asks for.
    pub fn from_config(config: &crate::config::OutboxConfig) -> Self {
        Self {
            batch_size: config.batch_size.max(1),
            workers: config.workers.max(1),
            poll_interval: Duration::from_millis(config.poll_interval_ms),
            initial_backoff: Duration::from_millis(config.initial_backoff_ms),
            max_backoff: Duration::from_secs(config.max_backoff_secs),
            retention: Duration::from_secs(config.retention_hours * 3600),
            ..Self::default()
        }
    }
}

/// The sink of every service's relay: analytics' internal `Ingest` RPC, called with the
/// deployment's service token. A batch counts as delivered when analytics answers; events it
/// rejects as malformed are refused for good (they never would succeed: dead letters), any
/// error (UNAVAILABLE while ClickHouse is down) fails the batch so it is retried.
#[derive(Debug, Clone)]
pub struct AnalyticsSink {
    client: analytics_pb::ingest_service_client::IngestServiceClient<tonic::transport::Channel>,
    token: Option<crate::auth::ServiceToken>,
}

use aimesh_proto::analytics::v1 as analytics_pb;

impl AnalyticsSink {
    /// A lazily connecting sink to `url` (`services.analytics`).
    pub fn new(url: &str, token: Option<crate::auth::ServiceToken>) -> Result<Self, crate::ServiceError> {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| crate::ServiceError::invalid_field("services.analytics", e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        let client = analytics_pb::ingest_service_client::IngestServiceClient::new(channel)
            .max_decoding_message_size(MAX_INGEST_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_INGEST_MESSAGE_BYTES);
        Ok(Self { client, token })
    }
}

impl OutboxSink for AnalyticsSink {
    fn deliver<'a>(&'a self, events: &'a [OutboxEvent]) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            let token = self.token.as_ref().ok_or_else(|| SinkError::new("auth.service_token is not set"))?;
            let request_events = events
                .iter()
                .map(|event| analytics_pb::Event {
                    event_id: event.event_id.to_string(),
                    topic: event.topic.clone(),
                    event_type: event.event_type.clone(),
                    project_id: event.project_id.map(|id| id.to_string()).unwrap_or_default(),
                    occurred_at: Some(crate::wire::proto_json::timestamp(event.occurred_at)),
                    payload: event.payload.to_string(),
                })
                .collect();
            let mut request = tonic::Request::new(analytics_pb::IngestRequest { events: request_events });
            token.authorize(&mut request).map_err(SinkError::new)?;
            crate::telemetry::inject_current_context(request.metadata_mut());
            let response = self
                .client
                .clone()
                .ingest(request)
                .await
                .map_err(|status| SinkError::new(format!("{:?}: {}", status.code(), status.message())))?
                .into_inner();
            let refused = analytics_pb::EventOutcome::Rejected as i32;
            let mut rejected = Vec::new();
            // Results come one per event in request order; the id they echo is checked first.
            for (index, result) in response.results.iter().enumerate().filter(|(_, r)| r.outcome == refused) {
                let event_id = Uuid::parse_str(&result.event_id).ok().or_else(|| events.get(index).map(|e| e.event_id));
                let Some(event_id) = event_id else {
                    tracing::error!(event_id = %result.event_id, reason = %result.message,
                        "analytics rejected an event the relay did not send");
                    continue;
                };
                let reason = match result.field.as_str() {
                    "" => result.message.clone(),
                    field => format!("{field}: {}", result.message),
                };
                tracing::warn!(%event_id, %reason, "analytics rejected an outbox event; it becomes a dead letter");
                rejected.push(Rejection { event_id, reason });
            }
            Ok(Delivery { rejected })
        })
    }
}

/// A relay running in the background; [`RelayTask::stop`] delivers what is due and waits.
#[derive(Debug)]
pub struct RelayTask {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RelayTask {
    /// Stops relaying after a last drain (bounded by the delivery timeout per batch).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts relaying `pool`'s outbox to analytics (`services.analytics`, `outbox` settings): what
/// each service with an outbox does beside its server.
pub fn spawn_relay(pool: PgPool, common: &crate::config::CommonConfig) -> Result<RelayTask, crate::ServiceError> {
    let sink = AnalyticsSink::new(&common.services.analytics, common.auth.service_token.clone())?;
    let relay = OutboxRelay::new(pool, Arc::new(sink), RelaySettings::from_config(&common.outbox));
    let stop = CancellationToken::new();
    let task = tokio::spawn(tracing::Instrument::in_current_span(relay.run(stop.clone())));
    Ok(RelayTask { stop, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan of a batch on a table that was never analyzed, behind a backlog.
    #[tokio::test]
    async fn a_batch_is_read_in_index_order_without_sorting_the_backlog_even_before_any_analyze() {
        let db = crate::testing::TestDatabase::new(&migrator()).await;
        let backlog = "INSERT INTO outbox_events (event_id, topic, event_type, payload, occurred_at) \
                       SELECT gen_random_uuid(), 'usage', 'usage.recorded', jsonb_build_object('n', n), now() \
                       FROM generate_series(1, 20000) AS n";
        // So that no autovacuum analyzes the table during the test.
        let no_autovacuum = "ALTER TABLE outbox_events SET (autovacuum_enabled = false)";
        sqlx::query(no_autovacuum).execute(&db.pool).await.expect("turn autovacuum off");
        sqlx::query(backlog).execute(&db.pool).await.expect("write the backlog");
        let plan_of = |relay_transaction: bool| {
            let pool = db.pool.clone();
            async move {
                let mut tx = if relay_transaction {
                    begin_relay_transaction(&pool).await.expect("begin")
                } else {
                    pool.begin().await.expect("begin")
                };
                let explain = format!("EXPLAIN {DUE_BATCH}");
                let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
                    .bind(500_i64)
                    .fetch_all(&mut *tx)
                    .await
                    .expect("explain");
                lines.join("\n")
            }
        };
        let plain = plan_of(false).await;
        assert!(plain.contains("Sort"), "the trap this guards against is not set up:\n{plain}");
        let relay = plan_of(true).await;
        assert!(!relay.contains("Sort") && relay.contains("Index Scan using outbox_events_due"), "{relay}");
    }

    #[test]
    fn new_events_have_postgres_precision_and_fresh_ids() {
        let a = OutboxEvent::new("audit", "user.created", None, serde_json::json!({}));
        let b = OutboxEvent::new("audit", "user.created", None, serde_json::json!({}));
        assert_ne!(a.event_id, b.event_id);
        assert_eq!(a.occurred_at.timestamp_subsec_nanos() % 1000, 0);
    }
}
