//! `QuotaService`: quotas per project, user and API key; reservations against them.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use aimesh_kit::auth::{Caller, ProjectRole};
use aimesh_kit::data::audit::Actor;
use aimesh_kit::wire::error::respond;
use aimesh_kit::wire::fields;
use aimesh_kit::wire::proto_json;
use aimesh_proto::usage::v1 as pb;

use super::{USAGE_READ, USAGE_WRITE, Usage, api_key_of};
use crate::domain::{NewReservation, QuotaLimits, QuotaScope, QuotaSubject, ReservationDraft};
use crate::error::{Result, UsageError};
use crate::ledger::GrantedReservation;
use crate::store::QuotaRow;

pub(super) struct QuotaApi(pub(super) Arc<Usage>);

fn quota_to_proto(row: QuotaRow) -> Result<pb::Quota> {
    let subject = row.subject()?;
    Ok(pb::Quota {
        project_id: row.project_id.to_string(),
        scope: subject.scope().to_proto().into(),
        subject_id: match subject {
            QuotaSubject::Project => String::new(),
            QuotaSubject::User(id) | QuotaSubject::ApiKey(id) => id.to_string(),
        },
        tokens_per_day: row.tokens_per_day,
        cost_per_month: row.cost_per_month.normalize().to_string(),
        requests_per_minute: row.requests_per_minute,
        tokens_per_minute: row.tokens_per_minute,
        soft_limit_percent: row.soft_limit_percent,
        update_time: Some(proto_json::timestamp(row.updated_at)),
    })
}

fn reservation_to_proto(granted: GrantedReservation) -> pb::Reservation {
    let r = granted.reservation;
    pb::Reservation {
        id: r.id.to_string(),
        project_id: r.project_id.to_string(),
        user_id: r.user_id.to_string(),
        api_key_id: r.api_key_id.map(|id| id.to_string()).unwrap_or_default(),
        model_id: r.model_id.to_string(),
        tokens: r.tokens,
        cost: r.cost.to_string(),
        expire_time: Some(proto_json::timestamp(r.expires_at)),
        warnings: granted.warnings,
    }
}

impl Usage {
    async fn set_quota(&self, caller: &Caller, actor: &Actor, request: pb::SetQuotaRequest) -> Result<pb::Quota> {
        let quota = request.quota.ok_or_else(|| UsageError::invalid("quota", "is required"))?;
        let project_id = fields::id("quota.project_id", &quota.project_id)?;
        let scope = QuotaScope::require_proto(quota.scope, "quota.scope")?;
        let subject = QuotaSubject::parse("quota.subject_id", scope, &quota.subject_id)?;
        let limits = QuotaLimits::validate(
            quota.tokens_per_day,
            &quota.cost_per_month,
            quota.requests_per_minute,
            quota.tokens_per_minute,
            quota.soft_limit_percent,
        )?;
        caller.principal.require_session()?;
        self.require(caller, project_id, ProjectRole::Admin, USAGE_WRITE).await?;
        quota_to_proto(self.ledger.set_quota(project_id, subject, &limits, actor).await?)
    }

    async fn list_quotas(&self, caller: &Caller, request: pb::ListQuotasRequest) -> Result<pb::ListQuotasResponse> {
        let project_id = fields::id("project_id", &request.project_id)?;
        self.require(caller, project_id, ProjectRole::Viewer, USAGE_READ).await?;
        let rows = self.ledger.store().reading_for(caller.principal.user_id).await.quotas(project_id).await?;
        Ok(pb::ListQuotasResponse { quotas: rows.into_iter().map(quota_to_proto).collect::<Result<_>>()? })
    }

    async fn delete_quota(
        &self,
        caller: &Caller,
        actor: &Actor,
        request: pb::DeleteQuotaRequest,
    ) -> Result<pb::DeleteQuotaResponse> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let scope = QuotaScope::require_proto(request.scope, "scope")?;
        let subject = QuotaSubject::parse("subject_id", scope, &request.subject_id)?;
        caller.principal.require_session()?;
        self.require(caller, project_id, ProjectRole::Admin, USAGE_WRITE).await?;
        self.ledger.delete_quota(project_id, subject, actor).await?;
        Ok(pb::DeleteQuotaResponse {})
    }

    async fn reserve(&self, caller: &Caller, request: pb::ReserveRequest) -> Result<pb::Reservation> {
        let draft = ReservationDraft {
            project_id: &request.project_id,
            user_id: &request.user_id,
            default_user: caller.principal.user_id,
            api_key_id: api_key_of(caller),
            model: &request.model,
            estimated_input_tokens: request.estimated_input_tokens,
            estimated_output_tokens: request.estimated_output_tokens,
            ttl_seconds: request.ttl_seconds,
        };
        let reservation = NewReservation::validate(&draft)?;
        self.require_usage_writer(caller, reservation.project_id, reservation.user_id).await?;
        Ok(reservation_to_proto(self.ledger.reserve(&reservation).await?))
    }

    async fn release_reservation(
        &self,
        caller: &Caller,
        request: pb::ReleaseReservationRequest,
    ) -> Result<pb::ReleaseReservationResponse> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let reservation_id = fields::id("reservation_id", &request.reservation_id)?;
        self.require(caller, project_id, ProjectRole::Member, USAGE_WRITE).await?;
        let actor = self.reservation_actor(caller, project_id).await?;
        self.ledger.release(project_id, reservation_id, &actor).await?;
        Ok(pb::ReleaseReservationResponse {})
    }
}

#[tonic::async_trait]
impl pb::quota_service_server::QuotaService for QuotaApi {
    async fn set_quota(&self, request: Request<pb::SetQuotaRequest>) -> Result<Response<pb::Quota>, Status> {
        let caller = Caller::of(&request)?;
        let actor = Actor::of(&request, Some(caller.principal.user_id));
        respond(self.0.set_quota(&caller, &actor, request.into_inner()).await)
    }

    async fn list_quotas(
        &self,
        request: Request<pb::ListQuotasRequest>,
    ) -> Result<Response<pb::ListQuotasResponse>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.list_quotas(&caller, request.into_inner()).await)
    }

    async fn delete_quota(
        &self,
        request: Request<pb::DeleteQuotaRequest>,
    ) -> Result<Response<pb::DeleteQuotaResponse>, Status> {
        let caller = Caller::of(&request)?;
        let actor = Actor::of(&request, Some(caller.principal.user_id));
        respond(self.0.delete_quota(&caller, &actor, request.into_inner()).await)
    }

    async fn reserve(&self, request: Request<pb::ReserveRequest>) -> Result<Response<pb::Reservation>, Status> {
        let caller = Caller::internal(&request)?;
        respond(self.0.reserve(&caller, request.into_inner()).await)
    }

    async fn release_reservation(
        &self,
        request: Request<pb::ReleaseReservationRequest>,
    ) -> Result<Response<pb::ReleaseReservationResponse>, Status> {
        let caller = Caller::internal(&request)?;
        respond(self.0.release_reservation(&caller, request.into_inner()).await)
    }
}
