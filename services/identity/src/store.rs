//! The identity database. Every write that matters for security also writes its audit event to
//! the outbox in the same transaction.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use aimesh_kit::db::unique_violation;
use aimesh_kit::outbox::{self, OutboxEvent};
use aimesh_kit::pagination::Cursor;

use aimesh_kit::access::ProjectRole;

use crate::domain::role_from_db;
use crate::error::{IdentityError, Result};

/// Who did something, from where: the fields every audit event carries.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub user_id: Option<Uuid>,
    pub ip: String,
    pub user_agent: String,
}

/// One security-relevant action, written to the outbox (topic `audit`).
#[derive(Debug)]
pub struct Audit<'a> {
    pub actor: &'a Actor,
    pub action: &'static str,
    pub resource_type: &'static str,
    pub resource_id: String,
    pub project_id: Option<Uuid>,
    pub details: serde_json::Value,
}

async fn audit(conn: &mut PgConnection, audit: Audit<'_>) -> Result<()> {
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
    outbox::enqueue(conn, &event).await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    pub id: Uuid,
    pub email: String,
    pub username: String,
    pub password_hash: String,
    pub first_name: String,
    pub last_name: String,
    pub avatar_url: String,
    pub role: String,
    pub status: String,
    pub settings: serde_json::Value,
    pub last_login_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What registration stores.
#[derive(Debug)]
pub struct NewUser {
    pub email: String,
    pub username: String,
    pub password_hash: String,
    pub first_name: String,
    pub last_name: String,
}

/// Fields to change; `None` keeps the stored value.
#[derive(Debug, Default)]
pub struct UserPatch {
    pub username: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub avatar_url: Option<String>,
    pub settings: Option<serde_json::Value>,
    pub role: Option<&'static str>,
    pub status: Option<&'static str>,
}

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

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyCredential {
    pub api_key_id: Uuid,
    pub project_id: Uuid,
    pub scopes: Vec<String>,
    pub created_by: Uuid,
    pub expires_at: Option<DateTime<Utc>>,
    /// The key's own rate limit, requests per minute.
    pub requests_per_minute: Option<i32>,
    /// The key's project's rate limit, requests per minute.
    pub project_requests_per_minute: Option<i32>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ProjectRow {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub requests_per_minute: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MemberRow {
    pub project_id: Uuid,
    pub user_id: Uuid,
    pub email: String,
    pub username: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyRow {
    pub id: Uuid,
    pub project_id: Uuid,
    pub name: String,
    pub display_prefix: String,
    pub scopes: Vec<String>,
    pub created_by: Uuid,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub requests_per_minute: Option<i32>,
}

/// A change of a project; `None` leaves a field as it is, `Some(None)` clears a limit.
#[derive(Debug, Default)]
pub struct ProjectPatch<'a> {
    pub name: Option<&'a str>,
    pub description: Option<&'a str>,
    pub requests_per_minute: Option<Option<i32>>,
}

/// A change of an API key; `None` leaves a field as it is, `Some(None)` clears the limit.
#[derive(Debug, Default)]
pub struct ApiKeyPatch<'a> {
    pub name: Option<&'a str>,
    pub requests_per_minute: Option<Option<i32>>,
}

/// What a new API key stores.
#[derive(Debug)]
pub struct NewApiKey<'a> {
    pub project_id: Uuid,
    pub name: &'a str,
    pub display_prefix: &'a str,
    pub hash: &'a str,
    pub scopes: &'a [String],
    pub created_by: Uuid,
    pub expires_at: Option<DateTime<Utc>>,
    pub requests_per_minute: Option<i32>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SettingRow {
    pub key: String,
    pub value: Option<serde_json::Value>,
    pub value_ciphertext: Option<Vec<u8>>,
    pub description: String,
    pub category: String,
    pub is_public: bool,
    pub is_encrypted: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const USER_COLUMNS: &str = "id, email, username, password_hash, first_name, last_name, avatar_url, role, status, \
                            settings, last_login_at, created_at, updated_at";
const SESSION_COLUMNS: &str = "id, user_id, device_name, ip_address, user_agent, expires_at, created_at, last_used_at";
const API_KEY_COLUMNS: &str = "id, project_id, name, display_prefix, scopes, created_by, created_at, expires_at, \
                               last_used_at, revoked_at, requests_per_minute";
const PROJECT_COLUMNS: &str = "id, name, description, requests_per_minute, created_at, updated_at";
const SETTING_COLUMNS: &str =
    "key, value, value_ciphertext, description, category, is_public, is_encrypted, created_at, updated_at";

fn sql(statement: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(statement)
}

fn user_conflict(error: sqlx::Error) -> IdentityError {
    match unique_violation(&error) {
        Some("users_email_key") => IdentityError::EmailTaken,
        Some("users_username_key") => IdentityError::UsernameTaken,
        _ => error.into(),
    }
}

/// The identity store over its PostgreSQL pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    // ---- users ----

    pub async fn insert_user(&self, user: NewUser, actor: &Actor) -> Result<UserRow> {
        let mut tx = self.pool.begin().await?;
        let row: UserRow = sqlx::query_as(sql(format!(
            "INSERT INTO users (id, email, username, password_hash, first_name, last_name) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING {USER_COLUMNS}"
        )))
        .bind(Uuid::now_v7())
        .bind(&user.email)
        .bind(&user.username)
        .bind(&user.password_hash)
        .bind(&user.first_name)
        .bind(&user.last_name)
        .fetch_one(&mut *tx)
        .await
        .map_err(user_conflict)?;
        let actor = Actor { user_id: Some(row.id), ..actor.clone() };
        audit(
            &mut tx,
            Audit {
                actor: &actor,
                action: "user.registered",
                resource_type: "user",
                resource_id: row.id.to_string(),
                project_id: None,
                details: serde_json::json!({ "email": row.email, "username": row.username }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(row)
    }

    pub async fn user(&self, id: Uuid) -> Result<Option<UserRow>> {
        Ok(sqlx::query_as(sql(format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1 AND deleted_at IS NULL")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// A live account by email or username, case-insensitively.
    pub async fn user_by_login(&self, login: &str) -> Result<Option<UserRow>> {
        Ok(sqlx::query_as(sql(format!(
            "SELECT {USER_COLUMNS} FROM users \
             WHERE (lower(email) = lower($1) OR lower(username) = lower($1)) AND deleted_at IS NULL LIMIT 1"
        )))
        .bind(login)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn update_user(&self, id: Uuid, patch: UserPatch, actor: &Actor) -> Result<(UserRow, Vec<String>)> {
        let mut tx = self.pool.begin().await?;
        let row: Option<UserRow> = sqlx::query_as(sql(format!(
            "UPDATE users SET username = COALESCE($2, username), first_name = COALESCE($3, first_name), \
             last_name = COALESCE($4, last_name), avatar_url = COALESCE($5, avatar_url), \
             settings = COALESCE($6, settings), role = COALESCE($7, role), status = COALESCE($8, status) \
             WHERE id = $1 AND deleted_at IS NULL RETURNING {USER_COLUMNS}"
        )))
        .bind(id)
        .bind(&patch.username)
        .bind(&patch.first_name)
        .bind(&patch.last_name)
        .bind(&patch.avatar_url)
        .bind(&patch.settings)
        .bind(patch.role)
        .bind(patch.status)
        .fetch_optional(&mut *tx)
        .await
        .map_err(user_conflict)?;
        let row = row.ok_or(IdentityError::NotFound("user"))?;
        // A disabled account's sessions end at once.
        let revoked = if patch.status == Some("disabled") { revoke_sessions(&mut tx, id, None).await? } else { vec![] };
        if patch.role.is_some() || patch.status.is_some() {
            audit(
                &mut tx,
                Audit {
                    actor,
                    action: "user.access_changed",
                    resource_type: "user",
                    resource_id: id.to_string(),
                    project_id: None,
                    details: serde_json::json!({ "role": patch.role, "status": patch.status }),
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok((row, revoked))
    }

    /// Sets a new password hash and ends every session but `keep`; returns the ended sessions'
    /// token hashes.
    pub async fn set_password(&self, id: Uuid, hash: &str, keep: Option<Uuid>, actor: &Actor) -> Result<Vec<String>> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1 AND deleted_at IS NULL")
            .bind(id)
            .bind(hash)
            .execute(&mut *tx)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(IdentityError::NotFound("user"));
        }
        let revoked = revoke_sessions(&mut tx, id, keep).await?;
        audit(
            &mut tx,
            Audit {
                actor,
                action: "user.password_changed",
                resource_type: "user",
                resource_id: id.to_string(),
                project_id: None,
                details: serde_json::json!({ "revoked_sessions": revoked.len() }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(revoked)
    }

    /// Soft-deletes an account, its memberships and sessions; refuses while it is the last owner of
    /// a live project. Returns the ended sessions' token hashes and the projects it left.
    pub async fn delete_user(&self, id: Uuid, actor: &Actor) -> Result<(Vec<String>, Vec<Uuid>)> {
        let mut tx = self.pool.begin().await?;
        let user: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM users WHERE id = $1 AND deleted_at IS NULL FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        if user.is_none() {
            return Err(IdentityError::NotFound("user"));
        }
        let sole_owner: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM project_members m JOIN projects p ON p.id = m.project_id \
             WHERE m.user_id = $1 AND m.role = 'owner' AND p.deleted_at IS NULL AND NOT EXISTS \
             (SELECT 1 FROM project_members o WHERE o.project_id = m.project_id AND o.role = 'owner' AND o.user_id <> $1))",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if sole_owner {
            return Err(IdentityError::OwnsProjects);
        }
        sqlx::query("UPDATE users SET deleted_at = now() WHERE id = $1").bind(id).execute(&mut *tx).await?;
        let projects: Vec<Uuid> =
            sqlx::query_scalar("DELETE FROM project_members WHERE user_id = $1 RETURNING project_id")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
        let revoked = revoke_sessions(&mut tx, id, None).await?;
        audit(
            &mut tx,
            Audit {
                actor,
                action: "user.deleted",
                resource_type: "user",
                resource_id: id.to_string(),
                project_id: None,
                details: serde_json::json!({}),
            },
        )
        .await?;
        tx.commit().await?;
        Ok((revoked, projects))
    }

    /// Records a failed login (the account, if the login names one) as an audit event.
    pub async fn record_failed_login(&self, login: &str, user_id: Option<Uuid>, actor: &Actor) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        audit(
            &mut conn,
            Audit {
                actor,
                action: "session.login_failed",
                resource_type: "user",
                resource_id: user_id.map(|id| id.to_string()).unwrap_or_default(),
                project_id: None,
                details: serde_json::json!({ "login": login }),
            },
        )
        .await
    }

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

    pub async fn list_sessions(&self, user_id: Uuid, after: Option<Cursor>, limit: i64) -> Result<Vec<SessionRow>> {
        let (time, id) = cursor_bounds(after);
        Ok(sqlx::query_as(sql(format!(
            "SELECT {SESSION_COLUMNS} FROM user_sessions WHERE user_id = $1 AND revoked_at IS NULL \
             AND expires_at > now() AND (created_at, id) < ($2, $3) ORDER BY created_at DESC, id DESC LIMIT $4"
        )))
        .bind(user_id)
        .bind(time)
        .bind(id)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?)
    }

    // ---- projects and memberships ----

    pub async fn create_project(
        &self,
        owner: Uuid,
        name: &str,
        description: &str,
        actor: &Actor,
    ) -> Result<ProjectRow> {
        let mut tx = self.pool.begin().await?;
        let row: ProjectRow = sqlx::query_as(sql(format!(
            "INSERT INTO projects (id, name, description, created_by) VALUES ($1, $2, $3, $4) \
             RETURNING {PROJECT_COLUMNS}"
        )))
        .bind(Uuid::now_v7())
        .bind(name)
        .bind(description)
        .bind(owner)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO project_members (project_id, user_id, role) VALUES ($1, $2, 'owner')")
            .bind(row.id)
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            Audit {
                actor,
                action: "project.created",
                resource_type: "project",
                resource_id: row.id.to_string(),
                project_id: Some(row.id),
                details: serde_json::json!({ "name": name }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(row)
    }

    pub async fn project(&self, id: Uuid) -> Result<Option<ProjectRow>> {
        Ok(sqlx::query_as(sql(format!("SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1 AND deleted_at IS NULL")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// `user_id`'s role in a live project, if any.
    pub async fn member_role(&self, project_id: Uuid, user_id: Uuid) -> Result<Option<ProjectRole>> {
        let role: Option<String> = sqlx::query_scalar(
            "SELECT m.role FROM project_members m JOIN projects p ON p.id = m.project_id \
             WHERE m.project_id = $1 AND m.user_id = $2 AND p.deleted_at IS NULL",
        )
        .bind(project_id)
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        role.as_deref().map(role_from_db).transpose()
    }

    /// Live projects `user_id` is a member of, newest first, with the role.
    pub async fn list_projects(
        &self,
        user_id: Uuid,
        after: Option<Cursor>,
        limit: i64,
    ) -> Result<Vec<(ProjectRow, String)>> {
        let (time, id) = cursor_bounds(after);
        let rows: Vec<ProjectWithRole> = sqlx::query_as(
            "SELECT p.id, p.name, p.description, p.requests_per_minute, p.created_at, p.updated_at, m.role \
             FROM projects p \
             JOIN project_members m ON m.project_id = p.id AND m.user_id = $1 \
             WHERE p.deleted_at IS NULL AND (p.created_at, p.id) < ($2, $3) \
             ORDER BY p.created_at DESC, p.id DESC LIMIT $4",
        )
        .bind(user_id)
        .bind(time)
        .bind(id)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.project, r.role)).collect())
    }

    /// Applies `patch`; returns the project and, when its rate limit changed, the hashes of its
    /// live API keys, whose cached verifications carry the old limit.
    pub async fn update_project(
        &self,
        id: Uuid,
        patch: &ProjectPatch<'_>,
        actor: &Actor,
    ) -> Result<(ProjectRow, Vec<String>)> {
        let (name, description) = (patch.name, patch.description);
        let mut tx = self.pool.begin().await?;
        let row: Option<ProjectRow> = sqlx::query_as(sql(format!(
            "UPDATE projects SET name = COALESCE($2, name), description = COALESCE($3, description), \
             requests_per_minute = CASE WHEN $4 THEN $5 ELSE requests_per_minute END \
             WHERE id = $1 AND deleted_at IS NULL RETURNING {PROJECT_COLUMNS}"
        )))
        .bind(id)
        .bind(name)
        .bind(description)
        .bind(patch.requests_per_minute.is_some())
        .bind(patch.requests_per_minute.flatten())
        .fetch_optional(&mut *tx)
        .await?;
        let row = row.ok_or(IdentityError::NotFound("project"))?;
        let live_keys: Vec<String> = if patch.requests_per_minute.is_some() {
            sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE project_id = $1 AND revoked_at IS NULL")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?
        } else {
            Vec::new()
        };
        audit(
            &mut tx,
            Audit {
                actor,
                action: "project.updated",
                resource_type: "project",
                resource_id: id.to_string(),
                project_id: Some(id),
                details: serde_json::json!({
                    "name": name,
                    "description": description,
                    "requests_per_minute": patch.requests_per_minute,
                }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok((row, live_keys))
    }

    /// Soft-deletes a project and revokes its API keys; returns the revoked keys' hashes and the
    /// members, whose cached roles are now wrong.
    pub async fn delete_project(&self, id: Uuid, actor: &Actor) -> Result<(Vec<String>, Vec<Uuid>)> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("UPDATE projects SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if deleted.rows_affected() == 0 {
            return Err(IdentityError::NotFound("project"));
        }
        let hashes: Vec<String> = sqlx::query_scalar(
            "UPDATE api_keys SET revoked_at = now() WHERE project_id = $1 AND revoked_at IS NULL RETURNING key_hash",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        audit(
            &mut tx,
            Audit {
                actor,
                action: "project.deleted",
                resource_type: "project",
                resource_id: id.to_string(),
                project_id: Some(id),
                details: serde_json::json!({ "revoked_api_keys": hashes.len() }),
            },
        )
        .await?;
        let members: Vec<Uuid> = sqlx::query_scalar("SELECT user_id FROM project_members WHERE project_id = $1")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((hashes, members))
    }

    pub async fn add_member(
        &self,
        project_id: Uuid,
        email: &str,
        role: ProjectRole,
        actor: &Actor,
    ) -> Result<MemberRow> {
        let mut tx = self.pool.begin().await?;
        let user: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM users WHERE lower(email) = lower($1) AND deleted_at IS NULL")
                .bind(email)
                .fetch_optional(&mut *tx)
                .await?;
        let user_id = user.ok_or(IdentityError::NotFound("user"))?;
        sqlx::query("INSERT INTO project_members (project_id, user_id, role) VALUES ($1, $2, $3)")
            .bind(project_id)
            .bind(user_id)
            .bind(role.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| if unique_violation(&e).is_some() { IdentityError::AlreadyMember } else { e.into() })?;
        audit(
            &mut tx,
            Audit {
                actor,
                action: "member.added",
                resource_type: "membership",
                resource_id: user_id.to_string(),
                project_id: Some(project_id),
                details: serde_json::json!({ "role": role.as_str() }),
            },
        )
        .await?;
        let row = member(&mut tx, project_id, user_id).await?.ok_or(IdentityError::NotFound("member"))?;
        tx.commit().await?;
        Ok(row)
    }

    pub async fn list_members(&self, project_id: Uuid, after: Option<Cursor>, limit: i64) -> Result<Vec<MemberRow>> {
        let (time, id) = cursor_bounds(after);
        Ok(sqlx::query_as(
            "SELECT m.project_id, m.user_id, u.email, u.username, m.role, m.created_at FROM project_members m \
             JOIN users u ON u.id = m.user_id WHERE m.project_id = $1 AND (m.created_at, m.user_id) < ($2, $3) \
             ORDER BY m.created_at DESC, m.user_id DESC LIMIT $4",
        )
        .bind(project_id)
        .bind(time)
        .bind(id)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Changes a member's role, keeping at least one owner. `check` sees the target's current
    /// role first and may refuse.
    pub async fn update_member_role(
        &self,
        project_id: Uuid,
        user_id: Uuid,
        role: ProjectRole,
        actor: &Actor,
        check: impl FnOnce(ProjectRole) -> Result<()>,
    ) -> Result<MemberRow> {
        let mut tx = self.pool.begin().await?;
        let current = lock_members_and_check(&mut tx, project_id, user_id, role != ProjectRole::Owner, check).await?;
        sqlx::query("UPDATE project_members SET role = $3 WHERE project_id = $1 AND user_id = $2")
            .bind(project_id)
            .bind(user_id)
            .bind(role.as_str())
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            Audit {
                actor,
                action: "member.role_changed",
                resource_type: "membership",
                resource_id: user_id.to_string(),
                project_id: Some(project_id),
                details: serde_json::json!({ "from": current.as_str(), "to": role.as_str() }),
            },
        )
        .await?;
        let row = member(&mut tx, project_id, user_id).await?.ok_or(IdentityError::NotFound("member"))?;
        tx.commit().await?;
        Ok(row)
    }

    /// Removes a member, keeping at least one owner. `check` sees the target's role first.
    pub async fn remove_member(
        &self,
        project_id: Uuid,
        user_id: Uuid,
        actor: &Actor,
        check: impl FnOnce(ProjectRole) -> Result<()>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let current = lock_members_and_check(&mut tx, project_id, user_id, true, check).await?;
        sqlx::query("DELETE FROM project_members WHERE project_id = $1 AND user_id = $2")
            .bind(project_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            Audit {
                actor,
                action: "member.removed",
                resource_type: "membership",
                resource_id: user_id.to_string(),
                project_id: Some(project_id),
                details: serde_json::json!({ "role": current.as_str() }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- API keys ----

    pub async fn create_api_key(&self, key: NewApiKey<'_>, actor: &Actor) -> Result<ApiKeyRow> {
        let mut tx = self.pool.begin().await?;
        let row: ApiKeyRow = sqlx::query_as(sql(format!(
            "INSERT INTO api_keys (id, project_id, name, display_prefix, key_hash, scopes, created_by, expires_at, \
             requests_per_minute) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {API_KEY_COLUMNS}"
        )))
        .bind(Uuid::now_v7())
        .bind(key.project_id)
        .bind(key.name)
        .bind(key.display_prefix)
        .bind(key.hash)
        .bind(key.scopes)
        .bind(key.created_by)
        .bind(key.expires_at)
        .bind(key.requests_per_minute)
        .fetch_one(&mut *tx)
        .await?;
        audit(
            &mut tx,
            Audit {
                actor,
                action: "api_key.created",
                resource_type: "api_key",
                resource_id: row.id.to_string(),
                project_id: Some(key.project_id),
                details: serde_json::json!({
                    "name": key.name,
                    "scopes": key.scopes,
                    "display_prefix": key.display_prefix,
                    "requests_per_minute": key.requests_per_minute,
                }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(row)
    }

    pub async fn api_key(&self, project_id: Uuid, id: Uuid) -> Result<Option<ApiKeyRow>> {
        Ok(sqlx::query_as(sql(format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE project_id = $1 AND id = $2")))
            .bind(project_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn list_api_keys(
        &self,
        project_id: Uuid,
        include_revoked: bool,
        after: Option<Cursor>,
        limit: i64,
    ) -> Result<Vec<ApiKeyRow>> {
        let (time, id) = cursor_bounds(after);
        Ok(sqlx::query_as(sql(format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE project_id = $1 AND ($2 OR revoked_at IS NULL) \
             AND (created_at, id) < ($3, $4) ORDER BY created_at DESC, id DESC LIMIT $5"
        )))
        .bind(project_id)
        .bind(include_revoked)
        .bind(time)
        .bind(id)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Revokes a key (again is a no-op); returns it and its hash.
    pub async fn revoke_api_key(&self, project_id: Uuid, id: Uuid, actor: &Actor) -> Result<(ApiKeyRow, String)> {
        let mut tx = self.pool.begin().await?;
        let revoked: Option<String> = sqlx::query_scalar(
            "UPDATE api_keys SET revoked_at = now() WHERE project_id = $1 AND id = $2 AND revoked_at IS NULL \
             RETURNING key_hash",
        )
        .bind(project_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if revoked.is_some() {
            audit(
                &mut tx,
                Audit {
                    actor,
                    action: "api_key.revoked",
                    resource_type: "api_key",
                    resource_id: id.to_string(),
                    project_id: Some(project_id),
                    details: serde_json::json!({}),
                },
            )
            .await?;
        }
        let row: Option<(ApiKeyRow, String)> = sqlx::query_as::<_, ApiKeyWithHash>(sql(format!(
            "SELECT {API_KEY_COLUMNS}, key_hash FROM api_keys WHERE project_id = $1 AND id = $2"
        )))
        .bind(project_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| (r.key, r.key_hash));
        tx.commit().await?;
        row.ok_or(IdentityError::NotFound("api key"))
    }

    /// Applies `patch` to a live key; returns it and its hash, whose cached verification carries
    /// the old limit.
    pub async fn update_api_key(
        &self,
        project_id: Uuid,
        id: Uuid,
        patch: &ApiKeyPatch<'_>,
        actor: &Actor,
    ) -> Result<(ApiKeyRow, String)> {
        let mut tx = self.pool.begin().await?;
        let row: Option<ApiKeyWithHash> = sqlx::query_as(sql(format!(
            "UPDATE api_keys SET name = COALESCE($3, name), \
             requests_per_minute = CASE WHEN $4 THEN $5 ELSE requests_per_minute END \
             WHERE project_id = $1 AND id = $2 AND revoked_at IS NULL RETURNING {API_KEY_COLUMNS}, key_hash"
        )))
        .bind(project_id)
        .bind(id)
        .bind(patch.name)
        .bind(patch.requests_per_minute.is_some())
        .bind(patch.requests_per_minute.flatten())
        .fetch_optional(&mut *tx)
        .await?;
        let row = row.ok_or(IdentityError::NotFound("api key"))?;
        audit(
            &mut tx,
            Audit {
                actor,
                action: "api_key.updated",
                resource_type: "api_key",
                resource_id: id.to_string(),
                project_id: Some(project_id),
                details: serde_json::json!({ "name": patch.name, "requests_per_minute": patch.requests_per_minute }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok((row.key, row.key_hash))
    }

    /// The live key of a hash, in a live project.
    pub async fn api_key_credential(&self, hash: &str) -> Result<Option<ApiKeyCredential>> {
        Ok(sqlx::query_as(
            "SELECT k.id AS api_key_id, k.project_id, k.scopes, k.created_by, k.expires_at, k.requests_per_minute, \
             p.requests_per_minute AS project_requests_per_minute FROM api_keys k \
             JOIN projects p ON p.id = k.project_id AND p.deleted_at IS NULL \
             WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?)
    }

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

    // ---- settings ----

    pub async fn setting(&self, key: &str) -> Result<Option<SettingRow>> {
        Ok(sqlx::query_as(sql(format!("SELECT {SETTING_COLUMNS} FROM system_configs WHERE key = $1")))
            .bind(key)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Settings ordered by key, after `after_key`; only public ones unless `include_private`.
    pub async fn list_settings(
        &self,
        category: Option<&str>,
        include_private: bool,
        after_key: &str,
        limit: i64,
    ) -> Result<Vec<SettingRow>> {
        Ok(sqlx::query_as(sql(format!(
            "SELECT {SETTING_COLUMNS} FROM system_configs WHERE ($1::text IS NULL OR category = $1) \
             AND ($2 OR is_public) AND key > $3 ORDER BY key LIMIT $4"
        )))
        .bind(category)
        .bind(include_private)
        .bind(after_key)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn put_setting(&self, row: &SettingRow, actor: &Actor) -> Result<SettingRow> {
        let mut tx = self.pool.begin().await?;
        let stored: SettingRow = sqlx::query_as(sql(format!(
            "INSERT INTO system_configs (key, value, value_ciphertext, description, category, is_public, is_encrypted) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, \
             value_ciphertext = EXCLUDED.value_ciphertext, description = EXCLUDED.description, \
             category = EXCLUDED.category, is_public = EXCLUDED.is_public, is_encrypted = EXCLUDED.is_encrypted \
             RETURNING {SETTING_COLUMNS}"
        )))
        .bind(&row.key)
        .bind(&row.value)
        .bind(&row.value_ciphertext)
        .bind(&row.description)
        .bind(&row.category)
        .bind(row.is_public)
        .bind(row.is_encrypted)
        .fetch_one(&mut *tx)
        .await?;
        audit(
            &mut tx,
            Audit {
                actor,
                action: "setting.changed",
                resource_type: "setting",
                resource_id: row.key.clone(),
                project_id: None,
                // An encrypted value never leaves in an event.
                details: serde_json::json!({ "public": row.is_public, "encrypted": row.is_encrypted }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(stored)
    }

    pub async fn delete_setting(&self, key: &str, actor: &Actor) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM system_configs WHERE key = $1").bind(key).execute(&mut *tx).await?;
        if deleted.rows_affected() > 0 {
            audit(
                &mut tx,
                Audit {
                    actor,
                    action: "setting.deleted",
                    resource_type: "setting",
                    resource_id: key.to_owned(),
                    project_id: None,
                    details: serde_json::json!({}),
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(deleted.rows_affected() > 0)
    }
}

#[derive(sqlx::FromRow)]
struct ProjectWithRole {
    #[sqlx(flatten)]
    project: ProjectRow,
    role: String,
}

#[derive(sqlx::FromRow)]
struct ApiKeyWithHash {
    #[sqlx(flatten)]
    key: ApiKeyRow,
    key_hash: String,
}

/// The upper bound of a keyset page: the cursor, or "after everything" for the first page.
fn cursor_bounds(after: Option<Cursor>) -> (DateTime<Utc>, Uuid) {
    after.map(|c| (c.time, c.id)).unwrap_or((DateTime::<Utc>::MAX_UTC, Uuid::max()))
}

async fn member(conn: &mut PgConnection, project_id: Uuid, user_id: Uuid) -> Result<Option<MemberRow>> {
    Ok(sqlx::query_as(
        "SELECT m.project_id, m.user_id, u.email, u.username, m.role, m.created_at FROM project_members m \
         JOIN users u ON u.id = m.user_id WHERE m.project_id = $1 AND m.user_id = $2",
    )
    .bind(project_id)
    .bind(user_id)
    .fetch_optional(conn)
    .await?)
}

/// Locks the project's memberships (so two concurrent demotions cannot both pass the check),
/// lets `check` refuse on `user_id`'s current role (whether the caller may touch it comes before
/// whether the change is possible), and refuses when `losing_owner` would leave no owner.
async fn lock_members_and_check(
    conn: &mut PgConnection,
    project_id: Uuid,
    user_id: Uuid,
    losing_owner: bool,
    check: impl FnOnce(ProjectRole) -> Result<()>,
) -> Result<ProjectRole> {
    let members: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT user_id, role FROM project_members WHERE project_id = $1 FOR UPDATE")
            .bind(project_id)
            .fetch_all(&mut *conn)
            .await?;
    let current = members
        .iter()
        .find(|(id, _)| *id == user_id)
        .map(|(_, role)| role_from_db(role))
        .transpose()?
        .ok_or(IdentityError::NotFound("member"))?;
    check(current)?;
    let owners = members.iter().filter(|(_, role)| role == "owner").count();
    if losing_owner && current == ProjectRole::Owner && owners <= 1 {
        return Err(IdentityError::LastOwner);
    }
    Ok(current)
}

/// Ends `user_id`'s live sessions except `keep`; returns their access-token hashes.
async fn revoke_sessions(conn: &mut PgConnection, user_id: Uuid, keep: Option<Uuid>) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "UPDATE user_sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL \
         AND ($2::uuid IS NULL OR id <> $2) RETURNING token_hash",
    )
    .bind(user_id)
    .bind(keep)
    .fetch_all(conn)
    .await?)
}
