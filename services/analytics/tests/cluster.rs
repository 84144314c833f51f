//! Analytics on a ClickHouse cluster of the test's own ([`ScratchClickHouse`]: two chDB nodes,
//! one shard each, and a ZooKeeper): the schema is created idempotently, events count once
//! whichever node and replica ingest them, the rollup agrees with the raw events, retention cuts
//! every shard, and a single-node deployment moves to the cluster with every event exactly once.
//!
//! chDB's clickhouse-local cannot replicate (no interserver HTTP) nor run `ON CLUSTER` DDL (no
//! distributed DDL queue), so these run the node-by-node DDL and plain MergeTree shards; the
//! replicated `ON CLUSTER` statements are checked by ClickHouse's parser only (see
//! docs/clickhouse-cluster.md).

mod common;

use chrono::{DateTime, Duration, DurationRound, Utc};
use uuid::Uuid;

use common::{day_query, totals, usage_event, valid};

use aimesh_analytics::AnalyticsConfig;
use aimesh_analytics::cluster::{Cluster, Topology};
use aimesh_analytics::error::AnalyticsError;
use aimesh_analytics::query::Dimension;
use aimesh_analytics::schema::{MIGRATIONS, Step};
use aimesh_analytics::store::{IngestClaims, Source, Store, Stored};
use aimesh_kit::testing::ScratchClickHouse;
use aimesh_kit::wire::proto_json;
use aimesh_proto::analytics::v1 as pb;

/// A two-node cluster and one analytics deployment's database and Redis prefix on it.
struct Deployment {
    scratch: ScratchClickHouse,
    database: String,
    redis_prefix: String,
}

impl Deployment {
    async fn start() -> Self {
        Self {
            scratch: ScratchClickHouse::start(2, 1).await,
            database: format!("aimesh_test_{}", Uuid::new_v4().simple()),
            redis_prefix: format!("test-{}", Uuid::new_v4().simple()),
        }
    }

    /// The settings of an analytics replica whose `clickhouse_url` is node `node`, on the
    /// cluster (DDL node by node, shards without replicas: what chDB can run).
    fn config(&self, node: usize) -> AnalyticsConfig {
        AnalyticsConfig {
            clickhouse_cluster: Some(self.scratch.cluster().to_owned()),
            clickhouse_cluster_replicated: false,
            clickhouse_cluster_node_urls: self.scratch.urls(),
            ..self.single_config(node)
        }
    }

    /// The settings of a single-node deployment on node `node`.
    fn single_config(&self, node: usize) -> AnalyticsConfig {
        AnalyticsConfig {
            clickhouse_url: self.scratch.urls()[node].clone(),
            clickhouse_database: self.database.clone(),
            default_retention_days: 365,
            ..AnalyticsConfig::default()
        }
    }

    /// An analytics replica as it starts: moving single-node tables if any, migrating, opening.
    async fn replica(&self, config: AnalyticsConfig) -> Store {
        let redis = aimesh_kit::testing::redis_with_prefix(&self.redis_prefix).await;
        let clickhouse =
            aimesh_analytics::connect_clickhouse_converting(&config, &redis).await.expect("connect and migrate");
        Store::open(clickhouse, IngestClaims::new(redis), &config).await.expect("open store")
    }

    /// `sql` on node `node`, `{db}` being the deployment's database.
    fn query(&self, node: usize, sql: &str) -> String {
        let sql = sql.replace("{db}", &self.database);
        self.scratch.query(node, &sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// A project id whose rows the cluster keeps on shard `shard` (0-based), as the
    /// Distributed tables' sharding key `cityHash64(project_id)` places them.
    fn project_on_shard(&self, shard: u64) -> Uuid {
        loop {
            let project = Uuid::new_v4();
            if self.query(0, &format!("SELECT cityHash64(toUUID('{project}')) % 2")) == shard.to_string() {
                return project;
            }
        }
    }
}

/// Ingests `events` through `store` as a relay would: again while another replica claims some.
async fn deliver(store: &Store, events: &[pb::Event]) -> Vec<Stored> {
    for _ in 0..200 {
        match store.ingest(valid(events)).await {
            Err(AnalyticsError::ClaimedElsewhere) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            outcome => return outcome.expect("ingest"),
        }
    }
    panic!("the events stayed claimed by another replica");
}

fn new_count(outcomes: &[Stored]) -> usize {
    outcomes.iter().filter(|s| **s == Stored::New).count()
}

/// An audit event of `project` at `at`.
fn audit_event(project: Uuid, at: DateTime<Utc>) -> pb::Event {
    pb::Event {
        event_id: Uuid::now_v7().to_string(),
        topic: "audit".into(),
        event_type: "project.updated".into(),
        project_id: project.to_string(),
        occurred_at: Some(proto_json::timestamp(at)),
        payload: serde_json::json!({"resource_type": "project", "resource_id": project.to_string()}).to_string(),
    }
}

/// A product event of `project` at `at`.
fn product_event(project: Uuid, at: DateTime<Utc>) -> pb::Event {
    pb::Event {
        event_id: Uuid::now_v7().to_string(),
        topic: "product".into(),
        event_type: "chat.opened".into(),
        project_id: project.to_string(),
        occurred_at: Some(proto_json::timestamp(at)),
        payload: "{}".into(),
    }
}

#[tokio::test]
async fn the_schema_is_created_once_however_many_replicas_migrate() {
    let deployment = Deployment::start().await;
    // Two replicas on a fresh database at once (each on its own node), then one again.
    let configs = [deployment.config(0), deployment.config(1)];
    let (first, second) = tokio::join!(
        aimesh_analytics::connect_clickhouse(&configs[0]),
        aimesh_analytics::connect_clickhouse(&configs[1])
    );
    first.expect("first replica migrates");
    second.expect("second replica migrates");
    aimesh_analytics::connect_clickhouse(&deployment.config(0)).await.expect("migrating again changes nothing");

    let expected = [
        "audit_events Distributed",
        "audit_events_local ReplacingMergeTree",
        "product_events Distributed",
        "product_events_local ReplacingMergeTree",
        "project_legal_hold Distributed",
        "project_legal_hold_local ReplacingMergeTree",
        "project_retention Distributed",
        "project_retention_local ReplacingMergeTree",
        "retention_applied Distributed",
        "retention_applied_local ReplacingMergeTree",
        "schema_migrations Distributed",
        "schema_migrations_local ReplacingMergeTree",
        "usage_events Distributed",
        "usage_events_local ReplacingMergeTree",
        "usage_hourly Distributed",
        "usage_hourly_local AggregatingMergeTree",
        "usage_hourly_mv MaterializedView",
    ]
    .join("\n");
    for node in 0..2 {
        let tables = deployment
            .query(node, "SELECT name, engine FROM system.tables WHERE database = '{db}' ORDER BY name FORMAT CSV");
        assert_eq!(tables.replace(['"'], "").replace(',', " "), expected, "node {node}");
        let projections = deployment.query(
            node,
            "SELECT name FROM system.projections WHERE database = '{db}' AND table = 'usage_hourly_local'",
        );
        assert_eq!(projections, "by_model", "node {node}");
        let versions = deployment.query(node, "SELECT DISTINCT version FROM {db}.schema_migrations ORDER BY version");
        assert_eq!(versions, "1\n2\n3\n4", "every version recorded, read through the cluster from node {node}");
    }
}

#[tokio::test]
async fn the_replicated_on_cluster_statements_parse() {
    // What a cluster with Keeper and distributed DDL runs; chDB can only parse it (see the top),
    // which the test run's own server does.
    let url = std::env::var("AIMESH_CLICKHOUSE_URL").unwrap_or_else(|_| AnalyticsConfig::default().clickhouse_url);
    let server = aimesh_analytics::store::client_of(&url);
    let topology = Topology::Cluster(Cluster { name: "main".into(), replicated: true, nodes: Vec::new() });
    let statements: Vec<String> = MIGRATIONS
        .iter()
        .flat_map(|m| m.steps.iter())
        .flat_map(|step| step.statements(&topology, "analytics"))
        .collect();
    assert_eq!(statements.len(), 18, "7 tables × (local + Distributed), the view and 3 changes of the rollup");
    for statement in statements {
        let ast: Vec<String> = server
            .query(&format!("EXPLAIN AST {statement}"))
            .fetch_all()
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
        let kind = if statement.starts_with("ALTER") { "AlterQuery" } else { "CreateQuery" };
        assert!(ast.iter().any(|line| line.contains(kind)), "{statement}: {ast:?}");
    }
}

#[tokio::test]
async fn replicated_local_tables_register_in_the_keeper() {
    // Node by node (chDB has no distributed DDL queue), the replicated statements create the
    // local tables and register each shard's replica in ZooKeeper. They stay read-only here:
    // clickhouse-local opens no interserver HTTP port, which replication needs (see the top).
    let deployment = Deployment::start().await;
    let topology = Topology::Cluster(Cluster { name: "main".into(), replicated: true, nodes: Vec::new() });
    let Step::Table { name, shard_by, body } = &MIGRATIONS[0].steps[0] else { panic!("usage_events first") };
    let local =
        topology.create_table(&deployment.database, name, shard_by, body).remove(0).replace(" ON CLUSTER `main`", "");
    for node in 0..2 {
        deployment.query(node, "CREATE DATABASE {db}");
        deployment.query(node, &local);
        let replica = deployment.query(
            node,
            "SELECT zookeeper_path, replica_name, total_replicas, is_readonly FROM system.replicas WHERE database = '{db}'",
        );
        let shard = node + 1;
        let path = format!("/clickhouse/tables/{shard}/{}/usage_events_local", deployment.database);
        assert_eq!(replica, format!("{path}\tr1\t1\t1"), "node {node}");
    }
}

#[tokio::test]
async fn events_count_once_whichever_node_and_replica_ingests_them() {
    let deployment = Deployment::start().await;
    let (on_first, on_second) =
        tokio::join!(deployment.replica(deployment.config(0)), deployment.replica(deployment.config(1)));
    let projects = [deployment.project_on_shard(0), deployment.project_on_shard(1)];
    let model = Uuid::new_v4();
    let start = Utc::now().duration_trunc(Duration::hours(1)).expect("trunc") - Duration::hours(30);
    let batch: Vec<pb::Event> = (0..200)
        .map(|i| {
            let project = projects[i % 2];
            let status = if i % 9 == 0 { "error" } else { "success" };
            usage_event(project, model, start + Duration::minutes(i as i64 * 7), 100 + i as i64, "0.0012345678", status)
        })
        .collect();

    // The same batch handed to both replicas at once (the relay's redelivery), each on its node.
    let (first, second) = tokio::join!(deliver(&on_first, &batch), deliver(&on_second, &batch));
    assert_eq!(new_count(&first) + new_count(&second), 200, "each event new on one replica only");
    // Later deliveries through either replica find every event stored, whichever shard holds it.
    assert_eq!(new_count(&deliver(&on_second, &batch).await), 0);
    assert_eq!(new_count(&deliver(&on_first, &batch[..50]).await), 0);
    let late = usage_event(projects[1], model, start + Duration::hours(2), 1000, "1", "success");
    assert_eq!(deliver(&on_first, std::slice::from_ref(&late)).await, vec![Stored::New]);
    assert_eq!(deliver(&on_second, &[late.clone(), late]).await, vec![Stored::Duplicate, Stored::Duplicate]);

    // 201 events, cost 200 × 0.0012345678 + 1, through every node; spread over both shards.
    for node in 0..2 {
        let totals = deployment.query(node, "SELECT count(), sum(cost) FROM {db}.usage_events");
        assert_eq!(totals, "201\t1.24691356", "raw totals through node {node}");
        let rollup = deployment.query(node, "SELECT sum(requests), sum(cost) FROM {db}.usage_hourly");
        assert_eq!(rollup, "201\t1.24691356", "rollup totals through node {node}");
        let local = deployment.query(node, "SELECT count() FROM {db}.usage_events_local");
        assert_eq!(local, if node == 0 { "100" } else { "101" }, "rows stored on shard {node}");
    }
    // Each replica's answers, from the rollup and the raw events, agree for every project.
    for store in [&on_first, &on_second] {
        for project in projects {
            let query = day_query(project, start - Duration::hours(1), start + Duration::days(2), None);
            let raw = totals(&store.usage_from(&query, Source::Raw).await.expect("raw"));
            let rollup = totals(&store.usage_from(&query, Source::Rollup).await.expect("rollup"));
            assert_eq!(raw, rollup, "rollup equals raw for {project}");
            let expected = if project == projects[0] { 100 } else { 101 };
            assert_eq!(raw.iter().map(|r| r.2).sum::<u64>(), expected);
            // A ragged range: the rollup's whole hours and the events at the ends, through the
            // Distributed tables, equal the events alone to the last figure.
            let ends = (start + Duration::minutes(17) + Duration::milliseconds(500), start + Duration::minutes(1230));
            let ragged = day_query(project, ends.0, ends.1, Some(Dimension::Status));
            let (rows, source) = store.usage(&ragged).await.expect("ragged");
            assert_eq!(source, Source::RollupAndRawEdges);
            assert_eq!(rows, store.usage_from(&ragged, Source::Raw).await.expect("raw"), "ragged range of {project}");
        }
    }
}

#[tokio::test]
async fn retention_cuts_every_shard() {
    let deployment = Deployment::start().await;
    let store = deployment.replica(deployment.config(0)).await;
    let kept = [deployment.project_on_shard(0), deployment.project_on_shard(1)];
    let short = [deployment.project_on_shard(0), deployment.project_on_shard(1)];
    let (now, model) = (Utc::now(), Uuid::new_v4());
    let events: Vec<pb::Event> = kept
        .iter()
        .chain(&short)
        .flat_map(|p| {
            [
                usage_event(*p, model, now - Duration::days(10), 10, "0.1", "success"),
                usage_event(*p, model, now - Duration::days(2), 10, "0.1", "success"),
                audit_event(*p, now - Duration::days(10)),
                product_event(*p, now - Duration::days(10)),
            ]
        })
        .collect();
    assert_eq!(new_count(&deliver(&store, &events).await), 16);
    for project in short {
        store.set_retention(project, 5).await.expect("set retention");
    }
    let applied = store.apply_due_retention(std::time::Duration::from_secs(3600)).await.expect("apply");
    assert_eq!(applied.len(), 2, "both projects applied");
    for project in short {
        assert!(store.retention_applied(project));
    }
    store.optimize().await.expect("optimize");

    let count = |node: usize, table: &str, project: Uuid| {
        deployment.query(node, &format!("SELECT count() FROM {{db}}.{table} WHERE project_id = '{project}'"))
    };
    for node in 0..2 {
        for project in kept {
            assert_eq!(count(node, "usage_events", project), "2", "kept on every shard");
            assert_eq!(count(node, "audit_events", project), "1");
        }
        for project in short {
            assert_eq!(count(node, "usage_events", project), "1", "only the 2-day-old row is kept");
            assert_eq!(count(node, "usage_hourly", project), "1", "the rollup is cut too");
            assert_eq!(count(node, "audit_events", project), "0");
            assert_eq!(count(node, "product_events", project), "0");
            let days = deployment.query(
                node,
                &format!("SELECT DISTINCT retention_days FROM {{db}}.usage_events WHERE project_id = '{project}'"),
            );
            assert_eq!(days, "5", "stored rows carry the new retention");
        }
    }
}

/// What a deployment's database answers, compared before and after the move: per table the
/// rows and ids (each id once), and the usage totals from the raw events and the rollup.
fn fingerprint(deployment: &Deployment, node: usize) -> Vec<String> {
    [
        "SELECT count(), uniqExact(event_id), sum(cost), sum(total_tokens) FROM {db}.usage_events",
        "SELECT sum(requests), sum(cost), sum(total_tokens) FROM {db}.usage_hourly",
        "SELECT count(), uniqExact(event_id) FROM {db}.audit_events",
        "SELECT count(), uniqExact(event_id) FROM {db}.product_events",
        "SELECT project_id, days FROM {db}.project_retention FINAL ORDER BY project_id",
        "SELECT project_id, days FROM {db}.retention_applied FINAL ORDER BY project_id",
    ]
    .iter()
    .map(|sql| deployment.query(node, sql))
    .collect()
}

/// A single-node deployment on node 0 with events over three months, duplicates delivered,
/// and a retention change applied; returns its fingerprint.
async fn single_node_history(deployment: &Deployment) -> Vec<String> {
    let store = deployment.replica(deployment.single_config(0)).await;
    let start = Utc::now().duration_trunc(Duration::days(1)).expect("trunc") - Duration::days(75);
    // Projects on both shards of the cluster to come, so the move must put rows on each.
    let projects = [deployment.project_on_shard(0), deployment.project_on_shard(1), deployment.project_on_shard(0)];
    let model = Uuid::new_v4();
    let mut events: Vec<pb::Event> = (0..150)
        .map(|i| {
            let at = start + Duration::hours(i as i64 * 12);
            usage_event(projects[i % 3], model, at, 50 + i as i64, "0.0000000007", "success")
        })
        .collect();
    events.extend((0..12).map(|i| audit_event(projects[i % 3], start + Duration::days(i as i64 * 6))));
    events.extend((0..9).map(|i| product_event(projects[i % 3], start + Duration::days(i as i64 * 8))));
    assert_eq!(new_count(&deliver(&store, &events).await), 171);
    assert_eq!(new_count(&deliver(&store, &events[40..90]).await), 0);
    store.set_retention(projects[0], 300).await.expect("set retention");
    store.apply_due_retention(std::time::Duration::from_secs(3600)).await.expect("apply");
    let before = fingerprint(deployment, 0);
    assert!(before[0].starts_with("150\t150\t"), "{before:?}");
    before
}

#[tokio::test]
async fn a_single_node_deployment_moves_to_the_cluster_with_every_event_once() {
    let deployment = Deployment::start().await;
    let before = single_node_history(&deployment).await;

    // Two replicas start with the cluster configured: the one on the old node moves the tables
    // while the other waits for it, then both serve.
    let (first, second) =
        tokio::join!(deployment.replica(deployment.config(0)), deployment.replica(deployment.config(1)));
    for node in 0..2 {
        assert_eq!(fingerprint(&deployment, node), before, "the same answers through node {node}");
    }
    let moved = deployment.query(1, "SELECT count() FROM {db}.usage_events_local");
    assert_ne!(moved, "0", "rows moved to the other shard too");
    let kept = deployment.query(
        0,
        "SELECT name FROM system.tables WHERE database = '{db}' AND name LIKE '%_before_cluster' ORDER BY name",
    );
    assert_eq!(kept.lines().count(), 8, "every old table kept aside: {kept}");
    // A new event and a redelivered old one, through either replica.
    let project = Uuid::new_v4();
    let fresh = usage_event(project, Uuid::new_v4(), Utc::now(), 10, "1", "success");
    assert_eq!(deliver(&second, std::slice::from_ref(&fresh)).await, vec![Stored::New]);
    assert_eq!(deliver(&first, &[fresh]).await, vec![Stored::Duplicate]);

    // Starting again finds nothing to move and changes nothing.
    let again = deployment.replica(deployment.config(0)).await;
    drop(again);
    assert_eq!(deployment.query(0, "SELECT count() FROM {db}.usage_events"), "151");
}

#[tokio::test]
async fn a_move_that_died_half_way_finishes_with_every_event_once() {
    let deployment = Deployment::start().await;
    let before = single_node_history(&deployment).await;

    // The state a crash in the middle of step 4 leaves: the old view dropped, every old table
    // renamed, the cluster's tables created, and some of the rows copied.
    deployment.query(0, "DROP VIEW {db}.usage_hourly_mv");
    for table in aimesh_analytics::schema::tables() {
        deployment.query(0, &format!("RENAME TABLE {{db}}.{table} TO {{db}}.{table}_single"));
    }
    aimesh_analytics::connect_clickhouse(&deployment.config(0)).await.expect("cluster tables");
    for (table, rows) in [("usage_events", 60), ("audit_events", 5), ("project_retention", 1)] {
        deployment.query(
            0,
            &format!(
                "INSERT INTO {{db}}.{table} SELECT * FROM {{db}}.{table}_single FINAL LIMIT {rows} \
                 SETTINGS distributed_foreground_insert = 1"
            ),
        );
    }
    let partly = deployment.query(0, "SELECT count() FROM {db}.usage_events");
    assert_eq!(partly, "60");

    // Both replicas start again: the one on node 1 only waits; the one on the old node finishes.
    let (waiter, finisher) =
        tokio::join!(deployment.replica(deployment.config(1)), deployment.replica(deployment.config(0)));
    drop((waiter, finisher));
    for node in 0..2 {
        assert_eq!(fingerprint(&deployment, node), before, "the same answers through node {node}");
    }
    let leftovers =
        deployment.query(0, "SELECT count() FROM system.tables WHERE database = '{db}' AND name LIKE '%_single'");
    assert_eq!(leftovers, "0");
}

#[tokio::test]
async fn a_move_that_died_while_renaming_finishes_with_every_event_once() {
    let deployment = Deployment::start().await;
    let before = single_node_history(&deployment).await;

    // The state a crash in step 2 leaves: the old view dropped, some old tables renamed.
    deployment.query(0, "DROP VIEW {db}.usage_hourly_mv");
    for table in ["usage_events", "project_retention"] {
        deployment.query(0, &format!("RENAME TABLE {{db}}.{table} TO {{db}}.{table}_single"));
    }
    let refused = aimesh_analytics::connect_clickhouse(&deployment.config(0)).await.err().map(|e| format!("{e:#}"));
    assert!(
        refused.as_deref().is_some_and(|e| e.contains("single-node deployment's tables")),
        "no cluster tables beside old ones: {refused:?}"
    );

    let store = deployment.replica(deployment.config(0)).await;
    for node in 0..2 {
        assert_eq!(fingerprint(&deployment, node), before, "the same answers through node {node}");
    }
    let late = usage_event(Uuid::new_v4(), Uuid::new_v4(), Utc::now(), 10, "1", "success");
    assert_eq!(deliver(&store, &[late.clone(), late]).await, vec![Stored::New, Stored::Duplicate]);
}
