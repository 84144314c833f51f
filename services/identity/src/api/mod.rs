//! The gRPC edge of identity: each submodule implements one protobuf service. A handler decodes
//! and validates, authorizes, calls the store, and encodes; this module holds what they share.

mod api_keys;
mod auth;
mod projects;
mod sessions;
mod settings;
mod users;

use std::sync::Arc;

use tonic::Request;
use uuid::Uuid;

use aimesh_kit::auth::{Access, Caller, ProjectAccess, ProjectRole};
use aimesh_kit::auth::{CredentialVerifier, Principal};
use aimesh_kit::wire::fields;
use aimesh_proto::identity::v1 as pb;

use crate::config::IdentityConfig;
use crate::domain::SettingsCipher;
use crate::error::Result;
use crate::store::{Actor, Store};

/// The scope an API key needs to read identity data of its project.
const IDENTITY_READ: &str = "identity:read";
/// The scope changes of identity data need. No key can hold it (it is not in
/// `aimesh_kit::auth::SCOPES`): changing who may do what takes a person's login session.
const IDENTITY_WRITE: &str = "identity:write";

/// What every handler of identity works with.
#[derive(Debug)]
pub struct Identity {
    store: Store,
    verifier: CredentialVerifier,
    access: ProjectAccess,
    config: IdentityConfig,
    cipher: Option<SettingsCipher>,
}

impl Identity {
    pub fn new(
        store: Store,
        verifier: CredentialVerifier,
        access: ProjectAccess,
        config: IdentityConfig,
    ) -> anyhow::Result<Arc<Self>> {
        let cipher = config.settings_key.as_deref().map(SettingsCipher::from_base64).transpose()?;
        Ok(Arc::new(Self { store, verifier, access, config, cipher }))
    }

    /// Every gRPC service of identity, ready for the server.
    pub fn routes(self: &Arc<Self>) -> tonic::service::Routes {
        tonic::service::Routes::new(pb::user_service_server::UserServiceServer::new(users::UserApi(Arc::clone(self))))
            .add_service(pb::session_service_server::SessionServiceServer::new(sessions::SessionApi(Arc::clone(self))))
            .add_service(pb::project_service_server::ProjectServiceServer::new(projects::ProjectApi(Arc::clone(self))))
            .add_service(pb::api_key_service_server::ApiKeyServiceServer::new(api_keys::ApiKeyApi(Arc::clone(self))))
            .add_service(pb::settings_service_server::SettingsServiceServer::new(settings::SettingsApi(Arc::clone(
                self,
            ))))
            .add_service(pb::auth_service_server::AuthServiceServer::new(auth::AuthApi(Arc::clone(self))))
    }

    /// The fully qualified names of those services, for grpc.health.v1.
    pub const GRPC_SERVICES: [&'static str; 6] = [
        "aimesh.identity.v1.UserService",
        "aimesh.identity.v1.SessionService",
        "aimesh.identity.v1.ProjectService",
        "aimesh.identity.v1.ApiKeyService",
        "aimesh.identity.v1.SettingsService",
        "aimesh.identity.v1.AuthService",
    ];

    /// The caller's role in `project_id`, refused unless it is at least `needed` (see
    /// [`ProjectAccess::require`]). An API key of the project reads, as a viewer, with
    /// `identity:read`, and changes nothing.
    async fn require_role(&self, caller: &Caller, project_id: Uuid, needed: ProjectRole) -> Result<ProjectRole> {
        let scope = if needed > ProjectRole::Viewer { IDENTITY_WRITE } else { IDENTITY_READ };
        match self.access.require(caller, project_id, needed, scope).await? {
            Access::Member(role) => Ok(role),
            Access::ApiKey => Ok(ProjectRole::Viewer),
        }
    }

    /// Forgets the cached roles of these memberships on every replica, after they changed.
    async fn forget_roles(&self, project_id: Uuid, user_ids: &[Uuid]) {
        for user_id in user_ids {
            if let Err(error) = self.access.invalidate(project_id, *user_id).await {
                tracing::warn!(%error, "could not invalidate a cached project role; it expires by TTL");
            }
        }
    }

    /// Forgets cached verifications of credentials that just stopped working, on every replica.
    async fn forget_credentials(&self, hashes: &[String]) {
        for hash in hashes {
            self.verifier.invalidate(hash).await;
        }
    }
}

/// Who is acting and from where, for audit events and login sessions. The address is the
/// client the gateway vouched for, else the peer's (see `aimesh_kit::serving::ratelimit::client`); a
/// plain `x-forwarded-for` is not believed, since any caller can send one.
fn actor<T>(request: &Request<T>, user_id: Option<Uuid>) -> Actor {
    let metadata = request.metadata();
    let text = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok()).map(str::trim).unwrap_or_default();
    let ip = aimesh_kit::serving::ratelimit::ClientAddress::of(request)
        .or_else(|| request.remote_addr().map(|addr| addr.ip()))
        .map(|ip| ip.to_string())
        .unwrap_or_default();
    let user_agent: String = text("user-agent").chars().take(512).collect();
    Actor { user_id, ip, user_agent }
}

/// The user a request names: an id, or `me` for the caller.
fn target_user(principal: &Principal, field: &'static str, value: &str) -> Result<Uuid> {
    if value == "me" { Ok(principal.user_id) } else { Ok(fields::id(field, value)?) }
}
