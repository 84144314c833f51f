//! Analytics end to end: usage recorded through the usage service reaches ClickHouse through
//! the outbox with the same totals; a ClickHouse outage loses and doubles nothing; a replayed
//! batch changes nothing; bad questions and strangers are refused.

use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::Code;

use aimesh_kit::auth::ServiceToken;
use aimesh_proto::analytics::v1 as pb;
use aimesh_proto::usage::v1 as usage_pb;
use aimesh_tests::{Mesh, authed, catalog, expect_code, project_with_key, reason_and_field, record, test_config};

/// Totals of what the usage service answered: requests, input, output, cached tokens, cost.
#[derive(Debug, Default, Clone, PartialEq)]
struct Totals {
    requests: u64,
    input: i64,
    output: i64,
    cached: i64,
    cost: Decimal,
}

impl Totals {
    fn add(&mut self, record: &usage_pb::UsageRecord) {
        self.requests += 1;
        self.input += record.input_tokens;
        self.output += record.output_tokens;
        self.cached += record.cached_input_tokens;
        self.cost += record.cost.parse::<Decimal>().expect("cost");
    }
}

const METRICS: [&str; 5] = ["requests", "input_tokens", "output_tokens", "cached_input_tokens", "cost"];

/// The project's totals in analytics over the last and next day.
async fn analytics_totals(mesh: &Mesh, project: &str, credential: &str) -> Totals {
    let now = chrono::Utc::now();
    let request = pb::GetUsageBreakdownRequest {
        project_id: project.into(),
        start_time: Some(aimesh_kit::proto_json::timestamp(now - chrono::Duration::days(1))),
        end_time: Some(aimesh_kit::proto_json::timestamp(now + chrono::Duration::days(1))),
        dimension: "model".into(),
        metrics: METRICS.iter().map(|m| (*m).to_owned()).collect(),
        ..Default::default()
    };
    let answer = mesh.analytics().get_usage_breakdown(authed(request, credential)).await.expect("breakdown");
    let total = answer.into_inner().total.expect("total").values;
    let number = |name: &str| total.get(name).map(String::as_str).unwrap_or("0").to_owned();
    Totals {
        requests: number("requests").parse().expect("requests"),
        input: number("input_tokens").parse().expect("input"),
        output: number("output_tokens").parse().expect("output"),
        cached: number("cached_input_tokens").parse().expect("cached"),
        cost: number("cost").parse().expect("cost"),
    }
}

/// Waits until analytics shows `expected` (and then a little longer, so a double count would
/// show too).
async fn wait_for_totals(mesh: &Mesh, project: &str, credential: &str, expected: &Totals) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let seen = analytics_totals(mesh, project, credential).await;
        if &seen == expected {
            break;
        }
        assert!(seen.requests <= expected.requests, "counted too much: {seen:?} > {expected:?}");
        assert!(tokio::time::Instant::now() < deadline, "analytics shows {seen:?}, usage recorded {expected:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(&analytics_totals(mesh, project, credential).await, expected, "stable, nothing counted twice");
}

fn varied_record(project: &str, i: i64) -> usage_pb::RecordUsageRequest {
    usage_pb::RecordUsageRequest {
        input_tokens: 1_000 + i * 37,
        cached_input_tokens: i * 5,
        output_tokens: 100 + i * 11,
        duration_ms: 100 + i,
        status: if i % 7 == 0 { usage_pb::UsageStatus::Error } else { usage_pb::UsageStatus::Success }.into(),
        ..record(project, &format!("req-{i}"))
    }
}

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

/// A TCP proxy in front of ClickHouse that the test can cut: while down it refuses new
/// connections and drops open ones, which is what analytics sees of a stopped ClickHouse.
struct Cuttable {
    url: String,
    down: Arc<watch::Sender<bool>>,
}

impl Cuttable {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy address"));
        let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_owned();
        let down = Arc::new(watch::channel(false).0);
        let state = Arc::clone(&down);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if *state.borrow() {
                    continue;
                }
                let mut cut = state.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|down| *down) => {}
                    }
                });
            }
        });
        Self { url, down }
    }

    fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }
}

#[tokio::test]
async fn a_clickhouse_outage_in_the_middle_of_a_stream_loses_nothing_and_counts_nothing_twice() {
    let proxy = Cuttable::start(aimesh_tests::clickhouse_url()).await;
    let (mut config, databases) = test_config();
    config.analytics.clickhouse_url = proxy.url.clone();
    config.common.server.health_interval_secs = 1;
    let token = ServiceToken::generate();
    config.common.auth.service_token = Some(token.clone());
    let mesh = Mesh::start_with(config, databases).await;
    catalog(&mesh).await;
    let ann = mesh.signup("ann").await;
    let (project, secret) = project_with_key(&mesh, &ann, &["usage:write", "analytics:read"]).await;

    let mut expected = Totals::default();
    for i in 0..60 {
        if i == 20 {
            proxy.set_down(true);
        }
        if i == 25 {
            // Analytics refuses with UNAVAILABLE, and health says so.
            let mut request = tonic::Request::new(pb::IngestRequest { events: Vec::new() });
            token.authorize(&mut request).expect("authorize");
            let mut probe = pb::Event { event_id: uuid::Uuid::now_v7().to_string(), ..Default::default() };
            probe.topic = "product".into();
            probe.event_type = "probe".into();
            probe.project_id = project.clone();
            probe.occurred_at = Some(aimesh_kit::proto_json::timestamp(chrono::Utc::now()));
            probe.payload = "{}".into();
            request.get_mut().events.push(probe);
            expect_code("ingest while clickhouse is down", Code::Unavailable, mesh.ingest().ingest(request).await);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let mut health = tonic_health::pb::health_client::HealthClient::new(
                tonic::transport::Channel::from_shared(format!("http://{}", mesh.analytics))
                    .expect("url")
                    .connect_lazy(),
            );
            let status = health
                .check(tonic_health::pb::HealthCheckRequest { service: "aimesh.analytics.v1.IngestService".into() })
                .await
                .expect("health")
                .into_inner()
                .status;
            assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::NotServing as i32);
        }
        if i == 40 {
            proxy.set_down(false);
        }
        let recorded = mesh.usage().record_usage(authed(varied_record(&project, i), &secret)).await.expect("record");
        expected.add(&recorded.into_inner());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_totals(&mesh, &project, &secret, &expected).await;
}

#[tokio::test]
async fn a_replayed_batch_changes_nothing_and_malformed_events_are_refused_one_by_one() {
    let (mut config, databases) = test_config();
    let token = ServiceToken::generate();
    config.common.auth.service_token = Some(token.clone());
    let mesh = Mesh::start_with(config, databases).await;
    let ann = mesh.signup("ann").await;
    let (project, secret) = project_with_key(&mesh, &ann, &["analytics:read"]).await;

    let now = chrono::Utc::now();
    let usage = |tokens: i64| pb::Event {
        event_id: uuid::Uuid::now_v7().to_string(),
        topic: "usage".into(),
        event_type: "usage.recorded".into(),
        project_id: project.clone(),
        occurred_at: Some(aimesh_kit::proto_json::timestamp(now)),
        payload: serde_json::json!({
            "id": uuid::Uuid::now_v7(), "request_id": "r", "user_id": ann.user_id, "model_id": uuid::Uuid::new_v4(),
            "request_type": "chat", "input_tokens": tokens, "output_tokens": 1, "total_tokens": tokens + 1,
            "cost": "0.0000000001", "duration_ms": 5, "status": "success",
        })
        .to_string(),
    };
    let malformed = pb::Event { payload: r#"{"input_tokens": "many"}"#.into(), ..usage(1) };
    let batch = vec![usage(10), malformed, usage(20)];
    let ingest = |events: Vec<pb::Event>| {
        let mut request = tonic::Request::new(pb::IngestRequest { events });
        token.authorize(&mut request).expect("authorize");
        let mut client = mesh.ingest();
        async move { client.ingest(request).await.expect("ingest").into_inner() }
    };
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
