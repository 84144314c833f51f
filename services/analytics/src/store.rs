//! ClickHouse: the connection, ingestion counted once, the usage and audit queries, retention.
//!
//! Exactly once: an event is written only if its id is in none of the event tables yet. The
//! check and the insert run under one lock per process, so two deliveries of the same event
//! to one replica cannot both pass; materialized views therefore see each event once and the
//! rollup counts it once. The event tables are ReplacingMergeTree keyed by event id, and every
//! raw read uses FINAL, so a duplicate that still got in (two analytics replicas handed the same
//! event at the same instant) never shows in raw answers; see README, "Analytics".

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use clickhouse::Row;
use serde::Deserialize;
use uuid::Uuid;

use crate::config::AnalyticsConfig;
use crate::error::{AnalyticsError, Result};
use crate::events::{AuditEventRow, ProductEventRow, UsageEventRow, ValidEvent};
use crate::query::{UsageFilter, UsageQuery};
use crate::schema::EVENT_TABLES;

/// A ClickHouse server and the database analytics owns on it.
#[derive(Clone)]
pub struct ClickHouse {
    server: clickhouse::Client,
    client: clickhouse::Client,
    database: String,
}

impl std::fmt::Debug for ClickHouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouse").field("database", &self.database).finish_non_exhaustive()
    }
}

impl ClickHouse {
    /// A client of `config.clickhouse_url`; refuses a database name that is not a plain
    /// identifier, or `default` (special in chDB, and shared on a real server).
    pub fn new(config: &AnalyticsConfig) -> Result<Self> {
        let database = config.clickhouse_database.as_str();
        let plain = database.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && database.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !plain || database == "default" || database == "system" {
            return Err(AnalyticsError::invalid(
                "analytics.clickhouse_database",
                "must be a plain identifier other than default and system",
            ));
        }
        let mut server = clickhouse::Client::default().with_url(&config.clickhouse_url);
        if let Some(user) = &config.clickhouse_user {
            server = server.with_user(user);
        }
        if let Some(password) = &config.clickhouse_password {
            server = server.with_password(password);
        }
        let client = server.clone().with_database(database);
        Ok(Self { server, client, database: database.to_owned() })
    }

    /// The client without a database, for creating it.
    pub fn server(&self) -> &clickhouse::Client {
        &self.server
    }

    /// The client of analytics' database.
    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// Whether ClickHouse answers.
    pub async fn is_healthy(&self) -> bool {
        self.server.query("SELECT 1").fetch_one::<u8>().await.is_ok()
    }
}

/// What happened to one valid event at ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    New,
    Duplicate,
}

/// Sums over a set of usage records (a bucket, a group, or all).
#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
pub struct UsageAggregate {
    /// Bucket start in unix seconds (0 without buckets).
    pub bucket: u32,
    /// The group's value ("" without grouping).
    pub grp: String,
    pub sum_requests: u64,
    pub sum_errors: u64,
    pub sum_input_tokens: i64,
    pub sum_output_tokens: i64,
    pub sum_cached_input_tokens: i64,
    pub sum_total_tokens: i64,
    /// Exact decimal.
    pub sum_cost: String,
    /// p50, p95, p99 of the duration in milliseconds.
    pub latency: Vec<f64>,
}

/// Where an aggregate was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Rollup,
    Raw,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rollup => "rollup",
            Self::Raw => "raw",
        }
    }
}

/// An audit search.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor_user_id: Option<Uuid>,
    /// Exact, or a prefix when it ends in ".".
    pub action: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    /// Strictly older than this (time, event id).
    pub before: Option<(DateTime<Utc>, Uuid)>,
}

#[derive(Row, Deserialize)]
struct EventIdRow {
    #[serde(with = "clickhouse::serde::uuid")]
    event_id: Uuid,
}

#[derive(Row, Deserialize)]
struct RetentionRow {
    #[serde(with = "clickhouse::serde::uuid")]
    project_id: Uuid,
    days: u16,
}

/// Analytics' data in ClickHouse.
#[derive(Debug, Clone)]
pub struct Store {
    ch: ClickHouse,
    default_retention_days: u16,
    /// Project retention in days, as last read or set (see [`Store::refresh_retention`]).
    retention: Arc<RwLock<HashMap<Uuid, u16>>>,
    time_zones: Arc<HashSet<String>>,
    ingest_lock: Arc<tokio::sync::Mutex<()>>,
}

/// ClickHouse's text form of a time, for `DateTime64(6, 'UTC')` parameters.
fn time_param(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

impl Store {
    /// The store of `ch`, reading the time zones ClickHouse knows and the projects' retention.
    pub async fn open(ch: ClickHouse, default_retention_days: u16) -> Result<Self> {
        let zones: Vec<String> = ch.client.query("SELECT time_zone FROM system.time_zones").fetch_all().await?;
        let store = Self {
            ch,
            default_retention_days,
            retention: Arc::default(),
            time_zones: Arc::new(zones.into_iter().collect()),
            ingest_lock: Arc::default(),
        };
        store.refresh_retention().await?;
        Ok(store)
    }

    pub fn clickhouse(&self) -> &ClickHouse {
        &self.ch
    }

    /// Whether ClickHouse knows the time zone `name`.
    pub fn is_time_zone(&self, name: &str) -> bool {
        self.time_zones.contains(name)
    }

    /// Rereads every project's retention (another replica may have changed one).
    pub async fn refresh_retention(&self) -> Result<()> {
        let rows: Vec<RetentionRow> =
            self.ch.client.query("SELECT project_id, days FROM project_retention FINAL").fetch_all().await?;
        let map = rows.into_iter().map(|row| (row.project_id, row.days)).collect();
        if let Ok(mut retention) = self.retention.write() {
            *retention = map;
        }
        Ok(())
    }

    /// A project's retention in days, and whether the project set it.
    pub fn retention_of(&self, project_id: Uuid) -> (u16, bool) {
        let custom = self.retention.read().ok().and_then(|r| r.get(&project_id).copied());
        custom.map_or((self.default_retention_days, false), |days| (days, true))
    }

    /// Stores the events not stored before; for each, whether it was new. Duplicates within
    /// the batch count as seen after their first occurrence.
    pub async fn ingest(&self, mut events: Vec<ValidEvent>) -> Result<Vec<Stored>> {
        let _serialised = self.ingest_lock.lock().await;
        let known = self.known_ids(&events).await?;
        let mut seen = HashSet::with_capacity(events.len());
        let outcomes: Vec<Stored> = events
            .iter()
            .map(|e| {
                if !known.contains(&e.event_id()) && seen.insert(e.event_id()) {
                    Stored::New
                } else {
                    Stored::Duplicate
                }
            })
            .collect();
        let (mut usage, mut audit, mut product) = (Vec::new(), Vec::new(), Vec::new());
        for (event, outcome) in events.iter_mut().zip(&outcomes) {
            if *outcome == Stored::Duplicate {
                continue;
            }
            event.set_retention(self.retention_of(event.project_id()).0);
            match event.clone() {
                ValidEvent::Usage(row) => usage.push(row),
                ValidEvent::Audit(row) => audit.push(row),
                ValidEvent::Product(row) => product.push(row),
            }
        }
        self.insert::<UsageEventRow>("usage_events", &usage).await?;
        self.insert::<AuditEventRow>("audit_events", &audit).await?;
        self.insert::<ProductEventRow>("product_events", &product).await?;
        Ok(outcomes)
    }

    /// Which of `events` are stored already: looked up by id within the batch's time span,
    /// which the tables' sort key (project, time, id) narrows to a few granules.
    async fn known_ids(&self, events: &[ValidEvent]) -> Result<HashSet<Uuid>> {
        let (Some(first), Some(last)) =
            (events.iter().map(ValidEvent::occurred_at).min(), events.iter().map(ValidEvent::occurred_at).max())
        else {
            return Ok(HashSet::new());
        };
        let ids: Vec<String> = events.iter().map(|e| e.event_id().to_string()).collect();
        let select = |table: &str| {
            format!(
                "SELECT event_id FROM {table} WHERE occurred_at BETWEEN {{first:DateTime64(6, 'UTC')}} \
                 AND {{last:DateTime64(6, 'UTC')}} AND event_id IN {{ids:Array(UUID)}}"
            )
        };
        let sql = EVENT_TABLES.iter().map(|t| select(t)).collect::<Vec<_>>().join(" UNION ALL ");
        let rows: Vec<EventIdRow> = self
            .ch
            .client
            .query(&sql)
            .param("first", time_param(first))
            .param("last", time_param(last))
            .param("ids", ids)
            .fetch_all()
            .await?;
        Ok(rows.into_iter().map(|row| row.event_id).collect())
    }

    /// One INSERT of `rows` (RowBinary), none when empty.
    async fn insert<T>(&self, table: &str, rows: &[T]) -> Result<()>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let mut insert = self.ch.client.insert::<T>(table).await?;
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await?;
        Ok(())
    }

    /// Whether the hourly rollup answers `query` exactly: hour-aligned range, buckets of an
    /// hour or more in a zone whose offset is whole hours at both ends.
    pub async fn rollup_answers(&self, query: &UsageQuery) -> Result<bool> {
        if !query.range.is_hour_aligned() {
            return Ok(false);
        }
        let Some((bucket, tz)) = &query.bucket else { return Ok(true) };
        if *bucket == crate::query::Bucket::Minute {
            return Ok(false);
        }
        if tz == "UTC" {
            return Ok(true);
        }
        let whole: u8 = self
            .ch
            .client
            .query(
                "SELECT toUInt8(timeZoneOffset(toDateTime({s:Int64}, {tz:String})) % 3600 = 0 \
                 AND timeZoneOffset(toDateTime({e:Int64}, {tz:String})) % 3600 = 0)",
            )
            .param("s", query.range.start.timestamp())
            .param("e", query.range.end.timestamp())
            .param("tz", tz.as_str())
            .fetch_one()
            .await?;
        Ok(whole == 1)
    }

    /// Usage sums of `query` per bucket and group, from the rollup when it answers exactly,
    /// else from the events.
    pub async fn usage(&self, query: &UsageQuery) -> Result<(Vec<UsageAggregate>, Source)> {
        let source = if self.rollup_answers(query).await? { Source::Rollup } else { Source::Raw };
        Ok((self.usage_from(query, source).await?, source))
    }

    /// Usage sums of `query` from `source`.
    pub async fn usage_from(&self, query: &UsageQuery, source: Source) -> Result<Vec<UsageAggregate>> {
        let (from, time, sums) = match source {
            Source::Raw => (
                "usage_events FINAL",
                "occurred_at",
                "count() AS sum_requests, countIf(status != 'success') AS sum_errors, \
                 sum(input_tokens) AS sum_input_tokens, sum(output_tokens) AS sum_output_tokens, \
                 sum(cached_input_tokens) AS sum_cached_input_tokens, sum(total_tokens) AS sum_total_tokens, \
                 toString(sum(cost)) AS sum_cost, quantiles(0.5, 0.95, 0.99)(duration_ms) AS latency",
            ),
            Source::Rollup => (
                "usage_hourly",
                "hour",
                "sum(requests) AS sum_requests, sum(errors) AS sum_errors, \
                 sum(input_tokens) AS sum_input_tokens, sum(output_tokens) AS sum_output_tokens, \
                 sum(cached_input_tokens) AS sum_cached_input_tokens, sum(total_tokens) AS sum_total_tokens, \
                 toString(sum(cost)) AS sum_cost, quantilesMerge(0.5, 0.95, 0.99)(latency) AS latency",
            ),
        };
        let bucket = query.bucket.as_ref().map_or_else(|| "toUInt32(0)".to_owned(), |(b, _)| b.sql(time));
        let group = query.group_by.map_or("''", |d| d.sql());
        let mut sql = format!(
            "SELECT {bucket} AS bucket, {group} AS grp, {sums} FROM {from} \
             WHERE project_id = {{project:UUID}} AND {time} >= {{start:DateTime64(6, 'UTC')}} \
             AND {time} < {{end:DateTime64(6, 'UTC')}}"
        );
        let UsageFilter { model_id, user_id, api_key_id, status, request_type } = &query.filter;
        for (present, condition) in [
            (model_id.is_some(), " AND model_id = {model_id:UUID}"),
            (user_id.is_some(), " AND user_id = {user_id:UUID}"),
            (api_key_id.is_some(), " AND api_key_id = {api_key_id:UUID}"),
            (status.is_some(), " AND status = {status:String}"),
            (request_type.is_some(), " AND request_type = {request_type:String}"),
        ] {
            if present {
                sql.push_str(condition);
            }
        }
        sql.push_str(" GROUP BY bucket, grp ORDER BY bucket, grp");
        let mut statement = self
            .ch
            .client
            .query(&sql)
            .param("project", query.project_id.to_string())
            .param("start", time_param(query.range.start))
            .param("end", time_param(query.range.end))
            .param("tz", query.bucket.as_ref().map_or("UTC", |(_, tz)| tz.as_str()));
        for (name, value) in [("model_id", model_id), ("user_id", user_id), ("api_key_id", api_key_id)] {
            if let Some(id) = value {
                statement = statement.param(name, id.to_string());
            }
        }
        for (name, value) in [("status", status), ("request_type", request_type)] {
            if let Some(text) = value {
                statement = statement.param(name, text.as_str());
            }
        }
        Ok(statement.fetch_all().await?)
    }

    /// Audit events of a project, newest first, at most `limit`.
    pub async fn audit(&self, project_id: Uuid, filter: &AuditFilter, limit: u32) -> Result<Vec<AuditEventRow>> {
        let mut sql = "SELECT event_id, project_id, occurred_at, actor_user_id, action, resource_type, \
             resource_id, ip_address, user_agent, details, retention_days FROM audit_events FINAL \
             WHERE project_id = {project:UUID}"
            .to_owned();
        let prefix = filter.action.as_deref().is_some_and(|a| a.ends_with('.'));
        for (present, condition) in [
            (filter.actor_user_id.is_some(), " AND actor_user_id = {actor:UUID}"),
            (filter.action.is_some() && prefix, " AND startsWith(action, {action:String})"),
            (filter.action.is_some() && !prefix, " AND action = {action:String}"),
            (filter.resource_type.is_some(), " AND resource_type = {resource_type:String}"),
            (filter.resource_id.is_some(), " AND resource_id = {resource_id:String}"),
            (filter.start.is_some(), " AND occurred_at >= {start:DateTime64(6, 'UTC')}"),
            (filter.end.is_some(), " AND occurred_at < {end:DateTime64(6, 'UTC')}"),
            (
                filter.before.is_some(),
                " AND (occurred_at, event_id) < ({before_time:DateTime64(6, 'UTC')}, {before_id:UUID})",
            ),
        ] {
            if present {
                sql.push_str(condition);
            }
        }
        sql.push_str(" ORDER BY occurred_at DESC, event_id DESC LIMIT {limit:UInt32}");
        let mut statement = self.ch.client.query(&sql).param("project", project_id.to_string()).param("limit", limit);
        if let Some(actor) = filter.actor_user_id {
            statement = statement.param("actor", actor.to_string());
        }
        for (name, value) in
            [("action", &filter.action), ("resource_type", &filter.resource_type), ("resource_id", &filter.resource_id)]
        {
            if let Some(text) = value {
                statement = statement.param(name, text.as_str());
            }
        }
        for (name, value) in [("start", filter.start), ("end", filter.end)] {
            if let Some(time) = value {
                statement = statement.param(name, time_param(time));
            }
        }
        if let Some((time, id)) = filter.before {
            statement = statement.param("before_time", time_param(time)).param("before_id", id.to_string());
        }
        Ok(statement.fetch_all().await?)
    }

    /// Sets a project's retention: new rows get it, stored rows are rewritten to it, and rows
    /// already older than it are deleted now (synchronously; it is a rare, admin action).
    pub async fn set_retention(&self, project_id: Uuid, days: u16) -> Result<()> {
        let client = self.ch.client.clone().with_setting("mutations_sync", "1");
        client
            .query("INSERT INTO project_retention (project_id, days, updated_at) VALUES ({project:UUID}, {days:UInt16}, now64(6))")
            .param("project", project_id.to_string())
            .param("days", days)
            .execute()
            .await?;
        if let Ok(mut retention) = self.retention.write() {
            retention.insert(project_id, days);
        }
        let tables = EVENT_TABLES.iter().map(|t| (*t, "occurred_at")).chain([("usage_hourly", "hour")]);
        for (table, time) in tables {
            client
                .query(&format!(
                    "ALTER TABLE {table} DELETE WHERE project_id = {{project:UUID}} \
                     AND {time} < now64(6) - toIntervalDay({{days:UInt16}})"
                ))
                .param("project", project_id.to_string())
                .param("days", days)
                .execute()
                .await?;
            client
                .query(&format!(
                    "ALTER TABLE {table} UPDATE retention_days = {{days:UInt16}} WHERE project_id = {{project:UUID}}"
                ))
                .param("project", project_id.to_string())
                .param("days", days)
                .execute()
                .await?;
        }
        Ok(())
    }

    /// Merges every table now, which applies TTLs and collapses duplicates at once instead of
    /// in ClickHouse's background merges (tests and operators).
    pub async fn optimize(&self) -> Result<()> {
        for table in EVENT_TABLES.iter().chain(&["usage_hourly"]) {
            self.ch.client.query(&format!("OPTIMIZE TABLE {table} FINAL")).execute().await?;
        }
        Ok(())
    }
}
