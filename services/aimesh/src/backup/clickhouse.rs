//! The analytics database, by ClickHouse's own BACKUP and RESTORE: tables, materialized views
//! and their parts as they are, so rollups are restored as they were instead of recomputed.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use chrono::Utc;

use aimesh_analytics::AnalyticsConfig;
use aimesh_analytics::store::ClickHouse;

use super::destination::Destination;
use super::manifest::{Artifact, ClickHouseBackup, to_lines};

/// Where the ClickHouse backup goes, under the backup's root.
pub const CLICKHOUSE_DIR: &str = "clickhouse";
/// The list of its files with their sha256.
pub const CLICKHOUSE_INDEX: &str = "clickhouse.index.jsonl";

fn connect(config: &AnalyticsConfig) -> anyhow::Result<ClickHouse> {
    if !config.clickhouse_cluster_node_urls.is_empty() {
        // Such a cluster runs no distributed DDL queue, which BACKUP ... ON CLUSTER needs.
        bail!(
            "analytics.clickhouse_cluster_node_urls is set: this cluster runs no distributed DDL queue, so back it \
             up node by node (docs/backup.md, \"ClickHouse clusters\")"
        );
    }
    ClickHouse::new(config).map_err(|e| anyhow::anyhow!("{e}"))
}

/// ` ON CLUSTER name` when analytics is spread over a cluster: every shard backs up (and
/// restores) its own part, one replica each.
fn on_cluster(config: &AnalyticsConfig) -> String {
    config.clickhouse_cluster.as_ref().map(|name| format!(" ON CLUSTER {name}")).unwrap_or_default()
}

/// Rows per table of `database` (views hold none of their own).
async fn rows(clickhouse: &ClickHouse, database: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    // On a cluster the Distributed tables count every shard; the local ones only this node's.
    let tables: Vec<String> = clickhouse
        .server()
        .query(
            "SELECT name FROM system.tables WHERE database = ? AND NOT is_temporary \
             AND engine NOT IN ('MaterializedView', 'View') \
             AND (engine = 'Distributed' OR NOT EXISTS \
                  (SELECT 1 FROM system.tables WHERE database = ? AND engine = 'Distributed')) \
             ORDER BY name",
        )
        .bind(database)
        .bind(database)
        .fetch_all()
        .await
        .context("listing the analytics tables")?;
    let mut rows = BTreeMap::new();
    for table in tables {
        let count: u64 =
            clickhouse.server().query(&format!("SELECT count() FROM {database}.`{table}`")).fetch_one().await?;
        rows.insert(table, count);
    }
    Ok(rows)
}

/// Backs the analytics database up to `clickhouse/` in `destination` and lists its files.
pub async fn backup(config: &AnalyticsConfig, destination: &Destination) -> anyhow::Result<ClickHouseBackup> {
    let clickhouse = connect(config)?;
    let database = clickhouse.database().to_owned();
    let started_at = Utc::now();
    let statement = format!(
        "BACKUP DATABASE {database}{} TO {}",
        on_cluster(config),
        destination.clickhouse_target(CLICKHOUSE_DIR)
    );
    clickhouse.server().query(&statement).execute().await.with_context(|| {
        format!(
            "BACKUP of the ClickHouse database {database} to {} (a directory must be on the ClickHouse server and \
             inside its backups.allowed_path)",
            destination.spelled()
        )
    })?;
    let finished_at = Utc::now();
    let rows = rows(&clickhouse, &database).await?;
    let files = destination.hash_all(CLICKHOUSE_DIR).await?;
    if files.is_empty() {
        bail!("ClickHouse reported its backup done, but {} holds none of its files", destination.spelled());
    }
    let bytes = files.iter().map(|f| f.size).sum();
    let count = files.len() as u64;
    let index = destination.write(CLICKHOUSE_INDEX, to_lines(&files)?).await?;
    Ok(ClickHouseBackup { database, started_at, finished_at, rows, index, files: count, bytes })
}

/// Checks every file of the ClickHouse backup against `files`.
pub async fn verify(destination: &Destination, files: &[Artifact]) -> anyhow::Result<()> {
    let stored = destination.hash_all(CLICKHOUSE_DIR).await?;
    if stored.len() != files.len() {
        bail!("{CLICKHOUSE_DIR}/ holds {} files; the manifest lists {}", stored.len(), files.len());
    }
    for (expected, actual) in files.iter().zip(&stored) {
        if expected.path != actual.path {
            bail!("{} is missing from the backup", expected.path);
        }
        expected.check(actual)?;
    }
    Ok(())
}

/// Restores the backup as analytics' configured database, refusing one that has tables
/// unless `force` (which drops it); the rows each table holds then.
pub async fn restore(
    config: &AnalyticsConfig,
    destination: &Destination,
    backup: &ClickHouseBackup,
    force: bool,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let clickhouse = connect(config)?;
    let database = clickhouse.database().to_owned();
    let tables: u64 = clickhouse
        .server()
        .query("SELECT count() FROM system.tables WHERE database = ?")
        .bind(&database)
        .fetch_one()
        .await?;
    if tables > 0 && !force {
        bail!(
            "the ClickHouse database {database} exists and holds {tables} tables: restore into a new database, or \
             pass --force to replace it"
        );
    }
    // RESTORE DATABASE creates it; an empty one left by a start of analytics is in the way.
    let cluster = on_cluster(config);
    clickhouse.server().query(&format!("DROP DATABASE IF EXISTS {database}{cluster} SYNC")).execute().await?;
    let statement = format!(
        "RESTORE DATABASE {} AS {database}{cluster} FROM {}",
        backup.database,
        destination.clickhouse_target(CLICKHOUSE_DIR)
    );
    clickhouse
        .server()
        .query(&statement)
        .execute()
        .await
        .with_context(|| format!("RESTORE of the ClickHouse database {database} from {}", destination.spelled()))?;
    rows(&clickhouse, &database).await
}
