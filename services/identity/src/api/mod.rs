//! The gRPC edge of identity: each submodule implements one protobuf service. A handler decodes
//! and validates, authorizes, calls the store, and encodes; this module holds what they share.

mod api_keys;
mod auth;
mod projects;
mod sessions;
mod settings;
mod users;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use aimesh_kit::ServiceError;
use aimesh_kit::auth::{Access, Caller, ProjectAccess, ProjectRole};
use aimesh_kit::auth::{CredentialVerifier, Principal};
use aimesh_kit::config::RateLimitConfig;
use aimesh_kit::data::cache::{CacheSettings, InvalidationBus, TwoLevelCache};
use aimesh_kit::data::redis::Redis;
use aimesh_kit::wire::fields;
use aimesh_proto::identity::v1 as pb;

use crate::config::IdentityConfig;
use crate::domain::SettingsCipher;
use crate::error::{IdentityError, Result};
use crate::login_throttle::LoginThrottle;
use crate::store::{Actor, ProjectRow, Store};

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
    /// Live projects by id (`None` for none or deleted), read through [`Identity::project_row`]
    /// and dropped on every replica by [`Identity::forget_project`] after each change.
    projects: TwoLevelCache<ProjectRow>,
    config: IdentityConfig,
    cipher: Option<SettingsCipher>,
    throttle: LoginThrottle,
    /// Slots for password hashing (`identity.password_hash_concurrency`): argon2id takes 19 MiB
    /// per hash, so the default 4 slots hold hashing to about 76 MiB of memory.
    hashing: Semaphore,
    /// The highest limits a tenant may set itself (`rate_limit.max_*_requests_per_minute`).
    limit_maxima: LimitMaxima,
}

/// The deployment's maxima of tenants' own rate limits; only a system admin sets more.
#[derive(Debug, Clone, Copy)]
struct LimitMaxima {
    project: u32,
    api_key: u32,
}

impl Identity {
    /// Identity over its store and caches; `bus` carries the project cache's invalidations
    /// between replicas.
    pub fn new(
        store: Store,
        verifier: CredentialVerifier,
        access: ProjectAccess,
        redis: Redis,
        bus: &InvalidationBus,
        rate_limit: &RateLimitConfig,
        config: IdentityConfig,
    ) -> anyhow::Result<Arc<Self>> {
        let cipher = config.settings_key.as_deref().map(SettingsCipher::from_base64).transpose()?;
        // identity.* has no cache settings of its own: the kit's defaults (10 s in process, 5 min
        // in Redis, 5 s for "no such project") suit a row that changes rarely and is invalidated
        // on every change.
        let projects = TwoLevelCache::new("projects", "identity", redis.clone(), bus, CacheSettings::default());
        let throttle = LoginThrottle::new(redis, config.login_throttle.clone());
        let hashing = Semaphore::new(config.password_hash_concurrency.max(1));
        let limit_maxima = LimitMaxima {
            project: rate_limit.max_project_requests_per_minute,
            api_key: rate_limit.max_api_key_requests_per_minute,
        };
        Ok(Arc::new(Self { store, verifier, access, projects, config, cipher, throttle, hashing, limit_maxima }))
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

    /// The store as a read-only request of `user` reads it: from a replica that has replayed
    /// the user's own writes, or from the primary.
    async fn reader(&self, user: Uuid) -> Store {
        self.store.reading_for(user).await
    }

    /// Keeps `user`'s write in view of their next reads, for writes made before the caller is
    /// known (registration, login, refresh), which the server's write recording cannot see.
    async fn wrote(&self, user: Uuid) {
        self.store.database().wrote(user).await;
    }

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

    /// The live project `project_id` (NOT_FOUND if there is none or it was deleted), through the
    /// project cache: how an answer about one project (`GetProject`) reads its row.
    async fn project_row(&self, project_id: Uuid) -> Result<Arc<ProjectRow>> {
        // The primary (the store's own pool), never a replica: a load right after an
        // invalidation that read a lagging replica would put the old row back into the shared
        // cache for every replica (the cache refuses only loads that began before the
        // invalidation), so no read-your-writes routing here.
        let primary = &self.store;
        let row = self
            .projects
            .get_or_load(&project_id.to_string(), || async move {
                primary.project(project_id).await.map_err(ServiceError::from)
            })
            .await?;
        row.ok_or(IdentityError::NotFound("project"))
    }

    /// Forgets the cached row of `project_id` on every replica; call after the commit of every
    /// change of what [`Identity::project_row`] answers. A failure (Redis unreachable) is logged,
    /// not returned: the change is committed, and the old row expires by the cache's TTL.
    async fn forget_project(&self, project_id: Uuid) {
        self.projects.invalidate_or_log(&project_id.to_string()).await;
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

    /// Forgets the cached verifications of the keys `user_id` made (in `project_id`, or in every
    /// project), after their access changed: such a key acts only while its creator could make
    /// it (see `Store::api_key_credential`). A failure only delays the change to the cache TTL.
    async fn forget_creator_keys(&self, user_id: Uuid, project_id: Option<Uuid>) {
        match self.store.creator_key_hashes(user_id, project_id).await {
            Ok(hashes) => self.forget_credentials(&hashes).await,
            Err(error) => tracing::warn!(%error, "could not find a creator's API keys; their cache expires by TTL"),
        }
    }

    /// Runs `work` (password hashing) in one of the bounded hashing slots, on the blocking pool;
    /// waits at most `identity.password_hash_wait_ms` for a slot, then refuses for now.
    async fn in_hashing_slot<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let wait = Duration::from_millis(self.config.password_hash_wait_ms);
        let permit = match tokio::time::timeout(wait, self.hashing.acquire()).await {
            Ok(Ok(permit)) => permit,
            _ => {
                return Err(IdentityError::TryLater {
                    reason: "PASSWORD_HASHING_BUSY",
                    message: "too many password checks at once; retry shortly".to_owned(),
                    retry_after: Duration::from_secs(1),
                });
            }
        };
        let done = tokio::task::spawn_blocking(work).await;
        drop(permit);
        done.map_err(|e| IdentityError::from(aimesh_kit::ServiceError::internal(e)))
    }

    /// Refuses `requests_per_minute` above the deployment's `maximum` (named `setting`) unless
    /// the caller is a system admin.
    fn check_limit_maximum(
        principal: &Principal,
        field: &'static str,
        requests_per_minute: Option<i32>,
        maximum: u32,
        setting: &str,
    ) -> Result<()> {
        let asked = requests_per_minute.and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
        if asked > maximum && !principal.system_admin {
            return Err(IdentityError::invalid(
                field,
                format!("must be at most {maximum} ({setting}); only a system admin may set more"),
            ));
        }
        Ok(())
    }
}

/// A handler's answer as gRPC; unlike the kit's `respond`, a refusal for now keeps its
/// retry-after (see `From<IdentityError> for tonic::Status`).
fn respond<T>(result: Result<T>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

/// Who is acting and from where, for audit events and login sessions.
fn actor<T>(request: &Request<T>, user_id: Option<Uuid>) -> Actor {
    Actor::of(request, user_id)
}

/// The client address an actor carries (see `Actor::of`), for the login-failure counters.
fn client_address(actor: &Actor) -> Option<std::net::IpAddr> {
    actor.ip.parse().ok()
}

/// The user a request names: an id, or `me` for the caller.
fn target_user(principal: &Principal, field: &'static str, value: &str) -> Result<Uuid> {
    if value == "me" { Ok(principal.user_id) } else { Ok(fields::id(field, value)?) }
}
