//! The ledger, catalog and counters against the real PostgreSQL and Redis Cluster: budgets that
//! hold under concurrency across replicas, idempotent records, prices in force, counters
//! rebuilt from PostgreSQL, exact costs, reservations that expire.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use fred::interfaces::KeysInterface;
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use aimesh_kit::config::{DatabaseConfig, RedisConfig};
use aimesh_kit::data::audit::Actor;
use aimesh_kit::data::cache::InvalidationBus;
use aimesh_kit::data::redis::Redis;
use aimesh_kit::testing::{self, TestDatabase};
use aimesh_kit::wire::pagination::{Cursor, Page};
use aimesh_usage::domain::{
    ModelStatus, NewReservation, NewUsage, Price, QuotaLimits, QuotaSubject, ReservationActor, ReservationDraft,
    UsageDraft, Windows,
};
use aimesh_usage::error::UsageError;
use aimesh_usage::ledger::Ledger;
use aimesh_usage::store::{ModelPatch, NewModel, UsageFilter};

/// One replica of the usage service: its own pool, Redis connections and invalidation bus, on
/// the database and key prefix shared with the other replicas of the test.
struct Replica {
    ledger: Ledger,
    redis: Redis,
    _bus: InvalidationBus,
}

async fn replica(url: &str, prefix: &str) -> Replica {
    let settings = DatabaseConfig { max_connections: 10, min_connections: 0, ..DatabaseConfig::default() };
    let pool = aimesh_kit::data::db::connect(url, &settings).await.expect("connect to the test database");
    let redis = Redis::connect_with_prefix(&testing::redis_urls(), &RedisConfig::default(), prefix)
        .await
        .expect("connect to the redis cluster");
    let bus = InvalidationBus::start(&redis).await.expect("subscribe to invalidations");
    Replica { ledger: Ledger::new(pool, redis.clone(), &bus), redis, _bus: bus }
}

/// A migrated database and two replicas on it with a fresh key prefix.
async fn setup() -> (TestDatabase, Replica, Replica) {
    let db = TestDatabase::new(&aimesh_usage::MIGRATOR).await;
    aimesh_kit::data::outbox::migrate(&db.pool).await.expect("migrate the outbox");
    let prefix = format!("test-{}", Uuid::new_v4().simple());
    let a = replica(&db.url, &prefix).await;
    let b = replica(&db.url, &prefix).await;
    (db, a, b)
}

fn decimal(text: &str) -> Decimal {
    Decimal::from_str(text).expect("decimal")
}

fn price(input: &str, output: &str, cached: &str) -> Price {
    Price {
        input_per_million: decimal(input),
        output_per_million: decimal(output),
        cached_input_per_million: decimal(cached),
    }
}

/// A catalog model with a price in force since an hour ago.
async fn model(ledger: &Ledger, name: &str, price: Price) -> Uuid {
    let new = NewModel {
        provider: "openai".into(),
        name: name.into(),
        version: String::new(),
        model_type: "chat",
        display_name: String::new(),
        description: String::new(),
        capabilities: vec![],
        status: ModelStatus::Active,
        max_tokens: 0,
        context_window: 0,
        match_pattern: format!("^{name}(-\\d{{4}}-\\d{{2}}-\\d{{2}})?$"),
    };
    let at = Utc::now() - chrono::Duration::hours(1);
    ledger.catalog().create_model(&new, Some((price, at)), &Actor::default()).await.expect("create model").model.id
}

struct Call<'a> {
    project: Uuid,
    user: Uuid,
    key: Option<Uuid>,
    request_id: &'a str,
    model: &'a str,
    input: i64,
    output: i64,
    cached: i64,
    at: Option<DateTime<Utc>>,
    reservation: Option<Uuid>,
}

impl<'a> Call<'a> {
    fn new(project: Uuid, user: Uuid, request_id: &'a str, model: &'a str) -> Self {
        Self {
            project,
            user,
            key: None,
            request_id,
            model,
            input: 100,
            output: 50,
            cached: 0,
            at: None,
            reservation: None,
        }
    }

    fn usage(&self) -> Result<NewUsage, UsageError> {
        let project = self.project.to_string();
        let reservation = self.reservation.map(|id| id.to_string()).unwrap_or_default();
        let draft = UsageDraft {
            request_id: self.request_id,
            project_id: &project,
            default_user: self.user,
            api_key_id: self.key,
            model: self.model,
            request_type: "chat",
            input_tokens: self.input,
            output_tokens: self.output,
            cached_input_tokens: self.cached,
            duration_ms: 1200,
            request_time: self.at,
            reservation_id: &reservation,
            ..UsageDraft::default()
        };
        NewUsage::validate(&draft, Utc::now())
    }
}

fn reservation(project: Uuid, user: Uuid, model: &str, input: i64, output: i64, ttl: i32) -> NewReservation {
    let project = project.to_string();
    let draft = ReservationDraft {
        project_id: &project,
        default_user: user,
        model,
        estimated_input_tokens: input,
        estimated_output_tokens: output,
        ttl_seconds: ttl,
        ..ReservationDraft::default()
    };
    NewReservation::validate(&draft).expect("valid reservation")
}

/// The person `user` acting with a login session, no project admin.
fn maker(user: Uuid) -> ReservationActor {
    ReservationActor { user_id: user, api_key_id: None, project_admin: false }
}

fn tokens_per_day(limit: i64) -> QuotaLimits {
    QuotaLimits::validate(limit, "", 0, 0, 0).expect("limits")
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Deletes every current key of the project, as a Redis flush would.
async fn flush(replica: &Replica, project: Uuid) {
    let keys = replica.ledger.counters().keys(project, &Windows::at(Utc::now()));
    let _: i64 = replica.redis.pool().del(keys).await.expect("delete the project's keys");
}

/// Asserts that `result` failed the way `check` expects.
fn expect<T: std::fmt::Debug>(result: Result<T, UsageError>, check: impl Fn(&UsageError) -> bool) {
    match result {
        Err(error) if check(&error) => {}
        other => panic!("unexpected: {other:?}"),
    }
}

/// Timing-sensitive tests compare minute counters: start them early in a minute.
async fn early_in_minute() {
    let second = Utc::now().second();
    if second > 40 {
        tokio::time::sleep(Duration::from_secs(u64::from(61 - second))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_reservations_against_room_for_fifty_let_fifty_through() {
    let (db, a, b) = setup().await;
    model(&a.ledger, "gpt-4o", price("2.50", "10", "1.25")).await;
    let project = Uuid::new_v4();
    // 100 tokens each: room for exactly 50.
    a.ledger.set_quota(project, QuotaSubject::Project, &tokens_per_day(5_000), &Actor::default()).await.expect("quota");

    let mut tasks = Vec::new();
    for i in 0..200 {
        let ledger = if i % 2 == 0 { a.ledger.clone() } else { b.ledger.clone() };
        let request = reservation(project, Uuid::new_v4(), "gpt-4o", 60, 40, 600);
        tasks.push(tokio::spawn(async move { ledger.reserve(&request).await }));
    }
    let (mut granted, mut refused) = (0, 0);
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => granted += 1,
            Err(UsageError::QuotaExceeded { limit, .. }) => {
                assert_eq!(limit, "project tokens_per_day");
                refused += 1;
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!((granted, refused), (50, 150));
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_reservations WHERE state = 'open'")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(open, 50, "refused reservations leave no row");
    let counters = b.ledger.counters().read(project, Utc::now()).await.expect("read counters");
    assert_eq!(counters.day.get("t:p"), Some(&5_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_record_counts_once_even_when_retries_race() {
    let (db, a, b) = setup().await;
    model(&a.ledger, "gpt-4o", price("2.50", "10", "1.25")).await;
    let (project, user) = (Uuid::new_v4(), Uuid::new_v4());

    let call = Call::new(project, user, "req-1", "gpt-4o");
    let first = a.ledger.record(call.usage().expect("valid")).await.expect("record");
    let again = b.ledger.record(call.usage().expect("valid")).await.expect("retry");
    assert_eq!(first, again, "a retry returns the first record");

    // Twenty concurrent copies of another request on two replicas.
    let usage = Call::new(project, user, "req-2", "gpt-4o").usage().expect("valid");
    let mut tasks = Vec::new();
    for i in 0..20 {
        let ledger = if i % 2 == 0 { a.ledger.clone() } else { b.ledger.clone() };
        let usage = usage.clone();
        tasks.push(tokio::spawn(async move { ledger.record(usage).await }));
    }
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        ids.insert(task.await.expect("task").expect("record").id);
    }
    assert_eq!(ids.len(), 1, "every racing retry got the same record");

    assert_eq!(count(&db.pool, "model_usage_logs").await, 2);
    assert_eq!(count(&db.pool, "usage_requests").await, 2);
    assert_eq!(count(&db.pool, "outbox_events WHERE topic = 'usage'").await, 2);
    let stats = a.ledger.stats(project).await.expect("stats");
    assert_eq!((stats.project.requests, stats.project.input_tokens, stats.project.output_tokens), (2, 200, 100));
    let counters = a.ledger.counters().read(project, Utc::now()).await.expect("counters");
    assert_eq!(counters.day.get("t:p"), Some(&300));
}

#[tokio::test]
async fn a_price_change_applies_only_to_later_requests() {
    let (_db, a, b) = setup().await;
    let model_id = model(&a.ledger, "gpt-4o", price("2.50", "10", "1.25")).await;
    let (project, user) = (Uuid::new_v4(), Uuid::new_v4());
    let now = Utc::now();

    let mut before = Call::new(project, user, "before", "gpt-4o");
    (before.input, before.output, before.at) = (1_000_000, 0, Some(now - chrono::Duration::minutes(10)));
    let first = a.ledger.record(before.usage().expect("valid")).await.expect("record");
    assert_eq!(first.cost.to_string(), "2.5000000000");

    // The new price takes effect five minutes ago (only an admin tool could backdate it this far;
    // the API allows a minute).
    let effective = now - chrono::Duration::minutes(5);
    a.ledger
        .catalog()
        .set_price(model_id, &price("5", "20", "2.5"), effective, &Actor::default())
        .await
        .expect("set price");

    // A late record of a call made before the change still pays the old price...
    let mut late = Call::new(project, user, "late", "gpt-4o");
    (late.input, late.output, late.at) = (1_000_000, 0, Some(now - chrono::Duration::minutes(6)));
    assert_eq!(b.ledger.record(late.usage().expect("valid")).await.expect("record").cost.to_string(), "2.5000000000");
    // ...a call after it pays the new one, on either replica.
    let mut after = Call::new(project, user, "after", "gpt-4o");
    (after.input, after.output) = (1_000_000, 0);
    assert_eq!(b.ledger.record(after.usage().expect("valid")).await.expect("record").cost.to_string(), "5.0000000000");
    // The first record did not change.
    let rows = a.ledger.store().list_usage(project, &UsageFilter::default(), &Page::first(10)).await.expect("list");
    let stored = rows.iter().find(|r| r.request_id == "before").map(|r| r.cost.to_string());
    assert_eq!(stored.as_deref(), Some("2.5000000000"));
    // The price history, newest first, on the other replica's catalog (invalidated by broadcast).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let prices = b.ledger.catalog().model(model_id).await.expect("model").prices;
    assert_eq!(prices.len(), 2);
    assert_eq!(prices[0].input_per_million, decimal("5"));
}

#[tokio::test]
async fn costs_with_cached_tokens_are_right_to_the_last_decimal() {
    let (db, a, _b) = setup().await;
    model(&a.ledger, "gpt-4o", price("2.50", "10.00", "1.25")).await;
    let (project, user) = (Uuid::new_v4(), Uuid::new_v4());
    let mut call = Call::new(project, user, "cached", "gpt-4o-2024-08-06");
    (call.input, call.cached, call.output) = (1_000_000, 400_000, 10_000);
    let row = a.ledger.record(call.usage().expect("valid")).await.expect("record");
    // 600,000 × 2.50 + 400,000 × 1.25 + 10,000 × 10.00, per million: 1.5 + 0.5 + 0.1.
    assert_eq!(row.cost.to_string(), "2.1000000000");
    let stored: Decimal =
        sqlx::query_scalar("SELECT cost FROM model_usage_logs").fetch_one(&db.pool).await.expect("cost");
    assert_eq!(stored.to_string(), "2.1000000000");
    let payload: serde_json::Value =
        sqlx::query_scalar("SELECT payload FROM outbox_events WHERE topic = 'usage' AND event_type = 'usage.recorded'")
            .fetch_one(&db.pool)
            .await
            .expect("event");
    assert_eq!(payload["cost"], "2.1000000000");
    assert_eq!(payload["cached_input_tokens"], 400_000);
    assert_eq!(payload["request_id"], "cached");
    let stats = a.ledger.stats(project).await.expect("stats");
    assert_eq!(stats.project.cost().to_string(), "2.100000000");
    assert_eq!(stats.by_user.get(&user.to_string()).map(|t| t.requests), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flushed_counters_are_rebuilt_from_postgres_with_the_same_figures() {
    early_in_minute().await;
    let (_db, a, b) = setup().await;
    model(&a.ledger, "gpt-4o", price("2.50", "10", "1.25")).await;
    model(&a.ledger, "gpt-4o-mini", price("0.15", "0.6", "0.075")).await;
    let project = Uuid::new_v4();
    let (ann, bob, key) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    a.ledger
        .set_quota(project, QuotaSubject::Project, &tokens_per_day(10_000), &Actor::default())
        .await
        .expect("quota");
    let monthly = QuotaLimits::validate(0, "100", 0, 0, 0).expect("limits");
    a.ledger.set_quota(project, QuotaSubject::User(bob), &monthly, &Actor::default()).await.expect("quota");

    // Records by two users and a key, on two models; a settled, a released and an open
    // reservation; one that expires.
    let mut calls = Vec::new();
    for (i, (user, model, k)) in
        [(ann, "gpt-4o", None), (bob, "gpt-4o-mini", Some(key)), (ann, "gpt-4o-mini", Some(key)), (bob, "gpt-4o", None)]
            .into_iter()
            .enumerate()
    {
        let mut call = Call::new(project, user, "", model);
        (call.input, call.output, call.cached, call.key) = (300 + i as i64, 200, 100, k);
        calls.push((format!("r{i}"), call));
    }
    for (id, call) in &mut calls {
        call.request_id = id;
        a.ledger.record(call.usage().expect("valid")).await.expect("record");
    }
    let settled = a.ledger.reserve(&reservation(project, ann, "gpt-4o", 1000, 1000, 600)).await.expect("reserve");
    let mut settle = Call::new(project, ann, "settle", "gpt-4o");
    settle.reservation = Some(settled.reservation.id);
    b.ledger.record(settle.usage().expect("valid")).await.expect("settle");
    let released = b.ledger.reserve(&reservation(project, bob, "gpt-4o", 500, 500, 600)).await.expect("reserve");
    a.ledger.release(project, released.reservation.id, &maker(bob)).await.expect("release");
    a.ledger.reserve(&reservation(project, bob, "gpt-4o-mini", 700, 300, 600)).await.expect("open reservation");
    a.ledger.reserve(&reservation(project, ann, "gpt-4o", 50, 50, 1)).await.expect("short reservation");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    a.ledger.ensure_counters(project).await.expect("purge the expired reservation");

    let now = Utc::now();
    let before = a.ledger.counters().read(project, now).await.expect("counters");
    let expected = a.ledger.expected_counters(project, now).await.expect("expected");
    assert_eq!((&before.day, &before.month, &before.minute), (&expected.day, &expected.month, &expected.minute));
    assert_eq!(
        before.day.get("t:p"),
        Some(&(4 * 500 + 6 + 150 + 1000)),
        "records, the settled call and the open reservation"
    );
    let stats_before = a.ledger.stats(project).await.expect("stats");

    flush(&a, project).await;
    assert!(a.ledger.counters().read(project, now).await.expect("counters").day.is_empty());
    // The next decision rebuilds first, on the other replica.
    let stats_after = b.ledger.stats(project).await.expect("stats");
    assert_eq!(stats_after, stats_before);
    let after = b.ledger.counters().read(project, now).await.expect("counters");
    assert_eq!((&after.day, &after.month, &after.minute), (&before.day, &before.month, &before.minute));

    // A single lost window (evicted while the marker stayed) is noticed and rebuilt too.
    let month_key = b.ledger.counters().keys(project, &Windows::at(now))[2].clone();
    let _: i64 = b.redis.pool().del(month_key).await.expect("delete the month's counters");
    a.ledger.ensure_counters(project).await.expect("rebuild");
    let rebuilt = a.ledger.counters().read(project, now).await.expect("counters");
    assert_eq!(rebuilt.month, before.month);

    // The budget still holds: 10,000 tokens a day minus what is counted leaves this much room.
    let used = after.day.get("t:p").copied().unwrap_or_default();
    let room = 10_000 - used;
    flush(&b, project).await;
    let too_much = a.ledger.reserve(&reservation(project, ann, "gpt-4o", room + 1, 0, 60)).await;
    assert!(matches!(too_much, Err(UsageError::QuotaExceeded { .. })), "{too_much:?}");
    a.ledger.reserve(&reservation(project, ann, "gpt-4o", room, 0, 60)).await.expect("exactly the room left");
}

#[tokio::test]
async fn reservations_expire_release_and_settle() {
    let (db, a, b) = setup().await;
    model(&a.ledger, "gpt-4o", price("2.50", "10", "1.25")).await;
    let (project, other_project, user) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    a.ledger
        .set_quota(project, QuotaSubject::User(user), &tokens_per_day(1_000), &Actor::default())
        .await
        .expect("quota");

    // Expiry gives the room back.
    a.ledger.reserve(&reservation(project, user, "gpt-4o", 600, 400, 1)).await.expect("reserve all");
    let refused = b.ledger.reserve(&reservation(project, user, "gpt-4o", 1, 0, 60)).await;
    assert!(
        matches!(refused, Err(UsageError::QuotaExceeded { ref limit, .. }) if limit.starts_with("user ")),
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let held = b.ledger.reserve(&reservation(project, user, "gpt-4o", 600, 400, 60)).await.expect("room came back");

    // Release gives it back once; a second release, or another project's, changes nothing.
    let other = a.ledger.release(other_project, held.reservation.id, &maker(user)).await;
    assert!(matches!(other, Err(UsageError::NotFound { what: "reservation", .. })), "{other:?}");
    let stranger = a.ledger.release(project, held.reservation.id, &maker(Uuid::new_v4())).await;
    assert!(matches!(stranger, Err(UsageError::Forbidden(_))), "{stranger:?}");
    a.ledger.release(project, held.reservation.id, &maker(user)).await.expect("release");
    let twice = a.ledger.release(project, held.reservation.id, &maker(user)).await;
    assert!(matches!(twice, Err(UsageError::NotFound { what: "reservation", .. })), "{twice:?}");

    // Settling replaces the estimate with the actual usage.
    let held = a.ledger.reserve(&reservation(project, user, "gpt-4o", 600, 300, 60)).await.expect("reserve");
    assert_eq!(
        a.ledger.counters().read(project, Utc::now()).await.expect("counters").day.get(&format!("t:u:{user}")),
        Some(&900)
    );
    let mut call = Call::new(project, user, "settles", "gpt-4o");
    call.reservation = Some(held.reservation.id);
    a.ledger.record(call.usage().expect("valid")).await.expect("settle");
    assert_eq!(
        a.ledger.counters().read(project, Utc::now()).await.expect("counters").day.get(&format!("t:u:{user}")),
        Some(&150)
    );

    // Soft limits warn.
    let soft = QuotaLimits::validate(1_000, "", 0, 0, 80).expect("limits");
    a.ledger.set_quota(project, QuotaSubject::User(user), &soft, &Actor::default()).await.expect("quota");
    // (On the replica that changed the quota: the others see it when the broadcast arrives.)
    let warned = a.ledger.reserve(&reservation(project, user, "gpt-4o", 700, 0, 60)).await.expect("reserve");
    assert_eq!(warned.warnings, vec![format!("user {user} tokens_per_day at 85%")]);

    // Usage that happened counts even above the limit.
    let mut big = Call::new(project, user, "big", "gpt-4o");
    (big.input, big.output) = (5_000, 0);
    a.ledger.record(big.usage().expect("valid")).await.expect("record above the limit");
    assert_eq!(
        a.ledger.counters().read(project, Utc::now()).await.expect("counters").day.get(&format!("t:u:{user}")),
        Some(&5_850)
    );

    // An expired or settled reservation cannot be settled: nothing written.
    let records = count(&db.pool, "model_usage_logs").await;
    // (Another user: this one is over its limit now, so even an empty reservation is refused.)
    let other = Uuid::new_v4();
    let short = a.ledger.reserve(&reservation(project, other, "gpt-4o", 0, 0, 1)).await.expect("reserve");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for (id, maker, reservation_id) in
        [("late-settle", other, short.reservation.id), ("double-settle", user, held.reservation.id)]
    {
        let mut call = Call::new(project, maker, id, "gpt-4o");
        call.reservation = Some(reservation_id);
        let result = a.ledger.record(call.usage().expect("valid")).await;
        assert!(matches!(result, Err(UsageError::NotFound { what: "reservation", .. })), "{result:?}");
    }
    assert_eq!(count(&db.pool, "model_usage_logs").await, records);
}

#[tokio::test]
async fn bad_input_writes_nothing() {
    let (db, a, _b) = setup().await;
    let gpt = model(&a.ledger, "gpt-4o", price("2.50", "10", "1.25")).await;
    let old = model(&a.ledger, "gpt-3", price("1", "1", "1")).await;
    let patch = ModelPatch { status: Some(ModelStatus::Retired), ..ModelPatch::default() };
    a.ledger.catalog().update_model(old, &patch, &Actor::default(), "model.retired").await.expect("retire");
    let unpriced = NewModel {
        provider: "acme".into(),
        name: "free-lunch".into(),
        version: String::new(),
        model_type: "chat",
        display_name: String::new(),
        description: String::new(),
        capabilities: vec![],
        status: ModelStatus::Active,
        max_tokens: 0,
        context_window: 0,
        match_pattern: String::new(),
    };
    a.ledger.catalog().create_model(&unpriced, None, &Actor::default()).await.expect("model without price");
    let (project, other, user) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let others = a.ledger.reserve(&reservation(other, user, "gpt-4o", 10, 10, 60)).await.expect("reserve");
    let outbox_before = count(&db.pool, "outbox_events").await;

    expect(a.ledger.record(Call::new(project, user, "x1", "llama-9").usage().expect("valid")).await, |e| {
        matches!(e, UsageError::ModelNotFound { field: "model", .. })
    });
    expect(a.ledger.record(Call::new(project, user, "x2", "gpt-3").usage().expect("valid")).await, |e| {
        matches!(e, UsageError::ModelRetired(_))
    });
    expect(a.ledger.record(Call::new(project, user, "x3", "free-lunch").usage().expect("valid")).await, |e| {
        matches!(e, UsageError::NoPrice(_))
    });
    let mut foreign = Call::new(project, user, "x4", "gpt-4o");
    foreign.reservation = Some(others.reservation.id);
    expect(a.ledger.record(foreign.usage().expect("valid")).await, |e| {
        matches!(e, UsageError::NotFound { what: "reservation", .. })
    });
    let mut unknown = Call::new(project, user, "x5", &gpt.to_string()).usage().expect("valid");
    unknown.reservation_id = Some(Uuid::new_v4());
    expect(a.ledger.record(unknown).await, |e| matches!(e, UsageError::NotFound { what: "reservation", .. }));
    expect(a.ledger.reserve(&reservation(project, user, "free-lunch", 1, 1, 60)).await, |e| {
        matches!(e, UsageError::NoPrice(_))
    });
    let mut negative = Call::new(project, user, "x6", "gpt-4o");
    negative.output = -1;
    expect(negative.usage(), |e| matches!(e, UsageError::Invalid { field: "output_tokens", .. }));
    let mut cached = Call::new(project, user, "x7", "gpt-4o");
    cached.cached = 101;
    expect(cached.usage(), |e| matches!(e, UsageError::Invalid { field: "cached_input_tokens", .. }));

    assert_eq!(count(&db.pool, "model_usage_logs").await, 0);
    assert_eq!(count(&db.pool, "usage_requests").await, 0);
    assert_eq!(count(&db.pool, "outbox_events").await, outbox_before);
    let reservations: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_reservations WHERE project_id = $1")
        .bind(project)
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(reservations, 0);
    let open: String = sqlx::query_scalar("SELECT state FROM quota_reservations WHERE id = $1")
        .bind(others.reservation.id)
        .fetch_one(&db.pool)
        .await
        .expect("state");
    assert_eq!(open, "open", "another project's reservation is untouched");
}

#[tokio::test]
async fn late_records_land_in_their_month_and_list_newest_first() {
    let (db, a, _b) = setup().await;
    let gpt = model(&a.ledger, "gpt-4o", price("2.50", "10", "1.25")).await;
    let (project, user, other_user) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // The price must be in force at the request time: backdate one.
    let long_ago = Utc::now() - chrono::Duration::days(40);
    a.ledger.catalog().set_price(gpt, &price("1", "1", "1"), long_ago, &Actor::default()).await.expect("old price");

    let now = Utc::now();
    for (i, days) in [34, 3, 0].into_iter().enumerate() {
        let id = format!("late-{i}");
        let mut call = Call::new(project, if i == 1 { other_user } else { user }, &id, "gpt-4o");
        call.at = Some(now - chrono::Duration::days(days));
        a.ledger.record(call.usage().expect("valid")).await.expect("record");
    }
    let in_default: i64 =
        sqlx::query_scalar("SELECT count(*) FROM model_usage_logs_default").fetch_one(&db.pool).await.expect("count");
    assert_eq!(in_default, 0, "every month of the last 35 days has its partition");

    let first = a.ledger.store().list_usage(project, &UsageFilter::default(), &Page::first(2)).await.expect("list");
    assert_eq!(first.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(), ["late-2", "late-1", "late-0"]);
    let next = Page::starting_after(Some(Cursor { time: first[1].request_time, id: first[1].id }), 2);
    let rest = a.ledger.store().list_usage(project, &UsageFilter::default(), &next).await.expect("list");
    assert_eq!(rest.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(), ["late-0"]);
    let filter = UsageFilter { user_id: Some(other_user), ..UsageFilter::default() };
    let only = a.ledger.store().list_usage(project, &filter, &Page::first(10)).await.expect("list");
    assert_eq!(only.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_records_share_transactions_and_each_gets_its_own_answer() {
    let (db, a, b) = setup().await;
    model(&a.ledger, "gpt-4o", price("2.50", "10", "1.25")).await;
    let (project, user) = (Uuid::new_v4(), Uuid::new_v4());
    let mut open = Vec::new();
    for _ in 0..20 {
        open.push(a.ledger.reserve(&reservation(project, user, "gpt-4o", 1000, 1000, 600)).await.expect("reserve"));
    }

    // 400 records at once over two replicas: most plain, some settling a reservation, some
    // refused alone (no price in force two hours ago; a reservation that does not exist), and
    // each request id twice.
    let ids: Vec<String> = (0..200).map(|i| format!("batch-{i}")).collect();
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate().flat_map(|(i, id)| [(i, id), (i, id)]) {
        let mut call = Call::new(project, user, id, "gpt-4o");
        call.input = 100 + i as i64;
        match i % 10 {
            3 => call.at = Some(Utc::now() - chrono::Duration::hours(2)),
            5 => call.reservation = Some(Uuid::now_v7()),
            7 => call.reservation = Some(open[i / 10].reservation.id),
            _ => {}
        }
        let ledger = if tasks.len() % 2 == 0 { a.ledger.clone() } else { b.ledger.clone() };
        let usage = call.usage().expect("valid");
        tasks.push(tokio::spawn(async move { (i, ledger.record(usage).await) }));
    }
    let mut recorded = std::collections::HashMap::new();
    for task in tasks {
        let (i, answer) = task.await.expect("task");
        match (i % 10, answer) {
            (3, Err(error)) => assert!(matches!(error, UsageError::NoPrice(_)), "{error:?}"),
            (5, Err(error)) => assert!(matches!(error, UsageError::NotFound { what: "reservation", .. }), "{error:?}"),
            (_, Ok(row)) => {
                assert_eq!(row.input_tokens, 100 + i as i64);
                let first = recorded.entry(i).or_insert_with(|| row.clone());
                assert_eq!(*first, row, "both copies of a request get the one record");
            }
            (kind, answer) => panic!("record {i} (kind {kind}) answered {answer:?}"),
        }
    }
    assert_eq!(recorded.len(), 160);
    assert_eq!(count(&db.pool, "model_usage_logs").await, 160);
    assert_eq!(count(&db.pool, "usage_requests").await, 160, "refused records leave no claim");
    assert_eq!(count(&db.pool, "outbox_events WHERE topic = 'usage'").await, 160);
    let settled: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_reservations WHERE state = 'settled'")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(settled, 20);

    // The counters hold exactly what PostgreSQL says, and a refused request id may try again.
    let now = Utc::now();
    let counters = a.ledger.counters().read(project, now).await.expect("counters");
    let expected = a.ledger.expected_counters(project, now).await.expect("expected");
    assert_eq!((&counters.day, &counters.month), (&expected.day, &expected.month));
    assert_eq!(counters.day.get("s:r:p"), Some(&160));
    let retry = Call::new(project, user, "batch-3", "gpt-4o");
    b.ledger.record(retry.usage().expect("valid")).await.expect("a refused request id records later");
}
