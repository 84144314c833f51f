//! Events and answers the analytics tests build and compare.

#![allow(dead_code)] // each test binary uses its own part

use chrono::{DateTime, Utc};
use uuid::Uuid;

use aimesh_analytics::events::{self, ValidEvent};
use aimesh_analytics::query::{Bucket, Dimension, TimeRange, UsageFilter, UsageQuery};
use aimesh_analytics::store::UsageAggregate;
use aimesh_kit::wire::proto_json;
use aimesh_proto::analytics::v1 as pb;

/// A usage event of `project` and `model` at `at`.
pub fn usage_event(project: Uuid, model: Uuid, at: DateTime<Utc>, tokens: i64, cost: &str, status: &str) -> pb::Event {
    let payload = serde_json::json!({
        "id": Uuid::now_v7(), "request_id": Uuid::new_v4().to_string(), "user_id": Uuid::new_v4(),
        "api_key_id": null, "model_id": model, "request_type": "chat", "input_tokens": tokens,
        "output_tokens": tokens / 2, "cached_input_tokens": 0, "total_tokens": tokens + tokens / 2,
        "cost": cost, "duration_ms": tokens % 1000, "status": status, "request_time": at.to_rfc3339(),
    });
    pb::Event {
        event_id: Uuid::now_v7().to_string(),
        topic: "usage".into(),
        event_type: "usage.recorded".into(),
        project_id: project.to_string(),
        occurred_at: Some(proto_json::timestamp(at)),
        payload: payload.to_string(),
    }
}

/// The events validated, as the Ingest handler passes them on.
pub fn valid(events: &[pb::Event]) -> Vec<ValidEvent> {
    events.iter().map(|e| events::validate(e).expect("valid event")).collect()
}

/// A daily time series of `project` over [start, end), optionally split by a dimension.
pub fn day_query(project: Uuid, start: DateTime<Utc>, end: DateTime<Utc>, group_by: Option<Dimension>) -> UsageQuery {
    UsageQuery {
        project_id: project,
        range: TimeRange::new(Some(start), Some(end), 400).expect("range"),
        filter: UsageFilter::default(),
        bucket: Some((Bucket::Day, "UTC".into())),
        group_by,
        with_latency: true,
    }
}

/// Requests, tokens and cost per (bucket, group), from one source.
pub fn totals(rows: &[UsageAggregate]) -> Vec<(u32, String, u64, i64, String)> {
    rows.iter()
        .map(|r| {
            let cost: rust_decimal::Decimal = r.sum_cost.parse().expect("cost");
            (r.bucket, r.grp.clone(), r.sum_requests, r.sum_total_tokens, cost.normalize().to_string())
        })
        .collect()
}
