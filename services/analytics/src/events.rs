//! Incoming events and what each becomes: a usage, audit or product row. Validation happens
//! here, event by event, so one malformed event is refused without failing its batch.

use chrono::{DateTime, Utc};
use clickhouse::Row;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use aimesh_kit::wire::proto_json;
use aimesh_proto::analytics::v1 as pb;

/// Fractional digits of a stored cost (ClickHouse `Decimal(38, 10)`), as usage computes it.
pub const COST_SCALE: u32 = 10;

/// Why one event was refused: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub field: String,
    pub message: String,
}

impl Rejection {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// A usage record (`usage.recorded`), as stored in `usage_events`.
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct UsageEventRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    #[serde(with = "clickhouse::serde::uuid")]
    pub project_id: Uuid,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    pub occurred_at: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::uuid")]
    pub record_id: Uuid,
    pub request_id: String,
    #[serde(with = "clickhouse::serde::uuid")]
    pub user_id: Uuid,
    /// Nil when the call was not made with an API key.
    #[serde(with = "clickhouse::serde::uuid")]
    pub api_key_id: Uuid,
    #[serde(with = "clickhouse::serde::uuid")]
    pub model_id: Uuid,
    #[serde(with = "clickhouse::serde::uuid")]
    pub chat_session_id: Uuid,
    pub request_type: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub total_tokens: i64,
    /// The cost in units of 10^-10 (`Decimal(38, 10)`).
    pub cost: i128,
    pub duration_ms: i64,
    pub status: String,
    pub error_message: String,
    pub retention_days: u16,
}

/// A security-relevant action (topic `audit`), as stored in `audit_events`.
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct AuditEventRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    /// Nil for actions outside any project (a person's own account).
    #[serde(with = "clickhouse::serde::uuid")]
    pub project_id: Uuid,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    pub occurred_at: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::uuid")]
    pub actor_user_id: Uuid,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub ip_address: String,
    pub user_agent: String,
    /// A JSON object.
    pub details: String,
    pub retention_days: u16,
}

/// Anything else a product reports (topic `product`), as stored in `product_events`.
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct ProductEventRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    #[serde(with = "clickhouse::serde::uuid")]
    pub project_id: Uuid,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    pub occurred_at: DateTime<Utc>,
    pub event_type: String,
    #[serde(with = "clickhouse::serde::uuid")]
    pub user_id: Uuid,
    /// A JSON object.
    pub payload: String,
    pub retention_days: u16,
}

/// A valid event, ready to be stored once its project's retention is known.
#[derive(Debug, Clone, PartialEq)]
pub enum ValidEvent {
    Usage(UsageEventRow),
    Audit(AuditEventRow),
    Product(ProductEventRow),
}

impl ValidEvent {
    pub fn event_id(&self) -> Uuid {
        match self {
            Self::Usage(row) => row.event_id,
            Self::Audit(row) => row.event_id,
            Self::Product(row) => row.event_id,
        }
    }

    pub fn project_id(&self) -> Uuid {
        match self {
            Self::Usage(row) => row.project_id,
            Self::Audit(row) => row.project_id,
            Self::Product(row) => row.project_id,
        }
    }

    pub fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            Self::Usage(row) => row.occurred_at,
            Self::Audit(row) => row.occurred_at,
            Self::Product(row) => row.occurred_at,
        }
    }

    /// The table its row goes to.
    pub fn table(&self) -> &'static str {
        match self {
            Self::Usage(_) => "usage_events",
            Self::Audit(_) => "audit_events",
            Self::Product(_) => "product_events",
        }
    }

    /// Sets how many days the row is kept.
    pub fn set_retention(&mut self, days: u16) {
        match self {
            Self::Usage(row) => row.retention_days = days,
            Self::Audit(row) => row.retention_days = days,
            Self::Product(row) => row.retention_days = days,
        }
    }
}

/// Checks one incoming event and turns it into its row.
pub fn validate(event: &pb::Event) -> Result<ValidEvent, Rejection> {
    let event_id = uuid_field("event_id", &event.event_id, true)?;
    let occurred_at =
        event.occurred_at.as_ref().ok_or_else(|| Rejection::new("occurred_at", "is required")).and_then(|ts| {
            proto_json::from_timestamp(ts).ok_or_else(|| Rejection::new("occurred_at", "is out of range"))
        })?;
    let project_id = uuid_field("project_id", &event.project_id, false)?;
    let payload: Map<String, Value> = match serde_json::from_str(&event.payload) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(Rejection::new("payload", "must be a JSON object")),
        Err(error) => return Err(Rejection::new("payload", format!("is not JSON: {error}"))),
    };
    let fields = Payload(&payload);
    let require_project = || {
        if project_id.is_nil() { Err(Rejection::new("project_id", "is required for this topic")) } else { Ok(()) }
    };
    match event.topic.as_str() {
        "usage" => {
            require_project()?;
            let cost = fields.decimal("cost")?;
            let mut cost = cost.round_dp(COST_SCALE);
            cost.rescale(COST_SCALE);
            let input_tokens = fields.count("input_tokens")?;
            let output_tokens = fields.count("output_tokens")?;
            let cached_input_tokens = fields.count("cached_input_tokens")?;
            if cached_input_tokens > input_tokens {
                return Err(Rejection::new("payload.cached_input_tokens", "must not exceed input_tokens"));
            }
            Ok(ValidEvent::Usage(UsageEventRow {
                event_id,
                project_id,
                occurred_at: fields.time("request_time")?.unwrap_or(occurred_at),
                record_id: fields.uuid("id", true)?,
                request_id: fields.text("request_id")?,
                user_id: fields.uuid("user_id", true)?,
                api_key_id: fields.uuid("api_key_id", false)?,
                model_id: fields.uuid("model_id", true)?,
                chat_session_id: fields.uuid("chat_session_id", false)?,
                request_type: fields.text("request_type")?,
                input_tokens,
                output_tokens,
                cached_input_tokens,
                total_tokens: fields.count("total_tokens")?,
                cost: cost.mantissa(),
                duration_ms: fields.count("duration_ms")?,
                status: fields.text("status")?,
                error_message: fields.text("error_message")?,
                retention_days: 0,
            }))
        }
        "audit" => Ok(ValidEvent::Audit(AuditEventRow {
            event_id,
            project_id,
            occurred_at,
            actor_user_id: fields.uuid("actor_user_id", false)?,
            action: if event.event_type.is_empty() { fields.text("action")? } else { event.event_type.clone() },
            resource_type: fields.text("resource_type")?,
            resource_id: fields.text("resource_id")?,
            ip_address: fields.text("ip_address")?,
            user_agent: fields.text("user_agent")?,
            details: payload.get("details").map_or_else(|| "{}".to_owned(), Value::to_string),
            retention_days: 0,
        })),
        "product" => {
            require_project()?;
            if event.event_type.is_empty() {
                return Err(Rejection::new("event_type", "is required"));
            }
            Ok(ValidEvent::Product(ProductEventRow {
                event_id,
                project_id,
                occurred_at,
                event_type: event.event_type.clone(),
                user_id: fields.uuid("user_id", false)?,
                payload: event.payload.clone(),
                retention_days: 0,
            }))
        }
        "" => Err(Rejection::new("topic", "is required")),
        other => Err(Rejection::new("topic", format!("{other:?} is not one of usage, audit, product"))),
    }
}

fn uuid_field(field: &str, value: &str, required: bool) -> Result<Uuid, Rejection> {
    if value.is_empty() {
        return if required { Err(Rejection::new(field, "is required")) } else { Ok(Uuid::nil()) };
    }
    Uuid::parse_str(value).map_err(|_| Rejection::new(field, "is not a valid id"))
}

/// Typed reads of a payload's fields; errors name `payload.<field>`.
struct Payload<'a>(&'a Map<String, Value>);

impl Payload<'_> {
    fn field(name: &str) -> String {
        format!("payload.{name}")
    }

    /// Absent and null are empty.
    fn text(&self, name: &str) -> Result<String, Rejection> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(text)) => Ok(text.clone()),
            Some(_) => Err(Rejection::new(Self::field(name), "must be a string")),
        }
    }

    fn uuid(&self, name: &str, required: bool) -> Result<Uuid, Rejection> {
        uuid_field(&Self::field(name), &self.text(name)?, required)
    }

    /// A whole number, zero or more; absent is zero.
    fn count(&self, name: &str) -> Result<i64, Rejection> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(0),
            Some(value) => value
                .as_i64()
                .filter(|n| *n >= 0)
                .ok_or_else(|| Rejection::new(Self::field(name), "must be a whole number, zero or more")),
        }
    }

    /// A decimal given as a string (exact) or a number; absent is zero.
    fn decimal(&self, name: &str) -> Result<Decimal, Rejection> {
        let invalid = || Rejection::new(Self::field(name), "must be a decimal number, zero or more");
        let value = match self.0.get(name) {
            None | Some(Value::Null) => return Ok(Decimal::ZERO),
            Some(Value::String(text)) => text.parse::<Decimal>().map_err(|_| invalid())?,
            Some(Value::Number(number)) => number.to_string().parse::<Decimal>().map_err(|_| invalid())?,
            Some(_) => return Err(invalid()),
        };
        if value.is_sign_negative() && !value.is_zero() {
            return Err(invalid());
        }
        Ok(value)
    }

    fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, Rejection> {
        match self.text(name)?.as_str() {
            "" => Ok(None),
            text => DateTime::parse_from_rfc3339(text)
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(|_| Rejection::new(Self::field(name), "must be an RFC 3339 time")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(topic: &str, payload: serde_json::Value) -> pb::Event {
        pb::Event {
            event_id: Uuid::now_v7().to_string(),
            topic: topic.into(),
            event_type: "usage.recorded".into(),
            project_id: Uuid::new_v4().to_string(),
            occurred_at: Some(proto_json::timestamp(Utc::now())),
            payload: payload.to_string(),
        }
    }

    fn usage_payload() -> serde_json::Value {
        serde_json::json!({
            "id": Uuid::new_v4(), "request_id": "r1", "user_id": Uuid::new_v4(), "api_key_id": null,
            "model_id": Uuid::new_v4(), "request_type": "chat", "input_tokens": 1200, "output_tokens": 300,
            "cached_input_tokens": 200, "total_tokens": 1500, "cost": "0.0057500000", "duration_ms": 850,
            "status": "success", "error_message": null, "request_time": "2026-01-02T03:04:05.123456Z",
        })
    }

    #[test]
    fn usage_event_keeps_exact_cost_and_request_time() {
        let Ok(ValidEvent::Usage(row)) = validate(&event("usage", usage_payload())) else {
            panic!("valid usage event refused");
        };
        assert_eq!(row.cost, 57_500_000);
        assert_eq!(row.input_tokens, 1200);
        assert!(row.api_key_id.is_nil());
        assert_eq!(row.occurred_at.to_rfc3339(), "2026-01-02T03:04:05.123456+00:00");
    }

    #[test]
    fn malformed_events_name_the_field() {
        let field = |e: pb::Event| validate(&e).err().map(|r| r.field);
        let mut bad = usage_payload();
        bad["input_tokens"] = serde_json::json!(-1);
        assert_eq!(field(event("usage", bad)), Some("payload.input_tokens".into()));
        let mut bad = usage_payload();
        bad["cost"] = serde_json::json!("a lot");
        assert_eq!(field(event("usage", bad)), Some("payload.cost".into()));
        assert_eq!(field(event("metrics", usage_payload())), Some("topic".into()));
        assert_eq!(
            field(pb::Event { event_id: "x".into(), ..event("usage", usage_payload()) }),
            Some("event_id".into())
        );
        assert_eq!(
            field(pb::Event { payload: "[1]".into(), ..event("usage", usage_payload()) }),
            Some("payload".into())
        );
        assert_eq!(
            field(pb::Event { occurred_at: None, ..event("audit", usage_payload()) }),
            Some("occurred_at".into())
        );
        assert_eq!(
            field(pb::Event { project_id: String::new(), ..event("usage", usage_payload()) }),
            Some("project_id".into())
        );
    }
}
