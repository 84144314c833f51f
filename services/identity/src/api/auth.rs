//! `AuthService` (internal): the other services' credential cache asks here on a miss.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use aimesh_proto::identity::v1 as pb;

use super::Identity;

pub(super) struct AuthApi(pub(super) Arc<Identity>);

#[tonic::async_trait]
impl pb::auth_service_server::AuthService for AuthApi {
    /// Answers through identity's own credential cache, so a burst of services verifying the same
    /// key costs one database query.
    async fn authenticate(&self, request: Request<pb::AuthenticateRequest>) -> Result<Response<pb::Principal>, Status> {
        let credential = request.into_inner().credential;
        let principal = self.0.verifier.verify(&credential).await?;
        Ok(Response::new(pb::Principal::from(&principal)))
    }
}
