//! The gRPC edge of usage: each submodule implements one protobuf service. A handler decodes
//! and validates, authorizes, calls the ledger or the catalog, and encodes; this module holds
//! what they share.

mod models;
mod quotas;
mod usage;

use std::sync::Arc;

use chrono::{DateTime, Utc};

use uuid::Uuid;

use aimesh_kit::auth::CredentialRef;
use aimesh_kit::auth::{Access, Caller, ProjectAccess, ProjectRole};
use aimesh_kit::wire::proto_json;
use aimesh_proto::usage::v1 as pb;

use crate::domain::ReservationActor;
use crate::error::{Result, UsageError};
use crate::ledger::Ledger;

/// The scope an API key needs to read a project's usage and quotas.
const USAGE_READ: &str = "usage:read";
/// The scope an API key needs to record usage and reserve room.
const USAGE_WRITE: &str = "usage:write";

/// What every handler of usage works with.
#[derive(Debug)]
pub struct Usage {
    ledger: Ledger,
    access: ProjectAccess,
}

impl Usage {
    pub fn new(ledger: Ledger, access: ProjectAccess) -> Arc<Self> {
        Arc::new(Self { ledger, access })
    }

    /// Every gRPC service of usage, ready for the server.
    pub fn routes(self: &Arc<Self>) -> tonic::service::Routes {
        tonic::service::Routes::new(pb::model_service_server::ModelServiceServer::new(models::ModelApi(Arc::clone(
            self,
        ))))
        .add_service(pb::usage_service_server::UsageServiceServer::new(usage::UsageApi(Arc::clone(self))))
        .add_service(pb::quota_service_server::QuotaServiceServer::new(quotas::QuotaApi(Arc::clone(self))))
    }

    /// The fully qualified names of those services, for grpc.health.v1.
    pub const GRPC_SERVICES: [&'static str; 3] =
        ["aimesh.usage.v1.ModelService", "aimesh.usage.v1.UsageService", "aimesh.usage.v1.QuotaService"];

    /// Refuses a caller without `needed` in the project (or an API key of it without `scope`).
    async fn require(&self, caller: &Caller, project_id: Uuid, needed: ProjectRole, scope: &str) -> Result<()> {
        self.access.require(caller, project_id, needed, scope).await?;
        Ok(())
    }

    /// May `caller` count usage in `project_id` for `user_id`? A person (a login session) counts
    /// only their own; attributing usage to others is for internal clients, which use an API
    /// key of the project with `usage:write`.
    async fn require_usage_writer(&self, caller: &Caller, project_id: Uuid, user_id: Uuid) -> Result<()> {
        let access = self.access.require(caller, project_id, ProjectRole::Member, USAGE_WRITE).await?;
        if access != Access::ApiKey && user_id != caller.principal.user_id {
            return Err(UsageError::forbidden(
                "a person records and reserves usage only for themselves; internal clients use an API key",
            ));
        }
        Ok(())
    }
}

impl Usage {
    /// Who `caller` is to the reservations of `project_id`: the principal itself, and whether
    /// it is an owner or admin there (a login session only: keys have no role). Asked after the
    /// caller check, from the cached role.
    async fn reservation_actor(&self, caller: &Caller, project_id: Uuid) -> Result<ReservationActor> {
        let project_admin = caller.principal.session_id().is_some()
            && self.access.role(caller, project_id).await?.is_some_and(|role| role >= ProjectRole::Admin);
        Ok(ReservationActor { user_id: caller.principal.user_id, api_key_id: api_key_of(caller), project_admin })
    }
}

/// The API key the caller used, if it used one: usage it records or reserves counts against it.
fn api_key_of(caller: &Caller) -> Option<Uuid> {
    match caller.principal.credential {
        CredentialRef::ApiKey { api_key_id, .. } => Some(api_key_id),
        CredentialRef::Session { .. } | CredentialRef::Service => None,
    }
}

/// An optional timestamp field; out of range is an error naming it.
fn time_field(field: &'static str, value: Option<&prost_types::Timestamp>) -> Result<Option<DateTime<Utc>>> {
    value
        .map(|ts| proto_json::from_timestamp(ts).ok_or_else(|| UsageError::invalid(field, "is out of range")))
        .transpose()
}
