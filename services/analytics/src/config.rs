//! Settings of the analytics service (`[analytics]` in the config file, `AIMESH_ANALYTICS__*`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AnalyticsConfig {
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// ClickHouse's HTTP interface.
    pub clickhouse_url: String,
    /// The database analytics owns there (created at start-up; never `default`).
    pub clickhouse_database: String,
    pub clickhouse_user: Option<String>,
    pub clickhouse_password: Option<String>,
    /// A PEM file of CA certificates to trust, besides the public ones, for an `https://`
    /// `clickhouse_url` (a private CA).
    pub clickhouse_ca_file: Option<std::path::PathBuf>,
    /// A cluster of ClickHouse nodes (a name in their `remote_servers`) to spread analytics'
    /// tables over: each table is a `<name>_local` table on every node plus a `Distributed`
    /// table `<name>` over them, sharded by project. None: one node (the default).
    pub clickhouse_cluster: Option<String>,
    /// With a cluster: whether the local tables are `Replicated*MergeTree` (needs Keeper and
    /// interserver replication; the default) or plain `*MergeTree` (shards of one replica).
    pub clickhouse_cluster_replicated: bool,
    /// With a cluster whose nodes run no distributed DDL queue: the HTTP URL of every node, to
    /// which schema changes, retention mutations and merges go one by one instead of
    /// `ON CLUSTER`. Empty (the default): `ON CLUSTER` through `clickhouse_url`.
    pub clickhouse_cluster_node_urls: Vec<String>,
    /// How long events are kept when a project sets nothing.
    pub default_retention_days: u16,
    /// The least time between two applications of one project's retention to its stored events
    /// (ClickHouse mutations over shared tables, run in the background by one replica at a time);
    /// changes in between are coalesced into the next. At least 1.
    pub retention_apply_interval_secs: u64,
    /// Longest time range one query may cover.
    pub max_range_days: u32,
    /// Most buckets one time series may have.
    pub max_buckets: u32,
    /// Most events one Ingest call may carry.
    pub max_batch_events: u32,
    /// Ingest calls waiting together are stored with one INSERT per table; a round takes no
    /// further call once it holds this many events.
    pub max_insert_events: u32,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7105)),
            clickhouse_url: "http://127.0.0.1:18123".into(),
            clickhouse_database: "aimesh_analytics".into(),
            clickhouse_user: None,
            clickhouse_password: None,
            clickhouse_ca_file: None,
            clickhouse_cluster: None,
            clickhouse_cluster_replicated: true,
            clickhouse_cluster_node_urls: Vec::new(),
            default_retention_days: 365,
            retention_apply_interval_secs: 300,
            max_range_days: 400,
            max_buckets: 10_000,
            max_batch_events: 10_000,
            max_insert_events: 20_000,
        }
    }
}
