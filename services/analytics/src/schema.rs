//! The ClickHouse schema, as versioned migrations applied at start-up. Each statement is
//! idempotent (`IF NOT EXISTS`), so replicas starting together, or a start that died half way,
//! only repeat work; a version is recorded once all its statements ran.
//!
//! Each table is a [`Step::Table`] that [`Topology`] lays out on one node or over a cluster.
//! Tables are partitioned by month, ordered by project and time with the event id last (so
//! ReplacingMergeTree collapses a duplicate that slipped past the ingest check), and expire by a
//! per-row `retention_days` (the project's retention when the row was written; changing it
//! rewrites that column).

use crate::cluster::{Topology, run_everywhere};
use crate::error::{AnalyticsError, Result};
use crate::store::ClickHouse;

/// One version of the schema.
#[derive(Debug)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub steps: &'static [Step],
}

/// One idempotent schema change, laid out as the topology needs ([`Topology`]).
#[derive(Debug)]
pub enum Step {
    /// A table of rows: on one node `CREATE TABLE IF NOT EXISTS {db}.<name> <body>`; on a
    /// cluster the same as `<name>_local` on every node (its engine made `Replicated` when the
    /// cluster replicates) plus a `Distributed` table `<name>` over them, sharded by `shard_by`.
    /// `{engine:X}` in the body is the engine X.
    Table { name: &'static str, shard_by: &'static str, body: &'static str },
    /// A materialized view `<name>` reading inserts into the (local) tables: `{table:<name>}` in
    /// the body is a table's local name, so on a cluster each shard rolls up its own rows.
    View { name: &'static str, body: &'static str },
    /// `ALTER TABLE` of the table that holds `table`'s rows (each node's local table on a
    /// cluster): `change` must be idempotent (`IF NOT EXISTS`, a setting, a rebuild).
    Alter { table: &'static str, change: &'static str },
}

impl Step {
    /// The statements that apply this step in database `db` as `topology` lays tables out.
    pub fn statements(&self, topology: &Topology, db: &str) -> Vec<String> {
        match self {
            Step::Table { name, shard_by, body } => topology.create_table(db, name, shard_by, body),
            Step::View { name, body } => vec![topology.create_view(db, name, body)],
            Step::Alter { table, change } => vec![topology.alter_table(db, table, change)],
        }
    }
}

/// Every version, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events, hourly usage rollup, retention",
        steps: &[
            Step::Table {
                name: "usage_events",
                shard_by: "cityHash64(project_id)",
                body: "(
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
        ) ENGINE = {engine:ReplacingMergeTree}
        PARTITION BY toYYYYMM(occurred_at)
        ORDER BY (project_id, occurred_at, event_id)
        TTL toDateTime(occurred_at) + toIntervalDay(retention_days)",
            },
            // Hourly sums per every dimension a query may split or filter by. Fed by the view below
            // from each insert into usage_events: only events the ingest found new reach it.
            Step::Table {
                name: "usage_hourly",
                shard_by: "cityHash64(project_id)",
                body: "(
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
        ) ENGINE = {engine:AggregatingMergeTree}
        PARTITION BY toYYYYMM(hour)
        ORDER BY (project_id, hour, model_id, user_id, api_key_id, status, request_type)
        TTL hour + toIntervalDay(retention_days)",
            },
            Step::View {
                name: "usage_hourly_mv",
                body: "TO {table:usage_hourly} AS
        SELECT e.project_id AS project_id, toDateTime(toStartOfHour(e.occurred_at), 'UTC') AS hour,
            e.model_id AS model_id, e.user_id AS user_id, e.api_key_id AS api_key_id, e.status AS status,
            e.request_type AS request_type, count() AS requests, countIf(e.status != 'success') AS errors,
            sum(e.input_tokens) AS input_tokens, sum(e.output_tokens) AS output_tokens,
            sum(e.cached_input_tokens) AS cached_input_tokens, sum(e.total_tokens) AS total_tokens,
            sum(e.cost) AS cost, quantilesState(0.5, 0.95, 0.99)(e.duration_ms) AS latency,
            max(e.retention_days) AS retention_days
        FROM {table:usage_events} AS e
        GROUP BY project_id, hour, model_id, user_id, api_key_id, status, request_type",
            },
            Step::Table {
                name: "audit_events",
                shard_by: "cityHash64(project_id)",
                body: "(
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
        ) ENGINE = {engine:ReplacingMergeTree}
        PARTITION BY toYYYYMM(occurred_at)
        ORDER BY (project_id, occurred_at, event_id)
        TTL toDateTime(occurred_at) + toIntervalDay(retention_days)",
            },
            Step::Table {
                name: "product_events",
                shard_by: "cityHash64(project_id)",
                body: "(
            event_id UUID,
            project_id UUID,
            occurred_at DateTime64(6, 'UTC'),
            event_type LowCardinality(String),
            user_id UUID,
            payload String,
            retention_days UInt16,
            INDEX event_id_bloom event_id TYPE bloom_filter GRANULARITY 4
        ) ENGINE = {engine:ReplacingMergeTree}
        PARTITION BY toYYYYMM(occurred_at)
        ORDER BY (project_id, occurred_at, event_id)
        TTL toDateTime(occurred_at) + toIntervalDay(retention_days)",
            },
            Step::Table {
                name: "project_retention",
                shard_by: "cityHash64(project_id)",
                body: "(
            project_id UUID,
            days UInt16,
            updated_at DateTime64(6, 'UTC')
        ) ENGINE = {engine:ReplacingMergeTree(updated_at)}
        ORDER BY project_id",
            },
        ],
    },
    Migration {
        version: 2,
        name: "retention applied in the background",
        steps: &[
            // The retention each project's stored events were last cut and rewritten to, and when:
            // a project whose row here differs from project_retention has a change pending.
            Step::Table {
                name: "retention_applied",
                shard_by: "cityHash64(project_id)",
                body: "(
            project_id UUID,
            days UInt16,
            applied_at DateTime64(6, 'UTC')
        ) ENGINE = {engine:ReplacingMergeTree(applied_at)}
        ORDER BY project_id",
            },
        ],
    },
    Migration {
        version: 3,
        name: "legal hold",
        steps: &[
            // The latest hold decision per project: on (legal_hold = 1, since when) or lifted. A
            // project on hold keeps every row (see docs/retention.md).
            Step::Table {
                name: "project_legal_hold",
                shard_by: "cityHash64(project_id)",
                body: "(
            project_id UUID,
            legal_hold UInt8,
            since DateTime64(6, 'UTC'),
            reason String,
            updated_at DateTime64(6, 'UTC')
        ) ENGINE = {engine:ReplacingMergeTree(updated_at)}
        ORDER BY project_id",
            },
        ],
    },
    Migration {
        version: 4,
        name: "hourly usage by model, status and type",
        steps: &[
            // The rollup keeps a row per user and key of each hour: a month of a busy project is
            // ~10^6 rows, ~90 ms to sum by day and model. Most questions split or filter by none of
            // the two, and this projection sums them away (~10^4 rows, ~15 ms); ClickHouse reads it
            // whenever a query needs no other column, part by part, so its answer is the rollup's.
            // A projection rather than a second table: it is written with each part, so it can
            // neither miss nor count twice an event inserted while the migration runs.
            // Merging an AggregatingMergeTree changes rows, so a merged part rebuilds it.
            Step::Alter {
                table: "usage_hourly",
                change: "MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild'",
            },
            Step::Alter {
                table: "usage_hourly",
                change: "ADD PROJECTION IF NOT EXISTS by_model (SELECT project_id, hour, model_id, status, request_type, \
                sum(requests), sum(errors), sum(input_tokens), sum(output_tokens), sum(cached_input_tokens), \
                sum(total_tokens), sum(cost) GROUP BY project_id, hour, model_id, status, request_type)",
            },
            // The parts written before (a background mutation; until a part has it, that part is
            // read from its rows).
            Step::Alter { table: "usage_hourly", change: "MATERIALIZE PROJECTION by_model" },
        ],
    },
];

/// The tables whose rows expire by `retention_days` and are keyed by project and time.
pub const EVENT_TABLES: [&str; 3] = ["usage_events", "audit_events", "product_events"];

/// The table that records which versions ran (a [`Step::Table`] like the others, so that the
/// bookkeeping spreads over a cluster too).
const BOOKKEEPING: Step = Step::Table {
    name: "schema_migrations",
    shard_by: "version",
    body: "(version UInt32, name String, applied_at DateTime('UTC') DEFAULT now()) \
           ENGINE = {engine:ReplacingMergeTree} ORDER BY version",
};

/// Every table a migration creates, the bookkeeping last.
pub fn tables() -> Vec<&'static str> {
    let steps = MIGRATIONS.iter().flat_map(|m| m.steps.iter()).chain([&BOOKKEEPING]);
    steps.filter_map(|step| if let Step::Table { name, .. } = step { Some(*name) } else { None }).collect()
}

/// Every view a migration creates.
pub fn views() -> Vec<&'static str> {
    let steps = MIGRATIONS.iter().flat_map(|m| m.steps.iter());
    steps.filter_map(|step| if let Step::View { name, .. } = step { Some(*name) } else { None }).collect()
}

/// Creates the database and applies the versions it has not seen. On a cluster the DDL runs on
/// every node (`ON CLUSTER`, or node by node), so several replicas starting together, or a start
/// that died half way, only repeat `IF NOT EXISTS` work; a version is recorded (through the
/// `Distributed` bookkeeping table, synchronously) once all its steps ran everywhere.
pub async fn migrate(clickhouse: &ClickHouse) -> Result<()> {
    let db = clickhouse.database();
    let topology = clickhouse.topology();
    let server = clickhouse.server();
    if matches!(topology, Topology::Cluster(_)) && crate::conversion::has_single_node_tables(clickhouse).await? {
        return Err(AnalyticsError::ClickHouse(format!(
            "database {db} holds a single-node deployment's tables: analytics moves them to the cluster when it \
             starts (docs/clickhouse-cluster.md)"
        )));
    }
    run_everywhere(topology, server, &format!("CREATE DATABASE IF NOT EXISTS {db}{}", topology.on_cluster()), &[])
        .await?;
    apply(clickhouse, &BOOKKEEPING).await?;
    let applied: Vec<u32> =
        server.query(&format!("SELECT DISTINCT version FROM {db}.schema_migrations")).fetch_all().await?;
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        for step in migration.steps {
            apply(clickhouse, step).await?;
        }
        server
            .query(&format!("INSERT INTO {db}.schema_migrations (version, name) VALUES (?, ?)"))
            .bind(migration.version)
            .bind(migration.name)
            .execute()
            .await?;
        tracing::info!(version = migration.version, name = migration.name, "clickhouse migration applied");
    }
    Ok(())
}

/// Runs one step's statements where the topology needs them.
async fn apply(clickhouse: &ClickHouse, step: &Step) -> Result<()> {
    let (db, topology) = (clickhouse.database(), clickhouse.topology());
    for statement in step.statements(topology, db) {
        run_everywhere(topology, clickhouse.server(), &statement, &[]).await?;
    }
    Ok(())
}
