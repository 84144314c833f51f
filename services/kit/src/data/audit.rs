//! Audit events: every service writes each security-relevant or administrative change as an
//! event of topic `audit` to its outbox, in the transaction of the change itself, so the audit
//! log (analytics' `SearchAuditLog`) holds exactly the changes that happened.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::data::outbox::{self, OutboxEvent};

/// Who did something, from where: the fields every audit event carries.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub user_id: Option<Uuid>,
    pub ip: String,
    pub user_agent: String,
}

impl Actor {
    /// The actor of `request`: `user_id`, the client address (the one the gateway vouched for,
    /// else the socket peer's; a plain `x-forwarded-for` is not believed, since any caller can
    /// send one) and the user agent.
    pub fn of<T>(request: &tonic::Request<T>, user_id: Option<Uuid>) -> Self {
        let ip = crate::serving::ratelimit::ClientAddress::of(request)
            .or_else(|| request.remote_addr().map(|addr| addr.ip()))
            .map(|ip| ip.to_string())
            .unwrap_or_default();
        let user_agent = request
            .metadata()
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .unwrap_or_default()
            .chars()
            .take(512)
            .collect();
        Self { user_id, ip, user_agent }
    }
}

/// One audited action. `details` carries what changed; a change of settings carries
/// `{"old": ..., "new": ...}` (see [`changed`]).
#[derive(Debug)]
pub struct Audit<'a> {
    pub actor: &'a Actor,
    pub action: &'static str,
    pub resource_type: &'static str,
    pub resource_id: String,
    pub project_id: Option<Uuid>,
    pub details: serde_json::Value,
}

/// Writes `audit` to the outbox on `conn`: call it inside the transaction of the change.
pub async fn record(conn: &mut PgConnection, audit: Audit<'_>) -> Result<(), sqlx::Error> {
    let payload = serde_json::json!({
        "actor_user_id": audit.actor.user_id,
        "action": audit.action,
        "resource_type": audit.resource_type,
        "resource_id": audit.resource_id,
        "ip_address": audit.actor.ip,
        "user_agent": audit.actor.user_agent,
        "details": audit.details,
    });
    let event = OutboxEvent::new("audit", audit.action, audit.project_id, payload);
    outbox::enqueue(conn, &event).await
}

/// The `details` of a change: the old and the new values.
pub fn changed(old: impl serde::Serialize, new: impl serde::Serialize) -> serde_json::Value {
    serde_json::json!({ "old": old, "new": new })
}
