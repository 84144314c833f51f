//! The ClickHouse schema, as versioned migrations applied at start-up. Each statement is
//! idempotent (`IF NOT EXISTS`), so replicas starting together, or a start that died half way,
//! only repeat work; a version is recorded once all its statements ran.
//!
//! `{db}` in a statement is the configured database. Tables are partitioned by month, ordered
//! by project and time with the event id last (so ReplacingMergeTree collapses a duplicate
//! that slipped past the ingest check), and expire by a per-row `retention_days` (the project's
//! retention when the row was written; changing it rewrites that column).

use crate::error::Result;
use crate::store::ClickHouse;

/// One version of the schema.
#[derive(Debug)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub statements: &'static [&'static str],
}

/// Every version, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events, hourly usage rollup, retention",
        statements: &[
            "CREATE TABLE IF NOT EXISTS {db}.usage_events (
            event_id UUID,
            project_id UUID,
            occurred_at DateTime64(6, 'UTC'),
            record_id UUID,
            request_id String,
            user_id UUID,
            api_key_id UUID,
            model_id UUID,
            chat_session_id UUID,
            request_type LowCardinality(String),
            input_tokens Int64,
            output_tokens Int64,
            cached_input_tokens Int64,
            total_tokens Int64,
            cost Decimal(38, 10),
            duration_ms Int64,
            status LowCardinality(String),
            error_message String,
            retention_days UInt16,
            INDEX event_id_bloom event_id TYPE bloom_filter GRANULARITY 4
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(occurred_at)
        ORDER BY (project_id, occurred_at, event_id)
        TTL toDateTime(occurred_at) + toIntervalDay(retention_days)",
            // Hourly sums per every dimension a query may split or filter by. Fed by the view below
            // from each insert into usage_events: only events the ingest found new reach it.
            "CREATE TABLE IF NOT EXISTS {db}.usage_hourly (
            project_id UUID,
            hour DateTime('UTC'),
            model_id UUID,
            user_id UUID,
            api_key_id UUID,
            status LowCardinality(String),
            request_type LowCardinality(String),
            requests SimpleAggregateFunction(sum, UInt64),
            errors SimpleAggregateFunction(sum, UInt64),
            input_tokens SimpleAggregateFunction(sum, Int64),
            output_tokens SimpleAggregateFunction(sum, Int64),
            cached_input_tokens SimpleAggregateFunction(sum, Int64),
            total_tokens SimpleAggregateFunction(sum, Int64),
            cost SimpleAggregateFunction(sum, Decimal(38, 10)),
            latency AggregateFunction(quantiles(0.5, 0.95, 0.99), Int64),
            retention_days SimpleAggregateFunction(max, UInt16)
        ) ENGINE = AggregatingMergeTree
        PARTITION BY toYYYYMM(hour)
        ORDER BY (project_id, hour, model_id, user_id, api_key_id, status, request_type)
        TTL hour + toIntervalDay(retention_days)",
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_hourly_mv TO {db}.usage_hourly AS
        SELECT e.project_id AS project_id, toDateTime(toStartOfHour(e.occurred_at), 'UTC') AS hour,
            e.model_id AS model_id, e.user_id AS user_id, e.api_key_id AS api_key_id, e.status AS status,
            e.request_type AS request_type, count() AS requests, countIf(e.status != 'success') AS errors,
            sum(e.input_tokens) AS input_tokens, sum(e.output_tokens) AS output_tokens,
            sum(e.cached_input_tokens) AS cached_input_tokens, sum(e.total_tokens) AS total_tokens,
            sum(e.cost) AS cost, quantilesState(0.5, 0.95, 0.99)(e.duration_ms) AS latency,
            max(e.retention_days) AS retention_days
        FROM {db}.usage_events AS e
        GROUP BY project_id, hour, model_id, user_id, api_key_id, status, request_type",
            "CREATE TABLE IF NOT EXISTS {db}.audit_events (
            event_id UUID,
            project_id UUID,
            occurred_at DateTime64(6, 'UTC'),
            actor_user_id UUID,
            action LowCardinality(String),
            resource_type LowCardinality(String),
            resource_id String,
            ip_address String,
            user_agent String,
            details String,
            retention_days UInt16,
            INDEX event_id_bloom event_id TYPE bloom_filter GRANULARITY 4
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(occurred_at)
        ORDER BY (project_id, occurred_at, event_id)
        TTL toDateTime(occurred_at) + toIntervalDay(retention_days)",
            "CREATE TABLE IF NOT EXISTS {db}.product_events (
            event_id UUID,
            project_id UUID,
            occurred_at DateTime64(6, 'UTC'),
            event_type LowCardinality(String),
            user_id UUID,
            payload String,
            retention_days UInt16,
            INDEX event_id_bloom event_id TYPE bloom_filter GRANULARITY 4
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(occurred_at)
        ORDER BY (project_id, occurred_at, event_id)
        TTL toDateTime(occurred_at) + toIntervalDay(retention_days)",
            "CREATE TABLE IF NOT EXISTS {db}.project_retention (
            project_id UUID,
            days UInt16,
            updated_at DateTime64(6, 'UTC')
        ) ENGINE = ReplacingMergeTree(updated_at)
        ORDER BY project_id",
        ],
    },
    Migration {
        version: 2,
        name: "retention applied in the background",
        statements: &[
            // The retention each project's stored events were last cut and rewritten to, and when:
            // a project whose row here differs from project_retention has a change pending.
            "CREATE TABLE IF NOT EXISTS {db}.retention_applied (
            project_id UUID,
            days UInt16,
            applied_at DateTime64(6, 'UTC')
        ) ENGINE = ReplacingMergeTree(applied_at)
        ORDER BY project_id",
        ],
    },
];

/// The tables whose rows expire by `retention_days` and are keyed by project and time.
pub const EVENT_TABLES: [&str; 3] = ["usage_events", "audit_events", "product_events"];

/// Creates the database and applies the versions it has not seen.
pub async fn migrate(clickhouse: &ClickHouse) -> Result<()> {
    let db = clickhouse.database();
    clickhouse.server().query(&format!("CREATE DATABASE IF NOT EXISTS {db}")).execute().await?;
    clickhouse
        .server()
        .query(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, name String, \
             applied_at DateTime('UTC') DEFAULT now()) ENGINE = ReplacingMergeTree ORDER BY version"
        ))
        .execute()
        .await?;
    let applied: Vec<u32> =
        clickhouse.server().query(&format!("SELECT DISTINCT version FROM {db}.schema_migrations")).fetch_all().await?;
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        for statement in migration.statements {
            clickhouse.server().query(&statement.replace("{db}", db)).execute().await?;
        }
        clickhouse
            .server()
            .query(&format!("INSERT INTO {db}.schema_migrations (version, name) VALUES (?, ?)"))
            .bind(migration.version)
            .bind(migration.name)
            .execute()
            .await?;
        tracing::info!(version = migration.version, name = migration.name, "clickhouse migration applied");
    }
    Ok(())
}
