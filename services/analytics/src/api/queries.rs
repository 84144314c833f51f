//! `AnalyticsService`: usage time series and breakdowns, the audit log, retention.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::DateTime;
use rust_decimal::Decimal;
use tonic::{Request, Response, Status};

use aimesh_kit::ServiceError;
use aimesh_kit::auth::{Caller, ProjectRole};
use aimesh_kit::data::audit::{Actor, changed};
use aimesh_kit::wire::error::respond;
use aimesh_kit::wire::fields;
use aimesh_kit::wire::pagination::{self, Cursor};
use aimesh_kit::wire::proto_json;
use aimesh_proto::analytics::v1 as pb;

use super::{Analytics, time_field};
use crate::error::{AnalyticsError, Result};
use crate::events::AuditEventRow;
use crate::query::{Bucket, Dimension, Metric, TimeRange, UsageFilter, UsageQuery};
use crate::store::{AuditFilter, UsageAggregate};

pub(super) struct QueryApi(pub(super) Arc<Analytics>);

/// Rows a breakdown returns when the request names no top_n, and at most.
const DEFAULT_TOP_N: i32 = 10;
const MAX_TOP_N: i32 = 1000;
/// Longest retention a project may set, in days (ten years).
const MAX_RETENTION_DAYS: i32 = 3650;
/// Longest reason a legal hold may carry, in characters.
const MAX_HOLD_REASON_CHARS: usize = 500;

fn filter_of(filter: Option<&pb::UsageFilter>) -> Result<UsageFilter> {
    let Some(filter) = filter else { return Ok(UsageFilter::default()) };
    let text = |value: &str| (!value.is_empty()).then(|| value.to_owned());
    Ok(UsageFilter {
        model_id: fields::optional_id("filter.model_id", &filter.model_id)?,
        user_id: fields::optional_id("filter.user_id", &filter.user_id)?,
        api_key_id: fields::optional_id("filter.api_key_id", &filter.api_key_id)?,
        status: text(&filter.status),
        request_type: text(&filter.request_type),
    })
}

/// The value of `metric` in `sums`, as the wire spells it.
fn metric_value(metric: Metric, sums: &UsageAggregate) -> String {
    let latency = |i: usize| sums.latency.get(i).copied().filter(|v| v.is_finite()).unwrap_or(0.0);
    match metric {
        Metric::Requests => sums.sum_requests.to_string(),
        Metric::InputTokens => sums.sum_input_tokens.to_string(),
        Metric::OutputTokens => sums.sum_output_tokens.to_string(),
        Metric::CachedInputTokens => sums.sum_cached_input_tokens.to_string(),
        Metric::TotalTokens => sums.sum_total_tokens.to_string(),
        Metric::Cost => sums.sum_cost.parse::<Decimal>().map(|d| d.normalize().to_string()).unwrap_or_default(),
        Metric::Errors => sums.sum_errors.to_string(),
        Metric::ErrorRate if sums.sum_requests == 0 => "0".to_owned(),
        Metric::ErrorRate => format!("{:.6}", sums.sum_errors as f64 / sums.sum_requests as f64),
        Metric::LatencyP50 => format!("{:.3}", latency(0)),
        Metric::LatencyP95 => format!("{:.3}", latency(1)),
        Metric::LatencyP99 => format!("{:.3}", latency(2)),
    }
}

fn metric_values(metrics: &[Metric], sums: &UsageAggregate) -> pb::MetricValues {
    pb::MetricValues { values: metrics.iter().map(|m| (m.as_str().to_owned(), metric_value(*m, sums))).collect() }
}

/// For ordering rows by a metric.
fn metric_number(metric: Metric, sums: &UsageAggregate) -> f64 {
    metric_value(metric, sums).parse::<f64>().unwrap_or(0.0)
}

impl Analytics {
    fn time_range(
        &self,
        start: Option<&prost_types::Timestamp>,
        end: Option<&prost_types::Timestamp>,
    ) -> Result<TimeRange> {
        TimeRange::new(time_field("start_time", start)?, time_field("end_time", end)?, self.config.max_range_days)
    }

    async fn usage_time_series(
        &self,
        caller: &Caller,
        request: pb::GetUsageTimeSeriesRequest,
    ) -> Result<pb::UsageTimeSeries> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let range = self.time_range(request.start_time.as_ref(), request.end_time.as_ref())?;
        let bucket = Bucket::parse(&request.bucket)?;
        let time_zone = if request.time_zone.is_empty() { "UTC".to_owned() } else { request.time_zone.clone() };
        if !self.store.is_time_zone(&time_zone) {
            return Err(AnalyticsError::invalid("time_zone", format!("{time_zone:?} is not a known time zone")));
        }
        let buckets = (range.end - range.start).num_seconds() / bucket.min_length().num_seconds().max(1);
        if buckets > i64::from(self.config.max_buckets) {
            return Err(AnalyticsError::invalid(
                "bucket",
                format!("the range makes more than {} buckets; choose a wider bucket", self.config.max_buckets),
            ));
        }
        let metrics = Metric::parse_list("metrics", &request.metrics)?;
        let group_by =
            if request.group_by.is_empty() { None } else { Some(Dimension::parse("group_by", &request.group_by)?) };
        let filter = filter_of(request.filter.as_ref())?;
        self.require(caller, project_id, ProjectRole::Viewer).await?;

        let with_latency = metrics.iter().copied().any(Metric::is_latency);
        let query = UsageQuery { project_id, range, filter, bucket: Some((bucket, time_zone)), group_by, with_latency };
        let (rows, source) = self.store.usage(&query).await?;
        let points = rows
            .iter()
            .map(|row| pb::TimeSeriesPoint {
                bucket_start: DateTime::from_timestamp(i64::from(row.bucket), 0).map(proto_json::timestamp),
                group: row.grp.clone(),
                metrics: Some(metric_values(&metrics, row)),
            })
            .collect();
        Ok(pb::UsageTimeSeries { points, source: source.as_str().to_owned() })
    }

    async fn usage_breakdown(
        &self,
        caller: &Caller,
        request: pb::GetUsageBreakdownRequest,
    ) -> Result<pb::UsageBreakdown> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let range = self.time_range(request.start_time.as_ref(), request.end_time.as_ref())?;
        let dimension = Dimension::parse("dimension", &request.dimension)?;
        let metrics = Metric::parse_list("metrics", &request.metrics)?;
        let order_by = match request.order_by.as_str() {
            "" => metrics[0],
            name => Metric::parse("order_by", name)?,
        };
        let top_n = match request.top_n {
            0 => DEFAULT_TOP_N,
            n if (1..=MAX_TOP_N).contains(&n) => n,
            _ => return Err(AnalyticsError::invalid("top_n", format!("must be between 1 and {MAX_TOP_N}"))),
        };
        let filter = filter_of(request.filter.as_ref())?;
        self.require(caller, project_id, ProjectRole::Viewer).await?;

        let with_latency = metrics.iter().copied().chain([order_by]).any(Metric::is_latency);
        let query = UsageQuery { project_id, range, filter, bucket: None, group_by: Some(dimension), with_latency };
        let (mut rows, source) = self.store.usage(&query).await?;
        let total_query = UsageQuery { group_by: None, ..query.clone() };
        let total = self.store.usage_from(&total_query, source).await?;
        rows.sort_by(|a, b| metric_number(order_by, b).total_cmp(&metric_number(order_by, a)).then(a.grp.cmp(&b.grp)));
        rows.truncate(top_n as usize);

        let (previous, previous_total) = if request.compare_previous {
            let previous_query = UsageQuery { range: range.previous(), ..query.clone() };
            let previous_rows = self.store.usage_from(&previous_query, source).await?;
            let previous_total =
                self.store.usage_from(&UsageQuery { group_by: None, ..previous_query }, source).await?;
            let by_value: HashMap<String, UsageAggregate> =
                previous_rows.into_iter().map(|row| (row.grp.clone(), row)).collect();
            (Some(by_value), previous_total.first().map(|sums| metric_values(&metrics, sums)))
        } else {
            (None, None)
        };
        let empty = UsageAggregate {
            bucket: 0,
            grp: String::new(),
            sum_requests: 0,
            sum_errors: 0,
            sum_input_tokens: 0,
            sum_output_tokens: 0,
            sum_cached_input_tokens: 0,
            sum_total_tokens: 0,
            sum_cost: "0".into(),
            latency: Vec::new(),
        };
        let rows = rows
            .iter()
            .map(|row| pb::BreakdownRow {
                value: row.grp.clone(),
                metrics: Some(metric_values(&metrics, row)),
                previous: previous
                    .as_ref()
                    .map(|by_value| metric_values(&metrics, by_value.get(&row.grp).unwrap_or(&empty))),
            })
            .collect();
        Ok(pb::UsageBreakdown {
            rows,
            total: Some(metric_values(&metrics, total.first().unwrap_or(&empty))),
            previous_total: if request.compare_previous {
                Some(previous_total.unwrap_or_else(|| metric_values(&metrics, &empty)))
            } else {
                None
            },
            source: source.as_str().to_owned(),
        })
    }

    async fn search_audit_log(
        &self,
        caller: &Caller,
        request: pb::SearchAuditLogRequest,
    ) -> Result<pb::SearchAuditLogResponse> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let text = |value: &str| (!value.is_empty()).then(|| value.to_owned());
        let filter = AuditFilter {
            actor_user_id: fields::optional_id("actor_user_id", &request.actor_user_id)?,
            action: text(&request.action),
            resource_type: text(&request.resource_type),
            resource_id: text(&request.resource_id),
            start: time_field("start_time", request.start_time.as_ref())?,
            end: time_field("end_time", request.end_time.as_ref())?,
            before: Cursor::decode(&request.page_token)?.map(|c| (c.time, c.id)),
        };
        if let (Some(start), Some(end)) = (filter.start, filter.end)
            && end <= start
        {
            return Err(AnalyticsError::invalid("end_time", "must be after start_time"));
        }
        let limit = pagination::page_size(request.page_size)?;
        if project_id.is_nil() {
            // The deployment's own log (the catalog, prices, accounts): no project's member
            // may read it, only a system admin in person.
            caller.principal.require_session()?;
            if !caller.principal.system_admin {
                return Err(ServiceError::permission_denied("the log outside projects is for system admins").into());
            }
        } else {
            self.require(caller, project_id, ProjectRole::Viewer).await?;
        }
        let fetch = u32::try_from(limit + 1).unwrap_or(u32::MAX);
        let rows = self.store.audit(project_id, &filter, fetch).await?;
        let (rows, next_page_token) =
            pagination::paginate(rows, limit, |r| Cursor { time: r.occurred_at, id: r.event_id });
        let events = rows
            .into_iter()
            .map(|row| pb::AuditEvent {
                event_id: row.event_id.to_string(),
                project_id: row.project_id.to_string(),
                actor_user_id: if row.actor_user_id.is_nil() { String::new() } else { row.actor_user_id.to_string() },
                action: row.action,
                resource_type: row.resource_type,
                resource_id: row.resource_id,
                ip_address: row.ip_address,
                user_agent: row.user_agent,
                details: row.details,
                occurred_at: Some(proto_json::timestamp(row.occurred_at)),
            })
            .collect();
        Ok(pb::SearchAuditLogResponse { events, next_page_token })
    }

    async fn retention(&self, project_id: uuid::Uuid) -> Result<pb::Retention> {
        let (days, custom) = self.store.retention_of(project_id);
        let applied = self.store.retention_applied(project_id);
        let since = self.store.legal_hold_of(project_id);
        Ok(pb::Retention {
            project_id: project_id.to_string(),
            days: i32::from(days),
            custom,
            applied,
            legal_hold: since.is_some(),
            legal_hold_since: since.map(proto_json::timestamp),
        })
    }

    async fn get_retention(&self, caller: &Caller, request: pb::GetRetentionRequest) -> Result<pb::Retention> {
        let project_id = fields::id("project_id", &request.project_id)?;
        self.require(caller, project_id, ProjectRole::Viewer).await?;
        self.retention(project_id).await
    }

    async fn set_retention(
        &self,
        caller: &Caller,
        actor: &Actor,
        request: pb::SetRetentionRequest,
    ) -> Result<pb::Retention> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let days = u16::try_from(request.days)
            .ok()
            .filter(|d| (1..=MAX_RETENTION_DAYS).contains(&i32::from(*d)))
            .ok_or_else(|| AnalyticsError::invalid("days", format!("must be between 1 and {MAX_RETENTION_DAYS}")))?;
        // Changing what is kept is an admin's decision, and a person's: API keys only read.
        caller.principal.require_session()?;
        self.require(caller, project_id, ProjectRole::Admin).await?;
        let (old_days, old_custom) = self.store.set_retention(project_id, days).await?;
        // Written after the change (ClickHouse has no transaction spanning both): a failure here
        // fails the call, and the admin's retry records the change again.
        let old = serde_json::json!({ "days": old_days, "custom": old_custom });
        let new = serde_json::json!({ "days": days, "custom": true });
        self.store
            .record_audit(AuditEventRow {
                event_id: uuid::Uuid::now_v7(),
                project_id,
                occurred_at: chrono::Utc::now(),
                actor_user_id: actor.user_id.unwrap_or_default(),
                action: "retention.set".to_owned(),
                resource_type: "retention".to_owned(),
                resource_id: project_id.to_string(),
                ip_address: actor.ip.clone(),
                user_agent: actor.user_agent.clone(),
                details: changed(old, new).to_string(),
                retention_days: 0,
            })
            .await?;
        self.retention(project_id).await
    }

    async fn set_legal_hold(
        &self,
        caller: &Caller,
        actor: &Actor,
        request: pb::SetLegalHoldRequest,
    ) -> Result<pb::Retention> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let reason = request.reason.trim();
        if reason.is_empty() || reason.chars().count() > MAX_HOLD_REASON_CHARS {
            return Err(AnalyticsError::invalid("reason", format!("must be 1 to {MAX_HOLD_REASON_CHARS} characters")));
        }
        // As for SetRetention: an admin's decision, and a person's.
        caller.principal.require_session()?;
        self.require(caller, project_id, ProjectRole::Admin).await?;
        let was = self.store.set_legal_hold(project_id, request.legal_hold, reason).await?;
        let old = serde_json::json!({ "legal_hold": was });
        let new = serde_json::json!({ "legal_hold": request.legal_hold });
        let mut details = changed(old, new);
        if let Some(object) = details.as_object_mut() {
            object.insert("reason".to_owned(), serde_json::Value::String(reason.to_owned()));
        }
        self.store
            .record_audit(AuditEventRow {
                event_id: uuid::Uuid::now_v7(),
                project_id,
                occurred_at: chrono::Utc::now(),
                actor_user_id: actor.user_id.unwrap_or_default(),
                action: if request.legal_hold { "retention.legal_hold_set" } else { "retention.legal_hold_lifted" }
                    .to_owned(),
                resource_type: "retention".to_owned(),
                resource_id: project_id.to_string(),
                ip_address: actor.ip.clone(),
                user_agent: actor.user_agent.clone(),
                details: details.to_string(),
                retention_days: 0,
            })
            .await?;
        self.retention(project_id).await
    }
}

#[tonic::async_trait]
impl pb::analytics_service_server::AnalyticsService for QueryApi {
    async fn get_usage_time_series(
        &self,
        request: Request<pb::GetUsageTimeSeriesRequest>,
    ) -> Result<Response<pb::UsageTimeSeries>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.usage_time_series(&caller, request.into_inner()).await)
    }

    async fn get_usage_breakdown(
        &self,
        request: Request<pb::GetUsageBreakdownRequest>,
    ) -> Result<Response<pb::UsageBreakdown>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.usage_breakdown(&caller, request.into_inner()).await)
    }

    async fn search_audit_log(
        &self,
        request: Request<pb::SearchAuditLogRequest>,
    ) -> Result<Response<pb::SearchAuditLogResponse>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.search_audit_log(&caller, request.into_inner()).await)
    }

    async fn get_retention(
        &self,
        request: Request<pb::GetRetentionRequest>,
    ) -> Result<Response<pb::Retention>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.get_retention(&caller, request.into_inner()).await)
    }

    async fn set_retention(
        &self,
        request: Request<pb::SetRetentionRequest>,
    ) -> Result<Response<pb::Retention>, Status> {
        let caller = Caller::of(&request)?;
        let actor = Actor::of(&request, Some(caller.principal.user_id));
        respond(self.0.set_retention(&caller, &actor, request.into_inner()).await)
    }

    async fn set_legal_hold(
        &self,
        request: Request<pb::SetLegalHoldRequest>,
    ) -> Result<Response<pb::Retention>, Status> {
        let caller = Caller::of(&request)?;
        let actor = Actor::of(&request, Some(caller.principal.user_id));
        respond(self.0.set_legal_hold(&caller, &actor, request.into_inner()).await)
    }
}
