//! `AuthService` (internal): the other services' caches ask here on a miss. Both RPCs answer
//! only the mesh (the service token); `GetProjectRole` answers for the user on whose behalf the
//! calling service asks.
//!
//! Both RPCs answer from the database, not through identity's own caches: the caller's cache
//! already collapses concurrent misses across replicas (its Redis load lock), and going through
//! a cache of the same name here would wait on that very lock.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use aimesh_kit::ServiceError;
use aimesh_kit::auth::{
    ACCESS_TOKEN_PREFIX, API_KEY_PREFIX, Caller, CredentialSource, RoleSource, check_credential_shape, require_internal,
};
use aimesh_kit::wire::fields;
use aimesh_proto::identity::v1 as pb;

use super::Identity;
use crate::credentials::{StoreCredentialSource, StoreRoleSource};

pub(super) struct AuthApi(pub(super) Arc<Identity>);

#[tonic::async_trait]
impl pb::auth_service_server::AuthService for AuthApi {
    async fn authenticate(&self, request: Request<pb::AuthenticateRequest>) -> Result<Response<pb::Principal>, Status> {
        require_internal(&request)?;
        let credential = request.into_inner().credential;
        check_credential_shape(&credential, &[ACCESS_TOKEN_PREFIX, API_KEY_PREFIX])?;
        let source = StoreCredentialSource::new(self.0.store.clone());
        let principal = source
            .authenticate(&credential)
            .await?
            .ok_or_else(|| ServiceError::unauthenticated("the credential is unknown, expired or revoked"))?;
        Ok(Response::new(pb::Principal::from(&principal)))
    }

    /// Answers for the user on whose behalf the call is made only (a login session; keys have
    /// no role).
    async fn get_project_role(
        &self,
        request: Request<pb::GetProjectRoleRequest>,
    ) -> Result<Response<pb::GetProjectRoleResponse>, Status> {
        let caller = Caller::internal(&request)?;
        caller.principal.require_session()?;
        let project_id = fields::id("project_id", &request.get_ref().project_id).map_err(Status::from)?;
        let role = StoreRoleSource::new(self.0.store.clone()).role(&caller, project_id).await?;
        let role = role.map_or(pb::ProjectRole::Unspecified, |role| role.to_proto());
        Ok(Response::new(pb::GetProjectRoleResponse { role: role.into() }))
    }
}
