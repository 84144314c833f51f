//! Who may act in a project: every service checks the caller's role in the project a request
//! names through [`ProjectAccess`]. A login session's role comes from identity (its own store
//! in the identity service, the `GetProjectRole` RPC elsewhere), cached in the kit's two-level
//! cache per (project, user) and invalidated by identity whenever a membership changes. An API
//! key is checked without asking anybody: it belongs to one project and carries scopes.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use aimesh_proto::identity::v1 as pb;

use super::credentials::{BearerCredential, Principal, ServiceToken};
use super::verifier::IdentityClient;
use crate::config::AuthConfig;
use crate::data::cache::{CacheSettings, InvalidationBus, TwoLevelCache};
use crate::data::redis::{Redis, RedisError};
use crate::wire::error::ServiceError;

/// A role in a project; each allows what the ones below it allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjectRole {
    Viewer,
    Member,
    Admin,
    Owner,
}

impl ProjectRole {
    /// The spelling in databases and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Member => "member",
            Self::Admin => "admin",
            Self::Owner => "owner",
        }
    }

    /// Reads [`ProjectRole::as_str`]'s spelling.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "viewer" => Some(Self::Viewer),
            "member" => Some(Self::Member),
            "admin" => Some(Self::Admin),
            "owner" => Some(Self::Owner),
            _ => None,
        }
    }

    /// The protobuf role; `None` for unspecified or unknown values.
    pub fn from_proto(value: i32) -> Option<Self> {
        match pb::ProjectRole::try_from(value) {
            Ok(pb::ProjectRole::Viewer) => Some(Self::Viewer),
            Ok(pb::ProjectRole::Member) => Some(Self::Member),
            Ok(pb::ProjectRole::Admin) => Some(Self::Admin),
            Ok(pb::ProjectRole::Owner) => Some(Self::Owner),
            _ => None,
        }
    }

    pub fn to_proto(self) -> pb::ProjectRole {
        match self {
            Self::Viewer => pb::ProjectRole::Viewer,
            Self::Member => pb::ProjectRole::Member,
            Self::Admin => pb::ProjectRole::Admin,
            Self::Owner => pb::ProjectRole::Owner,
        }
    }
}

/// The verified caller of a request and the bearer credential it presented (forwarded when a
/// service asks identity on the caller's behalf).
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub credential: BearerCredential,
}

impl Caller {
    /// The caller the auth layer put in the request, or UNAUTHENTICATED.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Self, ServiceError> {
        let principal = super::credentials::principal(request)?.clone();
        let credential = request
            .extensions()
            .get::<BearerCredential>()
            .cloned()
            .ok_or_else(|| ServiceError::unauthenticated("this call needs a credential"))?;
        Ok(Self { principal, credential })
    }

    /// The end user on whose behalf another service called an internal RPC, refused unless the
    /// call presented the service token (see [`super::credentials::require_internal`]).
    pub fn internal<T>(request: &tonic::Request<T>) -> Result<Self, ServiceError> {
        super::credentials::require_internal(request)?;
        Self::of(request)
    }
}

/// How a caller may act in a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A person with this role (a system admin counts as an owner).
    Member(ProjectRole),
    /// An API key of the project holding the scope the call needs.
    ApiKey,
}

/// Where the roles of login sessions come from when no cache has them. `Ok(None)`: no role (not
/// a member, or no such live project).
pub trait RoleSource: Send + Sync + 'static {
    fn role<'a>(
        &'a self,
        caller: &'a Caller,
        project_id: Uuid,
    ) -> BoxFuture<'a, Result<Option<ProjectRole>, ServiceError>>;
}

/// Asks identity's `GetProjectRole` with the service token, on behalf of the caller's own
/// credential, so identity answers for the caller and nobody else.
#[derive(Debug, Clone)]
pub struct RemoteRoleSource {
    client: IdentityClient,
    token: ServiceToken,
}

impl RemoteRoleSource {
    /// Asks identity through `client`, presenting `token`.
    pub fn new(client: IdentityClient, token: ServiceToken) -> Self {
        Self { client, token }
    }
}

impl RoleSource for RemoteRoleSource {
    fn role<'a>(
        &'a self,
        caller: &'a Caller,
        project_id: Uuid,
    ) -> BoxFuture<'a, Result<Option<ProjectRole>, ServiceError>> {
        Box::pin(async move {
            let mut request = tonic::Request::new(pb::GetProjectRoleRequest { project_id: project_id.to_string() });
            self.token.authorize_on_behalf(&mut request, &caller.credential.0)?;
            crate::telemetry::inject_current_context(request.metadata_mut());
            match self.client.clone().get_project_role(request).await {
                Ok(answer) => Ok(ProjectRole::from_proto(answer.into_inner().role)),
                Err(status) => Err(ServiceError::from_status(&status)),
            }
        })
    }
}

/// What a service other than identity verifies callers with: credentials and session roles
/// both asked of identity at `identity_url` (`services.identity`), through the shared caches.
pub fn remote(
    redis: &Redis,
    bus: &InvalidationBus,
    settings: &AuthConfig,
    identity_url: &str,
) -> Result<(super::verifier::CredentialVerifier, ProjectAccess), ServiceError> {
    // Identity answers only the mesh: without the token nothing could be verified.
    let token = settings.service_token.clone().ok_or_else(|| {
        ServiceError::invalid_field(
            "auth.service_token",
            "is not set: this service cannot ask identity about credentials",
        )
    })?;
    // One connection to identity for both.
    let client = super::verifier::identity_client(identity_url)?;
    let credentials = Arc::new(super::verifier::RemoteCredentialSource::new(client.clone(), token.clone()));
    let verifier = super::verifier::CredentialVerifier::new(redis.clone(), bus, settings, credentials);
    let roles = Arc::new(RemoteRoleSource::new(client, token));
    Ok((verifier, ProjectAccess::new(redis.clone(), bus, settings, roles)))
}

/// Checks callers' access to projects, through a cache of session roles.
#[derive(Clone)]
pub struct ProjectAccess {
    cache: TwoLevelCache<ProjectRole>,
    source: Arc<dyn RoleSource>,
}

impl std::fmt::Debug for ProjectAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectAccess").finish_non_exhaustive()
    }
}

impl ProjectAccess {
    /// Roles are cached as long as credential verifications (`auth.*_ttl_secs`), since a role
    /// change is as much a security change as a revocation.
    pub fn new(redis: Redis, bus: &InvalidationBus, settings: &AuthConfig, source: Arc<dyn RoleSource>) -> Self {
        let cache_settings = CacheSettings {
            local_ttl: Duration::from_secs(settings.local_ttl_secs),
            shared_ttl: Duration::from_secs(settings.shared_ttl_secs),
            negative_ttl: Duration::from_secs(settings.local_ttl_secs.min(5)),
            local_capacity: 100_000,
        };
        Self { cache: TwoLevelCache::new("project_roles", "identity", redis, bus, cache_settings), source }
    }

    fn key(project_id: Uuid, user_id: Uuid) -> String {
        format!("{project_id}:{user_id}")
    }

    /// How `caller` may act in `project_id`, refused unless it is a person with at least
    /// `needed`, or an API key of the project holding `scope`. A project the caller has no role
    /// in gets PERMISSION_DENIED whether it exists or not, so ids cannot be probed.
    pub async fn require(
        &self,
        caller: &Caller,
        project_id: Uuid,
        needed: ProjectRole,
        scope: &str,
    ) -> Result<Access, ServiceError> {
        // API keys (and the service token, which require_key_access refuses) have no role.
        if caller.principal.session_id().is_none() {
            caller.principal.require_key_access(project_id, scope)?;
            return Ok(Access::ApiKey);
        }
        let role = self
            .role(caller, project_id)
            .await?
            .ok_or_else(|| ServiceError::permission_denied("you are not a member of this project"))?;
        if role < needed {
            return Err(ServiceError::permission_denied(format!(
                "this needs the {} role in the project",
                needed.as_str()
            )));
        }
        Ok(Access::Member(role))
    }

    /// The role of a login session's person in `project_id` (`None`: none, or no such live
    /// project), through the cache. API keys have no role: PERMISSION_DENIED.
    pub async fn role(&self, caller: &Caller, project_id: Uuid) -> Result<Option<ProjectRole>, ServiceError> {
        if caller.principal.session_id().is_none() {
            return Err(ServiceError::permission_denied("API keys have no role in a project"));
        }
        let source = Arc::clone(&self.source);
        let role = self
            .cache
            .get_or_load(&Self::key(project_id, caller.principal.user_id), || async move {
                source.role(caller, project_id).await
            })
            .await?;
        Ok(role.map(|role| *role))
    }

    /// Forgets the cached role of `user_id` in `project_id` on every replica; identity calls it
    /// after every change of a membership.
    pub async fn invalidate(&self, project_id: Uuid, user_id: Uuid) -> Result<(), RedisError> {
        self.cache.invalidate(&Self::key(project_id, user_id)).await
    }
}
