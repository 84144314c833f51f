//! `IngestService`: batches of events from the outbox relays, and the retention policies the
//! other services' retention jobs read.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use aimesh_kit::auth::require_internal;
use aimesh_kit::wire::error::respond;
use aimesh_kit::wire::fields;
use aimesh_proto::analytics::v1 as pb;

use super::Analytics;
use crate::error::{AnalyticsError, Result};
use crate::events::{self, Rejection};
use crate::store::Stored;

pub(super) struct IngestApi(pub(super) Arc<Analytics>);

/// Policies per ListRetentionPolicies page when the request names no page size, and at most.
const DEFAULT_POLICY_PAGE: i32 = 1000;
const MAX_POLICY_PAGE: i32 = 10_000;

impl Analytics {
    async fn ingest(&self, request: pb::IngestRequest) -> Result<pb::IngestResponse> {
        if request.events.len() > self.config.max_batch_events as usize {
            return Err(AnalyticsError::invalid(
                "events",
                format!("at most {} events per call", self.config.max_batch_events),
            ));
        }
        let checked: Vec<Result<events::ValidEvent, Rejection>> = request.events.iter().map(events::validate).collect();
        let valid: Vec<events::ValidEvent> = checked.iter().filter_map(|c| c.as_ref().ok().cloned()).collect();
        let mut stored = self.store.ingest(valid).await?.into_iter();
        let mut response = pb::IngestResponse::default();
        for (event, check) in request.events.iter().zip(checked) {
            let result = match check {
                Err(rejection) => {
                    response.rejected += 1;
                    tracing::warn!(event_id = %event.event_id, field = %rejection.field, reason = %rejection.message, "event rejected");
                    pb::EventResult {
                        event_id: event.event_id.clone(),
                        outcome: pb::EventOutcome::Rejected.into(),
                        field: rejection.field,
                        message: rejection.message,
                    }
                }
                Ok(_) => {
                    let outcome = match stored.next() {
                        Some(Stored::New) => {
                            response.accepted += 1;
                            pb::EventOutcome::Accepted
                        }
                        _ => {
                            response.duplicates += 1;
                            pb::EventOutcome::Duplicate
                        }
                    };
                    pb::EventResult { event_id: event.event_id.clone(), outcome: outcome.into(), ..Default::default() }
                }
            };
            response.results.push(result);
        }
        metrics::counter!("analytics_events_accepted_total").increment(u64::from(response.accepted));
        metrics::counter!("analytics_events_duplicate_total").increment(u64::from(response.duplicates));
        metrics::counter!("analytics_events_rejected_total").increment(u64::from(response.rejected));
        Ok(response)
    }

    async fn list_retention_policies(
        &self,
        request: pb::ListRetentionPoliciesRequest,
    ) -> Result<pb::ListRetentionPoliciesResponse> {
        let limit = match request.page_size {
            0 => DEFAULT_POLICY_PAGE,
            size if (1..=MAX_POLICY_PAGE).contains(&size) => size,
            _ => return Err(AnalyticsError::invalid("page_size", format!("must be 1 to {MAX_POLICY_PAGE}"))),
        };
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(fields::id("page_token", token)?),
        };
        let limit = u32::try_from(limit).unwrap_or(1);
        let page = self.store.retention_policies(after, limit).await?;
        let next_page_token = match page.last() {
            Some(last) if page.len() == limit as usize => last.project_id.to_string(),
            _ => String::new(),
        };
        let policies = page
            .into_iter()
            .map(|policy| pb::RetentionPolicy {
                project_id: policy.project_id.to_string(),
                days: policy.days.map_or(0, i32::from),
                legal_hold: policy.legal_hold,
            })
            .collect();
        Ok(pb::ListRetentionPoliciesResponse { policies, next_page_token })
    }
}

#[tonic::async_trait]
impl pb::ingest_service_server::IngestService for IngestApi {
    async fn ingest(&self, request: Request<pb::IngestRequest>) -> Result<Response<pb::IngestResponse>, Status> {
        require_internal(&request)?;
        respond(self.0.ingest(request.into_inner()).await)
    }

    async fn list_retention_policies(
        &self,
        request: Request<pb::ListRetentionPoliciesRequest>,
    ) -> Result<Response<pb::ListRetentionPoliciesResponse>, Status> {
        require_internal(&request)?;
        respond(self.0.list_retention_policies(request.into_inner()).await)
    }
}
