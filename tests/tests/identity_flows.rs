//! The identity service end to end: accounts, login sessions, API keys, revocation across
//! replicas, last-use times and audit events, against the real PostgreSQL and Redis Cluster.

use std::time::{Duration, Instant};

use aimesh_proto::identity::v1 as pb;
use aimesh_tests::{Mesh, authed, expect_code, reason_and_field, test_config};
use prost_types::FieldMask;
use tonic::Code;

fn register(email: &str, username: &str, password: &str) -> pb::RegisterUserRequest {
    pb::RegisterUserRequest {
        email: email.into(),
        username: username.into(),
        password: password.into(),
        ..Default::default()
    }
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask { paths: paths.iter().map(|p| (*p).to_owned()).collect() })
}

/// Asserts `result` failed with `code`, `reason` and (when given) `field`.
#[track_caller]
fn assert_error<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, reason: &str, field: Option<&str>) {
    let status = expect_code("the call", code, result);
    let (got_reason, got_field) = reason_and_field(&status);
    assert_eq!(got_reason, reason, "{status:?}");
    if let Some(field) = field {
        assert_eq!(got_field.as_deref(), Some(field), "{status:?}");
    }
}

#[tokio::test]
async fn registration_refuses_bad_input_naming_the_field_and_writes_nothing() {
    let mesh = Mesh::start().await;
    let mut users = mesh.users();
    let cases = [
        (register("not-an-email", "ann", "long enough password"), "email"),
        (register("ann@example.org", "a", "long enough password"), "username"),
        (register("ann@example.org", "ann/../etc", "long enough password"), "username"),
        (register("ann@example.org", "ann", "short"), "password"),
        (
            pb::RegisterUserRequest {
                first_name: "x\u{0}y".into(),
                ..register("ann@example.org", "ann", "long enough password")
            },
            "first_name",
        ),
        (
            pb::RegisterUserRequest {
                last_name: "l".repeat(101),
                ..register("ann@example.org", "ann", "long enough password")
            },
            "last_name",
        ),
    ];
    for (request, field) in cases {
        assert_error(users.register_user(request).await, Code::InvalidArgument, "INVALID_FIELD", Some(field));
    }
    // None of them wrote anything: the email and the name are still free.
    let ann = users.register_user(register("ann@example.org", "ann", "long enough password")).await;
    assert_eq!(ann.expect("register").into_inner().email, "ann@example.org");

    // Unique case-insensitively.
    assert_error(
        users.register_user(register("ANN@Example.org", "other", "long enough password")).await,
        Code::AlreadyExists,
        "EMAIL_TAKEN",
        Some("email"),
    );
    assert_error(
        users.register_user(register("other@example.org", "ANN", "long enough password")).await,
        Code::AlreadyExists,
        "USERNAME_TAKEN",
        Some("username"),
    );
    let pool = mesh.identity_db().await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&pool).await.expect("count");
    assert_eq!(count, 1);
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users").fetch_one(&pool).await.expect("hash");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
}

#[tokio::test]
async fn an_account_reads_and_updates_itself_and_changes_its_password() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let mut users = mesh.users();

    let me = users.get_user(authed(pb::GetUserRequest { user_id: "me".into() }, &ann.token)).await.expect("get me");
    let me = me.into_inner();
    assert_eq!((me.id.as_str(), me.username.as_str()), (ann.user_id.as_str(), "ann"));
    assert!(me.last_login_time.is_some());
    assert_error(
        users.get_user(pb::GetUserRequest { user_id: "me".into() }).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
        None,
    );

    let update = |user: pb::User, paths: &[&str]| pb::UpdateUserRequest {
        user_id: "me".into(),
        user: Some(user),
        update_mask: mask(paths),
    };
    let renamed = users
        .update_user(authed(
            update(pb::User { first_name: "Ann".into(), ..Default::default() }, &["first_name"]),
            &ann.token,
        ))
        .await
        .expect("update first name")
        .into_inner();
    assert_eq!((renamed.first_name.as_str(), renamed.username.as_str()), ("Ann", "ann"));
    // Changing one's own role needs a system admin; the refusal changes nothing.
    let promote = update(
        pb::User { role: pb::UserRole::Admin.into(), first_name: "X".into(), ..Default::default() },
        &["role", "first_name"],
    );
    assert_error(
        users.update_user(authed(promote, &ann.token)).await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
        None,
    );
    let bad_mask = update(pb::User::default(), &["email"]);
    assert_error(
        users.update_user(authed(bad_mask, &ann.token)).await,
        Code::InvalidArgument,
        "INVALID_FIELD",
        Some("update_mask"),
    );
    let me = users
        .get_user(authed(pb::GetUserRequest { user_id: "me".into() }, &ann.token))
        .await
        .expect("get")
        .into_inner();
    assert_eq!((me.first_name.as_str(), me.role), ("Ann", pb::UserRole::User as i32));

    // A second device, then a password change from the first: the second is logged out.
    let other = mesh
        .sessions()
        .login(pb::LoginRequest { login: "ann".into(), password: ann.password.clone(), device_name: "phone".into() })
        .await
        .expect("second login")
        .into_inner();
    let wrong = pb::ChangePasswordRequest {
        user_id: "me".into(),
        current_password: "not the password".into(),
        new_password: "a brand new password".into(),
    };
    assert_error(
        users.change_password(authed(wrong, &ann.token)).await,
        Code::InvalidArgument,
        "INVALID_FIELD",
        Some("current_password"),
    );
    let change = pb::ChangePasswordRequest {
        user_id: "me".into(),
        current_password: ann.password.clone(),
        new_password: "a brand new password".into(),
    };
    let changed = users.change_password(authed(change, &ann.token)).await.expect("change password").into_inner();
    assert_eq!(changed.revoked_sessions, 1);
    assert_error(
        users.get_user(authed(pb::GetUserRequest { user_id: "me".into() }, &other.access_token)).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
        None,
    );
    assert!(users.get_user(authed(pb::GetUserRequest { user_id: "me".into() }, &ann.token)).await.is_ok());
    let old_password =
        pb::LoginRequest { login: ann.email.clone(), password: ann.password.clone(), device_name: String::new() };
    assert_error(mesh.sessions().login(old_password).await, Code::Unauthenticated, "BAD_CREDENTIALS", None);
}

#[tokio::test]
async fn sessions_log_in_refresh_list_and_end() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let mut sessions = mesh.sessions();

    let bad = pb::LoginRequest { login: "ann".into(), password: "wrong password!".into(), device_name: String::new() };
    assert_error(sessions.login(bad).await, Code::Unauthenticated, "BAD_CREDENTIALS", None);
    let unknown =
        pb::LoginRequest { login: "nobody".into(), password: "wrong password!".into(), device_name: String::new() };
    assert_error(sessions.login(unknown).await, Code::Unauthenticated, "BAD_CREDENTIALS", None);
    let empty = pb::LoginRequest { login: String::new(), password: "x".into(), device_name: String::new() };
    assert_error(sessions.login(empty).await, Code::InvalidArgument, "INVALID_FIELD", Some("login"));

    // Refreshing replaces both tokens: the old access and refresh tokens stop working at once.
    let refreshed = sessions
        .refresh_session(pb::RefreshSessionRequest { refresh_token: ann.refresh_token.clone() })
        .await
        .expect("refresh")
        .into_inner();
    let me = |token: &str| authed(pb::GetUserRequest { user_id: "me".into() }, token);
    assert!(mesh.users().get_user(me(&refreshed.access_token)).await.is_ok());
    assert_error(mesh.users().get_user(me(&ann.token)).await, Code::Unauthenticated, "UNAUTHENTICATED", None);
    assert_error(
        sessions.refresh_session(pb::RefreshSessionRequest { refresh_token: ann.refresh_token.clone() }).await,
        Code::Unauthenticated,
        "BAD_REFRESH_TOKEN",
        Some("refresh_token"),
    );
    // An access token is not a refresh token.
    assert_error(
        sessions.refresh_session(pb::RefreshSessionRequest { refresh_token: refreshed.access_token.clone() }).await,
        Code::Unauthenticated,
        "BAD_REFRESH_TOKEN",
        Some("refresh_token"),
    );

    let second = sessions
        .login(pb::LoginRequest {
            login: ann.email.clone(),
            password: ann.password.clone(),
            device_name: "laptop".into(),
        })
        .await
        .expect("login")
        .into_inner();
    let listed = sessions
        .list_sessions(authed(pb::ListSessionsRequest { page_size: 1, ..Default::default() }, &refreshed.access_token))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.sessions.len(), 1);
    assert!(!listed.next_page_token.is_empty());
    let rest = sessions
        .list_sessions(authed(
            pb::ListSessionsRequest { page_size: 1, page_token: listed.next_page_token.clone() },
            &refreshed.access_token,
        ))
        .await
        .expect("list page 2")
        .into_inner();
    let all: Vec<pb::Session> = listed.sessions.into_iter().chain(rest.sessions).collect();
    assert_eq!(all.len(), 2);
    assert_eq!(all.iter().filter(|s| s.current).count(), 1);
    assert!(all.iter().any(|s| s.device_name == "laptop" && !s.current));
    assert_error(
        sessions
            .list_sessions(authed(
                pb::ListSessionsRequest { page_size: 1, page_token: "garbage".into() },
                &refreshed.access_token,
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_FIELD",
        Some("page_token"),
    );

    // Ending the laptop session from the first one, then logging out of the first.
    let laptop = second.session.expect("session").id;
    sessions
        .revoke_session(authed(pb::RevokeSessionRequest { session_id: laptop.clone() }, &refreshed.access_token))
        .await
        .expect("revoke");
    assert_error(mesh.users().get_user(me(&second.access_token)).await, Code::Unauthenticated, "UNAUTHENTICATED", None);
    assert_error(
        sessions.revoke_session(authed(pb::RevokeSessionRequest { session_id: laptop }, &refreshed.access_token)).await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
        None,
    );
    sessions.logout(authed(pb::LogoutRequest {}, &refreshed.access_token)).await.expect("logout");
    assert_error(
        mesh.users().get_user(me(&refreshed.access_token)).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
        None,
    );
}

/// Creates a project owned by `token`'s account and an API key in it; returns (project id, key id, secret).
async fn project_with_key(mesh: &Mesh, token: &str, scopes: &[&str]) -> (String, String, String) {
    let project = mesh
        .projects()
        .create_project(authed(pb::CreateProjectRequest { name: "Research".into(), description: String::new() }, token))
        .await
        .expect("create project")
        .into_inner();
    let created = mesh
        .api_keys()
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                project_id: project.id.clone(),
                name: "ci".into(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                expire_time: None,
                requests_per_minute: 0,
                project_owned: false,
            },
            token,
        ))
        .await
        .expect("create key")
        .into_inner();
    let key = created.api_key.expect("key");
    (project.id, key.id, created.secret)
}

#[tokio::test]
async fn api_keys_are_shown_once_stored_hashed_and_checked_for_scope() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let (project_id, key_id, secret) = project_with_key(&mesh, &ann.token, &["identity:read", "chat:write"]).await;
    assert!(secret.starts_with("amk_"), "{secret}");

    let get = |credential: &str| authed(pb::GetProjectRequest { project_id: project_id.clone() }, credential);
    let project = mesh.projects().get_project(get(&secret)).await.expect("read with the key").into_inner();
    assert_eq!(project.caller_role, pb::ProjectRole::Viewer as i32);
    // A key reads; changing identity data needs a person's session.
    let rename = pb::UpdateProjectRequest {
        project_id: project_id.clone(),
        project: Some(pb::Project { name: "X".into(), ..Default::default() }),
        update_mask: mask(&["name"]),
    };
    assert_error(
        mesh.projects().update_project(authed(rename, &secret)).await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
        None,
    );

    // Listing shows the prefix, never the secret; the database holds only a hash.
    let listed = mesh
        .api_keys()
        .list_api_keys(authed(
            pb::ListApiKeysRequest { project_id: project_id.clone(), ..Default::default() },
            &ann.token,
        ))
        .await
        .expect("list keys")
        .into_inner();
    assert_eq!(listed.api_keys.len(), 1);
    assert!(secret.starts_with(&listed.api_keys[0].display_prefix));
    let pool = mesh.identity_db().await;
    let stored: String = sqlx::query_scalar("SELECT key_hash FROM api_keys").fetch_one(&pool).await.expect("hash");
    assert_ne!(stored, secret);
    assert!(!stored.contains(&secret[4..]));

    let bad_scope = pb::CreateApiKeyRequest {
        project_id: project_id.clone(),
        name: "x".into(),
        scopes: vec!["root".into()],
        expire_time: None,
        requests_per_minute: 0,
        project_owned: false,
    };
    assert_error(
        mesh.api_keys().create_api_key(authed(bad_scope, &ann.token)).await,
        Code::InvalidArgument,
        "INVALID_FIELD",
        Some("scopes"),
    );
    let past = pb::CreateApiKeyRequest {
        project_id: project_id.clone(),
        name: "x".into(),
        scopes: vec!["chat:read".into()],
        expire_time: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }),
        requests_per_minute: 0,
        project_owned: false,
    };
    assert_error(
        mesh.api_keys().create_api_key(authed(past, &ann.token)).await,
        Code::InvalidArgument,
        "INVALID_FIELD",
        Some("expire_time"),
    );
    // A key cannot mint keys.
    let by_key = pb::CreateApiKeyRequest {
        project_id: project_id.clone(),
        name: "x".into(),
        scopes: vec!["chat:read".into()],
        expire_time: None,
        requests_per_minute: 0,
        project_owned: false,
    };
    assert_error(
        mesh.api_keys().create_api_key(authed(by_key, &secret)).await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
        None,
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys").fetch_one(&pool).await.expect("count");
    assert_eq!(count, 1);

    // The last use is recorded without a write per request: it appears within the flush intervals.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let key = mesh
            .api_keys()
            .get_api_key(authed(
                pb::GetApiKeyRequest { project_id: project_id.clone(), api_key_id: key_id.clone() },
                &ann.token,
            ))
            .await
            .expect("get key")
            .into_inner();
        if key.last_use_time.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "last_use_time never appeared");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_revoked_key_stops_working_on_every_replica_at_once() {
    // Two replicas of one deployment: same database, same Redis prefix. Local caches are long
    // lived here, so only the invalidation broadcast can make the second replica refuse in time.
    let (mut config, databases) = test_config();
    config.common.auth.local_ttl_secs = 300;
    config.common.auth.shared_ttl_secs = 300;
    let first = Mesh::start_with(config.clone(), databases).await;
    let second = Mesh::start_with(config, Vec::new()).await;
    let ann = first.signup("ann").await;
    let (project_id, key_id, secret) = project_with_key(&first, &ann.token, &["identity:read"]).await;

    let get = |credential: &str| authed(pb::GetProjectRequest { project_id: project_id.clone() }, credential);
    // Both replicas verify the key and cache the verification.
    for mesh in [&first, &second] {
        for _ in 0..3 {
            mesh.projects().get_project(get(&secret)).await.expect("the key works");
        }
    }
    first
        .api_keys()
        .revoke_api_key(authed(
            pb::RevokeApiKeyRequest { project_id: project_id.clone(), api_key_id: key_id },
            &ann.token,
        ))
        .await
        .expect("revoke");
    // The replica that revoked refuses at once; the other within the broadcast's delay.
    assert_error(first.projects().get_project(get(&secret)).await, Code::Unauthenticated, "UNAUTHENTICATED", None);
    let started = Instant::now();
    loop {
        match second.projects().get_project(get(&secret)).await {
            Err(status) if status.code() == Code::Unauthenticated => break,
            Err(status) => panic!("unexpected error {status:?}"),
            Ok(_) => {
                assert!(started.elapsed() < Duration::from_secs(5), "the second replica still accepts a revoked key");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // Internal callers asking Authenticate get the same answer.
    let asked = second
        .auth()
        .authenticate(authed(pb::AuthenticateRequest { credential: secret.clone() }, second.service_token().expose()))
        .await;
    assert_error(asked, Code::Unauthenticated, "UNAUTHENTICATED", None);
    second.stop().await.expect("second stops cleanly");
    first.stop().await.expect("first stops cleanly");
}

#[tokio::test]
async fn authenticate_turns_credentials_into_principals() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let (project_id, key_id, secret) = project_with_key(&mesh, &ann.token, &["chat:read"]).await;
    let mut auth = mesh.auth();
    let token = mesh.service_token();

    let session = auth
        .authenticate(authed(pb::AuthenticateRequest { credential: ann.token.clone() }, token.expose()))
        .await
        .expect("session")
        .into_inner();
    assert_eq!((session.user_id.as_str(), session.kind), (ann.user_id.as_str(), pb::CredentialKind::Session as i32));
    assert!(!session.system_admin);
    let key = auth
        .authenticate(authed(pb::AuthenticateRequest { credential: secret }, token.expose()))
        .await
        .expect("key")
        .into_inner();
    assert_eq!(key.kind, pb::CredentialKind::ApiKey as i32);
    assert_eq!((key.project_id.as_str(), key.api_key_id.as_str()), (project_id.as_str(), key_id.as_str()));
    assert_eq!(key.scopes, vec!["chat:read".to_owned()]);
    for garbage in ["", "ams_", "amk_with spaces", "Bearer x", &format!("ams_{}", "a".repeat(300))] {
        let refused =
            auth.authenticate(authed(pb::AuthenticateRequest { credential: garbage.to_owned() }, token.expose())).await;
        assert_error(refused, Code::Unauthenticated, "UNAUTHENTICATED", None);
    }
}

#[tokio::test]
async fn security_actions_are_written_to_the_outbox_with_the_change() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let failed =
        pb::LoginRequest { login: ann.email.clone(), password: "wrong password".into(), device_name: String::new() };
    assert!(mesh.sessions().login(failed).await.is_err());
    let (project_id, key_id, secret) = project_with_key(&mesh, &ann.token, &["chat:read"]).await;
    mesh.api_keys()
        .revoke_api_key(authed(
            pb::RevokeApiKeyRequest { project_id: project_id.clone(), api_key_id: key_id.clone() },
            &ann.token,
        ))
        .await
        .expect("revoke");

    let pool = mesh.identity_db().await;
    let events: Vec<(String, String, Option<uuid::Uuid>)> =
        sqlx::query_as("SELECT topic, event_type, project_id FROM outbox_events ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("outbox");
    let types: Vec<&str> = events.iter().map(|(_, t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "user.registered",
            "session.login",
            "session.login_failed",
            "project.created",
            "api_key.created",
            "api_key.revoked"
        ]
    );
    assert!(events.iter().all(|(topic, _, _)| topic == "audit"));
    let revoked = events.last().and_then(|(_, _, project)| *project).map(|p| p.to_string());
    assert_eq!(revoked.as_deref(), Some(project_id.as_str()));
    // `amk_<8 hex>_<secret part>`; the secret part is base64url, which may hold `_` itself.
    let (hex, secret_part) =
        secret.strip_prefix("amk_").and_then(|rest| rest.split_once('_')).expect("amk_<8 hex>_<secret part>");
    let display_prefix = format!("amk_{hex}");
    // The key's creation is reported with what tells the key apart (its display prefix)...
    let created: serde_json::Value =
        sqlx::query_scalar("SELECT payload FROM outbox_events WHERE event_type = 'api_key.created'")
            .fetch_one(&pool)
            .await
            .expect("the api_key.created event");
    assert_eq!(created["resource_id"], key_id.as_str(), "{created}");
    assert_eq!(created["details"]["display_prefix"], display_prefix.as_str(), "{created}");
    // ...and neither the key nor its secret part appears anywhere in any event, whatever the column.
    assert!(secret_part.len() >= 32, "{secret}");
    let rows: Vec<String> = sqlx::query_scalar("SELECT row_to_json(e)::text FROM outbox_events e")
        .fetch_all(&pool)
        .await
        .expect("outbox rows");
    assert_eq!(rows.len(), events.len());
    for row in &rows {
        assert!(!row.contains(&secret) && !row.contains(secret_part), "an event leaks the key: {row}");
    }
}

#[tokio::test]
async fn health_serves_and_the_mesh_stops_gracefully() {
    let mesh = Mesh::start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(mesh.channel());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "aimesh.identity.v1.UserService".into() })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let started = Instant::now();
    mesh.stop().await.expect("clean stop");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn another_service_verifies_credentials_through_authenticate_and_sees_revocations() {
    use std::sync::Arc;

    use aimesh_kit::auth::{CredentialRef, CredentialVerifier, RemoteCredentialSource, identity_client};
    use aimesh_kit::data::cache::InvalidationBus;
    use aimesh_kit::data::redis::Redis;

    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    // What chat or usage build at start-up: their own cache on the shared Redis, identity behind it.
    let common = &mesh.config.common;
    let redis = Redis::connect(&common.redis_urls, &common.redis).await.expect("redis");
    let bus = InvalidationBus::start(&redis).await.expect("bus");
    let client = identity_client(&format!("http://{}", mesh.identity)).expect("identity client");
    let source = RemoteCredentialSource::new(client, mesh.service_token());
    let verifier = CredentialVerifier::new(redis, &bus, &common.auth, Arc::new(source));

    let principal = verifier.verify(&ann.token).await.expect("a live session verifies");
    assert_eq!(principal.user_id.to_string(), ann.user_id);
    assert!(matches!(principal.credential, CredentialRef::Session { .. }));
    let malformed = verifier.verify("not a credential").await.expect_err("malformed");
    assert_eq!(malformed.code, aimesh_kit::ErrorCode::Unauthenticated);

    mesh.sessions().logout(authed(pb::LogoutRequest {}, &ann.token)).await.expect("logout");
    let started = Instant::now();
    while verifier.verify(&ann.token).await.is_ok() {
        assert!(started.elapsed() < Duration::from_secs(5), "the other service still accepts a logged-out session");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
