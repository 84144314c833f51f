//! One retention policy per project across every store, through the gateway: a project kept
//! one day loses its old analytics events, usage records, chat sessions and files to the
//! services' background rounds; a project on legal hold with the same days keeps all of it
//! until the hold is lifted; the hold is audited. Old data is made by backdating rows directly.

use chrono::{Datelike, Duration, TimeZone, Utc};
use http::StatusCode;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use aimesh_proto::analytics::v1 as pb;
use aimesh_tests::{Mesh, eventually};

/// How old the backdated data is: past a retention of one day.
const AGE_DAYS: i64 = 3;

/// One project's old data in every store, by the ids that find it.
struct Seeded {
    project: String,
    session: String,
    file: String,
    events: usize,
}

async fn count(pool: &PgPool, statement: &'static str, project: &str) -> i64 {
    let id = Uuid::parse_str(project).expect("project id");
    sqlx::query_scalar(statement).bind(id).fetch_one(pool).await.expect("count")
}

/// Old product events of `project` in ClickHouse.
async fn old_events(mesh: &Mesh, project: &str) -> u64 {
    let client = aimesh_analytics::store::client_of(&aimesh_tests::clickhouse_url());
    let db = &mesh.config.analytics.clickhouse_database;
    client
        .query(&format!(
            "SELECT count() FROM {db}.product_events FINAL WHERE project_id = ? AND event_type = 'retention.test'"
        ))
        .bind(project)
        .fetch_one()
        .await
        .expect("count events")
}

/// What of `seeded` is still there: (events, usage records, chat sessions, live files).
async fn remaining(mesh: &Mesh, seeded: &Seeded) -> (u64, i64, i64, i64) {
    let (usage, chat, files) = (mesh.usage_db().await, mesh.chat_db().await, mesh.files_db().await);
    let project = &seeded.project;
    (
        old_events(mesh, project).await,
        count(&usage, "SELECT count(*) FROM model_usage_logs WHERE project_id = $1", project).await,
        count(&chat, "SELECT count(*) FROM chat_sessions WHERE project_id = $1", project).await,
        count(&files, "SELECT count(*) FROM files WHERE project_id = $1 AND deleted_at IS NULL", project).await,
    )
}

/// Old data of every kind in `project`: events ingested with an old time, a usage record of an
/// earlier month, a conversation and a file whose times are moved back.
async fn seed(mesh: &Mesh, token: &str, project: String, model: Uuid) -> Seeded {
    let rest = mesh.rest();
    let old = Utc::now() - Duration::days(AGE_DAYS);
    let events: Vec<pb::Event> = (0..3)
        .map(|_| pb::Event {
            event_id: Uuid::now_v7().to_string(),
            topic: "product".into(),
            event_type: "retention.test".into(),
            project_id: project.clone(),
            occurred_at: Some(aimesh_kit::wire::proto_json::timestamp(old)),
            payload: "{}".into(),
        })
        .collect();
    let seeded_events = events.len();
    let mut request = tonic::Request::new(pb::IngestRequest { events });
    mesh.service_token().authorize(&mut request).expect("authorize");
    let ingested = mesh.ingest().ingest(request).await.expect("ingest").into_inner();
    assert_eq!(ingested.accepted as usize, seeded_events);

    let session = rest
        .post("/v1/chat/sessions", json!({ "projectId": project, "model": "m" }))
        .bearer(token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json()["id"]
        .as_str()
        .expect("session id")
        .to_owned();
    rest.post(
        &format!("/v1/chat/sessions/{session}/messages"),
        json!({ "role": "MESSAGE_ROLE_USER", "content": "old" }),
    )
    .bearer(token)
    .send()
    .await
    .expect(StatusCode::OK);
    let file = mesh.upload_text(token, &project, "old.txt", b"kept or not").await.id;

    let id = Uuid::parse_str(&project).expect("project id");
    let session_id = Uuid::parse_str(&session).expect("session id");
    let chat = mesh.chat_db().await;
    sqlx::query("UPDATE chat_messages SET created_at = created_at - make_interval(days => $2) WHERE session_id = $1")
        .bind(session_id)
        .bind(AGE_DAYS as i32)
        .execute(&chat)
        .await
        .expect("backdate messages");
    sqlx::query("UPDATE chat_sessions SET updated_at = updated_at - make_interval(days => $2) WHERE id = $1")
        .bind(session_id)
        .bind(AGE_DAYS as i32)
        .execute(&chat)
        .await
        .expect("backdate the session");
    let files = mesh.files_db().await;
    sqlx::query("UPDATE files SET created_at = created_at - make_interval(days => $2) WHERE id = $1")
        .bind(Uuid::parse_str(&file).expect("file id"))
        .bind(AGE_DAYS as i32)
        .execute(&files)
        .await
        .expect("backdate the file");
    // A record accepted before the current budget period (budgets read this month's only).
    let now = Utc::now();
    let month = Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).single().expect("month start");
    let before = month - Duration::days(2);
    let usage = mesh.usage_db().await;
    sqlx::query(
        "INSERT INTO model_usage_logs (id, request_id, project_id, user_id, model_id, request_type, input_tokens, \
         output_tokens, cached_input_tokens, total_tokens, cost, duration_ms, status, request_time, created_at) \
         VALUES ($1, $2, $3, $4, $5, 'chat', 1, 1, 0, 2, 0.01, 5, 'success', $6, $6)",
    )
    .bind(Uuid::now_v7())
    .bind(Uuid::now_v7().to_string())
    .bind(id)
    .bind(Uuid::now_v7())
    .bind(model)
    .bind(before)
    .execute(&usage)
    .await
    .expect("an old usage record");
    Seeded { project, session, file, events: seeded_events }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_loses_old_data_in_every_store_unless_it_is_on_legal_hold() {
    let (mut config, databases) = aimesh_tests::test_config();
    config.analytics.retention_apply_interval_secs = 1;
    config.usage.retention_interval_secs = 1;
    config.chat.retention_interval_secs = 1;
    config.files.retention_interval_secs = 1;
    let mesh = Mesh::start_with(config, databases).await;
    let rest = mesh.rest();
    let ann = mesh.signup("ann").await;
    let model = Uuid::now_v7();
    sqlx::query("INSERT INTO ai_models (id, provider, name, model_type) VALUES ($1, 'openai', 'retained', 'chat')")
        .bind(model)
        .execute(&mesh.usage_db().await)
        .await
        .expect("a model");

    let short = mesh.create_project(&ann, "short").await;
    let held = mesh.create_project(&ann, "held").await;
    let short = seed(&mesh, &ann.token, short, model).await;
    let held = seed(&mesh, &ann.token, held, model).await;
    assert_eq!(remaining(&mesh, &short).await, (3, 1, 1, 1));

    // The hold first, then the days: at no moment is the held project's policy one day alone.
    let hold = |project: &str, on: bool| {
        rest.post(
            &format!("/v1/projects/{project}/analytics/retention:setLegalHold"),
            json!({ "legalHold": on, "reason": "case 42" }),
        )
        .bearer(&ann.token)
        .send()
    };
    let refused = rest
        .post(&format!("/v1/projects/{}/analytics/retention:setLegalHold", held.project), json!({ "legalHold": true }))
        .bearer(&ann.token)
        .send()
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "a hold needs a reason");
    assert!(refused.json().to_string().contains("reason"), "the error names the field: {}", refused.json());
    let on = hold(&held.project, true).await.expect(StatusCode::OK).json();
    assert_eq!(on["legalHold"], true);
    assert!(on["legalHoldSince"].is_string(), "the hold says since when: {on}");
    for project in [&held.project, &short.project] {
        rest.call(http::Method::PUT, &format!("/v1/projects/{project}/analytics/retention"))
            .json(json!({ "days": 1 }))
            .bearer(&ann.token)
            .send()
            .await
            .expect(StatusCode::OK);
    }

    eventually("the short project's old data is gone from every store", || {
        let (mesh, short) = (&mesh, &short);
        async move { remaining(mesh, short).await == (0, 0, 0, 0) }
    })
    .await;
    let retention = |project: String| {
        let (rest, token) = (rest.clone(), ann.token.clone());
        async move { rest.get(&format!("/v1/projects/{project}/analytics/retention")).bearer(&token).send().await.json() }
    };
    eventually("the hold is applied to the held project's events", || {
        let retention = retention(held.project.clone());
        async move { retention.await["applied"] == true }
    })
    .await;
    // The same rounds found the held project's data as old: it is all there.
    assert_eq!(remaining(&mesh, &held).await, (held.events as u64, 1, 1, 1), "a held project loses nothing");
    let got = rest.get(&format!("/v1/chat/sessions/{}", held.session)).bearer(&ann.token).send().await;
    assert_eq!(got.status, StatusCode::OK, "the held conversation reads");
    let gone = rest.get(&format!("/v1/chat/sessions/{}", short.session)).bearer(&ann.token).send().await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "the short project's conversation is gone whole");
    let file = rest.get(&format!("/v1/files/{}", short.file)).bearer(&ann.token).send().await;
    assert_eq!(file.status, StatusCode::NOT_FOUND, "the short project's file is deleted as DeleteFile does");

    // Lifted, the hold no longer keeps anything: the project's own day applies.
    let off = hold(&held.project, false).await.expect(StatusCode::OK).json();
    assert!(off.get("legalHold").is_none() || off["legalHold"] == false, "{off}");
    eventually("the formerly held project's old data is gone too", || {
        let (mesh, held) = (&mesh, &held);
        async move { remaining(mesh, held).await == (0, 0, 0, 0) }
    })
    .await;

    // Both decisions are in the audit log, with the reason.
    let audit = rest
        .get(&format!("/v1/projects/{}/analytics/audit?action=retention.", held.project))
        .bearer(&ann.token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json();
    let holds: Vec<&serde_json::Value> = audit["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["action"].as_str().is_some_and(|a| a.starts_with("retention.legal_hold")))
        .collect();
    let actions: Vec<&str> = holds.iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions, ["retention.legal_hold_lifted", "retention.legal_hold_set"], "{audit}");
    assert!(holds[1]["details"].as_str().is_some_and(|d| d.contains("case 42")), "{audit}");
}

#[tokio::test]
async fn only_the_mesh_reads_the_retention_policies() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "p").await;
    let reply = mesh.rest().call(http::Method::PUT, &format!("/v1/projects/{project}/analytics/retention"));
    reply.json(json!({ "days": 7 })).bearer(&ann.token).send().await.expect(StatusCode::OK);

    let request = pb::ListRetentionPoliciesRequest::default();
    let refused = mesh.ingest().list_retention_policies(aimesh_tests::authed(request.clone(), &ann.token)).await;
    assert!(refused.is_err(), "a person's session is not the service token");
    let mut internal = tonic::Request::new(request);
    mesh.service_token().authorize(&mut internal).expect("authorize");
    let page = mesh.ingest().list_retention_policies(internal).await.expect("the policies").into_inner();
    let policy = page.policies.iter().find(|p| p.project_id == project).expect("the project's policy");
    assert_eq!((policy.days, policy.legal_hold), (7, false));

    let mut bad = tonic::Request::new(pb::ListRetentionPoliciesRequest { page_size: 10_001, ..Default::default() });
    mesh.service_token().authorize(&mut bad).expect("authorize");
    let error = mesh.ingest().list_retention_policies(bad).await.expect_err("a page too large");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(error.message().contains("page_size"), "{}", error.message());
}
