//! Analytics' tables on one ClickHouse node or spread over a cluster (docs/clickhouse-cluster.md).
//!
//! On a cluster every table `t` is `t_local` on each node (`Replicated*MergeTree`, or plain
//! `*MergeTree` shards) plus a `Distributed` table `t` over them, sharded by a hash of the
//! project: all rows of a project, and so every copy of one event, meet on one shard, where
//! ReplacingMergeTree collapses them and the materialized view (on the local tables) rolls
//! them up. Readers and writers use `t`; schema changes, retention mutations and merges go to
//! `t_local` on every node, `ON CLUSTER` or node by node.

use crate::error::Result;

/// Where analytics' tables live.
#[derive(Debug, Clone)]
pub enum Topology {
    /// One node: each table is itself.
    Single,
    /// A named cluster of nodes.
    Cluster(Cluster),
}

/// A ClickHouse cluster analytics spreads its tables over.
#[derive(Clone)]
pub struct Cluster {
    /// The cluster's name in the nodes' `remote_servers`.
    pub name: String,
    /// Whether local tables are `Replicated*MergeTree`.
    pub replicated: bool,
    /// A client of each node, when schema changes go node by node; empty: `ON CLUSTER`.
    pub nodes: Vec<clickhouse::Client>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("replicated", &self.replicated)
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

impl Topology {
    /// The name of the table that holds `table`'s rows on each node.
    pub fn local(&self, table: &str) -> String {
        match self {
            Self::Single => table.to_owned(),
            Self::Cluster(_) => format!("{table}_local"),
        }
    }

    /// What follows a table name in DDL run once for the whole cluster: ` ON CLUSTER x`, or
    /// nothing (one node, or DDL sent to each node).
    pub fn on_cluster(&self) -> String {
        match self {
            Self::Cluster(cluster) if cluster.nodes.is_empty() => format!(" ON CLUSTER `{}`", cluster.name),
            _ => String::new(),
        }
    }

    /// Whether local tables replicate (reads that must see the latest quorum insert ask for it).
    pub fn is_replicated(&self) -> bool {
        matches!(self, Self::Cluster(cluster) if cluster.replicated)
    }

    /// `mutations_sync` for retention mutations: wait for every replica when tables replicate.
    pub fn mutations_sync(&self) -> &'static str {
        if self.is_replicated() { "2" } else { "1" }
    }

    /// The engine `spec` ("ReplacingMergeTree" or "ReplacingMergeTree(updated_at)") as the local
    /// tables have it: replicated under the Keeper path of its shard, database and table.
    pub fn engine(&self, spec: &str) -> String {
        if !self.is_replicated() {
            return spec.to_owned();
        }
        let (name, args) = match spec.split_once('(') {
            Some((name, rest)) => (name, rest.trim_end_matches(')')),
            None => (spec, ""),
        };
        let path = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'";
        if args.is_empty() { format!("Replicated{name}({path})") } else { format!("Replicated{name}({path}, {args})") }
    }

    /// The statements that create table `name` in database `db` from a migration's `body`
    /// (columns, `{engine:X}`, keys): the table itself, or its local tables and the
    /// `Distributed` table over them sharded by `shard_by`. Each is idempotent.
    pub fn create_table(&self, db: &str, name: &str, shard_by: &str, body: &str) -> Vec<String> {
        let body = self.render(db, body);
        let on = self.on_cluster();
        match self {
            Self::Single => vec![format!("CREATE TABLE IF NOT EXISTS {db}.{name} {body}")],
            Self::Cluster(cluster) => vec![
                format!("CREATE TABLE IF NOT EXISTS {db}.{name}_local{on} {body}"),
                format!(
                    "CREATE TABLE IF NOT EXISTS {db}.{name}{on} AS {db}.{name}_local \
                     ENGINE = Distributed(`{cluster}`, {db}, {name}_local, {shard_by})",
                    cluster = cluster.name
                ),
            ],
        }
    }

    /// The statement that creates the materialized view `name` from `body`, reading and writing
    /// local tables.
    pub fn create_view(&self, db: &str, name: &str, body: &str) -> String {
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{name}{on} {body}",
            on = self.on_cluster(),
            body = self.render(db, body)
        )
    }

    /// The statement that applies `change` to the table holding `table`'s rows.
    pub fn alter_table(&self, db: &str, table: &str, change: &str) -> String {
        format!("ALTER TABLE {db}.{}{} {change}", self.local(table), self.on_cluster())
    }

    /// `body` with `{table:t}` made `db.<local name of t>` and `{engine:X}` the engine.
    fn render(&self, db: &str, body: &str) -> String {
        let mut out = String::with_capacity(body.len());
        let mut rest = body;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let tail = &rest[start..];
            let end = tail.find('}').map_or(tail.len(), |i| i + 1);
            let token = &tail[..end];
            if let Some(table) = token.strip_prefix("{table:").and_then(|t| t.strip_suffix('}')) {
                out.push_str(&format!("{db}.{}", self.local(table)));
            } else if let Some(spec) = token.strip_prefix("{engine:").and_then(|t| t.strip_suffix('}')) {
                out.push_str(&self.engine(spec));
            } else {
                out.push_str(token);
            }
            rest = &tail[end..];
        }
        out.push_str(rest);
        out
    }
}

/// Runs `sql` where DDL of analytics' tables must run: once on `server` (one node, or
/// `ON CLUSTER` in the statement), or on every node of a cluster without distributed DDL.
pub async fn run_everywhere(
    topology: &Topology,
    server: &clickhouse::Client,
    sql: &str,
    settings: &[(&str, &str)],
) -> Result<()> {
    let with = |client: &clickhouse::Client| {
        settings.iter().fold(client.clone(), |client, (name, value)| client.with_setting(*name, *value))
    };
    match topology {
        Topology::Cluster(cluster) if !cluster.nodes.is_empty() => {
            for node in &cluster.nodes {
                with(node).query(sql).execute().await?;
            }
        }
        _ => with(server).query(sql).execute().await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(replicated: bool) -> Topology {
        Topology::Cluster(Cluster { name: "main".into(), replicated, nodes: Vec::new() })
    }

    #[test]
    fn one_node_keeps_todays_statements() {
        let single = Topology::Single;
        let created = single.create_table(
            "db",
            "t",
            "cityHash64(p)",
            "(p UUID) ENGINE = {engine:ReplacingMergeTree(v)} ORDER BY p",
        );
        assert_eq!(created, vec!["CREATE TABLE IF NOT EXISTS db.t (p UUID) ENGINE = ReplacingMergeTree(v) ORDER BY p"]);
        assert_eq!(
            single.create_view("db", "mv", "TO {table:h} AS SELECT * FROM {table:t}"),
            "CREATE MATERIALIZED VIEW IF NOT EXISTS db.mv TO db.h AS SELECT * FROM db.t"
        );
    }

    #[test]
    fn a_replicated_cluster_gets_local_replicated_tables_and_distributed_ones_on_cluster() {
        let created = cluster(true).create_table(
            "db",
            "t",
            "cityHash64(p)",
            "(p UUID) ENGINE = {engine:ReplacingMergeTree(v)} ORDER BY p",
        );
        assert_eq!(
            created,
            vec![
                "CREATE TABLE IF NOT EXISTS db.t_local ON CLUSTER `main` (p UUID) ENGINE = \
                 ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', v) ORDER BY p",
                "CREATE TABLE IF NOT EXISTS db.t ON CLUSTER `main` AS db.t_local \
                 ENGINE = Distributed(`main`, db, t_local, cityHash64(p))",
            ]
        );
        assert_eq!(
            cluster(true).create_view("db", "mv", "TO {table:h} AS SELECT * FROM {table:t}"),
            "CREATE MATERIALIZED VIEW IF NOT EXISTS db.mv ON CLUSTER `main` TO db.h_local AS SELECT * FROM db.t_local"
        );
        assert_eq!(
            cluster(true).alter_table("db", "h", "MATERIALIZE PROJECTION p"),
            "ALTER TABLE db.h_local ON CLUSTER `main` MATERIALIZE PROJECTION p"
        );
        assert_eq!(
            Topology::Single.alter_table("db", "h", "MATERIALIZE PROJECTION p"),
            "ALTER TABLE db.h MATERIALIZE PROJECTION p"
        );
        assert_eq!(cluster(false).engine("AggregatingMergeTree"), "AggregatingMergeTree");
        assert_eq!(
            cluster(true).engine("AggregatingMergeTree"),
            "ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')"
        );
    }
}
