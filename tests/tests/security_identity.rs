//! Attacks on identity, end to end through the gateway (REST) and over gRPC where it applies:
//! guessing passwords, keys outliving their creator's access, tenants raising their own limits
//! past the operator's maxima, unaudited changes, and keys acting as the person who made them.

use std::time::Duration;

use http::StatusCode;
use serde_json::{Value, json};
use tonic::Code;

use aimesh_identity::config::LoginThrottleConfig;
use aimesh_proto::chat::v1 as chat_pb;
use aimesh_proto::identity::v1 as pb;
use aimesh_tests::rest::{Reply, Rest};
use aimesh_tests::{Account, Mesh, authed, eventually, expect_code, test_config};

/// The lock after too many failures, in the tests: long enough that a request right after the
/// last failure always meets it, short enough to wait out.
const LOCKOUT_SECS: u64 = 5;

/// A mesh whose login throttle locks an account after 3 failures and an address after 6.
async fn throttled_mesh() -> Mesh {
    let (mut config, databases) = test_config();
    config.identity.login_throttle = LoginThrottleConfig {
        account_failures: 3,
        account_address_failures: 100,
        address_failures: 6,
        lockout_base_secs: LOCKOUT_SECS,
        lockout_max_secs: LOCKOUT_SECS,
        failure_window_secs: 600,
    };
    Mesh::start_with(config, databases).await
}

async fn login(rest: &Rest, login: &str, password: &str) -> Reply {
    rest.post("/v1/auth/login", json!({ "login": login, "password": password })).send().await
}

/// Asserts a REST error and returns its body.
#[track_caller]
fn assert_error(reply: &Reply, status: StatusCode, code: &str) -> Value {
    assert_eq!(reply.status, status, "body: {}", String::from_utf8_lossy(&reply.body));
    let body = reply.json();
    assert_eq!(body["code"], code, "{body}");
    body
}

/// Asserts a 429 of the login throttle with a `Retry-After` of at least one second.
#[track_caller]
fn assert_locked(reply: &Reply) {
    let body = assert_error(reply, StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED");
    assert_eq!(body["reason"], "LOGIN_THROTTLED", "{body}");
    let retry_after = reply.header("retry-after").and_then(|s| s.parse::<u64>().ok());
    assert!(retry_after.is_some_and(|s| (1..=LOCKOUT_SECS).contains(&s)), "retry-after {retry_after:?}: {body}");
}

#[tokio::test]
async fn a_guessed_login_locks_even_the_right_password_until_the_lock_ends() {
    let mesh = throttled_mesh().await;
    let rest = mesh.rest();
    let (ann, bob) = (mesh.signup("ann").await, mesh.signup("bob").await);

    for attempt in 1..=3 {
        let wrong = login(&rest, &ann.email, &format!("guess-number-{attempt}")).await;
        assert_error(&wrong, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
    }
    // Locked: the right password is refused too, without telling whether it was right.
    assert_locked(&login(&rest, &ann.email, &ann.password).await);
    // Also by username: the lock is the account's, not the spelling's.
    assert_locked(&login(&rest, "ann", &ann.password).await);
    // Over gRPC, with the same answer and a RetryInfo detail.
    let request = pb::LoginRequest { login: ann.email.clone(), password: ann.password.clone(), ..Default::default() };
    let status = mesh.sessions().login(request).await.expect_err("locked over gRPC");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.metadata().get("retry-after").is_some(), "{status:?}");
    // Another account from the same address is not locked by ann's lock.
    login(&rest, &bob.email, &bob.password).await.expect(StatusCode::OK);

    // Once the lock ends the right password works again (attempts while locked do not count).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(LOCKOUT_SECS * 4);
    loop {
        let reply = login(&rest, &ann.email, &ann.password).await;
        if reply.status == StatusCode::OK {
            break;
        }
        assert_locked(&reply);
        assert!(tokio::time::Instant::now() < deadline, "ann is still locked out after {LOCKOUT_SECS} s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The address: 3 failures so far, 3 more for names nobody has reach its threshold of 6,
    // and then every account is refused from it, bob's right password included.
    for name in ["nobody-1", "nobody-2", "nobody-3"] {
        assert_error(&login(&rest, name, "some-password-123").await, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
    }
    assert_locked(&login(&rest, &bob.email, &bob.password).await);
    // A forwarded-for header of its own choosing does not make the client someone else.
    let spoofed = rest
        .post("/v1/auth/login", json!({ "login": bob.email, "password": bob.password }))
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await;
    assert_locked(&spoofed);
}

#[tokio::test]
async fn guessed_refresh_tokens_lock_the_address() {
    let mesh = throttled_mesh().await;
    let rest = mesh.rest();
    let ann = mesh.signup("ann").await;
    for attempt in 0..6 {
        let guess = format!("amr_{attempt:0>43}");
        let reply = rest.post("/v1/auth/refresh", json!({ "refreshToken": guess })).send().await;
        assert_error(&reply, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
    }
    let reply = rest.post("/v1/auth/refresh", json!({ "refreshToken": ann.refresh_token })).send().await;
    assert_locked(&reply);
    assert_locked(&login(&rest, &ann.email, &ann.password).await);
}

#[tokio::test]
async fn password_hashing_is_bounded_in_concurrency() {
    let (mut config, databases) = test_config();
    config.identity.password_hash_concurrency = 1;
    config.identity.password_hash_wait_ms = 1;
    let mesh = Mesh::start_with(config, databases).await;
    let ann = mesh.signup("ann").await;
    let rest = mesh.rest();
    // Sixteen logins at once against one slot that waits 1 ms: argon2id takes far longer than
    // that, so those that find the slot taken are refused for now instead of queueing.
    let logins = (0..16).map(|_| login(&rest, &ann.email, &ann.password));
    let replies = futures::future::join_all(logins).await;
    let busy: Vec<&Reply> = replies.iter().filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS).collect();
    assert!(replies.iter().any(|r| r.status == StatusCode::OK), "some login got the slot");
    assert!(!busy.is_empty(), "no login was refused: {:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    for reply in busy {
        assert_eq!(reply.json()["reason"], "PASSWORD_HASHING_BUSY");
        assert!(reply.header("retry-after").is_some());
    }
}

/// Creates a key over REST as `creator`; returns its id and secret.
async fn create_key(rest: &Rest, creator: &Account, project_id: &str, project_owned: bool) -> Reply {
    let body = json!({ "name": "backend", "scopes": ["chat:read"], "projectOwned": project_owned });
    rest.post(&format!("/v1/projects/{project_id}/apiKeys"), body).bearer(&creator.token).send().await
}

async fn key_secret(rest: &Rest, creator: &Account, project_id: &str, project_owned: bool) -> String {
    let reply = create_key(rest, creator, project_id, project_owned).await.expect(StatusCode::OK);
    let body = reply.json();
    assert_eq!(body["apiKey"]["projectOwned"].as_bool().unwrap_or(false), project_owned, "{body}");
    body["secret"].as_str().expect("the secret").to_owned()
}

/// The status of a chat read with `credential`.
async fn chat_read(rest: &Rest, credential: &str, project_id: &str) -> StatusCode {
    rest.get(&format!("/v1/chat/sessions?projectId={project_id}")).bearer(credential).send().await.status
}

async fn create_project(rest: &Rest, owner: &Account) -> String {
    let reply = rest.post("/v1/projects", json!({ "name": "Apps" })).bearer(&owner.token).send().await;
    reply.expect(StatusCode::OK).json()["id"].as_str().expect("project id").to_owned()
}

async fn add_member(rest: &Rest, owner: &Account, project_id: &str, member: &Account, role: &str) {
    let body = json!({ "email": member.email, "role": role });
    rest.post(&format!("/v1/projects/{project_id}/members"), body)
        .bearer(&owner.token)
        .send()
        .await
        .expect(StatusCode::OK);
}

#[tokio::test]
async fn a_key_dies_with_its_creators_access_unless_the_project_owns_it() {
    let mesh = Mesh::start().await;
    let rest = mesh.rest();
    let (ann, bob, carol) = (mesh.signup("ann").await, mesh.signup("bob").await, mesh.signup("carol").await);
    let project = create_project(&rest, &ann).await;
    add_member(&rest, &ann, &project, &bob, "PROJECT_ROLE_OWNER").await;
    add_member(&rest, &ann, &project, &carol, "PROJECT_ROLE_ADMIN").await;

    // Only an owner makes a key that outlives its creator.
    let refused = create_key(&rest, &carol, &project, true).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "PERMISSION_DENIED");
    let bobs_own = key_secret(&rest, &bob, &project, false).await;
    let service_key = key_secret(&rest, &bob, &project, true).await;
    let carols = key_secret(&rest, &carol, &project, false).await;
    for key in [&bobs_own, &service_key, &carols] {
        assert_eq!(chat_read(&rest, key, &project).await, StatusCode::OK);
    }
    let listed = rest.get(&format!("/v1/projects/{project}/apiKeys")).bearer(&ann.token).send().await;
    let listed = listed.expect(StatusCode::OK).json();
    let owned: Vec<bool> = listed["apiKeys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["projectOwned"].as_bool().unwrap_or(false))
        .collect();
    assert_eq!(owned.iter().filter(|o| **o).count(), 1, "the service key is listed as such: {listed}");

    // Ann removes bob: his own key stops, the service key he made goes on.
    rest.delete(&format!("/v1/projects/{project}/members/{}", bob.user_id))
        .bearer(&ann.token)
        .send()
        .await
        .expect(StatusCode::OK);
    eventually("bob's own key is refused", || async {
        chat_read(&rest, &bobs_own, &project).await == StatusCode::UNAUTHORIZED
    })
    .await;
    let request = chat_pb::ListSessionsRequest { project_id: project.clone(), ..Default::default() };
    expect_code(
        "bob's key over gRPC",
        Code::Unauthenticated,
        mesh.chat().list_sessions(authed(request, &bobs_own)).await,
    );
    assert_eq!(chat_read(&rest, &service_key, &project).await, StatusCode::OK);

    // Ann demotes carol to member: carol's key stops likewise.
    rest.patch(&format!("/v1/projects/{project}/members/{}", carol.user_id), json!({ "role": "PROJECT_ROLE_MEMBER" }))
        .bearer(&ann.token)
        .send()
        .await
        .expect(StatusCode::OK);
    eventually("carol's key is refused", || async {
        chat_read(&rest, &carols, &project).await == StatusCode::UNAUTHORIZED
    })
    .await;
    // Made an admin again, her key works again.
    rest.patch(&format!("/v1/projects/{project}/members/{}", carol.user_id), json!({ "role": "PROJECT_ROLE_ADMIN" }))
        .bearer(&ann.token)
        .send()
        .await
        .expect(StatusCode::OK);
    eventually("carol's key works again", || async { chat_read(&rest, &carols, &project).await == StatusCode::OK })
        .await;
}

#[tokio::test]
async fn a_tenant_cannot_raise_its_limits_past_the_deployment_maxima() {
    let mesh = Mesh::start().await;
    let rest = mesh.rest();
    let ann = mesh.signup("ann").await;
    let project = create_project(&rest, &ann).await;
    let path = format!("/v1/projects/{project}");

    let raised = rest.patch(&path, json!({ "requestsPerMinute": 1_000_000 })).bearer(&ann.token).send().await;
    let body = assert_error(&raised, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
    assert_eq!(body["details"]["field"], "project.requests_per_minute", "{body}");
    let key = json!({ "name": "k", "scopes": ["chat:read"], "requestsPerMinute": 10_000 });
    let raised = rest.post(&format!("/v1/projects/{project}/apiKeys"), key).bearer(&ann.token).send().await;
    let body = assert_error(&raised, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
    assert_eq!(body["details"]["field"], "requests_per_minute", "{body}");
    // Within the maxima the owner sets it.
    let set = rest.patch(&path, json!({ "requestsPerMinute": 30_000 })).bearer(&ann.token).send().await;
    assert_eq!(set.expect(StatusCode::OK).json()["requestsPerMinute"], 30_000);

    // A system admin may go past them.
    let root = mesh.signup("root").await;
    let root = mesh.make_admin(&root).await;
    let set = rest.patch(&path, json!({ "requestsPerMinute": 1_000_000 })).bearer(&root.token).send().await;
    assert_eq!(set.expect(StatusCode::OK).json()["requestsPerMinute"], 1_000_000);
}

/// The audit events of `action` in `project`, as analytics' REST route shows them, once there
/// are `count` of them.
async fn audit_events(rest: &Rest, reader: &Account, project: &str, action: &str, count: usize) -> Vec<Value> {
    let path = format!("/v1/projects/{project}/analytics/audit?action={action}&pageSize=100");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reply = rest.get(&path).bearer(&reader.token).send().await.expect(StatusCode::OK);
        let events = reply.json()["events"].as_array().cloned().unwrap_or_default();
        if events.len() >= count {
            return events;
        }
        assert!(tokio::time::Instant::now() < deadline, "{action}: {} of {count} events after 30 s", events.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn details(event: &Value) -> Value {
    serde_json::from_str(event["details"].as_str().expect("details")).expect("details are JSON")
}

#[tokio::test]
async fn membership_and_limit_changes_are_audited_with_old_and_new_values() {
    let mesh = Mesh::start().await;
    let rest = mesh.rest();
    let (ann, bob) = (mesh.signup("ann").await, mesh.signup("bob").await);
    let project = create_project(&rest, &ann).await;
    add_member(&rest, &ann, &project, &bob, "PROJECT_ROLE_MEMBER").await;
    rest.patch(&format!("/v1/projects/{project}/members/{}", bob.user_id), json!({ "role": "PROJECT_ROLE_ADMIN" }))
        .bearer(&ann.token)
        .send()
        .await
        .expect(StatusCode::OK);
    let path = format!("/v1/projects/{project}");
    rest.patch(&path, json!({ "requestsPerMinute": 120 })).bearer(&ann.token).send().await.expect(StatusCode::OK);

    let role = audit_events(&rest, &ann, &project, "member.role_changed", 1).await;
    let role = details(&role[0]);
    assert_eq!(role["old"]["role"], "member", "{role}");
    assert_eq!(role["new"]["role"], "admin", "{role}");
    let added = details(&audit_events(&rest, &ann, &project, "member.added", 1).await[0]);
    assert_eq!((added["old"].clone(), added["new"]["role"].clone()), (Value::Null, json!("member")), "{added}");
    let limit = details(&audit_events(&rest, &ann, &project, "project.updated", 1).await[0]);
    assert_eq!(limit["old"]["requests_per_minute"], Value::Null, "{limit}");
    assert_eq!(limit["new"]["requests_per_minute"], 120, "{limit}");
    assert_eq!(limit["new"]["name"], "Apps", "{limit}");
}

#[tokio::test]
async fn a_key_cannot_read_its_creators_profile_or_sessions() {
    let mesh = Mesh::start().await;
    let rest = mesh.rest();
    let ann = mesh.signup("ann").await;
    let project = create_project(&rest, &ann).await;
    let key = {
        let body = json!({ "name": "k", "scopes": ["chat:read", "identity:read"] });
        let reply = rest.post(&format!("/v1/projects/{project}/apiKeys"), body).bearer(&ann.token).send().await;
        reply.expect(StatusCode::OK).json()["secret"].as_str().expect("secret").to_owned()
    };
    for path in ["/v1/users/me".to_owned(), format!("/v1/users/{}", ann.user_id), "/v1/auth/sessions".to_owned()] {
        let reply = rest.get(&path).bearer(&key).send().await;
        assert_error(&reply, StatusCode::FORBIDDEN, "PERMISSION_DENIED");
        // Her session still reads them.
        rest.get(&path).bearer(&ann.token).send().await.expect(StatusCode::OK);
    }
    let me = pb::GetUserRequest { user_id: "me".into() };
    expect_code("GetUser by key", Code::PermissionDenied, mesh.users().get_user(authed(me, &key)).await);
    let sessions = pb::ListSessionsRequest::default();
    expect_code(
        "ListSessions by key",
        Code::PermissionDenied,
        mesh.sessions().list_sessions(authed(sessions, &key)).await,
    );
}

#[tokio::test]
async fn probing_which_emails_are_registered_locks_the_address() {
    let mesh = throttled_mesh().await;
    let rest = mesh.rest();
    let ann = mesh.signup("ann").await;
    let project = create_project(&rest, &ann).await;
    // Registration answers "taken" for a known email (a person must learn it somehow), and
    // invitations "not found" for an unknown one; each such answer counts against the address.
    for attempt in 0..3 {
        let body =
            json!({ "email": ann.email, "username": format!("probe{attempt}"), "password": "probe-password-123" });
        let taken = rest.post("/v1/users", body).send().await;
        assert_error(&taken, StatusCode::CONFLICT, "ALREADY_EXISTS");
        let body = json!({ "email": format!("nobody{attempt}@example.org"), "role": "PROJECT_ROLE_VIEWER" });
        let unknown = rest.post(&format!("/v1/projects/{project}/members"), body).bearer(&ann.token).send().await;
        assert_error(&unknown, StatusCode::NOT_FOUND, "NOT_FOUND");
    }
    // Six probes: the address is locked for both, before any answer about the email.
    let body = json!({ "email": "fresh@example.org", "username": "fresh", "password": "fresh-password-123" });
    assert_locked(&rest.post("/v1/users", body).send().await);
    let body = json!({ "email": "nobody9@example.org", "role": "PROJECT_ROLE_VIEWER" });
    assert_locked(&rest.post(&format!("/v1/projects/{project}/members"), body).bearer(&ann.token).send().await);
}
