//! Every service with a database relays its outbox to analytics: the service runtime starts the
//! relay for each (the files service once had none, and its events never left its database).
//! An event carries the W3C trace context of the request that wrote it, from the gateway on.

use aimesh_proto::chat::v1 as chat_pb;
use aimesh_proto::files::v1 as files_pb;
use aimesh_proto::identity::v1 as pb;
use aimesh_tests::{Mesh, authed, catalog, eventually, outbox_drains, project_with_key, record};

/// Events of `project` in ClickHouse's product table, by type, in type order.
async fn product_events(mesh: &Mesh, project: &str) -> Vec<(String, u64)> {
    let client = aimesh_analytics::store::client_of(&aimesh_tests::clickhouse_url());
    let database = &mesh.config.analytics.clickhouse_database;
    client
        .query(&format!(
            "SELECT event_type, count() FROM {database}.product_events FINAL \
             WHERE project_id = toUUID(?) GROUP BY event_type ORDER BY event_type"
        ))
        .bind(project)
        .fetch_all::<(String, u64)>()
        .await
        .unwrap_or_default()
}

async fn upload(mesh: &Mesh, credential: &str, project: &str, name: &str) -> files_pb::File {
    mesh.upload_text(credential, project, name, format!("the content of {name}").as_bytes()).await
}

#[tokio::test]
async fn file_uploads_and_deletions_are_queryable_in_analytics() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let request = pb::CreateProjectRequest { name: "Files".into(), description: String::new() };
    let project = mesh.projects().create_project(authed(request, &ann.token)).await.expect("project").into_inner().id;
    let kept = upload(&mesh, &ann.token, &project, "kept.txt").await;
    let deleted = upload(&mesh, &ann.token, &project, "deleted.txt").await;
    assert_ne!(kept.id, deleted.id);
    let delete = files_pb::DeleteFileRequest { file_id: deleted.id.clone() };
    mesh.files().delete_file(authed(delete, &ann.token)).await.expect("delete");

    let expected = vec![("file.deleted".to_owned(), 1), ("file.uploaded".to_owned(), 2)];
    eventually("the files events are in analytics", || async { product_events(&mesh, &project).await == expected })
        .await;
}

/// Traffic on every service that writes events, then every outbox is drained by its relay.
#[tokio::test]
async fn after_traffic_on_every_service_every_outbox_is_delivered() {
    let mesh = Mesh::start().await;
    catalog(&mesh).await;
    let ann = mesh.signup("ann").await;
    let (project, secret) = project_with_key(&mesh, &ann, &["usage:write"]).await;
    mesh.usage().record_usage(mesh.on_behalf(record(&project, "request-1"), &secret)).await.expect("record usage");
    let session = chat_pb::CreateSessionRequest {
        project_id: project.clone(),
        model: "gpt-4o".into(),
        title: "Outbox".into(),
        ..Default::default()
    };
    let session = mesh.chat().create_session(authed(session, &ann.token)).await.expect("session").into_inner();
    let message = chat_pb::AppendMessageRequest {
        session_id: session.id,
        role: chat_pb::MessageRole::User.into(),
        content: "hello".into(),
        ..Default::default()
    };
    mesh.chat().append_message(authed(message, &ann.token)).await.expect("append");
    upload(&mesh, &ann.token, &project, "a.txt").await;

    let databases =
        [("identity", mesh.identity_db().await), ("usage", mesh.usage_db().await), ("chat", mesh.chat_db().await)];
    let databases = databases.into_iter().chain([("files", mesh.files_db().await)]);
    for (service, pool) in databases {
        outbox_drains(&pool, service).await;
        pool.close().await;
    }
}

/// A REST call with a `traceparent` reaches the service as the parent of its span (the gateway
/// passes the header on, the service adopts it), and the outbox event the call writes carries
/// the same trace, with the service's span as its parent.
#[tokio::test(flavor = "current_thread")]
async fn a_request_s_trace_context_reaches_the_outbox_event_it_writes() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    // What Telemetry::init installs, without an exporter: spans get ids and follow W3C parents.
    // On this one-thread runtime every task of the mesh runs under this subscriber.
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _traced = tracing::subscriber::set_default(subscriber);

    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let (trace_id, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let reply = mesh
        .rest()
        .post("/v1/projects", serde_json::json!({ "name": "Traced" }))
        .bearer(&ann.token)
        .header("traceparent", &format!("00-{trace_id}-{caller_span}-01"))
        .send()
        .await
        .expect(http::StatusCode::OK);
    let project = reply.json()["id"].as_str().expect("the project's id").to_owned();

    let pool = mesh.identity_db().await;
    let traceparent: Option<String> = sqlx::query_scalar(
        "SELECT traceparent FROM outbox_events WHERE event_type = 'project.created' AND project_id = $1::uuid",
    )
    .bind(&project)
    .fetch_one(&pool)
    .await
    .expect("the project.created event");
    pool.close().await;
    let traceparent = traceparent.expect("the event carries a trace context");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!((parts[0], parts[1], parts[3]), ("00", trace_id, "01"), "the caller's trace, sampled: {traceparent}");
    assert!(parts[2] != caller_span && parts[2] != "0000000000000000", "a span of the service: {traceparent}");

    // A call without a trace context starts none of its own here: its event carries a fresh
    // trace, never the previous caller's.
    let untraced = mesh.rest().post("/v1/projects", serde_json::json!({ "name": "Untraced" })).bearer(&ann.token);
    let other = untraced.send().await.expect(http::StatusCode::OK).json()["id"].as_str().map(str::to_owned);
    let pool = mesh.identity_db().await;
    let other_trace: Option<String> = sqlx::query_scalar(
        "SELECT traceparent FROM outbox_events WHERE event_type = 'project.created' AND project_id = $1::uuid",
    )
    .bind(other.expect("the second project's id"))
    .fetch_one(&pool)
    .await
    .expect("the second project.created event");
    pool.close().await;
    assert!(other_trace.as_deref().is_none_or(|t| !t.contains(trace_id)), "{other_trace:?}");
}
