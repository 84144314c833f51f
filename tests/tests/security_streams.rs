//! Long streams and downloads against abuse (issue 19, items 4 and 7), end to end through the
//! gateway (Server-Sent Events, downloads) and over gRPC: an open watch or export ends once its
//! caller's access goes away (removed from the project, demoted, logged out, key revoked),
//! streams have a maximum lifetime and a maximum number open per principal, and a download is
//! inert in a browser (no sniffing, always an attachment, sandboxed).

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use tonic::Code;
use tonic::codec::Streaming;

use aimesh_proto::chat::v1 as chat_pb;
use aimesh_proto::identity::v1 as pb;
use aimesh_tests::rest::{Event, Events, Rest};
use aimesh_tests::{Account, Mesh, authed, eventually, expect_code, reason_and_field, test_config};

/// How long a test waits for a stream to end; far above the re-check interval (1 s) it sets.
const END_WAIT: Duration = Duration::from_secs(20);

/// A mesh whose chat re-checks open streams every second, with `configure` applied on top.
async fn mesh_with(configure: impl FnOnce(&mut aimesh::MeshConfig)) -> Mesh {
    let (mut config, databases) = test_config();
    config.chat.stream_recheck_secs = 1;
    configure(&mut config);
    Mesh::start_with(config, databases).await
}

async fn create_session(mesh: &Mesh, account: &Account, project_id: &str) -> String {
    let request = chat_pb::CreateSessionRequest {
        project_id: project_id.into(),
        model: "gpt-4o".into(),
        title: "Watched".into(),
        ..Default::default()
    };
    mesh.chat().create_session(authed(request, &account.token)).await.expect("create session").into_inner().id
}

async fn append(mesh: &Mesh, credential: &str, session_id: &str, content: String) {
    let request = chat_pb::AppendMessageRequest {
        session_id: session_id.into(),
        role: chat_pb::MessageRole::User.into(),
        content,
        tokens: 1,
        ..Default::default()
    };
    mesh.chat().append_message(authed(request, credential)).await.expect("append");
}

/// A watch of `session_id` over gRPC, or its refusal.
async fn try_watch(
    mesh: &Mesh,
    credential: &str,
    session_id: &str,
) -> Result<Streaming<chat_pb::Message>, tonic::Status> {
    let request = chat_pb::WatchSessionRequest { session_id: session_id.into(), after_sequence: 0 };
    mesh.chat().watch_session(authed(request, credential)).await.map(tonic::Response::into_inner)
}

async fn watch(mesh: &Mesh, credential: &str, session_id: &str) -> Streaming<chat_pb::Message> {
    try_watch(mesh, credential, session_id).await.expect("watch")
}

/// The status a gRPC stream ends with, skipping the messages before it; panics if it ends
/// cleanly or stays open past [`END_WAIT`].
async fn end_of<T: std::fmt::Debug>(stream: &mut Streaming<T>) -> tonic::Status {
    let deadline = tokio::time::Instant::now() + END_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => panic!("the stream is still open after {END_WAIT:?}"),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => panic!("the stream ended without an error"),
            Ok(Err(status)) => return status,
        }
    }
}

/// A watch of `session_id` through the gateway, as Server-Sent Events.
async fn watch_sse(rest: &Rest, credential: &str, session_id: &str) -> Events {
    let response =
        rest.get(&format!("/v1/chat/sessions/{session_id}:watch")).bearer(credential).open().await.expect("watch");
    assert_eq!(response.status(), StatusCode::OK);
    Events::new(response.into_body())
}

/// The `error` event an SSE stream ends with, as JSON, skipping the messages before it.
async fn sse_error(events: &mut Events) -> Value {
    let deadline = tokio::time::Instant::now() + END_WAIT;
    loop {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        match events.next(wait).await {
            Some(Event { name, data, .. }) if name == "error" => {
                assert_eq!(events.next(END_WAIT).await, None, "the stream closes after its error");
                return serde_json::from_str(&data).expect("the error is JSON");
            }
            Some(_) => {}
            None => panic!("the event stream ended without an error event"),
        }
    }
}

#[tokio::test]
async fn a_watcher_removed_from_the_project_is_cut_off_with_permission_denied_and_any_when_deleted() {
    let mesh = mesh_with(|_| {}).await;
    let (ann, bob) = (mesh.signup("ann").await, mesh.signup("bob").await);
    let project = mesh.create_project(&ann, "Streams").await;
    mesh.add_member(&ann, &project, &bob, pb::ProjectRole::Member).await;
    let session = create_session(&mesh, &ann, &project).await;
    append(&mesh, &ann.token, &session, "before".into()).await;

    let mut grpc = watch(&mesh, &bob.token, &session).await;
    let first = grpc.message().await.expect("a message").expect("the stream stays open");
    assert_eq!(first.content, "before");
    let mut sse = watch_sse(&mesh.rest(), &bob.token, &session).await;
    let first = sse.next(END_WAIT).await.expect("an event");
    assert_eq!(first.name, "message");

    let remove = pb::RemoveMemberRequest { project_id: project.clone(), user_id: bob.user_id.clone() };
    mesh.projects().remove_member(authed(remove, &ann.token)).await.expect("ann removes bob");

    let status = end_of(&mut grpc).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let error = sse_error(&mut sse).await;
    assert_eq!(error["code"], "PERMISSION_DENIED", "{error}");
    // The owner's own watch is untouched, until the session is deleted: then it ends as a new
    // call on the session would, NOT_FOUND.
    let mut own = watch(&mesh, &ann.token, &session).await;
    assert_eq!(own.message().await.expect("a message").expect("open").content, "before");
    let delete = chat_pb::DeleteSessionRequest { session_id: session.clone() };
    mesh.chat().delete_session(authed(delete, &ann.token)).await.expect("ann deletes the session");
    let status = end_of(&mut own).await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(reason_and_field(&status).0, "SESSION_NOT_FOUND");
}

#[tokio::test]
async fn a_watcher_who_logs_out_or_whose_key_is_revoked_is_cut_off_with_unauthenticated() {
    let mesh = mesh_with(|_| {}).await;
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "Streams").await;
    let session = create_session(&mesh, &ann, &project).await;
    let key = pb::CreateApiKeyRequest {
        project_id: project.clone(),
        name: "watcher".into(),
        scopes: vec!["chat:read".into()],
        ..Default::default()
    };
    let key = mesh.api_keys().create_api_key(authed(key, &ann.token)).await.expect("create key").into_inner();
    let key_id = key.api_key.expect("the key").id;

    // A second login of ann watches (the first one keeps working for the revocation below).
    let login = pb::LoginRequest { login: ann.email.clone(), password: ann.password.clone(), device_name: "tv".into() };
    let tv = mesh.sessions().login(login).await.expect("login").into_inner().access_token;
    let mut grpc = watch(&mesh, &tv, &session).await;
    let mut sse = watch_sse(&mesh.rest(), &tv, &session).await;
    let mut by_key = watch(&mesh, &key.secret, &session).await;
    let mut by_key_sse = watch_sse(&mesh.rest(), &key.secret, &session).await;

    mesh.sessions().logout(authed(pb::LogoutRequest {}, &tv)).await.expect("logout");
    let status = end_of(&mut grpc).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(sse_error(&mut sse).await["code"], "UNAUTHENTICATED");

    let revoke = pb::RevokeApiKeyRequest { project_id: project.clone(), api_key_id: key_id };
    mesh.api_keys().revoke_api_key(authed(revoke, &ann.token)).await.expect("revoke the key");
    let status = end_of(&mut by_key).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(sse_error(&mut by_key_sse).await["code"], "UNAUTHENTICATED");
}

#[tokio::test]
async fn an_export_of_an_admin_demoted_while_it_runs_is_cut_off() {
    // One stream per person: the demoted admin's next stream opening shows that the export's
    // stream ended (its slot is free) without reading the export.
    let mesh = mesh_with(|config| config.chat.max_streams_per_principal = 1).await;
    let (ann, bob) = (mesh.signup("ann").await, mesh.signup("bob").await);
    let project = mesh.create_project(&ann, "Streams").await;
    mesh.add_member(&ann, &project, &bob, pb::ProjectRole::Admin).await;
    let session = create_session(&mesh, &ann, &project).await;
    // Far more than the stream's buffers and the HTTP/2 windows hold: the export is still
    // running, held up by bob not reading, when the demotion is noticed.
    let content = "x".repeat(250_000);
    for _ in 0..40 {
        append(&mesh, &ann.token, &session, content.clone()).await;
    }
    let whole = 40 * content.len();

    let export = chat_pb::ExportProjectRequest { project_id: project.clone() };
    let mut stream =
        mesh.chat().export_project(authed(export, &bob.token)).await.expect("export as an admin").into_inner();
    let first = stream.message().await.expect("a chunk").expect("the export goes on");
    assert!(!first.data.is_empty());
    expect_code("a second stream", Code::ResourceExhausted, try_watch(&mesh, &bob.token, &session).await);

    let demote = pb::UpdateMemberRoleRequest {
        project_id: project.clone(),
        user_id: bob.user_id.clone(),
        role: pb::ProjectRole::Member.into(),
    };
    mesh.projects().update_member_role(authed(demote, &ann.token)).await.expect("ann demotes bob");
    eventually("the export stream ends and frees bob's slot", || async {
        try_watch(&mesh, &bob.token, &session).await.is_ok()
    })
    .await;

    let mut received = first.data.len();
    let status = loop {
        match tokio::time::timeout(END_WAIT, stream.message()).await.expect("the stream moves") {
            Ok(Some(chunk)) => received += chunk.data.len(),
            Ok(None) => panic!("the export finished ({received} bytes) for a demoted admin"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(received < whole, "only what was in flight before the demotion arrived: {received} of {whole}");
}

#[tokio::test]
async fn a_principal_holds_at_most_the_configured_streams_and_a_closed_one_frees_its_slot() {
    let mesh = mesh_with(|config| config.chat.max_streams_per_principal = 2).await;
    let rest = mesh.rest();
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "Streams").await;
    let session = create_session(&mesh, &ann, &project).await;

    let grpc = watch(&mesh, &ann.token, &session).await;
    let _sse = watch_sse(&rest, &ann.token, &session).await;
    let refused = expect_code("a third stream", Code::ResourceExhausted, try_watch(&mesh, &ann.token, &session).await);
    assert_eq!(reason_and_field(&refused).0, "TOO_MANY_STREAMS");
    let refused = rest.get(&format!("/v1/chat/sessions/{session}:watch")).bearer(&ann.token).send().await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", refused.body);
    assert_eq!(refused.json()["code"], "RESOURCE_EXHAUSTED");
    let export =
        chat_pb::ExportSessionRequest { session_id: session.clone(), format: chat_pb::ExportFormat::Json.into() };
    let refused = mesh.chat().export_session(authed(export, &ann.token)).await;
    expect_code("an export counts too", Code::ResourceExhausted, refused.map(|_| ()));

    // Counted per person, not per login session.
    let login = pb::LoginRequest { login: ann.email.clone(), password: ann.password.clone(), device_name: "tv".into() };
    let tv = mesh.sessions().login(login).await.expect("login").into_inner().access_token;
    expect_code("another login of ann", Code::ResourceExhausted, try_watch(&mesh, &tv, &session).await);
    // Somebody else has slots of their own.
    let bob = mesh.signup("bob").await;
    mesh.add_member(&ann, &project, &bob, pb::ProjectRole::Viewer).await;
    let _bob = watch(&mesh, &bob.token, &session).await;

    drop(grpc);
    eventually("the closed stream's slot is free again", || async { try_watch(&mesh, &tv, &session).await.is_ok() })
        .await;
}

#[tokio::test]
async fn a_stream_ends_by_itself_at_its_maximum_lifetime() {
    let mesh = mesh_with(|config| config.chat.stream_max_lifetime_secs = 2).await;
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "Streams").await;
    let session = create_session(&mesh, &ann, &project).await;
    append(&mesh, &ann.token, &session, "one".into()).await;

    let mut grpc = watch(&mesh, &ann.token, &session).await;
    let mut sse = watch_sse(&mesh.rest(), &ann.token, &session).await;
    let status = end_of(&mut grpc).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason_and_field(&status).0, "STREAM_LIFETIME_REACHED");
    let error = sse_error(&mut sse).await;
    assert_eq!((&error["code"], &error["reason"]), (&json!("UNAVAILABLE"), &json!("STREAM_LIFETIME_REACHED")));

    // Reconnecting after the last sequence received picks up from there.
    append(&mesh, &ann.token, &session, "two".into()).await;
    let request = chat_pb::WatchSessionRequest { session_id: session.clone(), after_sequence: 1 };
    let mut resumed = mesh.chat().watch_session(authed(request, &ann.token)).await.expect("watch again").into_inner();
    assert_eq!(resumed.message().await.expect("a message").expect("open").content, "two");
}

/// Uploads `content` as a file of `mime_type` through the gateway; returns its id.
async fn upload(rest: &Rest, token: &str, project_id: &str, name: &str, mime_type: &str, content: &str) -> String {
    // A `+` in a query string is a space.
    let mime_type = mime_type.replace('+', "%2B");
    let path = format!("/v1/projects/{project_id}/files?metadata.name={name}&metadata.mimeType={mime_type}");
    let reply = rest
        .call(Method::POST, &path)
        .raw("application/octet-stream", content.to_owned())
        .bearer(token)
        .send()
        .await
        .expect(StatusCode::OK);
    reply.json()["id"].as_str().expect("file id").to_owned()
}

#[tokio::test]
async fn downloads_are_inert_in_a_browser_by_either_route() {
    let mesh = Mesh::start().await;
    let rest = mesh.rest();
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "Streams").await;
    let files = [
        ("page.html", "text/html", "<html><script>alert(document.cookie)</script></html>"),
        ("logo.svg", "image/svg+xml", "<svg xmlns=\"http://www.w3.org/2000/svg\"><script>alert(1)</script></svg>"),
        ("notes.txt", "text/plain", "<script>alert(1)</script>"),
    ];
    for (name, mime_type, content) in files {
        let file_id = upload(&rest, &ann.token, &project, name, mime_type, content).await;
        let link = rest
            .post(&format!("/v1/files/{file_id}:createDownloadUrl"), json!({ "expiresInSeconds": 60 }))
            .bearer(&ann.token)
            .send()
            .await
            .expect(StatusCode::OK)
            .json();
        let url = link["url"].as_str().expect("a url").to_owned();
        let authenticated = rest.get(&format!("/v1/files/{file_id}:download")).bearer(&ann.token).send().await;
        let signed = rest.get(&url).send().await;
        for (route, reply) in [("download", authenticated), ("signed link", signed)] {
            let reply = reply.expect(StatusCode::OK);
            assert_eq!(reply.body, content.as_bytes(), "{route} {name}");
            assert!(reply.header("content-type").is_some_and(|t| t.starts_with(mime_type)), "{route} {name}");
            assert_eq!(reply.header("x-content-type-options"), Some("nosniff"), "{route} {name}");
            assert_eq!(
                reply.header("content-disposition"),
                Some(format!("attachment; filename=\"{name}\"").as_str()),
                "{route} {name}"
            );
            if mime_type != "text/plain" {
                let policy = reply.header("content-security-policy").unwrap_or_default();
                assert!(
                    policy.contains("sandbox") && policy.contains("default-src 'none'"),
                    "{route} {name}: {policy}"
                );
            }
        }
    }
}
