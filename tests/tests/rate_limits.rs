//! Rate limits end to end: an API key's own limit, a project's limit over its keys, a person's
//! limit over every service, the answers (RESOURCE_EXHAUSTED with RetryInfo, `ratelimit-*`
//! headers) and limit changes taking effect through the revocation path; callers without a
//! credential limited per address by the gateways, which vouch for it to the services.

use std::time::Duration;

use aimesh_gateway::GatewayConfig;
use aimesh_kit::serving::ratelimit::client::{HEADER_CLIENT_IP, HEADER_CLIENT_IP_TOKEN};
use aimesh_proto::chat::v1 as chat_pb;
use aimesh_proto::identity::v1 as pb;
use aimesh_proto::usage::v1 as usage_pb;
use aimesh_tests::rest::{Call, Reply, Rest};
use aimesh_tests::{Account, Mesh, authed, expect_code, reason_and_field, test_config};
use http::StatusCode;
use serde_json::json;
use tonic::Code;
use tonic::metadata::MetadataMap;
use tonic_types::StatusExt;

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask { paths: paths.iter().map(|p| (*p).to_owned()).collect() })
}

async fn create_key(mesh: &Mesh, owner: &Account, project_id: &str, requests_per_minute: u32) -> (String, String) {
    let request = pb::CreateApiKeyRequest {
        project_id: project_id.into(),
        name: "limited".into(),
        scopes: vec!["chat:read".into(), "usage:read".into()],
        expire_time: None,
        requests_per_minute,
        project_owned: false,
    };
    let created = mesh.api_keys().create_api_key(authed(request, &owner.token)).await.expect("create key");
    let created = created.into_inner();
    let key = created.api_key.expect("key");
    assert_eq!(key.requests_per_minute, requests_per_minute, "the limit is returned");
    (key.id, created.secret)
}

async fn list_sessions(mesh: &Mesh, credential: &str, project_id: &str) -> Result<MetadataMap, tonic::Status> {
    let request = chat_pb::ListSessionsRequest { project_id: project_id.into(), ..Default::default() };
    mesh.chat().list_sessions(authed(request, credential)).await.map(|response| response.metadata().clone())
}

fn header(metadata: &MetadataMap, name: &str) -> Option<String> {
    metadata.get(name).and_then(|value| value.to_str().ok()).map(str::to_owned)
}

/// A denial as the client sees it: RATE_LIMITED, a RetryInfo, the headers; returns the
/// dimension the ErrorInfo names.
#[track_caller]
fn assert_rate_limited(call: &str, result: Result<MetadataMap, tonic::Status>, limit: u32) -> String {
    let status = expect_code(call, Code::ResourceExhausted, result);
    assert_eq!(reason_and_field(&status).0, "RATE_LIMITED", "{call}");
    let details = status.get_error_details();
    let retry = details.retry_info().and_then(|info| info.retry_delay).expect("a RetryInfo detail");
    assert!(retry > Duration::ZERO && retry <= Duration::from_secs(60), "{call}: retry in {retry:?}");
    assert_eq!(header(status.metadata(), "ratelimit-limit"), Some(limit.to_string()), "{call}");
    assert_eq!(header(status.metadata(), "ratelimit-remaining").as_deref(), Some("0"), "{call}");
    let retry_after: u64 = header(status.metadata(), "retry-after").and_then(|v| v.parse().ok()).expect("retry-after");
    assert!((1..=60).contains(&retry_after), "{call}: retry-after {retry_after}");
    assert!(header(status.metadata(), "ratelimit-reset").is_some(), "{call}");
    details.error_info().and_then(|info| info.metadata.get("dimension").cloned()).unwrap_or_default()
}

#[tokio::test]
async fn an_api_key_gets_its_own_limit_across_services_and_a_new_limit_takes_effect() {
    const LIMIT: u32 = 5;
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "Limits").await;
    let (key_id, secret) = create_key(&mesh, &ann, &project, LIMIT).await;

    for call in 1..=LIMIT {
        let metadata = list_sessions(&mesh, &secret, &project).await.unwrap_or_else(|e| panic!("call {call}: {e:?}"));
        assert_eq!(header(&metadata, "ratelimit-limit"), Some(LIMIT.to_string()));
        assert_eq!(header(&metadata, "ratelimit-remaining"), Some((LIMIT - call).to_string()), "call {call}");
        assert!(header(&metadata, "retry-after").is_none(), "only denials say when to retry");
    }
    let dimension = assert_rate_limited("call N+1 to chat", list_sessions(&mesh, &secret, &project).await, LIMIT);
    assert_eq!(dimension, "api_key");
    // The limit is the key's, in Redis, whichever service it calls.
    let usage = usage_pb::ListUsageRequest { project_id: project.clone(), ..Default::default() };
    let usage = mesh.usage().list_usage(authed(usage, &secret)).await.map(|r| r.metadata().clone());
    assert_rate_limited("the same key at usage", usage, LIMIT);
    // Other callers are not affected.
    list_sessions(&mesh, &ann.token, &project).await.expect("ann's own session is not limited by the key");

    // Out of range: refused, naming the field, nothing changed.
    let too_high = pb::UpdateApiKeyRequest {
        project_id: project.clone(),
        api_key_id: key_id.clone(),
        api_key: Some(pb::ApiKey { requests_per_minute: 2_000_000, ..Default::default() }),
        update_mask: mask(&["requests_per_minute"]),
    };
    let refused = expect_code(
        "too high",
        Code::InvalidArgument,
        mesh.api_keys().update_api_key(authed(too_high, &ann.token)).await,
    );
    assert_eq!(reason_and_field(&refused).1.as_deref(), Some("api_key.requests_per_minute"));
    let by_key = pb::UpdateApiKeyRequest {
        project_id: project.clone(),
        api_key_id: key_id.clone(),
        api_key: Some(pb::ApiKey { requests_per_minute: 600, ..Default::default() }),
        update_mask: mask(&["requests_per_minute"]),
    };
    let get = pb::GetApiKeyRequest { project_id: project.clone(), api_key_id: key_id.clone() };
    let stored = mesh.api_keys().get_api_key(authed(get, &ann.token)).await.expect("get key").into_inner();
    assert_eq!(stored.requests_per_minute, LIMIT, "nothing written");

    let updated = mesh.api_keys().update_api_key(authed(by_key, &ann.token)).await.expect("raise the limit");
    assert_eq!(updated.into_inner().requests_per_minute, 600);
    // The key's bucket keeps the time it used: at 600 per minute one request comes back every
    // 0.1 s, so a moment later (and after chat got identity's invalidation broadcast) the key
    // may call again, under the new limit.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let metadata = list_sessions(&mesh, &secret, &project).await.expect("the new limit applies at once");
    assert_eq!(header(&metadata, "ratelimit-limit").as_deref(), Some("600"));
}

#[tokio::test]
async fn a_project_limit_counts_all_its_keys_and_applies_to_keys_already_in_use() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "Limits").await;
    let (_, first) = create_key(&mesh, &ann, &project, 0).await;
    let (_, second) = create_key(&mesh, &ann, &project, 0).await;
    // Both verifications are cached now, with the deployment's default project limit.
    list_sessions(&mesh, &first, &project).await.expect("first key");
    list_sessions(&mesh, &second, &project).await.expect("second key");

    let update = pb::UpdateProjectRequest {
        project_id: project.clone(),
        project: Some(pb::Project { requests_per_minute: 3, ..Default::default() }),
        update_mask: mask(&["requests_per_minute"]),
    };
    let updated = mesh.projects().update_project(authed(update, &ann.token)).await.expect("limit the project");
    assert_eq!(updated.into_inner().requests_per_minute, 3);
    // Chat drops its cached verifications when identity's broadcast arrives: milliseconds, the
    // documented bound of normal operation; a call before that would still see the old limit.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut allowed = 0;
    for credential in [&first, &second, &first, &second, &first] {
        match list_sessions(&mesh, credential, &project).await {
            Ok(_) => allowed += 1,
            Err(status) => {
                let dimension = assert_rate_limited("over the project's limit", Err(status), 3);
                assert_eq!(dimension, "project");
            }
        }
    }
    assert_eq!(allowed, 3, "three calls of both keys together");

    let bad = pb::UpdateProjectRequest {
        project_id: project.clone(),
        project: Some(pb::Project { requests_per_minute: 1_000_001, ..Default::default() }),
        update_mask: mask(&["requests_per_minute"]),
    };
    let refused =
        expect_code("too high", Code::InvalidArgument, mesh.projects().update_project(authed(bad, &ann.token)).await);
    assert_eq!(reason_and_field(&refused).1.as_deref(), Some("project.requests_per_minute"));
    let get = pb::GetProjectRequest { project_id: project.clone() };
    let stored = mesh.projects().get_project(authed(get, &ann.token)).await.expect("get project").into_inner();
    assert_eq!(stored.requests_per_minute, 3, "nothing written");

    let key = pb::CreateApiKeyRequest {
        project_id: project.clone(),
        name: "too fast".into(),
        scopes: vec!["chat:read".into()],
        expire_time: None,
        requests_per_minute: 1_000_001,
        project_owned: false,
    };
    let refused = expect_code(
        "key too fast",
        Code::InvalidArgument,
        mesh.api_keys().create_api_key(authed(key, &ann.token)).await,
    );
    assert_eq!(reason_and_field(&refused).1.as_deref(), Some("requests_per_minute"));
}

#[tokio::test]
async fn a_person_is_limited_per_user_across_services() {
    const PER_USER: u32 = 6;
    let (mut config, databases) = test_config();
    config.common.rate_limit.per_user = PER_USER;
    let mesh = Mesh::start_with(config, databases).await;
    let ann = mesh.signup("ann").await;
    let bob = mesh.signup("bob").await;
    // One call at identity, the rest at chat: one budget.
    let project = mesh.create_project(&ann, "Limits").await;
    for call in 2..=PER_USER {
        list_sessions(&mesh, &ann.token, &project).await.unwrap_or_else(|e| panic!("call {call}: {e:?}"));
    }
    let dimension = assert_rate_limited("call N+1", list_sessions(&mesh, &ann.token, &project).await, PER_USER);
    assert_eq!(dimension, "user");
    let get = pb::GetUserRequest { user_id: ann.user_id.clone() };
    let at_identity = mesh.users().get_user(authed(get, &ann.token)).await.map(|r| r.metadata().clone());
    assert_rate_limited("identity too", at_identity, PER_USER);
    mesh.create_project(&bob, "Limits").await;
}

/// `count` REST calls at once, spread over `gateways` in turn; the replies in call order.
async fn at_once(gateways: &[Rest], count: usize, call: impl Fn(&Rest) -> Call) -> Vec<Reply> {
    let calls = (0..count).map(|i| call(&gateways[i % gateways.len()]).send());
    futures::future::join_all(calls).await
}

/// Splits REST replies into those let through and 429s, checking each 429 is the shape a
/// service's denial has: the error body, `RateLimit-*` and `Retry-After`.
#[track_caller]
fn let_through(replies: &[Reply], limit: u32) -> usize {
    let mut through = 0;
    for reply in replies {
        if reply.status != StatusCode::TOO_MANY_REQUESTS {
            through += 1;
            continue;
        }
        let body = reply.json();
        assert_eq!(body["code"], "RESOURCE_EXHAUSTED", "{body}");
        assert_eq!(body["reason"], "RATE_LIMITED", "{body}");
        assert_eq!(reply.header("ratelimit-limit"), Some(limit.to_string().as_str()), "{:?}", reply.headers);
        assert_eq!(reply.header("ratelimit-remaining"), Some("0"));
        assert!(reply.header("ratelimit-reset").is_some());
        let retry_after: u64 = reply.header("retry-after").and_then(|v| v.parse().ok()).expect("retry-after");
        assert!((1..=60).contains(&retry_after), "retry-after {retry_after}");
        assert_eq!(body["details"]["retryAfterSeconds"], retry_after);
    }
    through
}

#[tokio::test]
async fn two_gateways_share_one_per_ip_limit_and_the_services_do_not_count_it_again() {
    const PER_IP: u32 = 12;
    let (mut config, databases) = test_config();
    config.common.rate_limit.per_ip = PER_IP;
    let mesh = Mesh::start_with(config, databases).await;
    let gateways = [mesh.rest(), mesh.start_gateway(GatewayConfig::default()).await];

    // Without a credential: each call reaches identity, which refuses it (401) unless the limit
    // did first. Were the gateway's address counted at identity too, only half would get there
    // (the test client and the gateways share 127.0.0.1).
    let replies = at_once(&gateways, 3 * PER_IP as usize, |rest| rest.get("/v1/projects")).await;
    assert_eq!(let_through(&replies, PER_IP), PER_IP as usize, "exactly the limit, across both gateways");
    for reply in replies.iter().filter(|r| r.status != StatusCode::TOO_MANY_REQUESTS) {
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "the service decided these: {:?}", reply.body);
        assert_eq!(reply.header("ratelimit-limit"), Some(PER_IP.to_string().as_str()), "the gateway's own headers");
    }
    // Shared with a direct gRPC caller from the same address: the one per-IP budget is spent.
    let direct = mesh.projects().list_projects(pb::ListProjectsRequest::default()).await.map(|r| r.metadata().clone());
    assert_eq!(assert_rate_limited("direct, same address", direct, PER_IP), "ip");
}

#[tokio::test]
async fn a_client_behind_a_trusted_proxy_has_its_own_budget_and_reaches_identity() {
    const PER_IP: u32 = 4;
    let (mut config, databases) = test_config();
    config.common.rate_limit.per_ip = PER_IP;
    let mesh = Mesh::start_with(config, databases).await;
    let behind_ingress =
        mesh.start_gateway(GatewayConfig { trusted_proxies: vec!["127.0.0.0/8".into()], ..Default::default() }).await;
    let ann = mesh.signup("ann").await; // two anonymous calls from 127.0.0.1, straight to identity
    let from = |client: &'static str| move |rest: &Rest| rest.get("/v1/projects").header("x-forwarded-for", client);

    let first = at_once(std::slice::from_ref(&behind_ingress), 2 * PER_IP as usize, from("203.0.113.7")).await;
    assert_eq!(let_through(&first, PER_IP), PER_IP as usize);
    let second = at_once(std::slice::from_ref(&behind_ingress), 2 * PER_IP as usize, from("203.0.113.8")).await;
    assert_eq!(let_through(&second, PER_IP), PER_IP as usize, "another client, its own budget");
    // The gateway without trusted proxies does not believe the header: 127.0.0.1 has two left.
    let spoofed = at_once(&[mesh.rest()], PER_IP as usize, from("203.0.113.9")).await;
    assert_eq!(let_through(&spoofed, PER_IP), PER_IP as usize - 2);

    // The client's address, not the gateway's, is what identity records for a login.
    let login = json!({ "login": ann.email, "password": ann.password, "deviceName": "laptop" });
    let logged_in =
        behind_ingress.post("/v1/auth/login", login).header("x-forwarded-for", "198.51.100.20").send().await;
    let token = logged_in.expect(StatusCode::OK).json()["accessToken"].as_str().expect("token").to_owned();
    let sessions = behind_ingress.get("/v1/auth/sessions").bearer(&token).send().await.expect(StatusCode::OK).json();
    let laptop = sessions["sessions"].as_array().expect("sessions").iter().find(|s| s["deviceName"] == "laptop");
    assert_eq!(laptop.expect("the new session")["ipAddress"], "198.51.100.20", "{sessions}");
}

#[tokio::test]
async fn an_api_key_through_two_gateways_gets_exactly_its_limit() {
    const LIMIT: u32 = 8;
    let mesh = Mesh::start().await;
    let gateways = [mesh.rest(), mesh.start_gateway(GatewayConfig::default()).await];
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "Limits").await;
    let (_, secret) = create_key(&mesh, &ann, &project, LIMIT).await;
    let list = format!("/v1/chat/sessions?projectId={project}");
    let replies = at_once(&gateways, 3 * LIMIT as usize, |rest| rest.get(&list).bearer(&secret)).await;
    assert_eq!(let_through(&replies, LIMIT), LIMIT as usize);
    for reply in replies.iter().filter(|r| r.status != StatusCode::TOO_MANY_REQUESTS) {
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    }
}

#[tokio::test]
async fn a_forged_client_address_is_ignored_and_the_per_ip_limit_still_applies() {
    const PER_IP: u32 = 3;
    let (mut config, databases) = test_config();
    config.common.rate_limit.per_ip = PER_IP;
    let mesh = Mesh::start_with(config, databases).await;
    let forged = |i: u32| {
        let mut request = tonic::Request::new(pb::ListProjectsRequest::default());
        let metadata = request.metadata_mut();
        metadata.insert(HEADER_CLIENT_IP, format!("203.0.113.{i}").parse().expect("ip"));
        let guess = format!("amsvc_{}", "0".repeat(64));
        metadata.insert(HEADER_CLIENT_IP_TOKEN, guess.parse().expect("token"));
        request
    };
    for i in 1..=PER_IP {
        let refused = mesh.projects().list_projects(forged(i)).await.map(|r| r.metadata().clone());
        expect_code("no credential", Code::Unauthenticated, refused);
    }
    let over = mesh.projects().list_projects(forged(PER_IP + 1)).await.map(|r| r.metadata().clone());
    assert_eq!(assert_rate_limited("a new address each time, not vouched for", over, PER_IP), "ip");
}
