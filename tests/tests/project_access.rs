//! How services other than identity learn a caller's role in a project (what
//! `aimesh_kit::auth::remote` builds for them): `ProjectAccess` asks
//! identity's `GetProjectRole` with the caller's own credential, caches the answer, and sees
//! identity's membership changes at once through the invalidation broadcast.

use std::time::{Duration, Instant};

use aimesh_kit::auth::CredentialVerifier;
use aimesh_kit::auth::{Access, BearerCredential, Caller, ProjectAccess, ProjectRole};
use aimesh_kit::data::cache::InvalidationBus;
use aimesh_kit::data::redis::Redis;
use aimesh_kit::{ErrorCode, ServiceError};
use aimesh_proto::identity::v1 as pb;
use aimesh_tests::{Mesh, authed};

/// What a service such as usage builds at start-up: a verifier and a role cache asking identity.
struct OtherService {
    verifier: CredentialVerifier,
    access: ProjectAccess,
    _bus: InvalidationBus,
}

impl OtherService {
    async fn start(mesh: &Mesh) -> Self {
        let common = &mesh.config.common;
        let redis = Redis::connect(&common.redis_urls, &common.redis).await.expect("redis");
        let bus = InvalidationBus::start(&redis).await.expect("bus");
        let identity = format!("http://{}", mesh.identity);
        let (verifier, access) =
            aimesh_kit::auth::remote(&redis, &bus, &common.auth, &identity).expect("identity client");
        Self { verifier, access, _bus: bus }
    }

    /// What a handler does: verify the credential, then check the project.
    async fn require(&self, credential: &str, project_id: &str, needed: ProjectRole) -> Result<Access, ServiceError> {
        let principal = self.verifier.verify(credential).await?;
        let caller = Caller { principal, credential: BearerCredential(credential.to_owned()) };
        let project_id = project_id.parse().expect("project id");
        self.access.require(&caller, project_id, needed, "usage:read").await
    }
}

#[tokio::test]
async fn roles_come_from_identity_and_changes_show_at_once() {
    let mesh = Mesh::start().await;
    let (ann, bob) = (mesh.signup("ann").await, mesh.signup("bob").await);
    let project = mesh.create_project(&ann, "Lab").await;
    let service = OtherService::start(&mesh).await;

    assert_eq!(service.require(&ann.token, &project, ProjectRole::Owner).await, Ok(Access::Member(ProjectRole::Owner)));
    let stranger = service.require(&bob.token, &project, ProjectRole::Viewer).await.expect_err("bob is no member");
    assert_eq!(stranger.code, ErrorCode::PermissionDenied);
    // A project that does not exist looks the same as one the caller is not in.
    let unknown = uuid::Uuid::new_v4().to_string();
    let missing = service.require(&ann.token, &unknown, ProjectRole::Viewer).await.expect_err("no such project");
    assert_eq!(missing.code, ErrorCode::PermissionDenied);

    // Bob joins as a viewer: the cached "no role" must not outlive the change.
    let add = pb::AddMemberRequest {
        project_id: project.clone(),
        email: bob.email.clone(),
        role: pb::ProjectRole::Viewer.into(),
    };
    mesh.projects().add_member(authed(add, &ann.token)).await.expect("add bob");
    eventually(|| service.require(&bob.token, &project, ProjectRole::Viewer), Ok(Access::Member(ProjectRole::Viewer)))
        .await;
    let too_low =
        service.require(&bob.token, &project, ProjectRole::Member).await.expect_err("a viewer is not a member");
    assert_eq!(too_low.code, ErrorCode::PermissionDenied);

    let promote = pb::UpdateMemberRoleRequest {
        project_id: project.clone(),
        user_id: bob.user_id.clone(),
        role: pb::ProjectRole::Admin.into(),
    };
    mesh.projects().update_member_role(authed(promote, &ann.token)).await.expect("promote bob");
    eventually(|| service.require(&bob.token, &project, ProjectRole::Admin), Ok(Access::Member(ProjectRole::Admin)))
        .await;

    let remove = pb::RemoveMemberRequest { project_id: project.clone(), user_id: bob.user_id.clone() };
    mesh.projects().remove_member(authed(remove, &ann.token)).await.expect("remove bob");
    let started = Instant::now();
    while service.require(&bob.token, &project, ProjectRole::Viewer).await.is_ok() {
        assert!(started.elapsed() < Duration::from_secs(5), "a removed member keeps access elsewhere");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn api_keys_are_checked_by_project_and_scope_without_asking_for_a_role() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "Lab").await;
    let other = mesh.create_project(&ann, "Lab").await;
    let key = pb::CreateApiKeyRequest {
        project_id: project.clone(),
        name: "ci".into(),
        scopes: vec!["usage:read".into()],
        expire_time: None,
        requests_per_minute: 0,
        project_owned: false,
    };
    let secret = mesh.api_keys().create_api_key(authed(key, &ann.token)).await.expect("key").into_inner().secret;
    let service = OtherService::start(&mesh).await;

    assert_eq!(service.require(&secret, &project, ProjectRole::Viewer).await, Ok(Access::ApiKey));
    let elsewhere = service.require(&secret, &other, ProjectRole::Viewer).await.expect_err("another project");
    assert_eq!(elsewhere.code, ErrorCode::PermissionDenied);
    // A key asking identity for "its role" directly is refused: keys have scopes, not roles.
    let asked =
        mesh.auth().get_project_role(mesh.on_behalf(pb::GetProjectRoleRequest { project_id: project }, &secret)).await;
    assert_eq!(asked.expect_err("keys have no role").code(), tonic::Code::PermissionDenied);
}

/// Calls `check` until it answers `expected`, for at most 5 s.
async fn eventually<F, Fut>(check: F, expected: Result<Access, ServiceError>)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Access, ServiceError>>,
{
    let started = Instant::now();
    loop {
        let got = check().await;
        if got == expected {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "still {got:?}, expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
