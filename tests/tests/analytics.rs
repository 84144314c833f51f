//! Analytics end to end: usage recorded through the usage service reaches ClickHouse through
//! the outbox with the same totals (a ClickHouse outage: faults_clickhouse.rs); a replayed
//! batch changes nothing; bad questions and strangers are refused.

use rust_decimal::Decimal;
use tonic::Code;

use aimesh_kit::auth::ServiceToken;
use aimesh_proto::analytics::v1 as pb;
use aimesh_proto::identity::v1 as identity_pb;
use aimesh_tests::totals::{Totals, analytics_totals, varied_record, wait_for_totals};
use aimesh_tests::{Account, Mesh, authed, catalog, eventually, expect_code, project_with_key, reason_and_field};

#[tokio::test]
async fn usage_recorded_through_the_usage_service_reaches_analytics_to_the_last_token_and_cent() {
    let mesh = Mesh::start().await;
    catalog(&mesh).await;
    let ann = mesh.signup("ann").await;
    let (project, secret) = project_with_key(&mesh, &ann, &["usage:write", "analytics:read"]).await;

    let mut expected = Totals::default();
    for i in 0..40 {
        let recorded =
            mesh.usage().record_usage(mesh.on_behalf(varied_record(&project, i), &secret)).await.expect("record");
        expected.add(&recorded.into_inner());
    }
    // A client retry of a recorded request counts nothing in usage, nor in analytics.
    mesh.usage().record_usage(mesh.on_behalf(varied_record(&project, 3), &secret)).await.expect("retry");
    assert!(expected.cost > Decimal::ZERO);
    wait_for_totals(&mesh, &project, &secret, &expected).await;

    // The same answer from the hourly rollup (hour-aligned range), from the rollup and the raw
    // events at the ragged edges (a range off the hour), and from the raw events (minute buckets).
    let hour = chrono::Utc::now().timestamp() / 3600 * 3600;
    let series = |start: i64, end: i64, bucket: &str| pb::GetUsageTimeSeriesRequest {
        project_id: project.clone(),
        start_time: Some(prost_types::Timestamp { seconds: start, nanos: 0 }),
        end_time: Some(prost_types::Timestamp { seconds: end, nanos: 0 }),
        bucket: bucket.into(),
        time_zone: "Asia/Tokyo".into(),
        metrics: vec!["requests".into(), "cost".into(), "errors".into()],
        ..Default::default()
    };
    let mut answers = Vec::new();
    for (start, bucket) in [(hour - 7200, "day"), (hour - 7201, "day"), (hour - 7200, "minute")] {
        let answer = mesh.analytics().get_usage_time_series(authed(series(start, hour + 7200, bucket), &secret)).await;
        answers.push(answer.expect("series").into_inner());
    }
    let sources: Vec<&str> = answers.iter().map(|answer| answer.source.as_str()).collect();
    assert_eq!(sources, ["rollup", "rollup+raw", "raw"]);
    let sum = |s: &pb::UsageTimeSeries, metric: &str| -> Decimal {
        s.points
            .iter()
            .map(|p| p.metrics.as_ref().expect("metrics").values[metric].parse::<Decimal>().expect("n"))
            .sum()
    };
    for series in &answers {
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
        occurred_at: Some(aimesh_kit::wire::proto_json::timestamp(now)),
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
        start_time: Some(aimesh_kit::wire::proto_json::timestamp(now - chrono::Duration::days(1))),
        end_time: Some(aimesh_kit::wire::proto_json::timestamp(now)),
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
                start_time: Some(aimesh_kit::wire::proto_json::timestamp(now - chrono::Duration::days(500))),
                bucket: "month".into(),
                ..good.clone()
            },
        ),
        (
            "bucket",
            pb::GetUsageTimeSeriesRequest {
                start_time: Some(aimesh_kit::wire::proto_json::timestamp(now - chrono::Duration::days(30))),
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

/// What an audit event says happened: (action, actor, resource type, resource id).
type Happened = (String, String, String, String);

fn happened(events: &[pb::AuditEvent]) -> Vec<Happened> {
    events
        .iter()
        .map(|e| (e.action.clone(), e.actor_user_id.clone(), e.resource_type.clone(), e.resource_id.clone()))
        .collect()
}

/// A time as a comparable pair.
fn instant(event: &pb::AuditEvent) -> (i64, i32) {
    let time = event.occurred_at.expect("occurred_at");
    (time.seconds, time.nanos)
}

#[tokio::test]
async fn the_audit_log_is_searched_by_action_actor_time_and_page_within_the_project_only() {
    let mesh = Mesh::start().await;
    let (ann, bob, carol) = (mesh.signup("ann").await, mesh.signup("bob").await, mesh.signup("carol").await);
    // Carol's own project and key: events of another project, and a caller from it.
    let (_, carols_key) = project_with_key(&mesh, &carol, &["analytics:read"]).await;
    let (project, reader) = project_with_key(&mesh, &ann, &["analytics:read"]).await;
    let verified = mesh
        .auth()
        .authenticate(authed(
            identity_pb::AuthenticateRequest { credential: reader.clone() },
            mesh.service_token().expose(),
        ))
        .await;
    let reader_id = verified.expect("the reader key verifies").into_inner().api_key_id;
    let add_bob = identity_pb::AddMemberRequest {
        project_id: project.clone(),
        email: bob.email.clone(),
        role: identity_pb::ProjectRole::Admin.into(),
    };
    mesh.projects().add_member(authed(add_bob, &ann.token)).await.expect("ann adds bob as an admin");
    let new_key = |name: &str, scopes: &[&str]| identity_pb::CreateApiKeyRequest {
        project_id: project.clone(),
        name: name.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    };
    let doomed = mesh.api_keys().create_api_key(authed(new_key("doomed", &["chat:read"]), &bob.token)).await;
    let doomed = doomed.expect("bob creates a key").into_inner();
    let doomed_id = doomed.api_key.as_ref().expect("the key").id.clone();
    let revoke = identity_pb::RevokeApiKeyRequest { project_id: project.clone(), api_key_id: doomed_id.clone() };
    mesh.api_keys().revoke_api_key(authed(revoke, &bob.token)).await.expect("bob revokes it");
    let unscoped = mesh.api_keys().create_api_key(authed(new_key("usage", &["usage:read"]), &ann.token)).await;
    let unscoped = unscoped.expect("ann creates a key without analytics:read").into_inner();
    let unscoped_key = unscoped.api_key.as_ref().expect("the key");

    let event = |action: &str, actor: &Account, resource_type: &str, resource_id: &str| -> Happened {
        (action.to_owned(), actor.user_id.clone(), resource_type.to_owned(), resource_id.to_owned())
    };
    // Newest first, as the log answers.
    let expected = [
        event("api_key.created", &ann, "api_key", &unscoped_key.id),
        event("api_key.revoked", &bob, "api_key", &doomed_id),
        event("api_key.created", &bob, "api_key", &doomed_id),
        event("member.added", &ann, "membership", &bob.user_id),
        event("api_key.created", &ann, "api_key", &reader_id),
        event("project.created", &ann, "project", &project),
    ];
    let all = pb::SearchAuditLogRequest { project_id: project.clone(), page_size: 100, ..Default::default() };
    let search = |request: pb::SearchAuditLogRequest, credential: &str| {
        let (mut analytics, request) = (mesh.analytics(), authed(request, credential));
        async move { analytics.search_audit_log(request).await.map(tonic::Response::into_inner) }
    };
    // Once identity's outbox is delivered, analytics has stored every event (it answers a
    // delivery after its INSERT), so the log holds all it ever will.
    let identity_db = mesh.identity_db().await;
    eventually("identity's outbox is delivered", || async {
        let undelivered = "SELECT count(*) FROM outbox_events WHERE delivered_at IS NULL";
        sqlx::query_scalar::<_, i64>(undelivered).fetch_one(&identity_db).await.is_ok_and(|n| n == 0)
    })
    .await;

    let found = search(all.clone(), &reader).await.expect("search everything");
    assert_eq!(happened(&found.events), expected, "the project's events only, newest first");
    assert!(found.next_page_token.is_empty(), "one page holds them all");
    assert!(found.events.iter().all(|e| e.project_id == project));
    let details: serde_json::Value = serde_json::from_str(&found.events[0].details).expect("details are JSON");
    assert_eq!(details["display_prefix"], unscoped_key.display_prefix.as_str(), "{details}");
    let shown = format!("{:?}", found.events);
    for secret in [&reader, &doomed.secret, &unscoped.secret] {
        assert!(!shown.contains(secret.as_str()), "the audit log shows a key: {shown}");
    }
    // A member's session gets the same answer as the project's key.
    let by_bob = search(all.clone(), &bob.token).await.expect("an admin searches");
    assert_eq!(by_bob.events, found.events);

    let with_reader = |request: pb::SearchAuditLogRequest| search(request, &reader);
    let expect_found = |matches: &dyn Fn(&Happened) -> bool| -> Vec<Happened> {
        expected.iter().filter(|e| matches(e)).cloned().collect()
    };
    // By action: exactly, or by a prefix ending in ".".
    let revoked = with_reader(pb::SearchAuditLogRequest { action: "api_key.revoked".into(), ..all.clone() }).await;
    assert_eq!(happened(&revoked.expect("by action").events), expect_found(&|e| e.0 == "api_key.revoked"));
    let keys = with_reader(pb::SearchAuditLogRequest { action: "api_key.".into(), ..all.clone() }).await;
    assert_eq!(happened(&keys.expect("by prefix").events), expect_found(&|e| e.0.starts_with("api_key.")));
    let no_dot = with_reader(pb::SearchAuditLogRequest { action: "api_key".into(), ..all.clone() }).await;
    assert_eq!(happened(&no_dot.expect("no prefix without a dot").events), []);
    // By actor.
    for actor in [&ann, &bob] {
        let by_actor = pb::SearchAuditLogRequest { actor_user_id: actor.user_id.clone(), ..all.clone() };
        let found = with_reader(by_actor).await.expect("by actor");
        assert_eq!(happened(&found.events), expect_found(&|e| e.1 == actor.user_id), "{}", actor.email);
    }
    let by_carol = pb::SearchAuditLogRequest { actor_user_id: carol.user_id.clone(), ..all.clone() };
    assert_eq!(happened(&with_reader(by_carol).await.expect("by a stranger").events), []);

    // By time: from the second oldest event (included) to the newest (excluded).
    let times: Vec<(i64, i32)> = found.events.iter().map(instant).collect();
    assert!(times.windows(2).all(|pair| pair[0] > pair[1]), "events at distinct times: {times:?}");
    let between = pb::SearchAuditLogRequest {
        start_time: found.events[4].occurred_at,
        end_time: found.events[0].occurred_at,
        ..all.clone()
    };
    let between = with_reader(between).await.expect("by time");
    assert_eq!(happened(&between.events), expected[1..5]);
    let backwards = pb::SearchAuditLogRequest {
        start_time: found.events[0].occurred_at,
        end_time: found.events[4].occurred_at,
        ..all.clone()
    };
    let status = expect_code("an end before the start", Code::InvalidArgument, with_reader(backwards).await);
    assert_eq!(reason_and_field(&status).1.as_deref(), Some("end_time"));

    // Pages of two, each continuing where the last ended, the last without a token; a filter
    // holds across pages.
    for (request, want) in [
        (pb::SearchAuditLogRequest { page_size: 2, ..all.clone() }, expected.to_vec()),
        (
            pb::SearchAuditLogRequest { page_size: 2, actor_user_id: ann.user_id.clone(), ..all.clone() },
            expect_found(&|e| e.1 == ann.user_id),
        ),
    ] {
        let (mut pages, mut token) = (Vec::new(), String::new());
        loop {
            let page = with_reader(pb::SearchAuditLogRequest { page_token: token, ..request.clone() }).await;
            let page = page.expect("a page");
            assert!(page.events.len() <= 2, "{:?}", happened(&page.events));
            pages.push(happened(&page.events));
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
            assert!(pages.len() < expected.len(), "pagination does not end");
        }
        let want_pages: Vec<Vec<Happened>> = want.chunks(2).map(<[Happened]>::to_vec).collect();
        assert_eq!(pages, want_pages);
    }

    // Strangers: a person without a role in the project, a key of another project, a key of
    // this project without analytics:read.
    for (who, credential) in [
        ("carol", carol.token.as_str()),
        ("carol's key", carols_key.as_str()),
        ("a usage key", unscoped.secret.as_str()),
    ] {
        expect_code(who, Code::PermissionDenied, search(all.clone(), credential).await);
    }
}
