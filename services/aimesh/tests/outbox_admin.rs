//! `aimesh outbox`: listing and replaying the dead letters of the services' outboxes, through
//! the functions the command runs and through the binary, against the real PostgreSQL.

use std::process::Command;
use std::sync::Arc;

use aimesh::outbox_admin;
use aimesh::{MeshConfig, SERVICES_WITH_DATABASE, ServiceName, connect_service_database};
use aimesh_kit::data::outbox::{self, Delivery, OutboxEvent, OutboxRelay, OutboxSink, Rejection, Replay, SinkError};
use aimesh_kit::testing::{self, ScratchDatabase};
use futures::future::BoxFuture;
use serde_json::Value;
use uuid::Uuid;

/// Refuses every event for good.
struct RefusingSink;

impl OutboxSink for RefusingSink {
    fn deliver<'a>(&'a self, events: &'a [OutboxEvent]) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        let rejected =
            events.iter().map(|e| Rejection { event_id: e.event_id, reason: "payload: malformed".into() }).collect();
        Box::pin(async move { Ok(Delivery { rejected }) })
    }
}

/// A configuration whose every service database is a scratch one of this test.
fn config() -> (MeshConfig, Vec<ScratchDatabase>) {
    let mut config = MeshConfig::default();
    config.common.postgres_url = testing::postgres_url();
    config.common.database.max_connections = 2;
    config.common.database.min_connections = 0;
    let databases: Vec<ScratchDatabase> = SERVICES_WITH_DATABASE.iter().map(|_| ScratchDatabase::new()).collect();
    for (service, database) in SERVICES_WITH_DATABASE.iter().zip(&databases) {
        let url = Some(database.url.clone());
        match service {
            ServiceName::Identity => config.identity.database.url = url,
            ServiceName::Chat => config.chat.database.url = url,
            ServiceName::Usage => config.usage.database.url = url,
            ServiceName::Files => config.files.database.url = url,
            ServiceName::Analytics | ServiceName::Gateway => unreachable!("no database"),
        }
    }
    (config, databases)
}

/// Writes `count` events to `service`'s outbox and has a relay whose sink refuses them all
/// settle them: they become dead letters. Returns their ids in order.
async fn dead_letters(config: &MeshConfig, service: ServiceName, count: usize) -> Vec<Uuid> {
    let pool = connect_service_database(service, config).await.expect("connect").expect("a database");
    let events: Vec<OutboxEvent> =
        (0..count).map(|n| OutboxEvent::new("audit", "thing.happened", None, serde_json::json!({ "n": n }))).collect();
    let mut tx = pool.begin().await.expect("begin");
    for event in &events {
        outbox::enqueue(&mut tx, event).await.expect("enqueue");
    }
    tx.commit().await.expect("commit");
    let relay = OutboxRelay::new(pool.clone(), Arc::new(RefusingSink), outbox::RelaySettings::default());
    assert_eq!(relay.relay_once().await.expect("relay"), count);
    pool.close().await;
    events.iter().map(|e| e.event_id).collect()
}

/// The JSON objects of `output`, one per line.
fn lines(output: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line: {line:?}: {e}")))
        .collect()
}

fn event_ids(lines: &[Value]) -> Vec<String> {
    lines.iter().map(|line| line["event_id"].as_str().expect("an event id").to_owned()).collect()
}

fn strings(ids: &[Uuid]) -> Vec<String> {
    ids.iter().map(Uuid::to_string).collect()
}

#[tokio::test]
async fn dead_letters_are_listed_per_service_page_by_page_and_replayed_once() {
    let (config, _databases) = config();
    let identity = dead_letters(&config, ServiceName::Identity, 2).await;
    let chat = dead_letters(&config, ServiceName::Chat, 1).await;

    // Every service, one per page: identity has a second page.
    let mut out = Vec::new();
    let more =
        outbox_admin::list_dead_letters(&config, &SERVICES_WITH_DATABASE, None, Some(1), &mut out).await.expect("list");
    let listed = lines(&out);
    let services: Vec<&str> = listed.iter().map(|line| line["service"].as_str().expect("a service")).collect();
    assert_eq!(services, ["identity", "chat"]);
    assert_eq!(event_ids(&listed), [identity[0].to_string(), chat[0].to_string()]);
    assert_eq!(listed[0]["reason"], "payload: malformed");
    assert_eq!(listed[0]["attempts"], 1);
    assert_eq!(listed[0]["payload"], serde_json::json!({ "n": 0 }));
    let after = listed[0]["id"].as_i64().expect("an id");
    assert_eq!(more, vec![(ServiceName::Identity, after)]);

    let mut out = Vec::new();
    let more = outbox_admin::list_dead_letters(&config, &[ServiceName::Identity], Some(after), Some(1), &mut out)
        .await
        .expect("the next page");
    assert_eq!(event_ids(&lines(&out)), [identity[1].to_string()]);
    assert!(more.is_empty());

    // By id: one that is a dead letter, one that is not; then again, which changes nothing.
    let unknown = Uuid::new_v4();
    let selection = Replay::Events(vec![identity[1], unknown]);
    let mut out = Vec::new();
    let replayed = outbox_admin::replay(&config, ServiceName::Identity, &selection, &mut out).await.expect("replay");
    assert_eq!(replayed, [identity[1]]);
    let answer = lines(&out);
    assert_eq!(answer[0]["service"], "identity");
    assert_eq!(answer[0]["replayed"], serde_json::json!(strings(&[identity[1]])));
    assert_eq!(answer[0]["not_found"], serde_json::json!(strings(&[unknown])));
    let mut out = Vec::new();
    let again = outbox_admin::replay(&config, ServiceName::Identity, &selection, &mut out).await.expect("again");
    assert!(again.is_empty());
    assert_eq!(lines(&out)[0]["not_found"], serde_json::json!(strings(&[identity[1], unknown])));

    let pool = connect_service_database(ServiceName::Identity, &config).await.expect("connect").expect("a database");
    let pending: Vec<(Uuid, i32)> =
        sqlx::query_as("SELECT event_id, attempts FROM outbox_events WHERE delivered_at IS NULL")
            .fetch_all(&pool)
            .await
            .expect("pending events");
    assert_eq!(pending, [(identity[1], 0)], "the replayed event waits for the relay, with no attempts");
    pool.close().await;

    let mut out = Vec::new();
    let all = outbox_admin::replay(&config, ServiceName::Chat, &Replay::All, &mut out).await.expect("replay all");
    assert_eq!(all, chat);

    // Bad input is refused before anything connects, naming the flag.
    let mut out = Vec::new();
    let error = outbox_admin::list_dead_letters(&config, &[ServiceName::Identity], None, Some(0), &mut out)
        .await
        .expect_err("an empty page");
    assert!(error.to_string().starts_with("--limit:"), "{error}");
    let error = outbox_admin::replay(&config, ServiceName::Chat, &Replay::Events(Vec::new()), &mut out)
        .await
        .expect_err("no event");
    assert!(error.to_string().starts_with("--event-id:"), "{error}");
    assert!(out.is_empty());
    assert!(outbox_admin::parse_service("gateway").is_err());
    assert_eq!(outbox_admin::parse_service("files"), Ok(ServiceName::Files));
}

/// `aimesh outbox ...` with the test server and `database` as identity's.
fn aimesh(args: &[&str], database: &ScratchDatabase) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_aimesh"))
        .args(args)
        .env("AIMESH_POSTGRES_URL", testing::postgres_url())
        .env("AIMESH_IDENTITY__DATABASE_URL", &database.url)
        .output()
        .expect("run aimesh")
}

#[tokio::test]
async fn the_binary_prints_json_lines_only_and_names_bad_flags() {
    let (config, databases) = config();
    let identity = dead_letters(&config, ServiceName::Identity, 3).await;
    let database = &databases[0];

    let listed = aimesh(&["outbox", "dead-letters", "--service", "identity", "--limit", "2"], database);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert_eq!(event_ids(&lines(&listed.stdout)), strings(&identity[..2]));
    assert!(String::from_utf8_lossy(&listed.stderr).contains("--after"), "where the next page starts");

    let id = identity[0].to_string();
    let replayed = aimesh(&["outbox", "replay", "--service", "identity", "--event-id", &id], database);
    assert!(replayed.status.success(), "{}", String::from_utf8_lossy(&replayed.stderr));
    assert_eq!(lines(&replayed.stdout)[0]["replayed"], serde_json::json!([id]));
    let rest = aimesh(&["outbox", "replay", "--service", "identity", "--all"], database);
    assert_eq!(lines(&rest.stdout)[0]["replayed"], serde_json::json!(strings(&identity[1..])));

    for (args, flag) in [
        (&["outbox", "dead-letters", "--limit", "5000"][..], "--limit"),
        (&["outbox", "replay", "--service", "identity"][..], "--event-id"),
        (&["outbox", "replay", "--service", "gateway", "--all"][..], "--service"),
        (&["outbox", "dead-letters", "--after", "3"][..], "--service"),
    ] {
        let refused = aimesh(args, database);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && stderr.contains(flag), "{args:?}: {stderr}");
        assert!(refused.stdout.is_empty(), "{args:?}");
    }
}
