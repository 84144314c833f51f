//! The analytics store against the real ClickHouse (chDB): events count once however often
//! they arrive, rollups agree with the raw events, retention drops old rows.

use chrono::{DateTime, Duration, DurationRound, Utc};
use uuid::Uuid;

mod common;

use common::{day_query, totals, usage_event, valid};

use aimesh_analytics::AnalyticsConfig;
use aimesh_analytics::error::AnalyticsError;
use aimesh_analytics::events::ValidEvent;
use aimesh_analytics::query::{Bucket, Dimension, TimeRange, UsageFilter, UsageQuery};
use aimesh_analytics::store::{IngestClaims, Source, Store, Stored, UsageAggregate};
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

/// A round of more events than one lookup asks about (5,000), of two topics: each event is
/// looked up in its own table, every chunk of ids is asked, and a replay of the whole round,
/// or of part of it mixed with new events, stores nothing twice.
#[tokio::test]
async fn a_round_larger_than_one_lookup_finds_every_stored_event_of_every_topic() {
    let test = TestStore::new().await;
    let store = &test.store;
    let project = Uuid::new_v4();
    let model = Uuid::new_v4();
    let at = Utc::now() - Duration::minutes(5);
    let product = |n: i64| pb::Event {
        event_id: Uuid::now_v7().to_string(),
        topic: "product".into(),
        event_type: "file.uploaded".into(),
        project_id: project.to_string(),
        occurred_at: Some(aimesh_kit::wire::proto_json::timestamp(at + Duration::milliseconds(n))),
        payload: serde_json::json!({ "n": n }).to_string(),
    };
    let batch: Vec<pb::Event> = (0..6_000)
        .map(|n| usage_event(project, model, at + Duration::milliseconds(n), 10, "0.01", "success"))
        .chain((0..1_000).map(product))
        .collect();
    let first = store.ingest(valid(&batch)).await.expect("ingest");
    assert!(first.iter().all(|s| *s == Stored::New));

    let replay = store.ingest(valid(&batch)).await.expect("replay");
    let duplicates = replay.iter().filter(|s| **s == Stored::Duplicate).count();
    assert_eq!(duplicates, 7_000, "every event of the replayed round is found stored");
    // The last usage event (in the second lookup of its table) and the first product event,
    // beside two new ones.
    let mixed = vec![batch[5_999].clone(), product(-1), batch[6_000].clone(), product(-2)];
    let outcomes = store.ingest(valid(&mixed)).await.expect("mixed");
    assert_eq!(outcomes, vec![Stored::Duplicate, Stored::New, Stored::Duplicate, Stored::New]);

    let count = |table: &'static str| async move {
        let sql = format!("SELECT count() FROM {table}");
        store.clickhouse().client().query(&sql).fetch_one::<u64>().await.expect("count")
    };
    assert_eq!((count("usage_events").await, count("product_events").await), (6_000, 1_002));
    test.drop_database().await;
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
    assert!(!store.retention_applied(short_project), "applied in the background");
    // The background job: due at once (never applied), then not again within the interval.
    let interval = std::time::Duration::from_secs(3600);
    assert_eq!(store.apply_due_retention(interval).await.expect("apply"), vec![(short_project, 5)]);
    assert!(store.retention_applied(short_project));
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
async fn whether_retention_is_applied_is_known_at_once_where_it_ran_and_elsewhere_at_the_next_refresh() {
    let test = TestStore::new().await;
    let other = test.replica().await;
    let project = Uuid::new_v4();
    assert!(test.store.retention_applied(project), "nothing to apply on the default");
    test.store.set_retention(project, 5).await.expect("set retention");
    other.refresh_retention().await.expect("refresh");
    assert!(!test.store.retention_applied(project));
    assert!(!other.retention_applied(project));

    let interval = std::time::Duration::from_secs(3600);
    assert_eq!(test.store.apply_due_retention(interval).await.expect("apply"), vec![(project, 5)]);
    assert!(test.store.retention_applied(project), "known at once on the replica that applied it");
    assert!(!other.retention_applied(project), "another replica answers from memory until it rereads");
    other.refresh_retention().await.expect("refresh");
    assert!(other.retention_applied(project));
    assert!(test.replica().await.retention_applied(project), "a replica starting reads it");

    // A later change is pending again everywhere it is known.
    other.set_retention(project, 6).await.expect("change");
    assert!(!other.retention_applied(project));
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
    assert!(store.retention_applied(project));
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
    assert!(!store.retention_applied(project));
    assert_eq!(store.apply_due_retention(std::time::Duration::ZERO).await.expect("apply"), vec![(project, 5)]);
    store.optimize().await.expect("optimize");
    assert_eq!(rows(project).await, Vec::<u16>::new(), "rows past the days go once the hold is lifted");
    let policies = store.retention_policies(None, 100).await.expect("policies");
    let policy = policies.iter().find(|p| p.project_id == project).expect("listed");
    assert_eq!((policy.days, policy.legal_hold), (Some(5), false));
    test.drop_database().await;
}

/// A usage question of `project` over [start, end) with the given bucket (and its zone), group
/// and filter, latency included.
fn usage_query(
    project: Uuid,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    bucket: Option<(Bucket, &str)>,
    group_by: Option<Dimension>,
    filter: UsageFilter,
) -> UsageQuery {
    UsageQuery {
        project_id: project,
        range: TimeRange::new(Some(start), Some(end), 400).expect("range"),
        filter,
        bucket: bucket.map(|(bucket, tz)| (bucket, tz.to_owned())),
        group_by,
        with_latency: true,
    }
}

#[tokio::test]
async fn a_ragged_range_is_answered_from_the_rollup_and_the_raw_edges_exactly_as_from_the_events() {
    let test = TestStore::new().await;
    let store = &test.store;
    let project = Uuid::new_v4();
    let (gpt, claude) = (Uuid::new_v4(), Uuid::new_v4());
    // 12:00 UTC two days ago to 16:00 UTC yesterday: across a UTC midnight and a Shanghai one
    // (16:00 UTC), every 17 minutes, so each partial hour at the range's ends holds events.
    let day = Utc::now().duration_trunc(Duration::days(1)).expect("trunc") - Duration::days(2);
    let first = day + Duration::hours(12) + Duration::seconds(13);
    let start = day + Duration::hours(12) + Duration::minutes(25) + Duration::milliseconds(500);
    let end = day + Duration::hours(38) + Duration::minutes(41) + Duration::microseconds(1);
    let mut batch: Vec<pb::Event> = (0..100)
        .map(|i| {
            let model = if i % 3 == 0 { claude } else { gpt };
            let status = if i % 7 == 0 { "error" } else { "success" };
            let cost = format!("0.00{:02}345678{}", i, i % 10);
            usage_event(project, model, first + Duration::minutes(i * 17), 100 + (i * 37) % 900, &cost, status)
        })
        .collect();
    // On each bound and just inside or outside it.
    let whole_start = day + Duration::hours(13);
    let whole_end = day + Duration::hours(38);
    for (n, at) in [
        start - Duration::microseconds(1),
        start,
        whole_start - Duration::microseconds(1),
        whole_start,
        whole_end - Duration::microseconds(1),
        whole_end,
        end - Duration::microseconds(1),
        end,
    ]
    .into_iter()
    .enumerate()
    {
        batch.push(usage_event(project, gpt, at, 5000 + n as i64, "0.0000000001", "success"));
    }
    store.ingest(valid(&batch)).await.expect("ingest");

    let by_model = UsageFilter { model_id: Some(gpt), ..UsageFilter::default() };
    let errors_only = UsageFilter { status: Some("error".into()), ..UsageFilter::default() };
    let cases = [
        (None, None, UsageFilter::default()),
        (None, Some(Dimension::Model), UsageFilter::default()),
        (Some((Bucket::Hour, "UTC")), None, UsageFilter::default()),
        (Some((Bucket::Hour, "Asia/Shanghai")), Some(Dimension::Status), UsageFilter::default()),
        (Some((Bucket::Day, "UTC")), Some(Dimension::Model), UsageFilter::default()),
        (Some((Bucket::Day, "Asia/Shanghai")), Some(Dimension::Model), UsageFilter::default()),
        (Some((Bucket::Day, "Asia/Shanghai")), None, by_model),
        (Some((Bucket::Week, "Europe/Berlin")), Some(Dimension::Model), errors_only),
        (Some((Bucket::Month, "UTC")), None, UsageFilter::default()),
    ];
    for (bucket, group_by, filter) in cases {
        let query = usage_query(project, (start, end), bucket, group_by, filter.clone());
        let (rows, source) = store.usage(&query).await.expect("usage");
        assert_eq!(source, Source::RollupAndRawEdges, "{bucket:?} {group_by:?} {filter:?}");
        assert_eq!(source.as_str(), "rollup+raw");
        let raw = store.usage_from(&query, Source::Raw).await.expect("raw");
        assert!(!raw.is_empty());
        // Every figure: counts, token sums, the cost to the last digit, the latency quantiles
        // (exact on both paths below 8192 values a group, where `quantiles` keeps them all).
        assert_eq!(rows, raw, "{bucket:?} {group_by:?} {filter:?}");
        assert!(rows.iter().all(|row| row.latency.len() == 3));
        // Without latency: the same sums, no quantiles.
        let without = UsageQuery { with_latency: false, ..query };
        let (sums, _) = store.usage(&without).await.expect("usage");
        let no_latency = |rows: Vec<UsageAggregate>| -> Vec<UsageAggregate> {
            rows.into_iter().map(|row| UsageAggregate { latency: Vec::new(), ..row }).collect()
        };
        assert_eq!(sums, no_latency(raw), "{bucket:?} {group_by:?} {filter:?}");
        assert_eq!(sums, no_latency(store.usage_from(&without, Source::Raw).await.expect("raw")));
    }
    let everything = usage_query(project, (start, end), None, None, UsageFilter::default());
    let (rows, _) = store.usage(&everything).await.expect("usage");
    assert_eq!(rows[0].sum_requests, 99, "events 2 to 94 of the spread, and the 6 bounds inside");

    // A range inside one hour holds no whole hour: the events alone.
    let inside = usage_query(project, (start, whole_start), Some((Bucket::Hour, "UTC")), None, UsageFilter::default());
    let (rows, source) = store.usage(&inside).await.expect("usage");
    assert_eq!(source, Source::Raw);
    assert_eq!(rows, store.usage_from(&inside, Source::Raw).await.expect("raw"));
    assert_eq!(rows[0].sum_requests, 4, "events at 12:34:13 and 12:51:13, and 2 bounds");
    // Whole hours: the rollup alone, as before.
    let aligned = usage_query(project, (whole_start, whole_end), None, None, UsageFilter::default());
    assert_eq!(store.source_of(&aligned).await.expect("source"), Source::Rollup);
    test.drop_database().await;
}

#[tokio::test]
async fn the_rollup_answers_only_where_its_hours_fall_in_one_bucket() {
    let test = TestStore::new().await;
    let store = &test.store;
    let project = Uuid::new_v4();
    let at = |text: &str| DateTime::parse_from_rfc3339(text).expect("time").with_timezone(&Utc);
    let source = |range: (&str, &str), bucket: Option<(Bucket, &'static str)>| {
        let query = usage_query(project, (at(range.0), at(range.1)), bucket, None, UsageFilter::default());
        async move { store.source_of(&query).await.expect("source") }
    };
    let ragged = ("2025-03-01T10:20:00Z", "2025-03-04T07:05:00Z");
    assert_eq!(source(ragged, Some((Bucket::Minute, "UTC"))).await, Source::Raw, "minutes are finer than the rollup");
    assert_eq!(source(ragged, Some((Bucket::Day, "Asia/Tokyo"))).await, Source::RollupAndRawEdges);
    // India's days start at 18:30 UTC, inside a rollup hour; its hours too.
    assert_eq!(source(ragged, Some((Bucket::Day, "Asia/Kolkata"))).await, Source::Raw);
    assert_eq!(source(ragged, Some((Bucket::Hour, "Asia/Kolkata"))).await, Source::Raw);
    // Within one Indian day, the rollup's hours fall in it whole.
    let one_day = ("2025-03-01T19:20:00Z", "2025-03-02T07:05:00Z");
    assert_eq!(source(one_day, Some((Bucket::Day, "Asia/Kolkata"))).await, Source::RollupAndRawEdges);
    // Lord Howe Island is +11 in both January and December, +10:30 from April to October: whole
    // hours at both ends are not enough.
    let year = ("2025-01-10T00:00:00Z", "2025-12-10T00:00:00Z");
    assert_eq!(source(year, Some((Bucket::Day, "Australia/Lord_Howe"))).await, Source::Raw);
    assert_eq!(source(year, Some((Bucket::Day, "Asia/Shanghai"))).await, Source::Rollup);
    assert_eq!(source(year, None).await, Source::Rollup);
    test.drop_database().await;
}

/// Whether ClickHouse reads `query` from the rollup's projection summed by model (schema
/// version 4) rather than from the rollup's rows of every user and key.
async fn reads_by_model(store: &Store, query: &UsageQuery, source: Source) -> bool {
    let plan = store.usage_plan(query, source).await.expect("plan");
    plan.iter().any(|line| line.contains("ReadFromMergeTree (by_model)"))
}

#[tokio::test]
async fn questions_without_users_or_keys_read_the_rollup_summed_by_model_with_the_same_answers() {
    let test = TestStore::new().await;
    let store = &test.store;
    let project = Uuid::new_v4();
    let (gpt, claude) = (Uuid::new_v4(), Uuid::new_v4());
    let start = Utc::now().duration_trunc(Duration::days(1)).expect("trunc") - Duration::days(3);
    let end = start + Duration::days(2);
    // Parts written before the projection existed: version 4 undone, events ingested, the
    // store opened again (a deployment upgrading), which must give those parts the projection.
    let ch = store.clickhouse();
    let db = ch.database();
    for statement in [
        format!("ALTER TABLE {db}.usage_hourly DROP PROJECTION by_model"),
        format!("ALTER TABLE {db}.schema_migrations DELETE WHERE version = 4"),
    ] {
        ch.server().query(&statement).with_setting("mutations_sync", "1").execute().await.expect(&statement);
    }
    let events: Vec<pb::Event> = (0..200)
        .map(|i| {
            let model = if i % 3 == 0 { claude } else { gpt };
            let status = if i % 7 == 0 { "error" } else { "success" };
            usage_event(project, model, start + Duration::minutes(i * 13), 100 + i, &format!("0.00{i:03}1"), status)
        })
        .collect();
    store.ingest(valid(&events[..100])).await.expect("ingest before the projection");
    let store = test.replica().await;
    store.ingest(valid(&events[100..])).await.expect("ingest after");
    let parts_without = format!(
        "SELECT count() FROM system.parts AS p WHERE p.database = '{db}' AND p.table = 'usage_hourly' AND p.active \
         AND p.name NOT IN (SELECT parent_name FROM system.projection_parts WHERE database = '{db}' \
         AND table = 'usage_hourly' AND name = 'by_model' AND active)"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ch.server().query(&parts_without).fetch_one::<u64>().await.expect("parts") > 0 {
        assert!(std::time::Instant::now() < deadline, "the migration materializes the projection in older parts");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let one_user = UsageFilter { user_id: Some(Uuid::new_v4()), ..UsageFilter::default() };
    let errors_only = UsageFilter { status: Some("error".into()), ..UsageFilter::default() };
    let ragged = (start + Duration::minutes(30), end - Duration::minutes(30));
    // (range, bucket, group, filter, whether the projection can answer)
    let cases = [
        ((start, end), Some((Bucket::Day, "UTC")), Some(Dimension::Model), UsageFilter::default(), true),
        ((start, end), Some((Bucket::Hour, "Asia/Shanghai")), Some(Dimension::Status), errors_only, true),
        (ragged, Some((Bucket::Day, "UTC")), Some(Dimension::Model), UsageFilter::default(), true),
        ((start, end), None, Some(Dimension::User), UsageFilter::default(), false),
        ((start, end), Some((Bucket::Day, "UTC")), None, one_user, false),
    ];
    for (range, bucket, group_by, filter, by_model) in cases {
        let query = UsageQuery { with_latency: false, ..usage_query(project, range, bucket, group_by, filter.clone()) };
        let source = store.source_of(&query).await.expect("source");
        assert_ne!(source, Source::Raw, "{range:?} {bucket:?} {group_by:?} {filter:?}");
        assert_eq!(
            reads_by_model(&store, &query, source).await,
            by_model,
            "{range:?} {bucket:?} {group_by:?} {filter:?}"
        );
        let answer = store.usage_from(&query, source).await.expect("usage");
        assert_eq!(
            answer,
            store.usage_from(&query, Source::Raw).await.expect("raw"),
            "{bucket:?} {group_by:?} {filter:?}"
        );
        assert_eq!(answer.is_empty(), filter.user_id.is_some(), "only the filter by an unknown user matches nothing");
    }
    test.drop_database().await;
}
