//! The analytics store against the real ClickHouse (chDB): events count once however often
//! they arrive, rollups agree with the raw events, retention drops old rows.

use chrono::{Duration, DurationRound, Utc};
use uuid::Uuid;

mod common;

use common::{day_query, totals, usage_event, valid};

use aimesh_analytics::AnalyticsConfig;
use aimesh_analytics::error::AnalyticsError;
use aimesh_analytics::events::ValidEvent;
use aimesh_analytics::query::Dimension;
use aimesh_analytics::store::{IngestClaims, Source, Store, Stored};
use aimesh_proto::analytics::v1 as pb;

/// A store on a database of its own, dropped at the end of the test.
struct TestStore {
    store: Store,
    config: AnalyticsConfig,
    redis_prefix: String,
}

impl TestStore {
    async fn new() -> Self {
        let config = AnalyticsConfig {
            clickhouse_url: std::env::var("AIMESH_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:18123".into()),
            clickhouse_database: format!("aimesh_test_{}", Uuid::new_v4().simple()),
            default_retention_days: 30,
            ..AnalyticsConfig::default()
        };
        let redis_prefix = format!("test-{}", Uuid::new_v4().simple());
        let store = Self::open(&config, &redis_prefix).await;
        Self { store, config, redis_prefix }
    }

    /// A second replica: its own writer and connections, the same ClickHouse database and Redis.
    async fn replica(&self) -> Store {
        Self::open(&self.config, &self.redis_prefix).await
    }

    async fn open(config: &AnalyticsConfig, redis_prefix: &str) -> Store {
        let clickhouse = aimesh_analytics::connect_clickhouse(config).await.expect("clickhouse (run make test)");
        let claims = IngestClaims::new(aimesh_kit::testing::redis_with_prefix(redis_prefix).await);
        Store::open(clickhouse, claims, config).await.expect("open store")
    }

    async fn drop_database(self) {
        let ch = self.store.clickhouse();
        ch.server().query(&format!("DROP DATABASE IF EXISTS {}", ch.database())).execute().await.expect("drop");
    }
}

#[tokio::test]
async fn replayed_and_duplicated_events_change_no_answer() {
    let test = TestStore::new().await;
    let store = &test.store;
    let project = Uuid::new_v4();
    let (gpt, claude) = (Uuid::new_v4(), Uuid::new_v4());
    let start = Utc::now().duration_trunc(Duration::days(1)).expect("trunc") - Duration::days(2);
    let batch: Vec<pb::Event> = (0..40)
        .map(|i| {
            let model = if i % 3 == 0 { claude } else { gpt };
            let status = if i % 10 == 0 { "error" } else { "success" };
            usage_event(project, model, start + Duration::minutes(i * 70), 1000 + i, "0.0012345678", status)
        })
        .collect();

    let first = store.ingest(valid(&batch)).await.expect("ingest");
    assert!(first.iter().all(|s| *s == Stored::New));
    let query = day_query(project, start, start + Duration::days(3), Some(Dimension::Model));
    let raw_before = totals(&store.usage_from(&query, Source::Raw).await.expect("raw"));
    let rollup_before = totals(&store.usage_from(&query, Source::Rollup).await.expect("rollup"));
    assert_eq!(raw_before, rollup_before, "the rollup agrees with the events");
    let requests: u64 = raw_before.iter().map(|r| r.2).sum();
    assert_eq!(requests, 40);
    let cost: rust_decimal::Decimal = raw_before.iter().map(|r| r.4.parse::<rust_decimal::Decimal>().expect("d")).sum();
    assert_eq!(cost.to_string(), "0.0493827120", "40 × 0.0012345678, exactly");

    // The whole batch again, then a batch mixing old and new events with a repeat inside.
    let replay = store.ingest(valid(&batch)).await.expect("replay");
    assert!(replay.iter().all(|s| *s == Stored::Duplicate));
    let extra = usage_event(project, gpt, start + Duration::hours(1), 7, "1", "success");
    let mixed = vec![batch[3].clone(), extra.clone(), batch[17].clone(), extra.clone()];
    let outcomes = store.ingest(valid(&mixed)).await.expect("mixed");
    assert_eq!(outcomes, vec![Stored::Duplicate, Stored::New, Stored::Duplicate, Stored::Duplicate]);

    store.optimize().await.expect("optimize");
    let raw_after = totals(&store.usage_from(&query, Source::Raw).await.expect("raw"));
    let rollup_after = totals(&store.usage_from(&query, Source::Rollup).await.expect("rollup"));
    assert_eq!(raw_after, rollup_after);
    let requests: u64 = raw_after.iter().map(|r| r.2).sum();
    assert_eq!(requests, 41, "only the one new event counts");
    let stored: u64 =
        store.clickhouse().client().query("SELECT count() FROM usage_events").fetch_one().await.expect("count");
    assert_eq!(stored, 41, "no duplicate row stored either");
    test.drop_database().await;
}

#[tokio::test]
async fn calls_ingesting_at_once_share_inserts_and_count_each_event_once() {
    let test = TestStore::new().await;
    let store = &test.store;
    let project = Uuid::new_v4();
    let model = Uuid::new_v4();
    let start = Utc::now().duration_trunc(Duration::hours(1)).expect("trunc") - Duration::hours(5);
    let events: Vec<pb::Event> =
        (0..225).map(|i| usage_event(project, model, start + Duration::seconds(i), 100, "0.01", "success")).collect();
    // Eight calls at once, each overlapping the next by half: 225 distinct events in 400.
    let calls: Vec<Vec<ValidEvent>> = (0..8).map(|i| valid(&events[i * 25..i * 25 + 50])).collect();
    let outcomes = futures::future::join_all(calls.into_iter().map(|call| store.ingest(call))).await;
    let mut new = 0;
    for outcome in outcomes {
        new += outcome.expect("ingest").iter().filter(|s| **s == Stored::New).count();
    }
    assert_eq!(new, 225, "each event new exactly once");

    let query = day_query(project, start - Duration::hours(1), start + Duration::hours(2), None);
    let raw = totals(&store.usage_from(&query, Source::Raw).await.expect("raw"));
    let rollup = totals(&store.usage_from(&query, Source::Rollup).await.expect("rollup"));
    assert_eq!(raw, rollup, "the rollup agrees with the events");
    assert_eq!(raw.iter().map(|r| r.2).sum::<u64>(), 225);
    let stored: u64 =
        store.clickhouse().client().query("SELECT count() FROM usage_events").fetch_one().await.expect("count");
    assert_eq!(stored, 225, "no duplicate row stored");
    test.drop_database().await;
}

#[tokio::test]
async fn two_replicas_handed_the_same_batch_at_once_count_it_once() {
    let test = TestStore::new().await;
    let other = test.replica().await;
    let project = Uuid::new_v4();
    let model = Uuid::new_v4();
    let start = Utc::now().duration_trunc(Duration::hours(1)).expect("trunc") - Duration::hours(3);
    let batch: Vec<pb::Event> =
        (0..300).map(|i| usage_event(project, model, start + Duration::seconds(i), 100, "0.01", "success")).collect();

    let (first, second) = tokio::join!(test.store.ingest(valid(&batch)), other.ingest(valid(&batch)));
    let mut new = 0;
    for (replica, outcome) in [(&test.store, first), (&other, second)] {
        // A replica that found the batch claimed answers "retry later", as a relay would.
        let mut outcome = outcome;
        let mut retries = 0;
        while matches!(outcome, Err(AnalyticsError::ClaimedElsewhere)) && retries < 100 {
            retries += 1;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            outcome = replica.ingest(valid(&batch)).await;
        }
        new += outcome.expect("ingest").iter().filter(|s| **s == Stored::New).count();
    }
    assert_eq!(new, 300, "each event new on one replica only");

    let query = day_query(project, start - Duration::hours(1), start + Duration::hours(2), None);
    let rollup = totals(&test.store.usage_from(&query, Source::Rollup).await.expect("rollup"));
    assert_eq!(rollup.iter().map(|r| r.2).sum::<u64>(), 300, "the rollup counts each event once");
    let raw = totals(&test.store.usage_from(&query, Source::Raw).await.expect("raw"));
    assert_eq!(raw, rollup);
    let stored: u64 =
        test.store.clickhouse().client().query("SELECT count() FROM usage_events").fetch_one().await.expect("count");
    assert_eq!(stored, 300, "no duplicate row stored, even before a merge");
    test.drop_database().await;
}

#[tokio::test]
async fn retention_drops_old_rows() {
    let test = TestStore::new().await;
    let store = &test.store;
    let (kept_project, short_project) = (Uuid::new_v4(), Uuid::new_v4());
    let now = Utc::now();
    let model = Uuid::new_v4();
    let events: Vec<pb::Event> = [kept_project, short_project]
        .into_iter()
        .flat_map(|p| {
            [
                usage_event(p, model, now - Duration::days(10), 10, "0.1", "success"),
                usage_event(p, model, now - Duration::days(2), 10, "0.1", "success"),
            ]
        })
        .collect();
    store.ingest(valid(&events)).await.expect("ingest");
    assert_eq!(store.set_retention(short_project, 5).await.expect("set retention"), (30, false));
    assert_eq!(store.retention_of(short_project), (5, true));
    assert_eq!(store.retention_of(kept_project), (30, false));
    assert!(!store.retention_applied(short_project).await.expect("applied?"), "applied in the background");
    // The background job: due at once (never applied), then not again within the interval.
    let interval = std::time::Duration::from_secs(3600);
    assert_eq!(store.apply_due_retention(interval).await.expect("apply"), vec![(short_project, 5)]);
    assert!(store.retention_applied(short_project).await.expect("applied?"));
    store.set_retention(short_project, 6).await.expect("change again");
    assert_eq!(store.apply_due_retention(interval).await.expect("apply"), vec![], "not twice in an interval");
    store.set_retention(short_project, 5).await.expect("change back");

    // Written after the change: expires by TTL at the next merge.
    let late = usage_event(short_project, model, now - Duration::days(7), 10, "0.1", "success");
    store.ingest(valid(&[late])).await.expect("ingest late");
    store.optimize().await.expect("optimize");

    let count = |project: Uuid, table: &'static str, column: &'static str| {
        let client = store.clickhouse().client().clone();
        async move {
            client
                .query(&format!("SELECT toUInt64(count()) FROM {table} WHERE project_id = ? AND {column} > 0"))
                .bind(project.to_string())
                .fetch_one::<u64>()
                .await
                .expect("count")
        }
    };
    assert_eq!(count(kept_project, "usage_events", "total_tokens").await, 2);
    assert_eq!(count(short_project, "usage_events", "total_tokens").await, 1, "only the 2-day-old row is kept");
    assert_eq!(count(short_project, "usage_hourly", "requests").await, 1, "the rollup drops them too");
    test.drop_database().await;
}

#[tokio::test]
async fn a_legal_hold_keeps_rows_past_the_retention_until_it_is_lifted() {
    let test = TestStore::new().await;
    let store = &test.store;
    let (project, model) = (Uuid::new_v4(), Uuid::new_v4());
    let now = Utc::now();
    let old = usage_event(project, model, now - Duration::days(10), 10, "0.1", "success");
    store.ingest(valid(&[old])).await.expect("ingest");
    let interval = std::time::Duration::from_secs(3600);

    // The hold first, then days shorter than the row's age: the hold wins, at once.
    assert!(!store.set_legal_hold(project, true, "case 42").await.expect("hold"), "not held before");
    let since = store.legal_hold_of(project).expect("held");
    assert!(store.set_legal_hold(project, true, "again").await.expect("hold again"), "held before");
    assert_eq!(store.legal_hold_of(project), Some(since), "holding again keeps since when");
    store.set_retention(project, 5).await.expect("set retention");
    let held = aimesh_analytics::store::LEGAL_HOLD_DAYS;
    assert_eq!(store.apply_due_retention(interval).await.expect("apply"), vec![(project, held)]);
    assert!(store.retention_applied(project).await.expect("applied?"));
    // Written while held: it gets the hold's retention too.
    let late = usage_event(project, model, now - Duration::days(9), 10, "0.1", "success");
    store.ingest(valid(&[late])).await.expect("ingest late");
    store.optimize().await.expect("optimize");
    let rows = |project: Uuid| {
        let client = store.clickhouse().client().clone();
        async move {
            client
                .query("SELECT retention_days FROM usage_events FINAL WHERE project_id = ? ORDER BY occurred_at")
                .bind(project.to_string())
                .fetch_all::<u16>()
                .await
                .expect("rows")
        }
    };
    assert_eq!(rows(project).await, vec![held, held], "a held project keeps every row");
    let policies = store.retention_policies(None, 100).await.expect("policies");
    let policy = policies.iter().find(|p| p.project_id == project).expect("listed");
    assert_eq!((policy.days, policy.legal_hold), (Some(5), true));

    // Lifted: the next round (a lifted hold waits for the interval like any change) cuts the rows
    // to the project's days.
    assert!(store.set_legal_hold(project, false, "case closed").await.expect("lift"));
    assert_eq!(store.legal_hold_of(project), None);
    assert_eq!(store.apply_due_retention(interval).await.expect("apply"), vec![], "within the interval");
    assert!(!store.retention_applied(project).await.expect("applied?"));
    assert_eq!(store.apply_due_retention(std::time::Duration::ZERO).await.expect("apply"), vec![(project, 5)]);
    store.optimize().await.expect("optimize");
    assert_eq!(rows(project).await, Vec::<u16>::new(), "rows past the days go once the hold is lifted");
    let policies = store.retention_policies(None, 100).await.expect("policies");
    let policy = policies.iter().find(|p| p.project_id == project).expect("listed");
    assert_eq!((policy.days, policy.legal_hold), (Some(5), false));
    test.drop_database().await;
}
