//! The transactional outbox against the real PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aimesh_kit::data::outbox::{
    self, Delivery, OutboxEvent, OutboxRelay, OutboxSink, Rejection, RelayError, RelaySettings, Replay, SinkError,
};
use aimesh_kit::testing::TestDatabase;
use futures::future::BoxFuture;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Records what it is given; fails while `failing` is set; refuses for good the events whose
/// payload `n` is in `refusing` (and records them apart); takes `delay` per batch. Several sinks
/// may share `in_flight` to catch one event being delivered twice at the same time.
#[derive(Default)]
struct RecordingSink {
    delivered: Mutex<Vec<OutboxEvent>>,
    refused: Mutex<Vec<OutboxEvent>>,
    refusing: Mutex<HashSet<u64>>,
    batches: Mutex<Vec<usize>>,
    failing: AtomicBool,
    delay: Duration,
    in_flight: Arc<Mutex<HashSet<Uuid>>>,
    overlaps: Arc<Mutex<Vec<Uuid>>>,
    batches_in_flight: AtomicUsize,
    most_batches_in_flight: AtomicUsize,
}

impl RecordingSink {
    fn delivered(&self) -> Vec<OutboxEvent> {
        self.delivered.lock().expect("lock").clone()
    }
}

impl OutboxSink for RecordingSink {
    fn deliver<'a>(&'a self, events: &'a [OutboxEvent]) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            {
                let mut in_flight = self.in_flight.lock().expect("lock");
                for event in events {
                    if !in_flight.insert(event.event_id) {
                        self.overlaps.lock().expect("lock").push(event.event_id);
                    }
                }
            }
            let batches = self.batches_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_batches_in_flight.fetch_max(batches, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.batches_in_flight.fetch_sub(1, Ordering::SeqCst);
            {
                let mut in_flight = self.in_flight.lock().expect("lock");
                for event in events {
                    in_flight.remove(&event.event_id);
                }
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(SinkError::new("analytics unavailable"));
            }
            let refusing = self.refusing.lock().expect("lock").clone();
            let (refused, taken): (Vec<OutboxEvent>, Vec<OutboxEvent>) =
                events.iter().cloned().partition(|e| e.payload["n"].as_u64().is_some_and(|n| refusing.contains(&n)));
            let rejected = refused
                .iter()
                .map(|e| Rejection {
                    event_id: e.event_id,
                    reason: format!("payload.n: {} is refused", e.payload["n"]),
                })
                .collect();
            self.refused.lock().expect("lock").extend(refused);
            self.delivered.lock().expect("lock").extend(taken);
            self.batches.lock().expect("lock").push(events.len());
            Ok(Delivery { rejected })
        })
    }
}

fn settings(batch_size: u32) -> RelaySettings {
    RelaySettings {
        batch_size,
        workers: 1,
        poll_interval: Duration::from_millis(50),
        initial_backoff: Duration::from_millis(300),
        max_backoff: Duration::from_millis(600),
        delivery_timeout: Duration::from_secs(10),
        retention: Duration::from_secs(3600),
    }
}

fn event(n: u32) -> OutboxEvent {
    let project = n.is_multiple_of(2).then(Uuid::new_v4);
    let payload = json!({"n": n, "actor": {"ip": "10.0.0.1", "tags": ["a", "b"]}, "ratio": 0.25, "note": null});
    OutboxEvent::new("audit", "api_key.revoked", project, payload)
}

async fn write(pool: &PgPool, events: &[OutboxEvent]) {
    let mut tx = pool.begin().await.expect("begin");
    for event in events {
        outbox::enqueue(&mut tx, event).await.expect("enqueue");
    }
    tx.commit().await.expect("commit");
}

async fn pending(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE delivered_at IS NULL")
        .fetch_one(pool)
        .await
        .expect("count")
}

#[tokio::test]
async fn events_of_a_rolled_back_transaction_are_never_delivered() {
    let db = TestDatabase::new(&outbox::migrator()).await;
    let sink = Arc::new(RecordingSink::default());
    let relay = OutboxRelay::new(db.pool.clone(), sink.clone(), settings(10));

    let mut tx = db.pool.begin().await.expect("begin");
    outbox::enqueue(&mut tx, &event(1)).await.expect("enqueue");
    tx.rollback().await.expect("rollback");
    let committed = event(2);
    write(&db.pool, std::slice::from_ref(&committed)).await;

    assert_eq!(relay.relay_once().await.expect("relay"), 1);
    assert_eq!(relay.relay_once().await.expect("relay"), 0);
    assert_eq!(sink.delivered(), vec![committed]);
    assert_eq!(pending(&db.pool).await, 0, "delivered rows are marked and not sent again");
}

#[tokio::test]
async fn committed_events_are_delivered_as_written_in_order() {
    let db = TestDatabase::new(&outbox::migrator()).await;
    let sink = Arc::new(RecordingSink::default());
    let relay = OutboxRelay::new(db.pool.clone(), sink.clone(), settings(2));
    let written: Vec<OutboxEvent> = (0..5).map(event).collect();
    write(&db.pool, &written[..3]).await;
    write(&db.pool, &written[3..]).await;

    let mut delivered_per_pass = Vec::new();
    for _ in 0..4 {
        delivered_per_pass.push(relay.relay_once().await.expect("relay"));
    }
    assert_eq!(delivered_per_pass, vec![2, 2, 1, 0]);
    assert_eq!(sink.delivered(), written);
}

#[tokio::test]
async fn failed_deliveries_back_off_then_succeed() {
    let db = TestDatabase::new(&outbox::migrator()).await;
    let sink = Arc::new(RecordingSink::default());
    sink.failing.store(true, Ordering::SeqCst);
    let relay = OutboxRelay::new(db.pool.clone(), sink.clone(), settings(10));
    let written: Vec<OutboxEvent> = (0..3).map(event).collect();
    write(&db.pool, &written).await;

    assert!(matches!(relay.relay_once().await, Err(RelayError::Sink(_))));
    let (attempts, not_due, within_cap, last_error): (i32, bool, bool, Option<String>) = sqlx::query_as(
        "SELECT max(attempts), bool_and(next_attempt_at > now()), \
                bool_and(next_attempt_at <= now() + interval '600 milliseconds'), max(last_error) \
         FROM outbox_events",
    )
    .fetch_one(&db.pool)
    .await
    .expect("read back");
    assert_eq!(attempts, 1);
    assert!(not_due, "failed events wait for their backoff");
    assert!(within_cap, "the backoff is capped");
    assert_eq!(last_error.as_deref(), Some("analytics unavailable"));
    assert_eq!(pending(&db.pool).await, 3, "nothing is lost");
    assert_eq!(relay.relay_once().await.expect("relay"), 0, "not due yet");

    // A second failure doubles the delay, still within max_backoff.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(matches!(relay.relay_once().await, Err(RelayError::Sink(_))));
    let (attempts, min_delay_ms): (i32, f64) = sqlx::query_as(
        "SELECT max(attempts), min(EXTRACT(EPOCH FROM next_attempt_at - now()) * 1000)::float8 FROM outbox_events",
    )
    .fetch_one(&db.pool)
    .await
    .expect("read back");
    assert_eq!(attempts, 2);
    assert!(min_delay_ms > 300.0, "second delay {min_delay_ms} ms should exceed the first");

    sink.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(650)).await;
    assert_eq!(relay.relay_once().await.expect("relay"), 3);
    assert_eq!(sink.delivered(), written);
    assert_eq!(pending(&db.pool).await, 0);
}

#[tokio::test]
async fn concurrent_relays_deliver_each_event_once() {
    let db = TestDatabase::new(&outbox::migrator()).await;
    let written: Vec<OutboxEvent> = (0..200).map(event).collect();
    write(&db.pool, &written).await;

    let in_flight = Arc::new(Mutex::new(HashSet::new()));
    let overlaps = Arc::new(Mutex::new(Vec::new()));
    let sinks: Vec<Arc<RecordingSink>> = (0..2)
        .map(|_| {
            Arc::new(RecordingSink {
                delay: Duration::from_millis(20),
                in_flight: Arc::clone(&in_flight),
                overlaps: Arc::clone(&overlaps),
                ..RecordingSink::default()
            })
        })
        .collect();
    let relays: Vec<_> = sinks
        .iter()
        .map(|sink| {
            let relay = OutboxRelay::new(db.pool.clone(), sink.clone(), settings(10));
            tokio::spawn(async move { while relay.relay_once().await.expect("relay") > 0 {} })
        })
        .collect();
    for relay in relays {
        relay.await.expect("relay task");
    }

    let mut per_event: HashMap<Uuid, usize> = HashMap::new();
    for sink in &sinks {
        for event in sink.delivered() {
            *per_event.entry(event.event_id).or_default() += 1;
        }
    }
    assert_eq!(per_event.len(), written.len(), "every event delivered");
    assert!(per_event.values().all(|count| *count == 1), "no event delivered twice");
    assert!(overlaps.lock().expect("lock").is_empty(), "no event in two batches at once");
    assert!(sinks.iter().all(|sink| !sink.delivered().is_empty()), "both relays took part");
    assert_eq!(pending(&db.pool).await, 0);
}

#[tokio::test]
async fn a_relay_with_several_workers_delivers_batches_side_by_side_each_event_once() {
    let db = TestDatabase::new(&outbox::migrator()).await;
    let written: Vec<OutboxEvent> = (0..200).map(event).collect();
    write(&db.pool, &written).await;
    let sink = Arc::new(RecordingSink { delay: Duration::from_millis(50), ..RecordingSink::default() });
    let relay = OutboxRelay::new(db.pool.clone(), sink.clone(), RelaySettings { workers: 4, ..settings(10) });
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sink.delivered().len() < written.len() {
        assert!(tokio::time::Instant::now() < deadline, "the workers should deliver everything");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running).await.expect("run returns").expect("run task");

    let mut per_event: HashMap<Uuid, usize> = HashMap::new();
    for event in sink.delivered() {
        *per_event.entry(event.event_id).or_default() += 1;
    }
    assert_eq!(per_event.len(), written.len(), "every event delivered");
    assert!(per_event.values().all(|count| *count == 1), "no event delivered twice");
    assert!(sink.overlaps.lock().expect("lock").is_empty(), "no event in two batches at once");
    assert!(sink.most_batches_in_flight.load(Ordering::SeqCst) >= 2, "batches went out side by side");
    assert_eq!(pending(&db.pool).await, 0);
}

#[tokio::test]
async fn run_relays_continuously_and_drains_on_shutdown() {
    let db = TestDatabase::new(&outbox::migrator()).await;
    let sink = Arc::new(RecordingSink::default());
    let relay_settings = RelaySettings { poll_interval: Duration::from_millis(100), ..settings(2) };
    let relay = OutboxRelay::new(db.pool.clone(), sink.clone(), relay_settings);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));

    // While running: polled within a few intervals, full batches back to back.
    let first: Vec<OutboxEvent> = (0..5).map(event).collect();
    write(&db.pool, &first).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while sink.delivered().len() < first.len() {
        assert!(tokio::time::Instant::now() < deadline, "the running relay should deliver");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Written just before shutdown, after the relay went to sleep for its poll interval.
    let last: Vec<OutboxEvent> = (5..10).map(event).collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    write(&db.pool, &last).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running).await.expect("run returns").expect("run task");

    assert_eq!(sink.delivered(), [first, last].concat());
    assert_eq!(pending(&db.pool).await, 0);
}

#[tokio::test]
async fn shutdown_drains_pending_events() {
    let db = TestDatabase::new(&outbox::migrator()).await;
    let sink = Arc::new(RecordingSink::default());
    // A poll interval so long that only the shutdown drain can deliver what is written below.
    let relay_settings = RelaySettings { poll_interval: Duration::from_secs(3600), ..settings(2) };
    let relay = OutboxRelay::new(db.pool.clone(), sink.clone(), relay_settings);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sink.delivered().is_empty());

    let written: Vec<OutboxEvent> = (0..5).map(event).collect();
    write(&db.pool, &written).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running).await.expect("run returns").expect("run task");

    assert_eq!(sink.delivered(), written);
    assert_eq!(pending(&db.pool).await, 0);
}

#[tokio::test]
async fn delivered_rows_are_pruned_after_the_retention_only() {
    let db = TestDatabase::new(&outbox::migrator()).await;
    let sink = Arc::new(RecordingSink::default());
    let relay = OutboxRelay::new(db.pool.clone(), sink.clone(), settings(10));
    write(&db.pool, &(0..3).map(event).collect::<Vec<_>>()).await;
    assert_eq!(relay.relay_once().await.expect("relay"), 3);
    write(&db.pool, &[event(3)]).await;
    let rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_events").fetch_one(&db.pool).await.expect("count")
    };

    assert_eq!(relay.prune().await.expect("prune"), 0, "delivered within the retention: kept");
    assert_eq!(rows().await, 4);
    sqlx::query(
        "UPDATE outbox_events SET delivered_at = delivered_at - interval '2 hours' WHERE delivered_at IS NOT NULL",
    )
    .execute(&db.pool)
    .await
    .expect("age the delivered rows");
    assert_eq!(relay.prune().await.expect("prune"), 3);
    assert_eq!(rows().await, 1, "the undelivered event stays");
    assert_eq!(pending(&db.pool).await, 1);
}

/// The value of `name`'s sample for `database` (and `topic`, when given) in this process's
/// metrics; 0 when there is none.
fn metric(name: &str, database: &str, topic: Option<&str>) -> f64 {
    let handle = aimesh_kit::telemetry::metrics_handle().expect("the metrics recorder");
    let (database, topic) = (format!("database=\"{database}\""), topic.map(|t| format!("topic=\"{t}\"")));
    handle
        .render()
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(&database))
        .filter(|line| topic.as_ref().is_none_or(|topic| line.contains(topic)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn database_name(pool: &PgPool) -> String {
    pool.connect_options().get_database().expect("a database name").to_owned()
}

async fn dead_letter_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox_dead_letters").fetch_one(pool).await.expect("count")
}

#[tokio::test]
async fn events_refused_for_good_become_dead_letters_and_the_others_are_delivered() {
    // Before anything is counted: counts made without a recorder are lost.
    aimesh_kit::telemetry::metrics_handle().expect("the metrics recorder");
    let db = TestDatabase::new(&outbox::migrator()).await;
    let database = database_name(&db.pool);
    let sink = Arc::new(RecordingSink::default());
    sink.refusing.lock().expect("lock").extend([1, 3]);
    let relay = OutboxRelay::new(db.pool.clone(), sink.clone(), settings(10));
    let written: Vec<OutboxEvent> = (0..5).map(event).collect();
    write(&db.pool, &written).await;
    // One earlier failed attempt, so the dead letter counts both.
    sink.failing.store(true, Ordering::SeqCst);
    assert!(matches!(relay.relay_once().await, Err(RelayError::Sink(_))));
    sink.failing.store(false, Ordering::SeqCst);
    sqlx::query("UPDATE outbox_events SET next_attempt_at = now()").execute(&db.pool).await.expect("make due");

    assert_eq!(relay.relay_once().await.expect("relay"), 5, "the whole batch left the outbox");
    assert_eq!(relay.relay_once().await.expect("relay"), 0, "dead letters are not retried");
    let delivered_ns: Vec<u64> = sink.delivered().iter().filter_map(|e| e.payload["n"].as_u64()).collect();
    assert_eq!(delivered_ns, vec![0, 2, 4]);

    let (page, next) =
        outbox::list_dead_letters(&db.pool, &outbox::dead_letter_page(None, None).expect("page")).await.expect("list");
    assert!(next.is_none());
    assert_eq!(page.len(), 2);
    for (dead, original) in page.iter().zip([&written[1], &written[3]]) {
        let kept = OutboxEvent {
            event_id: dead.event_id,
            topic: dead.topic.clone(),
            event_type: dead.event_type.clone(),
            project_id: dead.project_id,
            occurred_at: dead.occurred_at,
            payload: dead.payload.clone(),
            traceparent: dead.traceparent.clone(),
        };
        assert_eq!(&kept, original, "a dead letter keeps the event as written");
        assert_eq!(dead.attempts, 2);
        assert_eq!(dead.reason, format!("payload.n: {} is refused", original.payload["n"]));
    }
    let in_outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE event_id = ANY($1)")
        .bind(vec![written[1].event_id, written[3].event_id])
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(in_outbox, 0, "moved, not copied");
    assert_eq!(pending(&db.pool).await, 0);

    assert_eq!(metric("outbox_dead_lettered_total", &database, Some("audit")), 2.0);
    assert_eq!(metric("outbox_delivered_total", &database, Some("audit")), 3.0);
    relay.publish_gauges().await.expect("measure");
    assert_eq!(metric("outbox_dead_letters", &database, None), 2.0);
    assert_eq!(metric("outbox_pending", &database, None), 0.0);
    assert_eq!(metric("outbox_oldest_pending_age_seconds", &database, None), 0.0, "nothing pending");
}

#[tokio::test]
async fn dead_letters_are_listed_page_by_page_and_replayed_once_then_delivered() {
    let db = TestDatabase::new(&outbox::migrator()).await;
    let sink = Arc::new(RecordingSink::default());
    sink.refusing.lock().expect("lock").extend([0, 1, 2]);
    let relay = OutboxRelay::new(db.pool.clone(), sink.clone(), settings(10));
    let written: Vec<OutboxEvent> = (0..4).map(event).collect();
    write(&db.pool, &written).await;
    assert_eq!(relay.relay_once().await.expect("relay"), 4);

    // Keyset pages of two, in the order the events were written.
    let first = outbox::dead_letter_page(None, Some(2)).expect("page");
    let (page, next) = outbox::list_dead_letters(&db.pool, &first).await.expect("list");
    let next = next.expect("a second page");
    let (rest, last) = outbox::list_dead_letters(&db.pool, &next).await.expect("list");
    assert!(last.is_none());
    let listed: Vec<Uuid> = page.iter().chain(&rest).map(|d| d.event_id).collect();
    assert_eq!(listed, written[..3].iter().map(|e| e.event_id).collect::<Vec<_>>());

    // The cause is fixed: the sink takes them now.
    sink.refusing.lock().expect("lock").clear();
    let one = Replay::Events(vec![written[1].event_id, Uuid::new_v4()]);
    assert_eq!(outbox::replay_dead_letters(&db.pool, &one).await.expect("replay"), vec![written[1].event_id]);
    assert!(outbox::replay_dead_letters(&db.pool, &one).await.expect("replay again").is_empty(), "idempotent");
    let (attempts, last_error): (i32, Option<String>) =
        sqlx::query_as("SELECT attempts, last_error FROM outbox_events WHERE event_id = $1")
            .bind(written[1].event_id)
            .fetch_one(&db.pool)
            .await
            .expect("the replayed event");
    assert_eq!((attempts, last_error), (0, None));
    assert_eq!((pending(&db.pool).await, dead_letter_count(&db.pool).await), (1, 2));

    let everything = outbox::replay_dead_letters(&db.pool, &Replay::All).await.expect("replay all");
    assert_eq!(everything, vec![written[0].event_id, written[2].event_id]);
    assert!(outbox::replay_dead_letters(&db.pool, &Replay::All).await.expect("again").is_empty());
    assert_eq!((pending(&db.pool).await, dead_letter_count(&db.pool).await), (3, 0));

    assert_eq!(relay.relay_once().await.expect("relay"), 3);
    let delivered: HashSet<Uuid> = sink.delivered().iter().map(|e| e.event_id).collect();
    assert!(written.iter().all(|e| delivered.contains(&e.event_id)), "every event reached the sink in the end");
    assert_eq!(pending(&db.pool).await, 0);
}

#[test]
fn bad_pages_and_replays_are_refused_naming_the_field() {
    let field = |error: aimesh_kit::ServiceError| error.field;
    assert_eq!(field(outbox::dead_letter_page(None, Some(0)).expect_err("empty page")).as_deref(), Some("limit"));
    let too_many = Some(outbox::MAX_DEAD_LETTER_PAGE + 1);
    assert_eq!(field(outbox::dead_letter_page(None, too_many).expect_err("too large")).as_deref(), Some("limit"));
    assert_eq!(field(outbox::dead_letter_page(Some(-1), None).expect_err("negative")).as_deref(), Some("after"));
    assert_eq!(outbox::dead_letter_page(None, None).expect("default").limit(), outbox::DEFAULT_DEAD_LETTER_PAGE);
    let none = Replay::Events(Vec::new()).validate().expect_err("no event named");
    assert_eq!(none.field.as_deref(), Some("event_id"));
    let many = Replay::Events(vec![Uuid::nil(); outbox::MAX_REPLAY_EVENT_IDS + 1]).validate().expect_err("too many");
    assert_eq!(many.field.as_deref(), Some("event_id"));
}

#[tokio::test]
async fn the_age_of_the_oldest_pending_event_is_measured_while_the_sink_fails() {
    let db = TestDatabase::new(&outbox::migrator()).await;
    let database = database_name(&db.pool);
    let sink = Arc::new(RecordingSink::default());
    sink.failing.store(true, Ordering::SeqCst);
    write(&db.pool, &(0..3).map(event).collect::<Vec<_>>()).await;
    // Entered the outbox an hour ago; occurred_at (when the change happened) does not count.
    sqlx::query("UPDATE outbox_events SET created_at = now() - interval '1 hour', occurred_at = now()")
        .execute(&db.pool)
        .await
        .expect("backdate");
    let relay = OutboxRelay::new(db.pool.clone(), sink.clone(), settings(10));
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));

    // A relay whose every delivery fails still publishes what is waiting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while metric("outbox_pending", &database, None) != 3.0 {
        assert!(tokio::time::Instant::now() < deadline, "the gauges should be published while deliveries fail");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let age = metric("outbox_oldest_pending_age_seconds", &database, None);
    assert!((3600.0..3700.0).contains(&age), "oldest pending age {age}");
    assert_eq!(metric("outbox_dead_letters", &database, None), 0.0);
    sink.failing.store(false, Ordering::SeqCst);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running).await.expect("run returns").expect("run task");
}
