//! ClickHouse: the connection, ingestion counted once, the usage and audit queries, retention.
//!
//! Exactly once: an event is written only if its id is in none of the event tables yet. One
//! writer task per process does the check and the insert, and before the check it claims the
//! events' ids in the shared Redis ([`IngestClaims`]), so neither two deliveries of an event to
//! one replica nor two replicas handed the same event at the same instant can both find it
//! new; materialized views therefore see each event once and the rollup counts it once. The
//! writer takes every Ingest call waiting when it is free and serves them with one claim, one
//! check and one INSERT per table (group commit), so the INSERT size grows with the load
//! instead of being the relay's batch. The event tables are ReplacingMergeTree keyed by event
//! id and every raw read uses FINAL, as a last guard (see [`CLAIM_TTL`]); see README,
//! "Analytics".

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fred::interfaces::LuaInterface;
use tokio::sync::{mpsc, oneshot};

use chrono::{DateTime, Utc};
use clickhouse::Row;
use serde::Deserialize;
use uuid::Uuid;

use aimesh_kit::data::redis::{Redis, timed};

use crate::cluster::{Cluster, Topology, run_everywhere};
use crate::config::AnalyticsConfig;
use crate::error::{AnalyticsError, Result};
use crate::events::{AuditEventRow, ProductEventRow, UsageEventRow, ValidEvent};
use crate::query::{Bucket, TimeRange, UsageFilter, UsageQuery};
use crate::schema::EVENT_TABLES;

/// A client of the ClickHouse server at `url` over plain HTTP (tests and the bench). Unlike
/// `clickhouse::Client::default()`, its connections set `TCP_NODELAY`: the end of an INSERT's
/// streamed body is a small write, which Nagle's algorithm would hold back until the server's
/// delayed ACK (up to 40 ms on Linux).
pub fn client_of(url: &str) -> clickhouse::Client {
    client_over(tcp_connector(), url)
}

/// A client of the ClickHouse server at `url`, over HTTPS (trusting as `tls` says) or HTTP,
/// as the URL's scheme says.
pub fn client_with_tls(url: &str, tls: rustls::ClientConfig) -> clickhouse::Client {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp_connector());
    client_over(connector, url)
}

/// TCP as every ClickHouse client connects: `TCP_NODELAY`, and keepalive probes as the
/// crate's own client sends them.
fn tcp_connector() -> hyper_util::client::legacy::connect::HttpConnector {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    // An https:// URL goes through the TLS connector around this one.
    connector.enforce_http(false);
    connector
}

fn client_over<C>(connector: C, url: &str) -> clickhouse::Client
where
    C: tower::Service<http::Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + hyper_util::client::legacy::connect::Connection + Send + Unpin,
    C::Future: Send + Unpin + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Idle connections are closed before the server's own 3 s keep-alive timeout would close
    // them under a request.
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(2))
        .build(connector);
    clickhouse::Client::with_http_client(http).with_url(url)
}

/// A ClickHouse server (one node, or the entry node of a cluster) and the database analytics
/// owns on it.
#[derive(Clone)]
pub struct ClickHouse {
    server: clickhouse::Client,
    client: clickhouse::Client,
    database: String,
    topology: Topology,
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
        if !is_identifier(database) || database == "default" || database == "system" {
            return Err(AnalyticsError::invalid(
                "analytics.clickhouse_database",
                "must be a plain identifier other than default and system",
            ));
        }
        let tls =
            aimesh_kit::data::tls::client_config(config.clickhouse_ca_file.as_deref(), "analytics.clickhouse_ca_file")
                .map_err(|e| AnalyticsError::invalid(e.setting, e.message))?;
        let connect = |url: &str| {
            let mut client = client_with_tls(url, tls.clone());
            if let Some(user) = &config.clickhouse_user {
                client = client.with_user(user);
            }
            if let Some(password) = &config.clickhouse_password {
                client = client.with_password(password);
            }
            client
        };
        let topology = match &config.clickhouse_cluster {
            None if !config.clickhouse_cluster_node_urls.is_empty() => {
                return Err(AnalyticsError::invalid(
                    "analytics.clickhouse_cluster_node_urls",
                    "needs analytics.clickhouse_cluster",
                ));
            }
            None => Topology::Single,
            Some(name) => {
                // Quoted with backticks wherever it appears, so a name like `aimesh-prod` is fine.
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                    return Err(AnalyticsError::invalid(
                        "analytics.clickhouse_cluster",
                        "must be letters, digits, '_' and '-' only",
                    ));
                }
                let nodes =
                    config.clickhouse_cluster_node_urls.iter().map(|url| cluster_client(connect(url))).collect();
                Topology::Cluster(Cluster {
                    name: name.clone(),
                    replicated: config.clickhouse_cluster_replicated,
                    nodes,
                })
            }
        };
        let mut server = connect(&config.clickhouse_url);
        if let Topology::Cluster(cluster) = &topology {
            server = cluster_client(server);
            if cluster.replicated {
                // A write counts once a majority of its shard's replicas hold it, one at a time per
                // shard, so the ingest check can read it back from any replica (see
                // [`ClickHouse::consistent`]).
                server = server.with_setting("insert_quorum", "auto").with_setting("insert_quorum_parallel", "0");
            }
        }
        let client = server.clone().with_database(database);
        Ok(Self { server, client, database: database.to_owned(), topology })
    }

    /// How analytics' tables are laid out.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The client of analytics' database for reads that must see every write answered before
    /// (the ingest check): on replicated tables only replicas holding every quorum insert answer.
    pub fn consistent(&self) -> clickhouse::Client {
        if self.topology.is_replicated() {
            self.client.clone().with_setting("select_sequential_consistency", "1")
        } else {
            self.client.clone()
        }
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

/// Whether `name` is a plain SQL identifier (safe to put in a statement unquoted).
fn is_identifier(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A client as every cluster connection is: an INSERT into a `Distributed` table answers once
/// every shard stored its rows (not when they are queued for sending), so an answered write is
/// stored and the next ingest check sees it; and a read filtered by project asks only the shards
/// that project's rows are on (the tables are sharded by it).
fn cluster_client(client: clickhouse::Client) -> clickhouse::Client {
    client.with_setting("distributed_foreground_insert", "1").with_setting("optimize_skip_unused_shards", "1")
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
    /// The hourly rollup alone: the range is on whole hours.
    Rollup,
    /// The hourly rollup for the whole hours inside the range, the events for the ragged parts
    /// at its ends, in one statement.
    RollupAndRawEdges,
    /// The events alone.
    Raw,
}

impl Source {
    /// The name answers carry in their `source` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rollup => "rollup",
            Self::RollupAndRawEdges => "rollup+raw",
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
struct DaysRow {
    days: u16,
}

#[derive(Row, Deserialize)]
struct RetentionRow {
    #[serde(with = "clickhouse::serde::uuid")]
    project_id: Uuid,
    days: u16,
}

#[derive(Row, Deserialize)]
struct HoldRow {
    #[serde(with = "clickhouse::serde::uuid")]
    project_id: Uuid,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    since: DateTime<Utc>,
}

#[derive(Row, Deserialize)]
struct PolicyRow {
    #[serde(with = "clickhouse::serde::uuid")]
    project_id: Uuid,
    days: u16,
    legal_hold: u8,
}

/// A project's retention as every store applies it (see [`Store::retention_policies`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectPolicy {
    pub project_id: Uuid,
    /// The days the project set; None on the default.
    pub days: Option<u16>,
    pub legal_hold: bool,
}

/// The `retention_days` every row of a project on legal hold gets: far beyond any retention
/// (at most 3650 days), yet small enough that `toDateTime(occurred_at) + retention_days` stays
/// before the end of ClickHouse's `DateTime` (2106), past which it wraps around to an earlier
/// date (with 65535 days, a row of 2026 would expire in 2069).
pub const LEGAL_HOLD_DAYS: u16 = 20_000;

/// Analytics' data in ClickHouse.
#[derive(Debug, Clone)]
pub struct Store {
    ch: ClickHouse,
    retention: Arc<Retention>,
    time_zones: Arc<HashSet<String>>,
    /// The queue of the process's one ingest writer ([`Writer`]).
    writer: mpsc::Sender<IngestJob>,
    /// Holds the deployment's retention job lock ([`Store::apply_due_retention`]).
    redis: Redis,
}

/// Each project's retention in days and legal hold, and what its stored rows were last cut to,
/// as last read, set or applied here (see [`Store::refresh_retention`]). Each map holds only
/// projects with a policy: days set, a hold, or a retention ever applied.
#[derive(Debug)]
struct Retention {
    default_days: u16,
    custom: RwLock<HashMap<Uuid, u16>>,
    /// Projects on hold, and since when.
    holds: RwLock<HashMap<Uuid, DateTime<Utc>>>,
    /// The `retention_days` each project's stored rows were last rewritten to (`retention_applied`).
    applied: RwLock<HashMap<Uuid, u16>>,
}

impl Retention {
    /// A project's retention in days, and whether the project set it.
    fn of(&self, project_id: Uuid) -> (u16, bool) {
        let custom = self.custom.read().ok().and_then(|r| r.get(&project_id).copied());
        custom.map_or((self.default_days, false), |days| (days, true))
    }

    /// Since when the project is on legal hold, if it is.
    fn hold_of(&self, project_id: Uuid) -> Option<DateTime<Utc>> {
        self.holds.read().ok().and_then(|h| h.get(&project_id).copied())
    }

    /// The `retention_days` the project's rows get: its retention, or [`LEGAL_HOLD_DAYS`] on hold.
    fn effective(&self, project_id: Uuid) -> u16 {
        if self.hold_of(project_id).is_some() { LEGAL_HOLD_DAYS } else { self.of(project_id).0 }
    }

    /// Whether the project's stored rows carry the retention they should.
    fn is_applied(&self, project_id: Uuid) -> bool {
        let applied = self.applied.read().ok().and_then(|a| a.get(&project_id).copied());
        let (_, custom) = self.of(project_id);
        let held = self.hold_of(project_id).is_some();
        // A project on the default that was never held has nothing to apply; one whose hold was
        // lifted has until its rows are back on the default.
        if !custom && !held && applied.is_none() {
            return true;
        }
        applied == Some(self.effective(project_id))
    }
}

/// One Ingest call waiting for the writer, and where its outcomes go.
struct IngestJob {
    events: Vec<ValidEvent>,
    done: oneshot::Sender<Result<Vec<Stored>>>,
}

/// Ingest calls a replica queues for its writer before a further one waits to be queued.
const INGEST_QUEUE: usize = 64;

/// How long a replica's claim on the events it stores lasts unless released: far longer than
/// a check and an INSERT take, so it lapses only when its holder died (then a retry waits at
/// most this long), or stalled this long mid-INSERT (then FINAL still hides the duplicate in
/// raw reads).
pub const CLAIM_TTL: Duration = Duration::from_secs(60);

/// The longest a writer round (check and INSERTs) may take. A connection that stalls without
/// closing (a partition, a server that stopped answering) would otherwise hold the process's
/// one writer, and with it every Ingest call, until TCP gives up minutes later. Shorter than
/// the relays' delivery timeout, so callers get an answer, and than [`CLAIM_TTL`].
const ROUND_TIMEOUT: Duration = Duration::from_secs(20);

/// Event ids asked about in one query. They travel in the query's text as one string of
/// comma-separated ids, which ClickHouse splits itself: as an `Array(UUID)` parameter or a list
/// of literals its parser spent about 8 ms on every 1,000 ids (more than the lookup), a string
/// 2 ms. The text must stay under `max_query_size` (256 KiB by default), and the query must not
/// use server-side parameters (it would then travel as an HTML form, whose fields ClickHouse
/// caps at about 100 KB): 5,000 ids are 185 KB, while a writer round may hold
/// `max_insert_events` (20,000) events.
const KNOWN_IDS_PER_QUERY: usize = 5_000;

/// Claims every key for ARGV[1] for ARGV[2] ms, or none if any is claimed already; returns how
/// many were claimed by others.
const CLAIM_SCRIPT: &str = "\
local taken = 0
for _, key in ipairs(KEYS) do taken = taken + redis.call('EXISTS', key) end
if taken > 0 then return taken end
for _, key in ipairs(KEYS) do redis.call('SET', key, ARGV[1], 'PX', ARGV[2]) end
return 0";

/// Deletes the keys that still hold ARGV[1] (a lapsed claim may be someone else's by now).
const RELEASE_SCRIPT: &str = "\
local released = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then released = released + redis.call('DEL', key) end
end
return released";

/// Claims on event ids in the shared Redis, taken by a replica's writer for the time it
/// checks and inserts them. The keys share one hash tag so that one script claims a whole
/// round atomically on a Redis Cluster.
#[derive(Debug, Clone)]
pub struct IngestClaims {
    redis: Redis,
}

impl IngestClaims {
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }

    fn keys(&self, events: &[ValidEvent]) -> Vec<String> {
        let ids: HashSet<Uuid> = events.iter().map(ValidEvent::event_id).collect();
        ids.into_iter().map(|id| self.redis.key("analytics", &format!("{{ingest}}:{id}"))).collect()
    }

    /// Claims all of `events` for `token`, or none: false when another replica holds any.
    async fn claim(&self, keys: &[String], token: &str) -> Result<bool> {
        let millis = CLAIM_TTL.as_millis().to_string();
        let taken: i64 =
            timed("ingest_claim", self.redis.pool().eval(CLAIM_SCRIPT, keys.to_vec(), vec![token.to_owned(), millis]))
                .await
                .map_err(|e| AnalyticsError::RedisUnavailable(e.to_string()))?;
        Ok(taken == 0)
    }

    async fn release(&self, keys: &[String], token: &str) {
        let released: std::result::Result<i64, _> =
            timed("ingest_release", self.redis.pool().eval(RELEASE_SCRIPT, keys.to_vec(), vec![token.to_owned()]))
                .await;
        if let Err(error) = released {
            // The claims lapse by themselves; a retry of these events waits until then.
            tracing::warn!(%error, "cannot release ingest claims");
        }
    }
}

/// How long the retention job's lock lasts unless released: far longer than a round of
/// mutations takes, so it lapses only when its holder died.
const RETENTION_JOB_LEASE: Duration = Duration::from_secs(30 * 60);

/// Takes the lock KEYS[1] for ARGV[1] for ARGV[2] ms unless someone holds it; 1 when taken.
const LOCK_SCRIPT: &str = "\
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0";

/// A deployment-wide lock in the shared Redis, held by one analytics replica for a job.
pub(crate) struct JobLock {
    redis: Redis,
    key: String,
    token: String,
}

impl JobLock {
    /// Takes the lock `name` for `lease` unless another replica holds it.
    pub(crate) async fn try_take(redis: &Redis, name: &str, lease: Duration) -> Result<Option<Self>> {
        let key = redis.key("analytics", name);
        let token = Uuid::new_v4().to_string();
        let lease = lease.as_millis().to_string();
        let taken: i64 =
            timed("job_lock", redis.pool().eval(LOCK_SCRIPT, vec![key.clone()], vec![token.clone(), lease]))
                .await
                .map_err(|e| AnalyticsError::RedisUnavailable(e.to_string()))?;
        Ok((taken == 1).then(|| Self { redis: redis.clone(), key, token }))
    }

    /// Releases the lock if it is still this holder's.
    pub(crate) async fn release(self) {
        let released: std::result::Result<i64, _> =
            timed("job_unlock", self.redis.pool().eval(RELEASE_SCRIPT, vec![self.key.clone()], vec![self.token])).await;
        if let Err(error) = released {
            tracing::warn!(%error, key = self.key, "cannot release a job lock; it lapses by itself");
        }
    }
}

/// ClickHouse's text form of a time, for `DateTime64(6, 'UTC')` parameters.
fn time_param(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

/// The bounds of a usage question: the range, and the whole hours inside it.
const START: &str = "{start:DateTime64(6, 'UTC')}";
const END: &str = "{end:DateTime64(6, 'UTC')}";
const WHOLE_START: &str = "{whole_start:DateTime64(6, 'UTC')}";
const WHOLE_END: &str = "{whole_end:DateTime64(6, 'UTC')}";

/// What one read of usage selects per group: sums, then latency quantiles (or what stands for
/// them when the question does not ask for them).
struct UsageColumns {
    sums: &'static str,
    latency: &'static str,
    no_latency: &'static str,
}

impl UsageColumns {
    /// The columns, the quantiles only when `latency` (merging their states is most of what a
    /// long range costs in the rollup: over 90% of a 30-day read of 10 million events).
    fn select(&self, latency: bool) -> String {
        format!("{}{}", self.sums, if latency { self.latency } else { self.no_latency })
    }
}

/// [`UsageAggregate`]'s latency when the question does not ask for it.
const EMPTY_LATENCY: &str = ", CAST([], 'Array(Float64)') AS latency";

/// A group's sums over events, named as [`UsageAggregate`]'s fields.
const RAW_SUMS: UsageColumns = UsageColumns {
    sums: "count() AS sum_requests, countIf(status != 'success') AS sum_errors, \
        sum(input_tokens) AS sum_input_tokens, sum(output_tokens) AS sum_output_tokens, \
        sum(cached_input_tokens) AS sum_cached_input_tokens, sum(total_tokens) AS sum_total_tokens, \
        toString(sum(cost)) AS sum_cost",
    latency: ", quantiles(0.5, 0.95, 0.99)(duration_ms) AS latency",
    no_latency: EMPTY_LATENCY,
};

/// A group's sums over rollup rows, named as [`UsageAggregate`]'s fields.
const ROLLUP_SUMS: UsageColumns = UsageColumns {
    sums: "sum(requests) AS sum_requests, sum(errors) AS sum_errors, \
        sum(input_tokens) AS sum_input_tokens, sum(output_tokens) AS sum_output_tokens, \
        sum(cached_input_tokens) AS sum_cached_input_tokens, sum(total_tokens) AS sum_total_tokens, \
        toString(sum(cost)) AS sum_cost",
    latency: ", quantilesMerge(0.5, 0.95, 0.99)(latency) AS latency",
    no_latency: EMPTY_LATENCY,
};

/// A group's partial sums over events, of the rollup's types (`cost` stays `Decimal(38, 10)`,
/// the latency a `quantiles(0.5, 0.95, 0.99)` state of `Int64`, as `duration_ms` is), so that
/// they add up with rollup rows ([`ROLLUP_PART`]) in [`PART_SUMS`].
const RAW_PART: UsageColumns = UsageColumns {
    sums: "count() AS part_requests, countIf(status != 'success') AS part_errors, \
        sum(input_tokens) AS part_input_tokens, sum(output_tokens) AS part_output_tokens, \
        sum(cached_input_tokens) AS part_cached_input_tokens, sum(total_tokens) AS part_total_tokens, \
        sum(cost) AS part_cost",
    latency: ", quantilesState(0.5, 0.95, 0.99)(duration_ms) AS part_latency",
    no_latency: "",
};

/// A group's partial sums over rollup rows, as [`RAW_PART`] names them. Summed per group before
/// the union rather than after: about a fifth less time for a 30-day range.
const ROLLUP_PART: UsageColumns = UsageColumns {
    sums: "sum(requests) AS part_requests, sum(errors) AS part_errors, \
        sum(input_tokens) AS part_input_tokens, sum(output_tokens) AS part_output_tokens, \
        sum(cached_input_tokens) AS part_cached_input_tokens, sum(total_tokens) AS part_total_tokens, \
        sum(cost) AS part_cost",
    latency: ", quantilesMergeState(0.5, 0.95, 0.99)(latency) AS part_latency",
    no_latency: "",
};

/// A group's sums over partial sums, named as [`UsageAggregate`]'s fields.
const PART_SUMS: UsageColumns = UsageColumns {
    sums: "sum(part_requests) AS sum_requests, sum(part_errors) AS sum_errors, \
        sum(part_input_tokens) AS sum_input_tokens, sum(part_output_tokens) AS sum_output_tokens, \
        sum(part_cached_input_tokens) AS sum_cached_input_tokens, sum(part_total_tokens) AS sum_total_tokens, \
        toString(sum(part_cost)) AS sum_cost",
    latency: ", quantilesMerge(0.5, 0.95, 0.99)(part_latency) AS latency",
    no_latency: EMPTY_LATENCY,
};

/// The conditions of `filter`, each starting with ` AND `, on columns the events and the rollup
/// share; their parameters are bound by name.
fn filter_conditions(filter: &UsageFilter) -> String {
    let UsageFilter { model_id, user_id, api_key_id, status, request_type } = filter;
    [
        (model_id.is_some(), " AND model_id = {model_id:UUID}"),
        (user_id.is_some(), " AND user_id = {user_id:UUID}"),
        (api_key_id.is_some(), " AND api_key_id = {api_key_id:UUID}"),
        (status.is_some(), " AND status = {status:String}"),
        (request_type.is_some(), " AND request_type = {request_type:String}"),
    ]
    .into_iter()
    .filter_map(|(present, condition)| present.then_some(condition))
    .collect()
}

impl Store {
    /// The store of `ch`, reading the time zones ClickHouse knows and the projects' retention,
    /// with its ingest writer (claiming events in `claims`) running until the last clone of the
    /// store is dropped.
    pub async fn open(ch: ClickHouse, claims: IngestClaims, config: &AnalyticsConfig) -> Result<Self> {
        let zones: Vec<String> = ch.client.query("SELECT time_zone FROM system.time_zones").fetch_all().await?;
        let retention = Arc::new(Retention {
            default_days: config.default_retention_days,
            custom: RwLock::default(),
            holds: RwLock::default(),
            applied: RwLock::default(),
        });
        let (writer, jobs) = mpsc::channel(INGEST_QUEUE);
        let redis = claims.redis.clone();
        let store = Self { ch, retention, time_zones: Arc::new(zones.into_iter().collect()), writer, redis };
        store.refresh_retention().await?;
        let writer = Writer {
            ch: store.ch.clone(),
            retention: Arc::clone(&store.retention),
            claims,
            max_events: config.max_insert_events.max(1) as usize,
        };
        // Counted only when they happen; at 0 from the start, so that rates and alerts see them.
        metrics::counter!("analytics_ingest_claim_conflicts_total").increment(0);
        metrics::counter!("analytics_ingest_round_timeouts_total").increment(0);
        tokio::spawn(writer.run(jobs));
        Ok(store)
    }

    pub fn clickhouse(&self) -> &ClickHouse {
        &self.ch
    }

    /// Whether ClickHouse knows the time zone `name`.
    pub fn is_time_zone(&self, name: &str) -> bool {
        self.time_zones.contains(name)
    }

    /// Rereads every project's retention, legal hold and applied retention (another replica may
    /// have changed or applied one).
    pub async fn refresh_retention(&self) -> Result<()> {
        let rows: Vec<RetentionRow> =
            self.ch.client.query("SELECT project_id, days FROM project_retention FINAL").fetch_all().await?;
        let holds: Vec<HoldRow> = self
            .ch
            .client
            .query("SELECT project_id, since FROM project_legal_hold FINAL WHERE legal_hold = 1")
            .fetch_all()
            .await?;
        let applied: Vec<RetentionRow> =
            self.ch.client.query("SELECT project_id, days FROM retention_applied FINAL").fetch_all().await?;
        let map = rows.into_iter().map(|row| (row.project_id, row.days)).collect();
        if let Ok(mut retention) = self.retention.custom.write() {
            *retention = map;
        }
        let holds = holds.into_iter().map(|row| (row.project_id, row.since)).collect();
        if let Ok(mut held) = self.retention.holds.write() {
            *held = holds;
        }
        let applied = applied.into_iter().map(|row| (row.project_id, row.days)).collect();
        if let Ok(mut known) = self.retention.applied.write() {
            *known = applied;
        }
        Ok(())
    }

    /// A project's retention in days, and whether the project set it.
    pub fn retention_of(&self, project_id: Uuid) -> (u16, bool) {
        self.retention.of(project_id)
    }

    /// Since when a project is on legal hold, if it is (as last read or set).
    pub fn legal_hold_of(&self, project_id: Uuid) -> Option<DateTime<Utc>> {
        self.retention.hold_of(project_id)
    }

    /// Puts a project on legal hold (`on`) or lifts it, with the reason; returns whether it was
    /// on hold before. Setting what is in force changes nothing, so `since` stays the first
    /// time. Rows already stored get the hold's retention in the background, at the next round
    /// of [`Store::apply_due_retention`] (not held back by the interval, unlike day changes).
    pub async fn set_legal_hold(&self, project_id: Uuid, on: bool, reason: &str) -> Result<bool> {
        // Read from ClickHouse, not this replica's copy, which may be up to a refresh behind.
        let stored: Option<HoldRow> = self
            .ch
            .client
            .query("SELECT project_id, since FROM project_legal_hold FINAL WHERE project_id = {project:UUID} AND legal_hold = 1")
            .param("project", project_id.to_string())
            .fetch_optional()
            .await?;
        let was = stored.as_ref().map(|row| row.since);
        // Kept when the hold stays on; for a new hold, now (in microseconds, as stored).
        let now = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap_or_else(Utc::now);
        let since = on.then(|| was.unwrap_or(now));
        if was.is_some() != on {
            self.ch
                .client
                .query(
                    "INSERT INTO project_legal_hold (project_id, legal_hold, since, reason, updated_at) \
                     VALUES ({project:UUID}, {hold:UInt8}, {since:DateTime64(6, 'UTC')}, {reason:String}, now64(6))",
                )
                .param("project", project_id.to_string())
                .param("hold", u8::from(on))
                .param("since", time_param(since.unwrap_or(now)))
                .param("reason", reason)
                .execute()
                .await?;
        }
        if let Ok(mut holds) = self.retention.holds.write() {
            match since {
                Some(since) => holds.insert(project_id, since),
                None => holds.remove(&project_id),
            };
        }
        Ok(was.is_some())
    }

    /// Up to `limit` projects after `after` (by id) whose retention is not the default: days
    /// set, a legal hold, or both. Read from ClickHouse, so a change made on any replica shows
    /// at once.
    pub async fn retention_policies(&self, after: Option<Uuid>, limit: u32) -> Result<Vec<ProjectPolicy>> {
        let rows: Vec<PolicyRow> = self
            .ch
            .client
            .query(
                "SELECT p.project_id AS project_id, r.days AS days, h.legal_hold AS legal_hold \
                 FROM (SELECT DISTINCT project_id FROM (SELECT project_id FROM project_retention FINAL \
                       UNION ALL SELECT project_id FROM project_legal_hold FINAL WHERE legal_hold = 1)) AS p \
                 LEFT JOIN (SELECT project_id, days FROM project_retention FINAL) AS r ON r.project_id = p.project_id \
                 LEFT JOIN (SELECT project_id, legal_hold FROM project_legal_hold FINAL) AS h \
                 ON h.project_id = p.project_id \
                 WHERE p.project_id > {after:UUID} ORDER BY p.project_id LIMIT {limit:UInt32} \
                 SETTINGS join_use_nulls = 0",
            )
            .param("after", after.unwrap_or(Uuid::nil()).to_string())
            .param("limit", limit)
            .fetch_all()
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| ProjectPolicy {
                project_id: row.project_id,
                days: (row.days > 0).then_some(row.days),
                legal_hold: row.legal_hold == 1,
            })
            .collect())
    }

    /// Stores the events not stored before; for each, whether it was new. Duplicates within
    /// the batch count as seen after their first occurrence. Done by the writer, together
    /// with the other calls waiting at the time; the events are stored even if the caller
    /// stops waiting.
    pub async fn ingest(&self, events: Vec<ValidEvent>) -> Result<Vec<Stored>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let stopped = || AnalyticsError::Unavailable("the ingest writer stopped".into());
        let (done, outcomes) = oneshot::channel();
        self.writer.send(IngestJob { events, done }).await.map_err(|_| stopped())?;
        outcomes.await.map_err(|_| stopped())?
    }

    /// Where `query` is answered exactly at the least cost: the rollup alone for a range on
    /// whole hours, the rollup and the events at the ragged ends for another range, the events
    /// alone when the range holds no whole hour or the rollup's hours do not bucket as their
    /// events do ([`Store::hours_fit_buckets`]).
    pub async fn source_of(&self, query: &UsageQuery) -> Result<Source> {
        let Some(whole_hours) = query.range.whole_hours() else { return Ok(Source::Raw) };
        if !self.hours_fit_buckets(query, whole_hours).await? {
            return Ok(Source::Raw);
        }
        Ok(if query.range.is_hour_aligned() { Source::Rollup } else { Source::RollupAndRawEdges })
    }

    /// Whether each UTC hour of `hours` lies within one bucket of `query`, so that a rollup row
    /// falls in the bucket of every event it sums: always without buckets, never for minute
    /// buckets, always for longer ones in UTC. In another zone a bucket must not start inside
    /// an hour. The zone's offset at the range's two ends does not tell: a range of up to
    /// `max_range_days` can have whole-hour ends around a half-hour stretch (Australia/Lord_Howe
    /// is +11 in summer, +10:30 in winter). So each hour's first and last second are bucketed
    /// by the query's own expression and compared: 9,600 rows for 400 days, a few milliseconds.
    async fn hours_fit_buckets(&self, query: &UsageQuery, hours: TimeRange) -> Result<bool> {
        let Some((bucket, tz)) = &query.bucket else { return Ok(true) };
        if *bucket == Bucket::Minute {
            return Ok(false);
        }
        if tz == "UTC" {
            return Ok(true);
        }
        let sql = format!(
            "SELECT toUInt8(countIf({} != {}) = 0) FROM (SELECT toDateTime({{first:Int64}} + number * 3600, 'UTC') \
             AS hour_start, hour_start + 3599 AS hour_last_second FROM numbers({{count:UInt64}}))",
            bucket.sql("hour_start"),
            bucket.sql("hour_last_second"),
        );
        let fits: u8 = self
            .ch
            .client
            .query(&sql)
            .param("first", hours.start.timestamp())
            .param("count", u64::try_from((hours.end - hours.start).num_hours()).unwrap_or(0))
            .param("tz", tz.as_str())
            .fetch_one()
            .await?;
        Ok(fits == 1)
    }

    /// Usage sums of `query` per bucket and group, read where [`Store::source_of`] says.
    pub async fn usage(&self, query: &UsageQuery) -> Result<(Vec<UsageAggregate>, Source)> {
        let source = self.source_of(query).await?;
        Ok((self.usage_from(query, source).await?, source))
    }

    /// Usage sums of `query` from `source`. [`Source::RollupAndRawEdges`] on a range without a
    /// whole hour reads the events alone.
    pub async fn usage_from(&self, query: &UsageQuery, source: Source) -> Result<Vec<UsageAggregate>> {
        Ok(self.usage_statement(query, source, "").fetch_all().await?)
    }

    /// ClickHouse's plan for [`Store::usage_from`], one line each: which table, or which
    /// projection of the rollup, answers (tests and operators).
    pub async fn usage_plan(&self, query: &UsageQuery, source: Source) -> Result<Vec<String>> {
        Ok(self.usage_statement(query, source, "EXPLAIN projections = 1 ").fetch_all().await?)
    }

    /// The statement of [`Store::usage_from`], its parameters bound, after `prefix`.
    fn usage_statement(&self, query: &UsageQuery, source: Source, prefix: &str) -> clickhouse::query::Query {
        let bucket = |time: &str| query.bucket.as_ref().map_or_else(|| "toUInt32(0)".to_owned(), |(b, _)| b.sql(time));
        let group = query.group_by.map_or("''", |d| d.sql());
        let filter = filter_conditions(&query.filter);
        let project = "project_id = {project:UUID}";
        let whole_hours = query.range.whole_hours().filter(|_| source == Source::RollupAndRawEdges);
        let columns = |columns: &UsageColumns| columns.select(query.with_latency);
        let sql = match (source, whole_hours) {
            (Source::Rollup, _) => format!(
                "SELECT {} AS bucket, {group} AS grp, {} FROM usage_hourly \
                 WHERE {project} AND hour >= {START} AND hour < {END}{filter} \
                 GROUP BY bucket, grp ORDER BY bucket, grp",
                bucket("hour"),
                columns(&ROLLUP_SUMS),
            ),
            (Source::RollupAndRawEdges, Some(_)) => format!(
                "SELECT bucket, grp, {} FROM ( \
                 SELECT {} AS bucket, {group} AS grp, {} FROM usage_events FINAL \
                 WHERE {project} AND ((occurred_at >= {START} AND occurred_at < {WHOLE_START}) \
                 OR (occurred_at >= {WHOLE_END} AND occurred_at < {END})){filter} GROUP BY bucket, grp \
                 UNION ALL \
                 SELECT {} AS bucket, {group} AS grp, {} FROM usage_hourly \
                 WHERE {project} AND hour >= {WHOLE_START} AND hour < {WHOLE_END}{filter} GROUP BY bucket, grp) \
                 GROUP BY bucket, grp ORDER BY bucket, grp",
                columns(&PART_SUMS),
                bucket("occurred_at"),
                columns(&RAW_PART),
                bucket("hour"),
                columns(&ROLLUP_PART),
            ),
            (Source::Raw | Source::RollupAndRawEdges, _) => format!(
                "SELECT {} AS bucket, {group} AS grp, {} FROM usage_events FINAL \
                 WHERE {project} AND occurred_at >= {START} AND occurred_at < {END}{filter} \
                 GROUP BY bucket, grp ORDER BY bucket, grp",
                bucket("occurred_at"),
                columns(&RAW_SUMS),
            ),
        };
        let mut statement = self
            .ch
            .client
            .query(&format!("{prefix}{sql}"))
            .param("project", query.project_id.to_string())
            .param("start", time_param(query.range.start))
            .param("end", time_param(query.range.end))
            .param("tz", query.bucket.as_ref().map_or("UTC", |(_, tz)| tz.as_str()));
        if let Some(whole_hours) = whole_hours {
            statement = statement
                .param("whole_start", time_param(whole_hours.start))
                .param("whole_end", time_param(whole_hours.end));
        }
        let UsageFilter { model_id, user_id, api_key_id, status, request_type } = &query.filter;
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
        statement
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

    /// Sets a project's retention and returns the one it had (days, and whether the project had
    /// set it). Rows written from now on get it at once; rows already stored are cut and
    /// rewritten to it later, in the background ([`Store::apply_due_retention`]), so an admin
    /// changing it often costs no more ClickHouse mutations than one round per interval.
    pub async fn set_retention(&self, project_id: Uuid, days: u16) -> Result<(u16, bool)> {
        // Read from ClickHouse, not this replica's copy, which may be up to a refresh behind.
        let stored: Option<DaysRow> = self
            .ch
            .client
            .query("SELECT days FROM project_retention FINAL WHERE project_id = {project:UUID}")
            .param("project", project_id.to_string())
            .fetch_optional()
            .await?;
        let old = stored.map_or((self.retention.default_days, false), |row| (row.days, true));
        self.ch
            .client
            .query("INSERT INTO project_retention (project_id, days, updated_at) VALUES ({project:UUID}, {days:UInt16}, now64(6))")
            .param("project", project_id.to_string())
            .param("days", days)
            .execute()
            .await?;
        if let Ok(mut retention) = self.retention.custom.write() {
            retention.insert(project_id, days);
        }
        Ok(old)
    }

    /// Whether the rows of a project stored before its last retention change have been cut to
    /// it: always for a project on the default, else once the background job applied it. From
    /// memory, as this replica last read, set or applied the retention: an application by the
    /// replica that ran the job shows here at once, one by another replica at this replica's
    /// next [`Store::refresh_retention`] (every 30 s in the service), so for up to that long
    /// the answer may still be false; a change of days or hold made elsewhere shows as late
    /// (as in [`Store::retention_of`]).
    pub fn retention_applied(&self, project_id: Uuid) -> bool {
        self.retention.is_applied(project_id)
    }

    /// Stores an audit event analytics itself writes (a retention change): straight into its
    /// own table through the ingest writer, since analytics has no outbox of its own.
    pub async fn record_audit(&self, row: AuditEventRow) -> Result<()> {
        self.ingest(vec![ValidEvent::Audit(row)]).await?;
        Ok(())
    }

    /// Applies every pending retention change whose project was last applied at least
    /// `min_interval` ago, the latest setting of each (changes in between coalesce), unless
    /// another replica is doing so now: the job holds a lock in the shared Redis, so the
    /// deployment runs one round of retention mutations at a time. Returns the projects applied.
    pub async fn apply_due_retention(&self, min_interval: Duration) -> Result<Vec<(Uuid, u16)>> {
        let Some(lock) = JobLock::try_take(&self.redis, "retention-job", RETENTION_JOB_LEASE).await? else {
            return Ok(Vec::new());
        };
        let applied = self.apply_pending_retention(min_interval).await;
        lock.release().await;
        applied
    }

    async fn apply_pending_retention(&self, min_interval: Duration) -> Result<Vec<(Uuid, u16)>> {
        // Every project with days set or a hold decision (in force or lifted), with the
        // retention its rows should have. A project never applied joins with the defaults: days
        // 0 (never a valid retention) and applied_at at the epoch. A new hold is due at once:
        // until it is applied, rows past the project's days may still expire.
        let due: Vec<RetentionRow> = self
            .ch
            .client
            .query(
                "SELECT project_id, effective AS days FROM ( \
                 SELECT p.project_id AS project_id, h.legal_hold AS held, \
                 if(held = 1, {hold_days:UInt16}, if(r.days = 0, {default_days:UInt16}, r.days)) AS effective, \
                 a.days AS applied_days, a.applied_at AS applied_at \
                 FROM (SELECT DISTINCT project_id FROM (SELECT project_id FROM project_retention FINAL \
                       UNION ALL SELECT project_id FROM project_legal_hold FINAL)) AS p \
                 LEFT JOIN (SELECT project_id, days FROM project_retention FINAL) AS r ON r.project_id = p.project_id \
                 LEFT JOIN (SELECT project_id, legal_hold FROM project_legal_hold FINAL) AS h \
                 ON h.project_id = p.project_id \
                 LEFT JOIN (SELECT project_id, days, applied_at FROM retention_applied FINAL) AS a \
                 ON a.project_id = p.project_id) \
                 WHERE applied_days != effective \
                 AND (held = 1 OR applied_at <= now64(6) - toIntervalMillisecond({interval:UInt64})) \
                 SETTINGS join_use_nulls = 0",
            )
            .param("hold_days", LEGAL_HOLD_DAYS)
            .param("default_days", self.retention.default_days)
            .param("interval", u64::try_from(min_interval.as_millis()).unwrap_or(u64::MAX))
            .fetch_all()
            .await?;
        let mut applied = Vec::with_capacity(due.len());
        for row in due {
            self.apply_retention(row.project_id, row.days).await?;
            applied.push((row.project_id, row.days));
        }
        Ok(applied)
    }

    /// Cuts a project's stored rows to `days` and rewrites their `retention_days`, waiting for
    /// the mutations, then records it as applied. Idempotent; callers go through
    /// [`Store::apply_due_retention`], which bounds how often and how many at a time.
    pub async fn apply_retention(&self, project_id: Uuid, days: u16) -> Result<()> {
        let client = self.ch.client.clone();
        let (db, topology) = (self.ch.database(), self.ch.topology());
        let on = topology.on_cluster();
        let sync = [("mutations_sync", topology.mutations_sync())];
        // Mutations run on the tables that hold the rows (each shard's local table, on every
        // node): a Distributed table takes no ALTER ... DELETE. The id and days are typed values,
        // written into the statement because it may go to each node as it is.
        let tables = EVENT_TABLES.iter().map(|t| (*t, "occurred_at")).chain([("usage_hourly", "hour")]);
        for (table, time) in tables {
            let local = topology.local(table);
            let statements = [
                format!(
                    "ALTER TABLE {db}.{local}{on} DELETE WHERE project_id = '{project_id}' \
                     AND {time} < now64(6) - toIntervalDay({days})"
                ),
                format!(
                    "ALTER TABLE {db}.{local}{on} UPDATE retention_days = {days} WHERE project_id = '{project_id}'"
                ),
            ];
            for statement in statements {
                run_everywhere(topology, &self.ch.server, &statement, &sync).await?;
            }
        }
        client
            .query("INSERT INTO retention_applied (project_id, days, applied_at) VALUES ({project:UUID}, {days:UInt16}, now64(6))")
            .param("project", project_id.to_string())
            .param("days", days)
            .execute()
            .await?;
        if let Ok(mut applied) = self.retention.applied.write() {
            applied.insert(project_id, days);
        }
        tracing::info!(%project_id, days, "retention applied to stored events");
        Ok(())
    }

    /// Merges every table now, which applies TTLs and collapses duplicates at once instead of
    /// in ClickHouse's background merges (tests and operators).
    pub async fn optimize(&self) -> Result<()> {
        let (db, topology) = (self.ch.database(), self.ch.topology());
        for table in EVENT_TABLES.iter().chain(&["usage_hourly"]) {
            let statement = format!("OPTIMIZE TABLE {db}.{}{} FINAL", topology.local(table), topology.on_cluster());
            run_everywhere(topology, &self.ch.server, &statement, &[]).await?;
        }
        Ok(())
    }
}

/// The one task per process that checks and inserts events, a round at a time.
struct Writer {
    ch: ClickHouse,
    retention: Arc<Retention>,
    claims: IngestClaims,
    /// A round stops taking further waiting calls once it holds this many events.
    max_events: usize,
}

impl Writer {
    /// Until every store is dropped: takes the next call and every call waiting behind it (up
    /// to about `max_events` events), stores them in one round, answers each.
    async fn run(self, mut jobs: mpsc::Receiver<IngestJob>) {
        while let Some(first) = jobs.recv().await {
            let mut round = vec![first];
            let mut events = round[0].events.len();
            while events < self.max_events {
                let Ok(job) = jobs.try_recv() else { break };
                events += job.events.len();
                round.push(job);
            }
            let sizes: Vec<usize> = round.iter().map(|job| job.events.len()).collect();
            let mut replies = Vec::with_capacity(round.len());
            let mut all = Vec::with_capacity(events);
            for job in round {
                all.extend(job.events);
                replies.push(job.done);
            }
            metrics::histogram!("analytics_ingest_round_events").record(events as f64);
            match self.store_new(all).await {
                Ok(outcomes) => {
                    let mut outcomes = outcomes.into_iter();
                    for (done, size) in replies.into_iter().zip(sizes) {
                        // A caller that stopped waiting finds its events stored when it retries.
                        let _ = done.send(Ok(outcomes.by_ref().take(size).collect()));
                    }
                }
                Err(error) => {
                    for done in replies {
                        let _ = done.send(Err(error.clone()));
                    }
                }
            }
        }
    }

    /// Stores the events not stored before, under a claim on them; for each, whether it was
    /// new. Fails as unavailable (the relay retries) while another replica claims any.
    async fn store_new(&self, events: Vec<ValidEvent>) -> Result<Vec<Stored>> {
        let keys = self.claims.keys(&events);
        let token = Uuid::new_v4().to_string();
        if !self.claims.claim(&keys, &token).await? {
            metrics::counter!("analytics_ingest_claim_conflicts_total").increment(1);
            return Err(AnalyticsError::ClaimedElsewhere);
        }
        let Ok(stored) = tokio::time::timeout(ROUND_TIMEOUT, self.check_and_insert(events)).await else {
            // The INSERT may still complete on the server: the claims stay until they lapse,
            // so no round stores these events again meanwhile; a retry then finds them stored.
            metrics::counter!("analytics_ingest_round_timeouts_total").increment(1);
            return Err(AnalyticsError::Unavailable(format!("no answer within {ROUND_TIMEOUT:?}")));
        };
        self.claims.release(&keys, &token).await;
        stored
    }

    /// Stores the events the tables do not hold yet; for each, whether it was new.
    async fn check_and_insert(&self, mut events: Vec<ValidEvent>) -> Result<Vec<Stored>> {
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
            event.set_retention(self.retention.effective(event.project_id()));
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

    /// Which of `events` are stored already. Each event is looked up in its own topic's table
    /// (an event's topic never changes: a redelivery is the same outbox row), [`KNOWN_IDS_PER_QUERY`]
    /// events per query, the queries all at once: one after the other they were more than half
    /// of a writer round behind a backlog.
    async fn known_ids(&self, events: &[ValidEvent]) -> Result<HashSet<Uuid>> {
        let mut by_table: Vec<(&'static str, Vec<&ValidEvent>)> = Vec::new();
        for event in events {
            match by_table.iter_mut().find(|(table, _)| *table == event.table()) {
                Some((_, group)) => group.push(event),
                None => by_table.push((event.table(), vec![event])),
            }
        }
        let lookups = by_table
            .iter()
            .flat_map(|(table, group)| group.chunks(KNOWN_IDS_PER_QUERY).map(move |chunk| (*table, chunk)))
            .map(|(table, chunk)| self.known_ids_of_chunk(table, chunk));
        let found = futures::future::try_join_all(lookups).await?;
        Ok(found.into_iter().flatten().collect())
    }

    /// Which of `events` (all of `table`) are stored already: looked up by project, id and the
    /// events' time span, which the table's sort key (project, time, id) narrows to a few
    /// granules.
    async fn known_ids_of_chunk(&self, table: &str, events: &[&ValidEvent]) -> Result<HashSet<Uuid>> {
        let (Some(first), Some(last)) =
            (events.iter().map(|e| e.occurred_at()).min(), events.iter().map(|e| e.occurred_at()).max())
        else {
            return Ok(HashSet::new());
        };
        let ids = events.iter().map(|e| e.event_id().to_string()).collect::<Vec<_>>().join(",");
        let projects: HashSet<Uuid> = events.iter().map(|e| e.project_id()).collect();
        let projects: Vec<String> = projects.iter().map(Uuid::to_string).collect();
        // Every value is bound with `?`, escaped into the text by the client: a query with
        // server-side `{name:Type}` parameters travels as an HTML form, whose fields ClickHouse
        // caps at about 100 KB (see KNOWN_IDS_PER_QUERY).
        let sql = format!(
            "SELECT event_id FROM {table} WHERE project_id IN (SELECT toUUID(arrayJoin(?))) \
             AND occurred_at BETWEEN toDateTime64(?, 6, 'UTC') AND toDateTime64(?, 6, 'UTC') \
             AND event_id IN (SELECT toUUID(arrayJoin(splitByChar(',', ?))))"
        );
        let rows: Vec<EventIdRow> = self
            .ch
            .consistent()
            .query(&sql)
            .bind(projects)
            .bind(time_param(first))
            .bind(time_param(last))
            .bind(ids)
            .fetch_all()
            .await?;
        Ok(rows.into_iter().map(|row| row.event_id).collect())
    }

    /// One INSERT of `rows` (RowBinary), none when empty, timed in
    /// `clickhouse_insert_duration_seconds{table}` (failed ones too: a slow failure is slow).
    async fn insert<T>(&self, table: &'static str, rows: &[T]) -> Result<()>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let inserted = async {
            let mut insert = self.ch.client.insert::<T>(table).await?;
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await
        }
        .await;
        metrics::histogram!("clickhouse_insert_duration_seconds", "table" => table)
            .record(started.elapsed().as_secs_f64());
        inserted?;
        Ok(())
    }
}
