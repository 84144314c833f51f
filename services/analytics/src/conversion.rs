//! Taking a single-node deployment to a cluster: the first start of analytics with
//! `clickhouse_cluster` set, against the node that held its tables, moves their rows into the
//! cluster's tables, every event exactly once (docs/clickhouse-cluster.md, "Migration").
//!
//! The steps, each safe to repeat after a crash at any point (the state is read from the tables
//! each time, and one replica converts at a time under a lock in the shared Redis):
//! 1. the old materialized view goes (the cluster's rollup is rebuilt from the events as they
//!    move, and each moves once, so it counts each once);
//! 2. each old table `t` is renamed `t_single` (nothing writes to it any more);
//! 3. the cluster's tables are created ([`crate::schema::migrate`]);
//! 4. each `t_single` of rows is copied, a month at a time, into the `Distributed` table `t`,
//!    skipping the rows already there (a copy a crash interrupted), and then renamed
//!    `t_before_cluster`, which is kept for the operator to check and drop.

use std::time::Duration;

use clickhouse::Row;
use serde::Deserialize;

use aimesh_kit::data::redis::Redis;

use crate::cluster::Topology;
use crate::error::{AnalyticsError, Result};
use crate::schema;
use crate::store::{ClickHouse, JobLock};

/// How long the conversion lock lasts unless released: far longer than moving a deployment's
/// events takes, so it lapses only when its holder died.
const CONVERSION_LEASE: Duration = Duration::from_secs(60 * 60);

/// How long a replica waits for another one to convert, before failing its start (and being
/// started again by its supervisor).
const CONVERSION_WAIT: Duration = Duration::from_secs(15 * 60);

/// The tables whose rows move, and what identifies a row (a row already in the cluster's table
/// is not copied again). The rollup is rebuilt from the events instead; the bookkeeping starts
/// anew with the cluster's own.
const MOVED: [(&str, &str); 6] = [
    ("usage_events", "event_id"),
    ("audit_events", "event_id"),
    ("product_events", "event_id"),
    ("project_retention", "(project_id, updated_at)"),
    ("retention_applied", "(project_id, applied_at)"),
    ("project_legal_hold", "(project_id, updated_at)"),
];

/// The suffix of an old table whose rows are being moved.
const MOVING: &str = "_single";
/// The suffix of an old table whose rows have moved (kept for the operator to check and drop).
const KEPT: &str = "_before_cluster";

/// A table of analytics' database on some node of the cluster.
#[derive(Debug, Row, Deserialize)]
struct NodeTable {
    host: String,
    port: u16,
    name: String,
}

/// Moves a single-node deployment's tables to the cluster, if any node still has them (see the
/// module documentation); true when this call converted. A replica connected to another node
/// waits until the one connected to the old node has converted, for up to 15 minutes. Nothing
/// to do on one node.
pub async fn convert_single_node(clickhouse: &ClickHouse, redis: &Redis) -> Result<bool> {
    let Topology::Cluster(cluster) = clickhouse.topology() else { return Ok(false) };
    let deadline = tokio::time::Instant::now() + CONVERSION_WAIT;
    let here: (String, u16) = clickhouse.server().query("SELECT hostName(), tcpPort()").fetch_one().await?;
    let mut waiting = false;
    loop {
        let leftovers = leftovers_in_cluster(clickhouse, &cluster.name).await?;
        let Some(first) = leftovers.first() else { return Ok(false) };
        if leftovers.iter().any(|table| (table.host.as_str(), table.port) == (here.0.as_str(), here.1)) {
            if let Some(lock) = JobLock::try_take(redis, "cluster-conversion", CONVERSION_LEASE).await? {
                let converted = convert_here(clickhouse).await;
                lock.release().await;
                return converted.map(|()| true);
            }
        } else if !waiting {
            waiting = true;
            tracing::warn!(
                host = first.host,
                port = first.port,
                table = first.name,
                "single-node analytics tables are on another node: waiting for the replica connected to it to move them"
            );
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(AnalyticsError::ClickHouse(format!(
                "single-node table {} on {}:{} was not moved to the cluster within {CONVERSION_WAIT:?} \
                 (point analytics.clickhouse_url at that node)",
                first.name, first.host, first.port
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The tables of a single-node deployment that are not yet moved, on every node of `cluster`.
async fn leftovers_in_cluster(clickhouse: &ClickHouse, cluster: &str) -> Result<Vec<NodeTable>> {
    let sql = format!(
        "SELECT hostName() AS host, tcpPort() AS port, name FROM clusterAllReplicas(`{cluster}`, system.tables) \
         WHERE database = {{db:String}} AND ({OLD} OR name IN arrayMap(t -> concat(t, '{MOVING}'), {{tables:Array(String)}})) \
         ORDER BY host, port, name"
    );
    Ok(clickhouse
        .server()
        .query(&sql)
        .param("db", clickhouse.database())
        .param("tables", schema::tables())
        .param("views", schema::views())
        .fetch_all()
        .await?)
}

/// A row of `system.tables` that is a single-node deployment's: a table under an analytics
/// table's own name that is not `Distributed`, or a view that reads no local table.
const OLD: &str = "(name IN {tables:Array(String)} AND engine != 'Distributed') \
    OR (name IN {views:Array(String)} AND position(create_table_query, '_local') = 0)";

/// Whether the node of `clickhouse` holds single-node tables under the names the cluster's
/// tables need.
pub async fn has_single_node_tables(clickhouse: &ClickHouse) -> Result<bool> {
    let sql = format!("SELECT count() FROM system.tables WHERE database = {{db:String}} AND ({OLD})");
    let count: u64 = clickhouse
        .server()
        .query(&sql)
        .param("db", clickhouse.database())
        .param("tables", schema::tables())
        .param("views", schema::views())
        .fetch_one()
        .await?;
    Ok(count > 0)
}

/// The steps of the module documentation on the node of `clickhouse`, under the lock.
async fn convert_here(clickhouse: &ClickHouse) -> Result<()> {
    let (db, server) = (clickhouse.database(), clickhouse.server());
    let present = |name: String| async move {
        let engine: Option<(String, String)> = server
            .query("SELECT engine, create_table_query FROM system.tables WHERE database = ? AND name = ?")
            .bind(db)
            .bind(&name)
            .fetch_optional()
            .await?;
        Ok::<_, AnalyticsError>(engine)
    };
    for view in schema::views() {
        if present(view.to_owned()).await?.is_some_and(|(_, create)| !create.contains("_local")) {
            server.query(&format!("DROP VIEW IF EXISTS {db}.{view}")).execute().await?;
        }
    }
    for table in schema::tables() {
        if present(table.to_owned()).await?.is_some_and(|(engine, _)| engine != "Distributed") {
            server.query(&format!("RENAME TABLE {db}.{table} TO {db}.{table}{MOVING}")).execute().await?;
        }
    }
    schema::migrate(clickhouse).await?;
    for table in schema::tables() {
        let old = format!("{table}{MOVING}");
        if present(old.clone()).await?.is_none() {
            continue;
        }
        if let Some((_, identity)) = MOVED.iter().find(|(name, _)| *name == table) {
            let rows = copy_rows(clickhouse, table, &old, identity).await?;
            tracing::info!(table, rows, "single-node rows moved to the cluster");
        }
        server.query(&format!("RENAME TABLE {db}.{old} TO {db}.{table}{KEPT}")).execute().await?;
    }
    tracing::info!(database = db, "single-node analytics tables moved to the cluster");
    Ok(())
}

/// Copies the rows of `old` that `table` lacks into `table` (the Distributed one), a partition
/// at a time; returns how many were copied.
async fn copy_rows(clickhouse: &ClickHouse, table: &str, old: &str, identity: &str) -> Result<u64> {
    let (db, server) = (clickhouse.database(), clickhouse.server());
    let columns: Vec<String> = server
        .query("SELECT name FROM system.columns WHERE database = ? AND table = ? ORDER BY position")
        .bind(db)
        .bind(old)
        .fetch_all()
        .await?;
    let columns = columns.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ");
    let partitions: Vec<String> = server
        .query(&format!("SELECT DISTINCT _partition_id FROM {db}.{old} ORDER BY _partition_id"))
        .fetch_all()
        .await?;
    let partitioned = identity == "event_id";
    let mut copied = 0;
    for partition in partitions {
        // Events are partitioned by month: the rows of the month already moved are one shard
        // read each, not the whole table.
        let month = if partitioned { "WHERE toYYYYMM(occurred_at) = toUInt32({partition:String})" } else { "" };
        let count_sql = format!(
            "SELECT count() FROM {db}.{old} FINAL WHERE _partition_id = {{partition:String}} \
             AND {identity} NOT IN (SELECT {identity} FROM {db}.{table} {month})"
        );
        let missing: u64 = clickhouse.consistent().query(&count_sql).param("partition", &partition).fetch_one().await?;
        if missing == 0 {
            continue;
        }
        // FINAL: a duplicate the old node had not merged away yet moves once.
        let insert = format!(
            "INSERT INTO {db}.{table} ({columns}) SELECT {columns} FROM {db}.{old} FINAL \
             WHERE _partition_id = {{partition:String}} \
             AND {identity} NOT IN (SELECT {identity} FROM {db}.{table} {month})"
        );
        let mut query = server.query(&insert).param("partition", &partition);
        if clickhouse.topology().is_replicated() {
            query = query.with_setting("select_sequential_consistency", "1");
        }
        query.execute().await?;
        copied += missing;
    }
    Ok(copied)
}
