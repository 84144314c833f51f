//! `UsageService`: recording model calls, listing them, today's stats.

use std::sync::Arc;

use chrono::Utc;
use tonic::{Request, Response, Status};

use aimesh_kit::auth::{Caller, ProjectRole};
use aimesh_kit::wire::error::respond;
use aimesh_kit::wire::fields;
use aimesh_kit::wire::pagination::{Cursor, Page};
use aimesh_kit::wire::proto_json;
use aimesh_proto::usage::v1 as pb;

use super::{USAGE_READ, Usage, api_key_of, time_field};
use crate::domain::{NewUsage, RequestType, UsageDraft, UsageStatus};
use crate::error::{Result, UsageError};
use crate::ledger::Totals;
use crate::store::{UsageFilter, UsageRow};

pub(super) struct UsageApi(pub(super) Arc<Usage>);

fn usage_to_proto(row: UsageRow) -> Result<pb::UsageRecord> {
    let text = |id: Option<uuid::Uuid>| id.map(|id| id.to_string()).unwrap_or_default();
    Ok(pb::UsageRecord {
        id: row.id.to_string(),
        request_id: row.request_id,
        project_id: row.project_id.to_string(),
        user_id: row.user_id.to_string(),
        api_key_id: text(row.api_key_id),
        model_id: row.model_id.to_string(),
        chat_session_id: text(row.chat_session_id),
        request_type: RequestType::parse_db(&row.request_type)?.as_str().to_owned(),
        input_tokens: row.input_tokens,
        output_tokens: row.output_tokens,
        cached_input_tokens: row.cached_input_tokens,
        total_tokens: row.total_tokens,
        cost: row.cost.to_string(),
        duration_ms: row.duration_ms,
        status: UsageStatus::parse_db(&row.status)?.to_proto().into(),
        error_message: row.error_message,
        request_time: Some(proto_json::timestamp(row.request_time)),
        create_time: Some(proto_json::timestamp(row.created_at)),
    })
}

fn totals_to_proto(totals: &Totals) -> pb::UsageTotals {
    pb::UsageTotals {
        requests: totals.requests,
        input_tokens: totals.input_tokens,
        output_tokens: totals.output_tokens,
        cost: totals.cost().normalize().to_string(),
    }
}

/// An optional status of a request: unspecified is `None`, unknown values are refused.
fn optional_status(value: i32, field: &'static str) -> Result<Option<UsageStatus>> {
    if value == 0 { Ok(None) } else { Ok(Some(UsageStatus::require_proto(value, field)?)) }
}

impl Usage {
    async fn record_usage(&self, caller: &Caller, request: pb::RecordUsageRequest) -> Result<pb::UsageRecord> {
        let draft = UsageDraft {
            request_id: &request.request_id,
            project_id: &request.project_id,
            user_id: &request.user_id,
            default_user: caller.principal.user_id,
            api_key_id: api_key_of(caller),
            model: &request.model,
            chat_session_id: &request.chat_session_id,
            request_type: &request.request_type,
            input_tokens: request.input_tokens,
            output_tokens: request.output_tokens,
            cached_input_tokens: request.cached_input_tokens,
            duration_ms: request.duration_ms,
            status: optional_status(request.status, "status")?,
            error_message: &request.error_message,
            request_time: time_field("request_time", request.request_time.as_ref())?,
            reservation_id: &request.reservation_id,
        };
        let mut usage = NewUsage::validate(&draft, Utc::now())?;
        self.require_usage_writer(caller, usage.project_id, usage.user_id).await?;
        if usage.reservation_id.is_some() {
            usage.settled_by = self.reservation_actor(caller, usage.project_id).await?;
        }
        usage_to_proto(self.ledger.record(usage).await?)
    }

    async fn list_usage(&self, caller: &Caller, request: pb::ListUsageRequest) -> Result<pb::ListUsageResponse> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let filter = UsageFilter {
            user_id: fields::optional_id("user_id", &request.user_id)?,
            model_id: fields::optional_id("model_id", &request.model_id)?,
            api_key_id: fields::optional_id("api_key_id", &request.api_key_id)?,
            status: optional_status(request.status, "status")?.map(UsageStatus::as_str),
            start_time: time_field("start_time", request.start_time.as_ref())?,
            end_time: time_field("end_time", request.end_time.as_ref())?,
        };
        if let (Some(start), Some(end)) = (filter.start_time, filter.end_time)
            && start >= end
        {
            return Err(UsageError::invalid("end_time", "must be after start_time"));
        }
        let page = Page::new(&request.page_token, request.page_size)?;
        self.require(caller, project_id, ProjectRole::Viewer, USAGE_READ).await?;
        let reader = self.ledger.store().reading_for(caller.principal.user_id).await;
        let rows = reader.list_usage(project_id, &filter, &page).await?;
        let (rows, next_page_token) = page.finish(rows, |r| Cursor { time: r.request_time, id: r.id });
        let records = rows.into_iter().map(usage_to_proto).collect::<Result<_>>()?;
        Ok(pb::ListUsageResponse { records, next_page_token })
    }

    async fn get_usage_stats(&self, caller: &Caller, request: pb::GetUsageStatsRequest) -> Result<pb::UsageStats> {
        let project_id = fields::id("project_id", &request.project_id)?;
        self.require(caller, project_id, ProjectRole::Viewer, USAGE_READ).await?;
        let stats = self.ledger.stats(project_id).await?;
        Ok(pb::UsageStats {
            day: stats.day,
            project: Some(totals_to_proto(&stats.project)),
            by_user: stats.by_user.iter().map(|(user, totals)| (user.clone(), totals_to_proto(totals))).collect(),
            by_model: stats.by_model.iter().map(|(model, totals)| (model.clone(), totals_to_proto(totals))).collect(),
        })
    }
}

#[tonic::async_trait]
impl pb::usage_service_server::UsageService for UsageApi {
    async fn record_usage(
        &self,
        request: Request<pb::RecordUsageRequest>,
    ) -> Result<Response<pb::UsageRecord>, Status> {
        let caller = Caller::internal(&request)?;
        respond(self.0.record_usage(&caller, request.into_inner()).await)
    }

    async fn list_usage(
        &self,
        request: Request<pb::ListUsageRequest>,
    ) -> Result<Response<pb::ListUsageResponse>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.list_usage(&caller, request.into_inner()).await)
    }

    async fn get_usage_stats(
        &self,
        request: Request<pb::GetUsageStatsRequest>,
    ) -> Result<Response<pb::UsageStats>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.get_usage_stats(&caller, request.into_inner()).await)
    }
}
