//! Every service with a database relays its outbox to analytics: the service runtime starts the
//! relay for each (the files service once had none, and its events never left its database).

use aimesh_proto::chat::v1 as chat_pb;
use aimesh_proto::files::v1 as files_pb;
use aimesh_proto::identity::v1 as pb;
use aimesh_tests::{Mesh, authed, catalog, eventually, project_with_key, record};

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
    let metadata = files_pb::UploadMetadata {
        project_id: project.into(),
        name: name.into(),
        mime_type: "text/plain".into(),
        ..Default::default()
    };
    let messages = [
        files_pb::UploadRequest { part: Some(files_pb::upload_request::Part::Metadata(metadata)), finish: false },
        files_pb::UploadRequest {
            part: Some(files_pb::upload_request::Part::Chunk(format!("the content of {name}").into_bytes().into())),
            finish: false,
        },
        files_pb::UploadRequest { part: None, finish: true },
    ];
    let stream = futures::stream::iter(messages);
    mesh.files().upload(authed(stream, credential)).await.expect("upload").into_inner()
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
    mesh.usage().record_usage(authed(record(&project, "request-1"), &secret)).await.expect("record usage");
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
        // (written, still undelivered)
        let outbox = || async {
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT count(*), count(*) FILTER (WHERE delivered_at IS NULL) FROM outbox_events",
            )
            .fetch_one(&pool)
            .await
            .expect("read the outbox")
        };
        let (written, _) = outbox().await;
        assert!(written > 0, "the traffic wrote no event to {service}'s outbox");
        eventually(&format!("{service}'s outbox is delivered"), || async { outbox().await.1 == 0 }).await;
        pool.close().await;
    }
}
