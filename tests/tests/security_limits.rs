//! Abuse resistance of authentication (issue 19): failed authentications are limited per client
//! address before any credential is looked up, at the gateway and at every service; internal
//! RPCs answer only the mesh (the service token, with the end user's credential on behalf); and
//! each deployment secret serves one purpose only.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::StatusCode;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt;

use aimesh_kit::serving::ratelimit::client::{HEADER_CLIENT_IP, HEADER_CLIENT_IP_TOKEN};
use aimesh_proto::analytics::v1 as analytics_pb;
use aimesh_proto::files::v1 as files_pb;
use aimesh_proto::identity::v1 as pb;
use aimesh_proto::usage::v1 as usage_pb;
use aimesh_tests::{
    Mesh, authed, catalog, expect_code, project_with_key, reason_and_field, record, set_daily_token_budget, test_config,
};

/// Failed authentications per minute a client address may make in these tests.
const FAILURES: u32 = 5;
/// More attempts than that, by far.
const ATTEMPTS: usize = 20;

/// A credential of the right shape that nobody was ever given.
fn made_up_token() -> String {
    format!("ams_{}", uuid::Uuid::new_v4().simple())
}

/// How many times identity answered `Authenticate` so far in this process, whatever the answer:
/// every one is a database lookup. Needs the recorder installed before the mesh starts.
fn authenticate_calls() -> u64 {
    let handle = aimesh_kit::telemetry::metrics_handle().expect("the metrics recorder");
    handle
        .render()
        .lines()
        .filter(|line| {
            line.starts_with("rpc_requests_total{")
                && line.contains("service=\"identity\"")
                && line.contains("method=\"Authenticate\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Connects to a service from `source`, another loopback address than the usual 127.0.0.1, so
/// one test can be two clients.
#[derive(Clone, Copy)]
struct FromAddress {
    source: IpAddr,
    target: SocketAddr,
}

impl tonic::codegen::Service<http::Uri> for FromAddress {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let Self { source, target } = *self;
        Box::pin(async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source, 0))?;
            let stream = socket.connect(target).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

fn channel_from(source: &str, target: SocketAddr) -> Channel {
    let source = source.parse().expect("source address");
    Endpoint::from_shared(format!("http://{target}"))
        .expect("url")
        .connect_with_connector_lazy(FromAddress { source, target })
}

fn list_models(credential: &str) -> tonic::Request<usage_pb::ListModelsRequest> {
    authed(usage_pb::ListModelsRequest::default(), credential)
}

#[tokio::test]
async fn a_flood_of_made_up_credentials_is_refused_before_identity_looks_them_up() {
    // Installed before the services count anything.
    authenticate_calls();
    let (mut config, databases) = test_config();
    config.common.rate_limit.per_ip_failed_auth = FAILURES;
    // The test's REST clients name their addresses through X-Forwarded-For, as an ingress would.
    config.gateway.trusted_proxies = vec!["127.0.0.1".into()];
    let mesh = Mesh::start_with(config, databases).await;
    let ann = mesh.signup("ann").await;
    let rest = mesh.rest();
    let (attacker, bystander) = ("203.0.113.7", "198.51.100.1");

    // Through the gateway: the service (usage) asks identity about each unknown token, until the
    // address is out of failures; then the gateway refuses before calling anybody.
    let before = authenticate_calls();
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let reply = rest.get("/v1/models").header("x-forwarded-for", attacker).bearer(&made_up_token()).send().await;
        statuses.push(reply.status);
        last = Some(reply);
    }
    let failures = FAILURES as usize;
    assert!(statuses[..failures].iter().all(|s| *s == StatusCode::UNAUTHORIZED), "{statuses:?}");
    assert!(statuses[failures..].iter().all(|s| *s == StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    let refused = last.expect("a reply");
    let retry_after: u64 = refused.header("retry-after").expect("Retry-After").parse().expect("seconds");
    assert!((1..=60).contains(&retry_after), "retry after {retry_after} s");
    assert_eq!(refused.json()["reason"], "RATE_LIMITED", "{}", refused.json());
    let looked_up = authenticate_calls() - before;
    assert!(
        (1..=u64::from(FAILURES)).contains(&looked_up),
        "identity looked up {looked_up} credentials for {ATTEMPTS} attempts"
    );

    // Meanwhile a person elsewhere is served; from the flooding address even a good credential
    // is refused, unseen.
    let served = rest.get("/v1/models").header("x-forwarded-for", bystander).bearer(&ann.token).send().await;
    assert_eq!(served.status, StatusCode::OK, "{}", served.json());
    let unseen = rest.get("/v1/models").header("x-forwarded-for", attacker).bearer(&ann.token).send().await;
    assert_eq!(unseen.status, StatusCode::TOO_MANY_REQUESTS);

    // Over gRPC straight to a service, from another address: the service's own auth layer
    // counts and refuses, with RESOURCE_EXHAUSTED and a RetryInfo.
    let flooder = usage_pb::model_service_client::ModelServiceClient::new(channel_from("127.0.0.2", mesh.usage));
    let before = authenticate_calls();
    let mut codes = Vec::new();
    let mut denial = None;
    for _ in 0..ATTEMPTS {
        match flooder.clone().list_models(list_models(&made_up_token())).await {
            Ok(_) => panic!("a made-up credential was accepted"),
            Err(status) => {
                codes.push(status.code());
                denial = Some(status);
            }
        }
    }
    assert!(codes[..failures].iter().all(|c| *c == Code::Unauthenticated), "{codes:?}");
    assert!(codes[failures..].iter().all(|c| *c == Code::ResourceExhausted), "{codes:?}");
    let denial = denial.expect("a denial");
    assert_eq!(reason_and_field(&denial).0, "RATE_LIMITED");
    assert!(denial.get_details_retry_info().and_then(|info| info.retry_delay).is_some(), "RetryInfo");
    assert!(denial.metadata().get("retry-after").is_some(), "retry-after");
    let looked_up = authenticate_calls() - before;
    assert!((1..=u64::from(FAILURES)).contains(&looked_up), "identity looked up {looked_up} over gRPC");
    // A malformed credential counts as a failure too, and is refused like the others.
    let malformed = flooder.clone().list_models(list_models("not-a-credential")).await;
    expect_code("malformed, out of failures", Code::ResourceExhausted, malformed);
    // The person's own address is not the flooder's.
    mesh.models().list_models(list_models(&ann.token)).await.expect("another address is served");
    // The budget is the address's at every service; only the service token, verified without a
    // lookup, still passes from there.
    let identity = pb::auth_service_client::AuthServiceClient::new(channel_from("127.0.0.2", mesh.identity));
    let ask = || pb::AuthenticateRequest { credential: ann.token.clone() };
    let as_user = identity.clone().authenticate(authed(ask(), &ann.token)).await;
    expect_code("a good credential from the flooding address", Code::ResourceExhausted, as_user);
    let as_mesh = identity.clone().authenticate(authed(ask(), mesh.service_token().expose())).await;
    as_mesh.expect("the service token is not held back by the address's failures");
}

#[tokio::test]
async fn internal_rpcs_answer_only_the_service_token_acting_for_the_user() {
    let mesh = Mesh::start().await;
    catalog(&mesh).await;
    let ann = mesh.signup("ann").await;
    let (project, key) = project_with_key(&mesh, &ann, &["usage:write", "usage:read"]).await;
    set_daily_token_budget(&mesh, &ann.token, &project, 1_000_000_000).await;
    let token = mesh.service_token();

    // Identity: Authenticate and GetProjectRole.
    let ask = || pb::AuthenticateRequest { credential: ann.token.clone() };
    expect_code("Authenticate, anonymous", Code::Unauthenticated, mesh.auth().authenticate(ask()).await);
    for credential in [&ann.token, &key] {
        expect_code(
            "Authenticate as a user",
            Code::PermissionDenied,
            mesh.auth().authenticate(authed(ask(), credential)).await,
        );
    }
    let mut request = tonic::Request::new(ask());
    token.authorize(&mut request).expect("authorize");
    let principal = mesh.auth().authenticate(request).await.expect("the mesh authenticates").into_inner();
    assert_eq!(principal.user_id, ann.user_id);

    let role = || pb::GetProjectRoleRequest { project_id: project.clone() };
    let asked = mesh.auth().get_project_role(authed(role(), &ann.token)).await;
    expect_code("GetProjectRole with the user's own session", Code::PermissionDenied, asked);
    let answer = mesh.auth().get_project_role(mesh.on_behalf(role(), &ann.token)).await.expect("on behalf");
    assert_eq!(answer.into_inner().role, pb::ProjectRole::Owner as i32);

    // Usage: Reserve, RecordUsage, ReleaseReservation, with the user's key or on its behalf.
    let reserve = || usage_pb::ReserveRequest {
        project_id: project.clone(),
        model: "gpt-4o".into(),
        estimated_input_tokens: 10,
        estimated_output_tokens: 10,
        ttl_seconds: 600,
        ..Default::default()
    };
    expect_code("Reserve with a key", Code::PermissionDenied, mesh.quotas().reserve(authed(reserve(), &key)).await);
    let reservation = mesh.quotas().reserve(mesh.on_behalf(reserve(), &key)).await.expect("reserve").into_inner();
    let release =
        usage_pb::ReleaseReservationRequest { project_id: project.clone(), reservation_id: reservation.id.clone() };
    let released = mesh.quotas().release_reservation(authed(release.clone(), &key)).await;
    expect_code("ReleaseReservation with a key", Code::PermissionDenied, released);
    mesh.quotas().release_reservation(mesh.on_behalf(release, &key)).await.expect("release on behalf");
    let recorded = mesh.usage().record_usage(authed(record(&project, "direct"), &key)).await;
    expect_code("RecordUsage with a key", Code::PermissionDenied, recorded);
    let recorded = mesh.usage().record_usage(authed(record(&project, "session"), &ann.token)).await;
    expect_code("RecordUsage with a session", Code::PermissionDenied, recorded);
    let recorded =
        mesh.usage().record_usage(mesh.on_behalf(record(&project, "mesh"), &key)).await.expect("record").into_inner();
    assert_eq!(recorded.user_id, ann.user_id, "recorded for the user on whose behalf");

    // Files: AttachFiles, ReleaseSession.
    let session_id = uuid::Uuid::new_v4().to_string();
    let attach = || files_pb::AttachFilesRequest {
        project_id: project.clone(),
        session_id: session_id.clone(),
        file_ids: vec![],
    };
    let release = || files_pb::ReleaseSessionRequest { project_id: project.clone(), session_id: session_id.clone() };
    for credential in [&ann.token, &key] {
        let attached = mesh.attachments().attach_files(authed(attach(), credential)).await;
        expect_code("AttachFiles as a user", Code::PermissionDenied, attached);
        let released = mesh.attachments().release_session(authed(release(), credential)).await;
        expect_code("ReleaseSession as a user", Code::PermissionDenied, released);
    }
    let mut request = tonic::Request::new(attach());
    token.authorize(&mut request).expect("authorize");
    mesh.attachments().attach_files(request).await.expect("the mesh attaches");
    mesh.attachments().release_session(mesh.on_behalf(release(), &ann.token)).await.expect("on behalf releases");

    // Analytics: Ingest.
    let ingest = || analytics_pb::IngestRequest { events: vec![] };
    let ingested = mesh.ingest().ingest(authed(ingest(), &ann.token)).await;
    expect_code("Ingest as a user", Code::PermissionDenied, ingested);
    let mut request = tonic::Request::new(ingest());
    token.authorize(&mut request).expect("authorize");
    mesh.ingest().ingest(request).await.expect("the mesh ingests");

    // The on-behalf header alone, or beside a user's own credential, vouches for nothing.
    let mut forged = authed(role(), &key);
    forged.metadata_mut().insert("x-aimesh-on-behalf-of", format!("Bearer {}", ann.token).parse().expect("header"));
    expect_code("on behalf without the token", Code::Unauthenticated, mesh.auth().get_project_role(forged).await);
}

/// HMAC-SHA256 (RFC 2104), to forge a link as a key derived from the service token would sign it.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..key.len().min(64)].copy_from_slice(&key[..key.len().min(64)]);
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

#[tokio::test]
async fn the_service_token_neither_vouches_for_addresses_nor_signs_links() {
    const PER_IP: u32 = 4;
    let (mut config, databases) = test_config();
    config.common.rate_limit.per_ip = PER_IP;
    let mesh = Mesh::start_with(config, databases).await;
    let gateway_token = mesh.config.common.auth.gateway_token.clone().expect("aimesh makes a gateway token");
    let service_token = mesh.service_token();

    // Anonymous calls straight to usage, each vouched for as from a new address: with the
    // gateway token the address is believed (the gateway limited it), with the service token it
    // is not, and the peer is limited per address.
    let vouched = |i: u32, secret: &str| {
        let mut request = tonic::Request::new(usage_pb::ListModelsRequest::default());
        let metadata = request.metadata_mut();
        metadata.insert(HEADER_CLIENT_IP, format!("203.0.113.{i}").parse().expect("ip"));
        metadata.insert(HEADER_CLIENT_IP_TOKEN, secret.parse().expect("token"));
        request
    };
    let from_gateway = usage_pb::model_service_client::ModelServiceClient::new(channel_from("127.0.0.3", mesh.usage));
    for i in 0..=PER_IP * 2 {
        let answer = from_gateway.clone().list_models(vouched(i, gateway_token.expose())).await;
        expect_code("vouched with the gateway token", Code::Unauthenticated, answer);
    }
    let impostor = usage_pb::model_service_client::ModelServiceClient::new(channel_from("127.0.0.4", mesh.usage));
    let mut codes = Vec::new();
    for i in 0..=PER_IP {
        let answer = impostor.clone().list_models(vouched(i, service_token.expose())).await;
        codes.push(answer.expect_err("anonymous").code());
    }
    assert_eq!(codes.last(), Some(&Code::ResourceExhausted), "the service token vouched: {codes:?}");

    // A download link signed with the key the service token used to derive does not verify;
    // the deployment's own link key does.
    let ann = mesh.signup("ann").await;
    let project = mesh
        .projects()
        .create_project(authed(
            pb::CreateProjectRequest { name: "Links".into(), description: String::new() },
            &ann.token,
        ))
        .await
        .expect("project")
        .into_inner()
        .id;
    let metadata = files_pb::UploadMetadata {
        project_id: project,
        name: "a.txt".into(),
        mime_type: "text/plain".into(),
        ..Default::default()
    };
    let messages = [
        files_pb::UploadRequest { part: Some(files_pb::upload_request::Part::Metadata(metadata)), finish: false },
        files_pb::UploadRequest {
            part: Some(files_pb::upload_request::Part::Chunk(b"hello".to_vec().into())),
            finish: false,
        },
        files_pb::UploadRequest { part: None, finish: true },
    ];
    let file =
        mesh.files().upload(authed(futures::stream::iter(messages), &ann.token)).await.expect("upload").into_inner();
    let link = files_pb::CreateDownloadUrlRequest { file_id: file.id.clone(), expires_in_seconds: 600 };
    let link = mesh.files().create_download_url(authed(link, &ann.token)).await.expect("link").into_inner();
    mesh.rest().get(&format!("/v1/files/signed/{}", link.token)).send().await.expect(StatusCode::OK);

    let file_id = uuid::Uuid::parse_str(&file.id).expect("file id");
    let mut payload = file_id.as_bytes().to_vec();
    payload.extend_from_slice(&(chrono::Utc::now().timestamp() + 600).to_be_bytes());
    let derived = hmac_sha256(service_token.expose().as_bytes(), b"aimesh files download links");
    let forged =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(&payload), URL_SAFE_NO_PAD.encode(hmac_sha256(&derived, &payload)));
    let refused = mesh.rest().get(&format!("/v1/files/signed/{forged}")).send().await;
    assert!(refused.status.is_client_error(), "a link signed from the service token: {}", refused.status);
}
