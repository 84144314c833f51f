//! An outbox event analytics rejects for good becomes a dead letter of the service that wrote
//! it, kept with analytics' reason, while the events around it are delivered; replayed, it is
//! relayed again. Against the real mesh: PostgreSQL, ClickHouse, the relay and `Ingest`.

use aimesh_kit::data::outbox::{self, OutboxEvent, Replay};
use aimesh_tests::{Mesh, eventually, metric, outbox_drains};

#[tokio::test]
async fn an_event_analytics_rejects_is_kept_as_a_dead_letter_and_can_be_replayed() {
    // Counts made before the recorder exists are lost.
    aimesh_kit::telemetry::metrics_handle().expect("the metrics recorder");
    let mesh = Mesh::start().await;
    // Audit events of identity that analytics takes, and one it refuses.
    mesh.signup("ann").await;
    let malformed = OutboxEvent::new("usage", "usage.recorded", None, serde_json::json!({ "input_tokens": "many" }));
    let db = mesh.identity_db().await;
    let mut tx = db.begin().await.expect("begin");
    outbox::enqueue(&mut tx, &malformed).await.expect("enqueue");
    tx.commit().await.expect("commit");

    outbox_drains(&db, "identity").await;
    let dead = || async {
        let page = outbox::dead_letter_page(None, None).expect("page");
        outbox::list_dead_letters(&db, &page).await.expect("list").0
    };
    eventually("the rejected event is a dead letter", || async { dead().await.len() == 1 }).await;
    let letter = dead().await.remove(0);
    assert_eq!((letter.event_id, letter.topic.as_str(), letter.attempts), (malformed.event_id, "usage", 1));
    // A usage event without a project.
    assert!(letter.reason.starts_with("project_id: "), "analytics names the field: {}", letter.reason);
    let delivered: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE delivered_at IS NOT NULL")
        .fetch_one(&db)
        .await
        .expect("count");
    assert!(delivered > 0, "the events around it were delivered");
    let database = mesh.config.identity.database.url.as_deref().and_then(|url| url.rsplit('/').next()).expect("name");
    let label = format!("database=\"{database}\"");
    assert_eq!(metric("outbox_dead_lettered_total", &[&label, "topic=\"usage\""]), 1.0);
    eventually("the dead letters gauge shows it", || async { metric("outbox_dead_letters", &[&label]) == 1.0 }).await;

    // Replayed as it is, it is relayed again, and refused again.
    let replayed = outbox::replay_dead_letters(&db, &Replay::Events(vec![malformed.event_id])).await.expect("replay");
    assert_eq!(replayed, [malformed.event_id]);
    eventually("the replayed event is refused again", || async {
        metric("outbox_dead_lettered_total", &[&label, "topic=\"usage\""]) == 2.0
    })
    .await;
    assert_eq!(dead().await.len(), 1);
    db.close().await;
    mesh.stop().await.expect("stop");
}
