//! The identity database. Every write that matters for security also writes its audit event to
//! the outbox in the same transaction.
//!
//! One file per entity, beside the API file of the same name: `users`, `sessions`, `projects`
//! (with their memberships), `api_keys` and `settings`.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use aimesh_kit::data::db::sql;

use crate::error::Result;

mod api_keys;
mod projects;
mod sessions;
mod settings;
mod users;

pub use api_keys::{ApiKeyCredential, ApiKeyPatch, ApiKeyRow, NewApiKey};
pub use projects::{MemberRow, ProjectPatch, ProjectRow};
pub use sessions::{NewSession, SessionCredential, SessionRow};
pub use settings::SettingRow;
pub use users::{NewUser, UserPatch, UserRow};

use aimesh_kit::data::audit::changed;
pub use aimesh_kit::data::audit::{Actor, Audit};

async fn audit(conn: &mut PgConnection, audit: Audit<'_>) -> Result<()> {
    aimesh_kit::data::audit::record(conn, audit).await?;
    Ok(())
}

aimesh_kit::pg_store!(
    /// The identity store over its PostgreSQL pool.
    Store
);

impl Store {
    /// Applies last-use times collected in Redis; never moves a time backwards.
    pub async fn apply_last_use(&self, sessions: bool, ids: &[Uuid], times: &[DateTime<Utc>]) -> Result<()> {
        let statement = if sessions {
            "UPDATE user_sessions s SET last_used_at = GREATEST(s.last_used_at, u.at) \
             FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, at) WHERE s.id = u.id"
        } else {
            "UPDATE api_keys k SET last_used_at = GREATEST(COALESCE(k.last_used_at, u.at), u.at) \
             FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, at) WHERE k.id = u.id"
        };
        sqlx::query(statement).bind(ids).bind(times).execute(&self.pool).await?;
        Ok(())
    }
}
