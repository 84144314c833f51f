//! Analytics end to end: usage recorded through the usage service reaches ClickHouse through
//! the outbox with the same totals (a ClickHouse outage: faults_clickhouse.rs); a replayed
//! batch changes nothing; bad questions and strangers are refused.

use rust_decimal::Decimal;
use tonic::Code;

use aimesh_kit::auth::ServiceToken;
use aimesh_proto::analytics::v1 as pb;
use aimesh_tests::totals::{Totals, analytics_totals, varied_record, wait_for_totals};
use aimesh_tests::{Mesh, authed, catalog, expect_code, project_with_key, reason_and_field};

#[tokio::test]
async fn usage_recorded_through_the_usage_service_reaches_analytics_to_the_last_token_and_cent() {
    let mesh = Mesh::start().await;
    catalog(&mesh).await;
    let ann = mesh.signup("ann").await;
    let (project, secret) = project_with_key(&mesh, &ann, &["usage:write", "analytics:read"]).await;

    let mut expected = Totals::default();
    for i in 0..40 {
        let recorded = mesh.usage().record_usage(authed(varied_record(&project, i), &secret)).await.expect("record");
        expected.add(&recorded.into_inner());
    }
    // A client retry of a recorded request counts nothing in usage, nor in analytics.
    mesh.usage().record_usage(authed(varied_record(&project, 3), &secret)).await.expect("retry");
    assert!(expected.cost > Decimal::ZERO);
    wait_for_totals(&mesh, &project, &secret, &expected).await;

    // The same answer from the hourly rollup (hour-aligned range) and from the raw events.
    let hour = chrono::Utc::now().timestamp() / 3600 * 3600;
    let series = |start: i64, end: i64| pb::GetUsageTimeSeriesRequest {
        project_id: project.clone(),
        start_time: Some(prost_types::Timestamp { seconds: start, nanos: 0 }),
        end_time: Some(prost_types::Timestamp { seconds: end, nanos: 0 }),
        bucket: "day".into(),
        time_zone: "Asia/Tokyo".into(),
        metrics: vec!["requests".into(), "cost".into(), "errors".into()],
        ..Default::default()
    };
    let rollup = mesh.analytics().get_usage_time_series(authed(series(hour - 7200, hour + 7200), &secret)).await;
    let rollup = rollup.expect("rollup series").into_inner();
    let raw = mesh.analytics().get_usage_time_series(authed(series(hour - 7201, hour + 7200), &secret)).await;
    let raw = raw.expect("raw series").into_inner();
    assert_eq!((rollup.source.as_str(), raw.source.as_str()), ("rollup", "raw"));
    let sum = |s: &pb::UsageTimeSeries, metric: &str| -> Decimal {
        s.points
            .iter()
            .map(|p| p.metrics.as_ref().expect("metrics").values[metric].parse::<Decimal>().expect("n"))
            .sum()
    };
    for series in [&rollup, &raw] {
        assert_eq!(sum(series, "requests"), Decimal::from(expected.requests));
        assert_eq!(sum(series, "cost"), expected.cost);
        assert_eq!(sum(series, "errors"), Decimal::from(6), "i = 0, 7, 14, 21, 28, 35 failed");
    }
    let outbox = mesh.usage_db().await;
    let undelivered: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE delivered_at IS NULL")
        .fetch_one(&outbox)
        .await
        .expect("outbox");
    assert_eq!(undelivered, 0);
}

/// A usage event of `project` as usage's outbox sends it: `tokens` input tokens, one output
/// token, `error_message` as given.
fn usage_event(
    project: &str,
    user: &str,
    tokens: i64,
    error_message: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> pb::Event {
    pb::Event {
        event_id: uuid::Uuid::now_v7().to_string(),
        topic: "usage".into(),
        event_type: "usage.recorded".into(),
        project_id: project.to_owned(),
        occurred_at: Some(aimesh_kit::proto_json::timestamp(now)),
        payload: serde_json::json!({
            "id": uuid::Uuid::now_v7(), "request_id": "r", "user_id": user, "model_id": uuid::Uuid::new_v4(),
            "request_type": "chat", "input_tokens": tokens, "output_tokens": 1, "total_tokens": tokens + 1,
            "cost": "0.0000000001", "duration_ms": 5, "status": "success", "error_message": error_message,
        })
        .to_string(),
    }
}

/// One Ingest call of `events` with the service token.
async fn ingest_as(mesh: &Mesh, token: &ServiceToken, events: Vec<pb::Event>) -> pb::IngestResponse {
    let mut request = tonic::Request::new(pb::IngestRequest { events });
    token.authorize(&mut request).expect("authorize");
    mesh.ingest().ingest(request).await.expect("ingest").into_inner()
}

#[tokio::test]
async fn a_replayed_batch_changes_nothing_and_malformed_events_are_refused_one_by_one() {
    let mesh = Mesh::start().await;
    let token = mesh.service_token();
    let ann = mesh.signup("ann").await;
    let (project, secret) = project_with_key(&mesh, &ann, &["analytics:read"]).await;

    let now = chrono::Utc::now();
    let usage = |tokens: i64| usage_event(&project, &ann.user_id, tokens, "", now);
    let malformed = pb::Event { payload: r#"{"input_tokens": "many"}"#.into(), ..usage(1) };
    let batch = vec![usage(10), malformed, usage(20)];
    let ingest = |events: Vec<pb::Event>| ingest_as(&mesh, &token, events);
    let first = ingest(batch.clone()).await;
    assert_eq!((first.accepted, first.duplicates, first.rejected), (2, 0, 1));
    assert_eq!(first.results[1].outcome, pb::EventOutcome::Rejected as i32);
    assert_eq!(first.results[1].field, "payload.input_tokens");
    let before = analytics_totals(&mesh, &project, &secret).await;
    assert_eq!((before.requests, before.input, before.cost.to_string()), (2, 30, "0.0000000002".to_owned()));

    for _ in 0..3 {
        let replay = ingest(batch.clone()).await;
        assert_eq!((replay.accepted, replay.duplicates, replay.rejected), (0, 2, 1));
    }
    let overlapping = vec![batch[2].clone(), usage(5), batch[0].clone()];
    let mixed = ingest(overlapping).await;
    assert_eq!((mixed.accepted, mixed.duplicates), (1, 2));
    let after = analytics_totals(&mesh, &project, &secret).await;
    assert_eq!((after.requests, after.input), (3, 35), "only the new event counts");

    // Only services may ingest.
    let mut request = tonic::Request::new(pb::IngestRequest { events: vec![usage(1)] });
    request.metadata_mut().insert("authorization", format!("Bearer {}", ann.token).parse().expect("header"));
    expect_code("a person ingesting", Code::PermissionDenied, mesh.ingest().ingest(request).await);
}

/// A relay's batch may be far larger than gRPC's default 4 MiB message limit (batch size times
/// event size); analytics takes what the relay may send instead of refusing it for good.
#[tokio::test]
async fn a_batch_over_four_mebibytes_is_taken_whole_and_its_replay_found_whole() {
    let mesh = Mesh::start().await;
    let token = mesh.service_token();
    let (project, user) = (uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string());
    let (events, detail) = (4_000, "x".repeat(1_000));
    let now = chrono::Utc::now();
    let batch: Vec<pb::Event> = (0..events).map(|_| usage_event(&project, &user, 1, &detail, now)).collect();
    let size = prost::Message::encoded_len(&pb::IngestRequest { events: batch.clone() });
    assert!(size > 4 << 20, "the batch is {size} bytes");
    let answer = ingest_as(&mesh, &token, batch.clone()).await;
    assert_eq!((answer.accepted, answer.rejected), (events, 0));
    // Its replay is recognised whole, though the ids are looked up in several queries.
    let replay = ingest_as(&mesh, &token, batch).await;
    assert_eq!((replay.accepted, replay.duplicates), (0, events));
}

#[tokio::test]
async fn bad_questions_and_strangers_are_refused() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let bob = mesh.signup("bob").await;
    let (project, _) = project_with_key(&mesh, &ann, &["analytics:read"]).await;
    let (_, usage_key) = project_with_key(&mesh, &ann, &["usage:read"]).await;
    let now = chrono::Utc::now();
    let good = pb::GetUsageTimeSeriesRequest {
        project_id: project.clone(),
        start_time: Some(aimesh_kit::proto_json::timestamp(now - chrono::Duration::days(1))),
        end_time: Some(aimesh_kit::proto_json::timestamp(now)),
        bucket: "hour".into(),
        ..Default::default()
    };
    mesh.analytics().get_usage_time_series(authed(good.clone(), &ann.token)).await.expect("a good question");
    let cases = [
        ("bucket", pb::GetUsageTimeSeriesRequest { bucket: "fortnight".into(), ..good.clone() }),
        ("metrics", pb::GetUsageTimeSeriesRequest { metrics: vec!["happiness".into()], ..good.clone() }),
        ("time_zone", pb::GetUsageTimeSeriesRequest { time_zone: "Mars/Olympus_Mons".into(), ..good.clone() }),
        ("group_by", pb::GetUsageTimeSeriesRequest { group_by: "colour".into(), ..good.clone() }),
        (
            "end_time",
            pb::GetUsageTimeSeriesRequest { end_time: good.start_time, start_time: good.end_time, ..good.clone() },
        ),
        (
            "end_time",
            pb::GetUsageTimeSeriesRequest {
                start_time: Some(aimesh_kit::proto_json::timestamp(now - chrono::Duration::days(500))),
                bucket: "month".into(),
                ..good.clone()
            },
        ),
        (
            "bucket",
            pb::GetUsageTimeSeriesRequest {
                start_time: Some(aimesh_kit::proto_json::timestamp(now - chrono::Duration::days(30))),
                bucket: "minute".into(),
                ..good.clone()
            },
        ),
    ];
    for (field, request) in cases {
        let status = expect_code(
            field,
            Code::InvalidArgument,
            mesh.analytics().get_usage_time_series(authed(request, &ann.token)).await,
        );
        assert_eq!(reason_and_field(&status).1.as_deref(), Some(field));
    }
    let stranger = mesh.analytics().get_usage_time_series(authed(good.clone(), &bob.token)).await;
    expect_code("another project", Code::PermissionDenied, stranger);
    let wrong_key = mesh.analytics().get_usage_time_series(authed(good.clone(), &usage_key)).await;
    expect_code("a key of another project", Code::PermissionDenied, wrong_key);
    let retention = pb::SetRetentionRequest { project_id: project.clone(), days: 0 };
    let status = expect_code(
        "retention 0",
        Code::InvalidArgument,
        mesh.analytics().set_retention(authed(retention, &ann.token)).await,
    );
    assert_eq!(reason_and_field(&status).1.as_deref(), Some("days"));
    let retention = pb::SetRetentionRequest { project_id: project.clone(), days: 7 };
    expect_code(
        "a stranger's retention",
        Code::PermissionDenied,
        mesh.analytics().set_retention(authed(retention.clone(), &bob.token)).await,
    );
    let set = mesh.analytics().set_retention(authed(retention, &ann.token)).await.expect("owner sets retention");
    assert_eq!((set.get_ref().days, set.get_ref().custom), (7, true));
}
