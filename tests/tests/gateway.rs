//! The REST gateway end to end: the same mesh reached over HTTP/JSON, with its error shape,
//! field-named 400s, streams as Server-Sent Events and downloads, and the HTTP plumbing
//! (request ids, gzip, CORS, health, the OpenAPI document).

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use sha2::{Digest, Sha256};

use aimesh_gateway::GatewayConfig;
use aimesh_kit::config::ServiceUrls;
use aimesh_tests::rest::{Events, Form, Rest};
use aimesh_tests::{Mesh, test_config, use_s3};

/// Registers and logs in through REST; returns the access token.
async fn signup(rest: &Rest, name: &str) -> String {
    let email = format!("{name}@example.org");
    let password = format!("{name}-password-123");
    rest.post("/v1/users", json!({ "email": email, "username": name, "password": password }))
        .send()
        .await
        .expect(StatusCode::OK);
    let login = rest.post("/v1/auth/login", json!({ "login": email, "password": password })).send().await;
    let body = login.expect(StatusCode::OK).json();
    body["accessToken"].as_str().expect("an access token").to_owned()
}

async fn project(rest: &Rest, token: &str) -> String {
    let reply = rest.post("/v1/projects", json!({ "name": "REST" })).bearer(token).send().await;
    reply.expect(StatusCode::OK).json()["id"].as_str().expect("project id").to_owned()
}

async fn chat_session(rest: &Rest, token: &str, project_id: &str) -> String {
    let body =
        json!({ "projectId": project_id, "model": "gpt-4o", "title": "hello", "config": { "temperature": 0.2 } });
    let reply = rest.post("/v1/chat/sessions", body).bearer(token).send().await.expect(StatusCode::OK);
    reply.json()["id"].as_str().expect("session id").to_owned()
}

fn assert_error(reply: &aimesh_tests::rest::Reply, status: StatusCode, code: &str) -> Value {
    assert_eq!(reply.status, status, "body: {}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    assert_eq!(body["code"], code, "{body}");
    assert!(body["reason"].as_str().is_some_and(|r| !r.is_empty()), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(body["details"]["requestId"].as_str().is_some(), "{body}");
    body
}

#[tokio::test]
async fn a_conversation_over_rest_follows_the_json_mapping() {
    let mesh = Mesh::start().await;
    let rest = mesh.rest();
    let token = signup(&rest, "ann").await;
    let project_id = project(&rest, &token).await;
    let session_id = chat_session(&rest, &token, &project_id).await;

    let path = format!("/v1/chat/sessions/{session_id}/messages");
    let appended = rest
        .post(
            &path,
            json!({ "role": "MESSAGE_ROLE_USER", "content": "hi there", "tokens": 7, "metadata": { "k": [1, "v"] } }),
        )
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(appended["sequence"], "1", "int64 is a string in the JSON mapping");
    assert_eq!(appended["role"], "MESSAGE_ROLE_USER", "enums by name");
    assert_eq!(appended["metadata"], json!({ "k": [1.0, "v"] }), "Struct numbers are doubles");
    assert!(appended.get("parentMessageId").is_none(), "zero values are left out");

    // PATCH with only the changed fields: the update mask is inferred from the body.
    let patched = rest
        .patch(&format!("/v1/chat/sessions/{session_id}"), json!({ "title": "renamed" }))
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(patched["title"], "renamed");
    assert_eq!(patched["model"], "gpt-4o", "fields outside the body are untouched");

    let listed = rest
        .get(&format!("/v1/chat/sessions/{session_id}/messages?pageSize=10"))
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(listed["messages"][0]["content"], "hi there");
    let sessions = rest
        .get(&format!("/v1/chat/sessions?projectId={project_id}&status=SESSION_STATUS_ACTIVE"))
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(sessions["sessions"][0]["id"], session_id.as_str());
    assert_eq!(sessions["sessions"][0]["messageCount"], "1");

    // The same data through gRPC: the gateway changed nothing on the way.
    let over_grpc = mesh
        .chat()
        .get_session(aimesh_tests::authed(
            aimesh_proto::chat::v1::GetSessionRequest { session_id: session_id.clone() },
            &token,
        ))
        .await
        .expect("grpc get")
        .into_inner();
    assert_eq!(over_grpc.title, "renamed");
    assert_eq!(over_grpc.total_tokens, 7);
}

#[tokio::test]
async fn bad_requests_get_one_error_shape_with_the_field_named() {
    let mesh = Mesh::start().await;
    let rest = mesh.rest();
    let token = signup(&rest, "bea").await;
    let project_id = project(&rest, &token).await;

    let unknown =
        rest.post("/v1/chat/sessions", json!({ "projectId": project_id, "bogus": 1 })).bearer(&token).send().await;
    let body = assert_error(&unknown, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("bogus")), "{body}");

    let wrong_type =
        rest.post("/v1/chat/sessions", json!({ "projectId": project_id, "title": 5 })).bearer(&token).send().await;
    let body = assert_error(&wrong_type, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
    assert_eq!(body["details"]["field"], "title");

    let bad_query = rest.get("/v1/chat/sessions?pageSize=lots").bearer(&token).send().await;
    assert_eq!(assert_error(&bad_query, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT")["details"]["field"], "pageSize");

    let not_json = rest.call(Method::POST, "/v1/projects").raw("application/json", "{nope").bearer(&token).send().await;
    assert_eq!(assert_error(&not_json, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT")["details"]["field"], "body");

    // Validation inside the service comes back the same way, with its own reason and field.
    let empty = rest
        .post("/v1/chat/sessions/00000000-0000-0000-0000-000000000000/messages", json!({ "role": "MESSAGE_ROLE_USER" }))
        .bearer(&token)
        .send()
        .await;
    assert!(empty.status.is_client_error(), "{:?}", empty.status);

    let anonymous = rest.get(&format!("/v1/projects/{project_id}")).send().await;
    assert_error(&anonymous, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
    let forged = rest.get(&format!("/v1/projects/{project_id}")).bearer("amk_forged").send().await;
    assert_error(&forged, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");

    let other = signup(&rest, "cid").await;
    let foreign = rest.get(&format!("/v1/projects/{project_id}")).bearer(&other).send().await;
    assert_error(&foreign, StatusCode::FORBIDDEN, "PERMISSION_DENIED");

    let no_route = rest.get("/v1/nothing/here").send().await;
    assert_eq!(assert_error(&no_route, StatusCode::NOT_FOUND, "NOT_FOUND")["reason"], "NO_ROUTE");
    let wrong_method = rest.call(Method::PUT, &format!("/v1/projects/{project_id}")).send().await;
    assert_error(&wrong_method, StatusCode::METHOD_NOT_ALLOWED, "UNIMPLEMENTED");

    let huge = "x".repeat(mesh.config.gateway.max_body_bytes + 1);
    let too_big = rest.post("/v1/projects", json!({ "name": huge })).bearer(&token).send().await;
    assert_error(&too_big, StatusCode::PAYLOAD_TOO_LARGE, "INVALID_ARGUMENT");

    // Nothing above created a session.
    let sessions = rest.get(&format!("/v1/chat/sessions?projectId={project_id}")).bearer(&token).send().await;
    assert_eq!(sessions.expect(StatusCode::OK).json().get("sessions"), None);
}

#[tokio::test]
async fn a_watch_is_server_sent_events_that_resume_and_end_with_an_error_event() {
    let mesh = Mesh::start().await;
    // A gateway of its own in front of the mesh's services, so the services can stop while the
    // gateway keeps streaming to its client.
    let (mut config, _databases) = test_config();
    config.common.services = mesh.config.common.services.clone();
    // The deployment's secrets: the gateway vouches for its clients with the gateway token.
    config.common.auth = mesh.config.common.auth.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let own_gateway = Rest::new(listener.local_addr().expect("address"));
    let stop_gateway = CancellationToken::new();
    let gateway = tokio::spawn(aimesh_gateway::run(listener, config.common, config.gateway, stop_gateway.clone()));
    own_gateway.wait_until_ready().await;

    let rest = mesh.rest();
    let token = signup(&rest, "dan").await;
    let project_id = project(&rest, &token).await;
    let session_id = chat_session(&rest, &token, &project_id).await;
    let messages = format!("/v1/chat/sessions/{session_id}/messages");
    for content in ["one", "two"] {
        rest.post(&messages, json!({ "role": "MESSAGE_ROLE_USER", "content": content })).bearer(&token).send().await;
    }

    // Resuming after sequence 1 (as a reconnecting EventSource does) starts at two.
    let response = own_gateway
        .get(&format!("/v1/chat/sessions/{session_id}:watch"))
        .bearer(&token)
        .header("last-event-id", "1")
        .open()
        .await
        .expect("watch");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
    let mut events = Events::new(response.into_body());
    let first = events.next(Duration::from_secs(10)).await.expect("an event");
    assert_eq!((first.name.as_str(), first.id.as_deref()), ("message", Some("2")));
    assert_eq!(serde_json::from_str::<Value>(&first.data).expect("json")["content"], "two");

    rest.post(&messages, json!({ "role": "MESSAGE_ROLE_ASSISTANT", "content": "three" })).bearer(&token).send().await;
    let live = events.next(Duration::from_secs(10)).await.expect("the live message");
    assert_eq!(live.id.as_deref(), Some("3"));

    // The services stop: the stream ends with an error event, not a silent close.
    mesh.stop().await.expect("mesh stops");
    let last = events.next(Duration::from_secs(10)).await.expect("an error event");
    assert_eq!(last.name, "error");
    assert_eq!(serde_json::from_str::<Value>(&last.data).expect("json")["code"], "UNAVAILABLE");
    assert_eq!(events.next(Duration::from_secs(10)).await, None, "the stream closes after the error");

    stop_gateway.cancel();
    gateway.await.expect("gateway task").expect("gateway stops cleanly");
}

#[tokio::test]
async fn an_export_is_a_download_and_a_missing_session_a_json_error() {
    let mesh = Mesh::start().await;
    let rest = mesh.rest();
    let token = signup(&rest, "eve").await;
    let project_id = project(&rest, &token).await;
    let session_id = chat_session(&rest, &token, &project_id).await;
    rest.post(
        &format!("/v1/chat/sessions/{session_id}/messages"),
        json!({ "role": "MESSAGE_ROLE_USER", "content": "export me" }),
    )
    .bearer(&token)
    .send()
    .await
    .expect(StatusCode::OK);

    let export = rest
        .get(&format!("/v1/chat/sessions/{session_id}:export?format=EXPORT_FORMAT_MARKDOWN"))
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK);
    assert!(export.header("content-type").is_some_and(|t| t.starts_with("text/markdown")), "{:?}", export.headers);
    assert!(export.header("content-disposition").is_some_and(|d| d.starts_with("attachment; filename=")));
    assert!(String::from_utf8_lossy(&export.body).contains("export me"));

    let missing = rest
        .get("/v1/chat/sessions/00000000-0000-7000-8000-000000000000:export?format=EXPORT_FORMAT_JSON")
        .bearer(&token)
        .send()
        .await;
    assert!(missing.status == StatusCode::NOT_FOUND || missing.status == StatusCode::FORBIDDEN, "{:?}", missing.status);
    assert_eq!(missing.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn request_ids_gzip_health_and_the_openapi_document() {
    let mesh = Mesh::start().await;
    let rest = mesh.rest();

    let given = rest.get("/healthz").header("x-request-id", "req-123").send().await.expect(StatusCode::OK);
    assert_eq!(given.header("x-request-id"), Some("req-123"));
    let made = rest.get("/healthz").send().await;
    assert!(made.header("x-request-id").is_some_and(|id| id.len() >= 32), "a request id is made when none is given");

    let ready = rest.get("/readyz").send().await.expect(StatusCode::OK).json();
    assert_eq!(ready["services"]["chat"], "SERVING");

    let document = rest.get("/openapi.json").header("accept-encoding", "gzip").send().await.expect(StatusCode::OK);
    assert_eq!(document.header("content-encoding"), Some("gzip"), "large JSON is compressed when asked");
    let plain = rest.get("/openapi.json").send().await.json();
    assert_eq!(plain["openapi"], "3.0.3");
    assert!(plain["paths"]["/v1/chat/sessions/{session_id}:watch"]["get"]["responses"]["200"]["content"]["text/event-stream"].is_object());
    assert!(plain["paths"].get("/v1/usage:record").is_none(), "internal RPCs have no route");
}

#[tokio::test]
async fn a_service_that_cannot_be_reached_is_503_unavailable_and_the_gateway_not_ready() {
    let mesh = Mesh::start().await;
    let rest = mesh.rest();
    let token = signup(&rest, "unreached").await;
    let project_id = project(&rest, &token).await;
    let session = chat_session(&rest, &token, &project_id).await;
    // A port nothing listens on: bound, its address taken, released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
    let services = ServiceUrls { chat: format!("http://{closed}"), ..mesh.config.common.services.clone() };
    let cut_off = mesh.start_gateway_calling(services, GatewayConfig::default()).await;

    let reply = cut_off.get(&format!("/v1/chat/sessions/{session}")).bearer(&token).send().await;
    let body = assert_error(&reply, StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("reach")),
        "says the service cannot be reached: {body}"
    );
    let ready = cut_off.get("/readyz").send().await.expect(StatusCode::SERVICE_UNAVAILABLE).json();
    assert_eq!(ready["services"]["chat"], "NOT_SERVING", "{ready}");
    assert_eq!(ready["services"]["identity"], "SERVING", "{ready}");
    // The other services stay reachable through the same gateway.
    cut_off.get(&format!("/v1/projects/{project_id}")).bearer(&token).send().await.expect(StatusCode::OK);
}

#[tokio::test]
async fn cors_is_answered_for_the_configured_origins() {
    let (mut config, databases) = test_config();
    config.gateway.cors_allowed_origins = vec!["https://app.example.org".into()];
    let mesh = Mesh::start_with(config, databases).await;
    let preflight = mesh
        .rest()
        .call(Method::OPTIONS, "/v1/projects")
        .header("origin", "https://app.example.org")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization,content-type")
        .send()
        .await;
    assert!(preflight.status.is_success(), "{:?}", preflight.status);
    assert_eq!(preflight.header("access-control-allow-origin"), Some("https://app.example.org"));
    let stranger = mesh
        .rest()
        .call(Method::OPTIONS, "/v1/projects")
        .header("origin", "https://evil.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await;
    assert_eq!(stranger.header("access-control-allow-origin"), None);
}

#[tokio::test]
async fn a_file_is_uploaded_as_a_raw_body_and_downloaded_whole_by_range_and_by_link() {
    let mesh = Mesh::start().await;
    let rest = mesh.rest();
    let token = signup(&rest, "fay").await;
    let project_id = project(&rest, &token).await;

    let content = "hello world, in a file";
    let uploaded = rest
        .call(
            Method::POST,
            &format!("/v1/projects/{project_id}/files?metadata.name=hello.txt&metadata.mimeType=text/plain"),
        )
        .raw("application/octet-stream", content)
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(uploaded["sizeBytes"], content.len().to_string());
    let file_id = uploaded["id"].as_str().expect("file id").to_owned();

    let whole = rest.get(&format!("/v1/files/{file_id}:download")).bearer(&token).send().await.expect(StatusCode::OK);
    assert_eq!(whole.body, content.as_bytes());
    assert!(whole.header("content-type").is_some_and(|t| t.starts_with("text/plain")), "{:?}", whole.headers);
    assert_eq!(whole.header("content-disposition"), Some("attachment; filename=\"hello.txt\""));
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));

    let part = rest
        .get(&format!("/v1/files/{file_id}:download"))
        .header("range", "bytes=6-10")
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.body, &content.as_bytes()[6..=10]);
    assert_eq!(part.header("content-range"), Some(format!("bytes 6-10/{}", content.len()).as_str()));
    let tail =
        rest.get(&format!("/v1/files/{file_id}:download")).header("range", "bytes=-4").bearer(&token).send().await;
    assert_eq!(tail.expect(StatusCode::PARTIAL_CONTENT).body, &content.as_bytes()[content.len() - 4..]);

    // A link works without a credential (the fs backend's links are the gateway's own).
    let link = rest
        .post(&format!("/v1/files/{file_id}:createDownloadUrl"), json!({ "expiresInSeconds": 60 }))
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json();
    let url = link["url"].as_str().expect("a url");
    assert!(url.starts_with("/v1/files/signed/"), "{url}");
    let fetched = rest.get(url).send().await.expect(StatusCode::OK);
    assert_eq!(fetched.body, content.as_bytes());

    // Someone else's download is refused with the JSON error shape, not a stream.
    let stranger = signup(&rest, "gus").await;
    let refused = rest.get(&format!("/v1/files/{file_id}:download")).bearer(&stranger).send().await;
    assert_error(&refused, StatusCode::NOT_FOUND, "NOT_FOUND");
}

/// Files rows of a project, read from the files database.
async fn file_rows(mesh: &Mesh, table: &str, project_id: &str) -> i64 {
    let pool = mesh.files_db().await;
    let sql = format!("SELECT count(*) FROM {table} WHERE project_id = $1");
    let project = uuid::Uuid::parse_str(project_id).expect("a project uuid");
    let count = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(project).fetch_one(&pool).await;
    pool.close().await;
    count.expect("a count")
}

#[tokio::test]
async fn a_file_is_uploaded_as_a_multipart_form_with_metadata_from_its_text_parts() {
    let (mut config, databases) = test_config();
    use_s3(&mut config);
    let mesh = Mesh::start_with(config, databases).await;
    let rest = mesh.rest();
    let token = signup(&rest, "mia").await;
    let project_id = project(&rest, &token).await;
    let uploads = format!("/v1/projects/{project_id}/files");

    // Text parts give the name and the checksum; the file part gives the bytes and the type.
    let content: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i: u32| (i % 251) as u8).collect();
    let sha256 = hex::encode(Sha256::digest(&content));
    let form = Form::new().text("metadata.name", "Quarterly report.bin").text("metadata.sha256", &sha256).file(
        "file",
        "upload.bin",
        "application/octet-stream",
        &content,
    );
    let uploaded =
        rest.call(Method::POST, &uploads).form(form).bearer(&token).send().await.expect(StatusCode::OK).json();
    assert_eq!(uploaded["displayName"], "Quarterly report.bin");
    assert_eq!(uploaded["sha256"], sha256.as_str());
    assert_eq!(uploaded["sizeBytes"], content.len().to_string());
    let file_id = uploaded["id"].as_str().expect("file id");
    let download = rest.get(&format!("/v1/files/{file_id}:download")).bearer(&token).send().await;
    let download = download.expect(StatusCode::OK);
    assert_eq!(hex::encode(Sha256::digest(&download.body)), sha256);
    assert_eq!(download.body.as_ref(), content.as_slice());

    // Without text parts the file part's name and Content-Type stand in.
    let form = Form::new().file("file", "notes.txt", "text/plain", b"plain notes");
    let notes = rest.call(Method::POST, &uploads).form(form).bearer(&token).send().await.expect(StatusCode::OK).json();
    assert_eq!(notes["displayName"], "notes.txt");
    assert_eq!(notes["mimeType"], "text/plain");
    // A text part is checked as the service checks it: a wrong checksum refuses the upload.
    let form = Form::new().text("metadata.sha256", &"00".repeat(32)).file("file", "a.txt", "text/plain", b"hello");
    let refused = rest.call(Method::POST, &uploads).form(form).bearer(&token).send().await;
    assert_eq!(assert_error(&refused, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT")["details"]["field"], "sha256");
    assert_eq!(file_rows(&mesh, "files", &project_id).await, 2);
}

#[tokio::test]
async fn a_bad_or_cut_off_multipart_upload_is_refused_and_stores_nothing() {
    let mesh = Mesh::start().await;
    let rest = mesh.rest();
    let token = signup(&rest, "ned").await;
    let project_id = project(&rest, &token).await;
    let uploads = format!("/v1/projects/{project_id}/files");
    let file = |form: Form| form.file("file", "a.txt", "text/plain", b"some text");

    let cases = [
        ("no file part", Form::new().text("metadata.name", "a.txt"), "file"),
        ("two file parts", file(file(Form::new())), "file"),
        ("an unknown field", file(Form::new().text("metadata.colour", "blue")), "metadata.colour"),
        ("the body field as text", file(Form::new().text("chunk", "abc")), "chunk"),
        ("a text part after the file", file(Form::new()).text("metadata.sha256", "00"), "metadata.sha256"),
    ];
    for (case, form, field) in cases {
        let reply = rest.call(Method::POST, &uploads).form(form).bearer(&token).send().await;
        let body = assert_error(&reply, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
        assert_eq!(body["details"]["field"], field, "{case}: {body}");
    }
    let no_boundary = rest.call(Method::POST, &uploads).raw("multipart/form-data", "x").bearer(&token).send().await;
    let body = assert_error(&no_boundary, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
    assert_eq!(body["details"]["field"], "Content-Type");
    assert_eq!(file_rows(&mesh, "files", &project_id).await, 0);

    // A client gone once the upload has begun: the service sees no `finish` and keeps nothing.
    let begun = {
        let mesh_files = mesh.files_db().await;
        let project = uuid::Uuid::parse_str(&project_id).expect("a project uuid");
        async move {
            aimesh_tests::eventually("the upload has begun", || async {
                let pending: Result<i64, _> =
                    sqlx::query_scalar("SELECT count(*) FROM pending_uploads WHERE project_id = $1")
                        .bind(project)
                        .fetch_one(&mesh_files)
                        .await;
                pending.expect("a count") == 1
            })
            .await;
            mesh_files.close().await;
        }
    };
    let content = vec![7u8; 512 * 1024];
    let form = Form::new().file("file", "big.bin", "application/octet-stream", &content);
    // Cut in the middle of the file part.
    rest.call(Method::POST, &uploads).form(form).bearer(&token).send_cut_off(content.len() / 2, begun).await;
    aimesh_tests::eventually("the cut-off upload is abandoned", || async {
        file_rows(&mesh, "pending_uploads", &project_id).await == 0
    })
    .await;
    assert_eq!(file_rows(&mesh, "files", &project_id).await, 0);
    let listed = rest.get(&uploads).bearer(&token).send().await.expect(StatusCode::OK).json();
    assert!(listed["files"].as_array().is_none_or(Vec::is_empty), "{listed}");
}

#[tokio::test]
async fn a_rate_limited_key_gets_429_with_the_ratelimit_headers() {
    let mesh = Mesh::start().await;
    let rest = mesh.rest();
    let token = signup(&rest, "hal").await;
    let project_id = project(&rest, &token).await;
    let key = rest
        .post(
            &format!("/v1/projects/{project_id}/apiKeys"),
            json!({ "name": "tight", "scopes": ["chat:read"], "requestsPerMinute": 2 }),
        )
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json();
    let secret = key["secret"].as_str().expect("the key's secret").to_owned();
    let list = format!("/v1/chat/sessions?projectId={project_id}");
    for _ in 0..2 {
        let allowed = rest.get(&list).bearer(&secret).send().await.expect(StatusCode::OK);
        assert_eq!(allowed.header("ratelimit-limit"), Some("2"), "{:?}", allowed.headers);
        assert!(allowed.header("ratelimit-remaining").is_some());
    }
    let refused = rest.get(&list).bearer(&secret).send().await;
    let body = assert_error(&refused, StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED");
    assert_eq!(body["reason"], "RATE_LIMITED");
    assert_eq!(refused.header("ratelimit-remaining"), Some("0"));
    let retry_after: u64 =
        refused.header("retry-after").and_then(|s| s.parse().ok()).expect("a Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(body["details"]["retryAfterSeconds"], retry_after);
}
