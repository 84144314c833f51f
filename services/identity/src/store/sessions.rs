//! Login sessions: creation, credential checks, refresh, listing and revocation.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use aimesh_kit::wire::pagination::Page;

use super::{Actor, Audit, Store, audit, sql};
use crate::error::Result;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub device_name: String,
    pub ip_address: String,
    pub user_agent: String,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
}

/// What a new login session stores.
#[derive(Debug)]
pub struct NewSession<'a> {
    pub user_id: Uuid,
    pub access_hash: &'a str,
    pub refresh_hash: &'a str,
    pub device_name: &'a str,
    pub expires_at: DateTime<Utc>,
    pub refresh_expires_at: DateTime<Utc>,
}

/// What verifying a credential needs to know.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionCredential {
    pub session_id: Uuid,
    pub user_id: Uuid,
    pub expires_at: DateTime<Utc>,
    pub role: String,
}

const SESSION_COLUMNS: &str = "id, user_id, device_name, ip_address, user_agent, expires_at, created_at, last_used_at";

impl Store {
    // ---- login sessions ----

    pub async fn create_session(&self, new: NewSession<'_>, actor: &Actor) -> Result<SessionRow> {
        let mut tx = self.pool.begin().await?;
        let row: SessionRow = sqlx::query_as(sql(format!(
            "INSERT INTO user_sessions (id, user_id, token_hash, refresh_token_hash, device_name, ip_address, \
             user_agent, expires_at, refresh_expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             RETURNING {SESSION_COLUMNS}"
        )))
        .bind(Uuid::now_v7())
        .bind(new.user_id)
        .bind(new.access_hash)
        .bind(new.refresh_hash)
        .bind(new.device_name)
        .bind(&actor.ip)
        .bind(&actor.user_agent)
        .bind(new.expires_at)
        .bind(new.refresh_expires_at)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("UPDATE users SET last_login_at = now() WHERE id = $1").bind(new.user_id).execute(&mut *tx).await?;
        audit(
            &mut tx,
            Audit {
                actor,
                action: "session.login",
                resource_type: "session",
                resource_id: row.id.to_string(),
                project_id: None,
                details: serde_json::json!({ "device_name": new.device_name }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(row)
    }

    /// The live session of an access-token hash, if its account is active.
    pub async fn session_credential(&self, token_hash: &str) -> Result<Option<SessionCredential>> {
        Ok(sqlx::query_as(
            "SELECT s.id AS session_id, s.user_id, s.expires_at, u.role FROM user_sessions s \
             JOIN users u ON u.id = s.user_id \
             WHERE s.token_hash = $1 AND s.revoked_at IS NULL AND s.expires_at > now() \
             AND u.deleted_at IS NULL AND u.status = 'active'",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Swaps a session's tokens for new ones if `refresh_hash` is its live refresh token;
    /// returns the session and the hash of the access token that stopped working.
    pub async fn refresh_session(
        &self,
        refresh_hash: &str,
        access_hash: &str,
        new_refresh_hash: &str,
        expires_at: DateTime<Utc>,
        refresh_expires_at: DateTime<Utc>,
    ) -> Result<Option<(SessionRow, String)>> {
        let mut tx = self.pool.begin().await?;
        let old: Option<(Uuid, String)> = sqlx::query_as(
            "SELECT s.id, s.token_hash FROM user_sessions s JOIN users u ON u.id = s.user_id \
             WHERE s.refresh_token_hash = $1 AND s.revoked_at IS NULL AND s.refresh_expires_at > now() \
             AND u.deleted_at IS NULL AND u.status = 'active' FOR UPDATE OF s",
        )
        .bind(refresh_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((id, old_access_hash)) = old else { return Ok(None) };
        let row: SessionRow = sqlx::query_as(sql(format!(
            "UPDATE user_sessions SET token_hash = $2, refresh_token_hash = $3, expires_at = $4, \
             refresh_expires_at = $5, last_used_at = now() WHERE id = $1 RETURNING {SESSION_COLUMNS}"
        )))
        .bind(id)
        .bind(access_hash)
        .bind(new_refresh_hash)
        .bind(expires_at)
        .bind(refresh_expires_at)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some((row, old_access_hash)))
    }

    /// The access-token hashes of `user_id`'s live sessions.
    pub async fn live_session_hashes(&self, user_id: Uuid) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT token_hash FROM user_sessions WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now()",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Ends one of `user_id`'s sessions; returns its access-token hash.
    pub async fn revoke_session(&self, user_id: Uuid, session_id: Uuid, actor: &Actor) -> Result<Option<String>> {
        let mut tx = self.pool.begin().await?;
        let hash: Option<String> = sqlx::query_scalar(
            "UPDATE user_sessions SET revoked_at = now() \
             WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL RETURNING token_hash",
        )
        .bind(session_id)
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
        if hash.is_some() {
            audit(
                &mut tx,
                Audit {
                    actor,
                    action: "session.revoked",
                    resource_type: "session",
                    resource_id: session_id.to_string(),
                    project_id: None,
                    details: serde_json::json!({}),
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(hash)
    }

    pub async fn list_sessions(&self, user_id: Uuid, page: &Page) -> Result<Vec<SessionRow>> {
        let (time, id) = page.bounds();
        Ok(sqlx::query_as(sql(format!(
            "SELECT {SESSION_COLUMNS} FROM user_sessions WHERE user_id = $1 AND revoked_at IS NULL \
             AND expires_at > now() AND (created_at, id) < ($2, $3) ORDER BY created_at DESC, id DESC LIMIT $4"
        )))
        .bind(user_id)
        .bind(time)
        .bind(id)
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
        .await?)
    }
}

impl Store {
    /// Deletes login sessions that ended (were revoked, or their refresh token expired) more
    /// than `after` ago, `batch` rows per statement so that none holds many locks for long;
    /// returns how many went. Sessions that ended later stay, for audit and for telling a user
    /// why they were signed out.
    pub async fn purge_ended_sessions(&self, after: std::time::Duration, batch: i64) -> Result<u64> {
        let batch = batch.max(1);
        let mut purged = 0;
        loop {
            // The expression is the index's (user_sessions_ended), so each batch reads only the
            // rows it deletes.
            let deleted = sqlx::query(
                "DELETE FROM user_sessions WHERE id IN (SELECT id FROM user_sessions \
                 WHERE LEAST(revoked_at, GREATEST(expires_at, refresh_expires_at)) < now() - make_interval(secs => $1) \
                 LIMIT $2)",
            )
            .bind(after.as_secs_f64())
            .bind(batch)
            .execute(&self.pool)
            .await?
            .rows_affected();
            purged += deleted;
            if deleted < batch.unsigned_abs() {
                return Ok(purged);
            }
        }
    }
}

/// Ends `user_id`'s live sessions except `keep`; returns their access-token hashes.
pub(super) async fn revoke_sessions(conn: &mut PgConnection, user_id: Uuid, keep: Option<Uuid>) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "UPDATE user_sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL \
         AND ($2::uuid IS NULL OR id <> $2) RETURNING token_hash",
    )
    .bind(user_id)
    .bind(keep)
    .fetch_all(conn)
    .await?)
}
