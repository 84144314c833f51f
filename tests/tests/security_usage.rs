//! Abuse resistance of usage and analytics (issue 19): a reservation is released or settled only
//! by whoever made it or a project admin, and never through another project; every
//! administrative change (prices, quotas, retention) lands in the audit log with its old and new
//! values; retention changes run their ClickHouse mutations in the background, at most once per
//! project per interval, the last change winning.

use std::time::Duration;

use http::StatusCode;
use serde_json::{Value, json};
use tonic::Code;

use aimesh_proto::identity::v1 as identity_pb;
use aimesh_proto::usage::v1 as usage_pb;
use aimesh_tests::{Mesh, catalog, eventually, expect_code, record, reserve_tokens, set_daily_token_budget};

/// `message` as an internal client (another aimesh service) sends it to usage's internal RPCs
/// (Reserve, RecordUsage, ReleaseReservation) on behalf of the holder of `credential`.
fn internal<T>(mesh: &Mesh, message: T, credential: &str) -> tonic::Request<T> {
    mesh.on_behalf(message, credential)
}

fn release(project: &str, reservation: &str) -> usage_pb::ReleaseReservationRequest {
    usage_pb::ReleaseReservationRequest { project_id: project.to_owned(), reservation_id: reservation.to_owned() }
}

/// A small record of `project` settling `reservation`.
fn settle(project: &str, request_id: &str, reservation: &str) -> usage_pb::RecordUsageRequest {
    usage_pb::RecordUsageRequest {
        reservation_id: reservation.to_owned(),
        input_tokens: 10,
        cached_input_tokens: 0,
        output_tokens: 10,
        ..record(project, request_id)
    }
}

/// The state of a reservation in usage's database.
async fn state_of(pool: &sqlx::PgPool, reservation: &str) -> String {
    let id = uuid::Uuid::parse_str(reservation).expect("a reservation id");
    sqlx::query_scalar("SELECT state FROM quota_reservations WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("the reservation row")
}

#[tokio::test]
async fn a_reservation_is_closed_only_by_its_maker_or_a_project_admin() {
    let mesh = Mesh::start().await;
    catalog(&mesh).await;
    let (ann, bob, carol, dave) =
        (mesh.signup("ann").await, mesh.signup("bob").await, mesh.signup("carol").await, mesh.signup("dave").await);
    let project = mesh.create_project(&ann, "shared").await;
    mesh.add_member(&ann, &project, &bob, identity_pb::ProjectRole::Member).await;
    mesh.add_member(&ann, &project, &carol, identity_pb::ProjectRole::Member).await;
    let daves_project = mesh.create_project(&dave, "dave's").await;
    set_daily_token_budget(&mesh, &ann.token, &project, 1000).await;
    let pool = mesh.usage_db().await;
    let quotas = || mesh.quotas();

    // Bob holds 600 of the project's 1000 tokens.
    let held = quotas().reserve(internal(&mesh, reserve_tokens(&project, 600), &bob.token)).await;
    let held = held.expect("bob reserves").into_inner();

    // Carol, another member, can neither give it back nor spend it.
    let refused = quotas().release_reservation(internal(&mesh, release(&project, &held.id), &carol.token)).await;
    expect_code("carol releases bob's reservation", Code::PermissionDenied, refused);
    let refused = mesh.usage().record_usage(internal(&mesh, settle(&project, "carol-1", &held.id), &carol.token)).await;
    expect_code("carol settles bob's reservation", Code::PermissionDenied, refused);
    // Bob's room is still held: another 600 do not fit.
    let full = quotas().reserve(internal(&mesh, reserve_tokens(&project, 600), &carol.token)).await;
    expect_code("the budget still holds bob's 600", Code::ResourceExhausted, full);
    assert_eq!(state_of(&pool, &held.id).await, "open");

    // Through another project the id is unknown, not forbidden: ids cannot be probed.
    let probe = quotas().release_reservation(internal(&mesh, release(&daves_project, &held.id), &dave.token)).await;
    expect_code("dave releases through his own project", Code::NotFound, probe);
    let probe =
        mesh.usage().record_usage(internal(&mesh, settle(&daves_project, "dave-1", &held.id), &dave.token)).await;
    expect_code("dave settles through his own project", Code::NotFound, probe);
    let probe = quotas().release_reservation(internal(&mesh, release(&project, &held.id), &dave.token)).await;
    expect_code("dave names bob's project", Code::PermissionDenied, probe);
    assert_eq!(state_of(&pool, &held.id).await, "open");

    // The owner may release anyone's: the room comes back.
    quotas().release_reservation(internal(&mesh, release(&project, &held.id), &ann.token)).await.expect("ann releases");
    assert_eq!(state_of(&pool, &held.id).await, "released");
    let carols = quotas().reserve(internal(&mesh, reserve_tokens(&project, 600), &carol.token)).await;
    let carols = carols.expect("room for carol now").into_inner();
    // Its maker may release her own.
    quotas()
        .release_reservation(internal(&mesh, release(&project, &carols.id), &carol.token))
        .await
        .expect("carol releases her own");

    // And the owner may settle anyone's.
    let held = quotas().reserve(internal(&mesh, reserve_tokens(&project, 600), &bob.token)).await;
    let held = held.expect("bob reserves again").into_inner();
    let settled = mesh.usage().record_usage(internal(&mesh, settle(&project, "ann-1", &held.id), &ann.token)).await;
    settled.expect("ann settles bob's reservation");
    assert_eq!(state_of(&pool, &held.id).await, "settled");
}

/// The audit events of `project` (the nil id: outside projects) with `action`, as `token` sees
/// them through the gateway, once at least `count` are there.
async fn audit_events(mesh: &Mesh, token: &str, project: &str, action: &str, count: usize) -> Vec<Value> {
    let path = format!("/v1/projects/{project}/analytics/audit?action={action}&pageSize=100");
    // What a test waits for happens in the background (the outbox relay): polled, bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let reply = mesh.rest().get(&path).bearer(token).send().await.expect(StatusCode::OK);
        let events = reply.json()["events"].as_array().cloned().unwrap_or_default();
        if events.len() >= count {
            return events;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {count} {action} events: {events:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `details` of an audit event, parsed.
fn details(event: &Value) -> Value {
    serde_json::from_str(event["details"].as_str().expect("details")).expect("details are JSON")
}

const NIL_PROJECT: &str = "00000000-0000-0000-0000-000000000000";

#[tokio::test]
async fn price_and_quota_changes_are_audited_with_old_and_new_values() {
    let mesh = Mesh::start().await;
    let (root, model) = catalog(&mesh).await;
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "audited").await;
    let rest = mesh.rest();

    // A new price of the catalog (an hour from now), by the system admin.
    let effective = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let price = json!({ "inputPerMillion": "3", "outputPerMillion": "12", "effectiveTime": effective });
    rest.post(&format!("/v1/models/{}/prices", model.id), price)
        .bearer(&root.token)
        .send()
        .await
        .expect(StatusCode::OK);
    // A quota set, changed and deleted, by the project's owner.
    let quotas = format!("/v1/projects/{project}/quotas");
    for tokens in [1000, 2000] {
        let quota = json!({ "scope": "QUOTA_SCOPE_PROJECT", "tokensPerDay": tokens });
        rest.call(http::Method::PUT, &quotas).json(quota).bearer(&ann.token).send().await.expect(StatusCode::OK);
    }
    rest.delete(&format!("{quotas}?scope=QUOTA_SCOPE_PROJECT")).bearer(&ann.token).send().await.expect(StatusCode::OK);

    let set = audit_events(&mesh, &ann.token, &project, "quota.set", 2).await;
    assert_eq!(set.len(), 2, "{set:?}");
    // Newest first.
    let (second, first) = (details(&set[0]), details(&set[1]));
    assert_eq!(first["old"], Value::Null, "{first}");
    assert_eq!(first["new"]["tokens_per_day"], 1000, "{first}");
    assert_eq!(
        (second["old"]["tokens_per_day"].clone(), second["new"]["tokens_per_day"].clone()),
        (json!(1000), json!(2000))
    );
    assert_eq!(set[0]["actorUserId"], ann.user_id.as_str());
    assert_eq!(set[0]["resourceType"], "quota");
    assert_eq!(set[0]["resourceId"], "project");
    let deleted = audit_events(&mesh, &ann.token, &project, "quota.deleted", 1).await;
    let deleted = details(&deleted[0]);
    assert_eq!((deleted["old"]["tokens_per_day"].clone(), deleted["new"].clone()), (json!(2000), Value::Null));

    // The catalog belongs to no project: its log is the deployment's, for system admins only.
    let prices = audit_events(&mesh, &root.token, NIL_PROJECT, "model_price.set", 2).await;
    assert_eq!(prices.len(), 2, "the first price and the new one: {prices:?}");
    let change = details(&prices[0]);
    assert_eq!(prices[0]["resourceId"], model.id.as_str());
    assert_eq!(prices[0]["actorUserId"], root.user_id.as_str());
    let decimal = |v: &Value| v.as_str().and_then(|s| s.parse::<rust_decimal::Decimal>().ok());
    assert_eq!(decimal(&change["old"]["input_per_million"]), Some(rust_decimal::Decimal::new(25, 1)), "{change}");
    assert_eq!(decimal(&change["new"]["input_per_million"]), Some(rust_decimal::Decimal::from(3)), "{change}");
    let created = audit_events(&mesh, &root.token, NIL_PROJECT, "model.created", 1).await;
    assert_eq!(details(&created[0])["new"]["model"]["name"], "gpt-4o");
    let refused = rest.get(&format!("/v1/projects/{NIL_PROJECT}/analytics/audit")).bearer(&ann.token).send().await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "a project owner reads the deployment's log");
}

#[tokio::test]
async fn retention_changes_are_applied_in_the_background_at_most_once_per_interval() {
    const INTERVAL_SECS: u64 = 2;
    let (mut config, databases) = aimesh_tests::test_config();
    config.analytics.retention_apply_interval_secs = INTERVAL_SECS;
    let mesh = Mesh::start_with(config, databases).await;
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "retained").await;
    let rest = mesh.rest();
    let path = format!("/v1/projects/{project}/analytics/retention");

    // Ten quick changes, 30 days down to 21: each answers at once.
    let started = tokio::time::Instant::now();
    for days in (21..=30).rev() {
        let reply = rest.call(http::Method::PUT, &path).json(json!({ "days": days })).bearer(&ann.token).send().await;
        assert_eq!(reply.expect(StatusCode::OK).json()["days"], days);
    }
    eventually("the last retention is applied", || {
        let (rest, path, token) = (rest.clone(), path.clone(), ann.token.clone());
        async move {
            let now = rest.get(&path).bearer(&token).send().await.expect(StatusCode::OK).json();
            now["days"] == 21 && now["applied"] == true
        }
    })
    .await;
    let elapsed = started.elapsed();

    // Each run issues one DELETE mutation on usage_events for the project.
    let client = aimesh_analytics::store::client_of(&aimesh_tests::clickhouse_url());
    let runs: Vec<Mutation> = client
        .query(
            "SELECT toUInt32(create_time) AS created, command FROM system.mutations WHERE database = ? AND table = 'usage_events' \
             AND position(command, ?) > 0 AND position(command, 'DELETE') > 0 ORDER BY create_time",
        )
        .bind(&mesh.config.analytics.clickhouse_database)
        .bind(&project)
        .fetch_all()
        .await
        .expect("the mutations");
    assert!(!runs.is_empty(), "the retention was applied by mutations");
    let allowed = 1 + elapsed.as_secs() / INTERVAL_SECS;
    assert!(runs.len() as u64 <= allowed, "{} runs in {elapsed:?}: {runs:?}", runs.len());
    for pair in runs.windows(2) {
        assert!(u64::from(pair[1].created - pair[0].created) >= INTERVAL_SECS, "two runs within an interval: {runs:?}");
    }
    let last = &runs[runs.len() - 1].command;
    assert!(last.contains("toIntervalDay(21)"), "the last run applies the last retention: {last}");

    // Every change is in the audit log with its old and new value.
    let changes = audit_events(&mesh, &ann.token, &project, "retention.set", 10).await;
    assert_eq!(changes.len(), 10);
    let newest = details(&changes[0]);
    assert_eq!((newest["old"]["days"].clone(), newest["new"]["days"].clone()), (json!(22), json!(21)), "{newest}");
    let oldest = details(&changes[9]);
    assert_eq!(oldest["old"]["custom"], false, "the first change replaced the default: {oldest}");
    assert_eq!(changes[0]["actorUserId"], ann.user_id.as_str());
}

/// One mutation ClickHouse ran.
#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Mutation {
    created: u32,
    command: String,
}
