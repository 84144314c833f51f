//! Fault: ClickHouse stopped for 30 s in the middle of a steady stream of usage records. A
//! proxy between analytics and the test run's ClickHouse is cut (the shared server keeps serving
//! the other tests): analytics refuses ingestion with UNAVAILABLE and reports NOT_SERVING, the
//! events wait in usage's outbox, and once ClickHouse answers again every record is in
//! ClickHouse exactly once, to the last token and cent. And ClickHouse stalled (connections open,
//! no answers): ingestion is refused as UNAVAILABLE after the writer's round timeout, not held.

use std::time::Duration;

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use aimesh_kit::auth::ServiceToken;
use aimesh_kit::testing::{CuttableProxy, authority_of};
use aimesh_proto::analytics::v1 as pb;
use aimesh_tests::totals::{Totals, varied_record, wait_for_totals};
use aimesh_tests::{Mesh, catalog, expect_code, project_with_key, test_config};

/// How long ClickHouse is away.
const OUTAGE: Duration = Duration::from_secs(30);
/// The stream's pace: one record per tick.
const TICK: Duration = Duration::from_millis(250);

/// An Ingest of one product event, as a service would send it.
fn probe(project: &str, token: &ServiceToken) -> tonic::Request<pb::IngestRequest> {
    let event = pb::Event {
        event_id: uuid::Uuid::now_v7().to_string(),
        topic: "product".into(),
        event_type: "probe".into(),
        project_id: project.to_owned(),
        occurred_at: Some(aimesh_kit::wire::proto_json::timestamp(chrono::Utc::now())),
        payload: "{}".into(),
    };
    let mut request = tonic::Request::new(pb::IngestRequest { events: vec![event] });
    token.authorize(&mut request).expect("authorize");
    request
}

async fn ingest_health(mesh: &Mesh) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", mesh.analytics)).expect("url");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.connect_lazy());
    let request = tonic_health::pb::HealthCheckRequest { service: "aimesh.analytics.v1.IngestService".into() };
    health.check(request).await.expect("health").into_inner().status
}

/// Rows of the project in ClickHouse's raw usage table, without FINAL: a duplicate insert
/// would show here even where queries hide it.
async fn raw_usage_rows(mesh: &Mesh, project: &str) -> u64 {
    let client = aimesh_analytics::store::client_of(&aimesh_tests::clickhouse_url());
    let database = &mesh.config.analytics.clickhouse_database;
    client
        .query(&format!("SELECT count() FROM {database}.usage_events WHERE project_id = toUUID(?)"))
        .bind(project)
        .fetch_one::<u64>()
        .await
        .expect("count raw rows")
}

/// A mesh whose analytics reaches the test run's ClickHouse through a proxy the test controls,
/// health checked every second, and the service token that may call Ingest.
async fn mesh_behind_proxy() -> (CuttableProxy, Mesh, ServiceToken) {
    let clickhouse = aimesh_tests::clickhouse_url();
    let proxy = CuttableProxy::start(&authority_of(&clickhouse)).await;
    let (mut config, databases) = test_config();
    config.analytics.clickhouse_url = proxy.rewrite(&clickhouse, &authority_of(&clickhouse));
    config.common.server.health_interval_secs = 1;
    let mesh = Mesh::start_with(config, databases).await;
    let token = mesh.service_token();
    (proxy, mesh, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_stopped_for_30_seconds_under_a_stream_of_records_loses_and_doubles_nothing() {
    let (proxy, mesh, token) = mesh_behind_proxy().await;
    catalog(&mesh).await;
    let ann = mesh.signup("ann").await;
    let (project, secret) = project_with_key(&mesh, &ann, &["usage:write", "analytics:read"]).await;

    let mut expected = Totals::default();
    let mut sent = 0_i64;
    let mut record = async |expected: &mut Totals| {
        let recorded = mesh.usage().record_usage(mesh.on_behalf(varied_record(&project, sent), &secret)).await;
        expected.add(&recorded.expect("usage records while clickhouse is away").into_inner());
        sent += 1;
        tokio::time::sleep(TICK).await;
    };
    for _ in 0..20 {
        record(&mut expected).await;
    }

    proxy.set_down(true);
    let cut = tokio::time::Instant::now();
    let (mut refused, mut not_serving) = (false, false);
    while cut.elapsed() < OUTAGE {
        record(&mut expected).await;
        if !refused {
            expect_code(
                "ingest while clickhouse is away",
                Code::Unavailable,
                mesh.ingest().ingest(probe(&project, &token)).await,
            );
            refused = true;
        }
        not_serving |= ingest_health(&mesh).await == ServingStatus::NotServing as i32;
    }
    assert!(not_serving, "analytics never reported NOT_SERVING during a {OUTAGE:?} outage");
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE delivered_at IS NULL")
        .fetch_one(&mesh.usage_db().await)
        .await
        .expect("outbox");
    assert!(waiting > 0, "the records of the outage wait in the outbox");

    proxy.set_down(false);
    for _ in 0..20 {
        record(&mut expected).await;
    }
    assert_eq!(expected.requests, sent as u64);

    wait_for_totals(&mesh, &project, &secret, &expected).await;
    assert_eq!(raw_usage_rows(&mesh, &project).await, expected.requests, "one row per record in clickhouse");
    let undelivered: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE delivered_at IS NULL")
        .fetch_one(&mesh.usage_db().await)
        .await
        .expect("outbox");
    assert_eq!(undelivered, 0, "the outbox is empty again");
    assert_eq!(ingest_health(&mesh).await, ServingStatus::Serving as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_clickhouse_gets_ingest_refused_instead_of_hanging_and_then_served_again() {
    let (proxy, mesh, token) = mesh_behind_proxy().await;
    let project = uuid::Uuid::new_v4().to_string();
    mesh.ingest().ingest(probe(&project, &token)).await.expect("ingest while clickhouse answers");

    // ClickHouse accepts the writer's requests and never answers. Past the writer's round
    // timeout (20 s) and before the service's request timeout (30 s), which would answer
    // CANCELLED, the call is refused as UNAVAILABLE so the relay retries later.
    proxy.set_stalled(true);
    expect_code(
        "ingest while clickhouse stalls",
        Code::Unavailable,
        mesh.ingest().ingest(probe(&project, &token)).await,
    );

    // The writer is free again: once ClickHouse answers, the next call is served.
    proxy.set_stalled(false);
    let answer = mesh.ingest().ingest(probe(&project, &token)).await.expect("ingest after the stall").into_inner();
    assert_eq!(answer.accepted, 1, "the event after the stall is stored: {answer:?}");
}
