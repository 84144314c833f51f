//! Accounts: registration, profile and access changes, passwords, deletion and failed logins.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use aimesh_kit::data::db::unique_violation;

use super::sessions::revoke_sessions;
use super::{Actor, Audit, Store, audit, changed, sql};
use crate::error::{IdentityError, Result};

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

const USER_COLUMNS: &str = "id, email, username, password_hash, first_name, last_name, avatar_url, role, status, \
                            settings, last_login_at, created_at, updated_at";

fn user_conflict(error: sqlx::Error) -> IdentityError {
    match unique_violation(&error) {
        Some("users_email_key") => IdentityError::EmailTaken,
        Some("users_username_key") => IdentityError::UsernameTaken,
        _ => error.into(),
    }
}

impl Store {
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
        let old: Option<(String, String)> =
            sqlx::query_as("SELECT role, status FROM users WHERE id = $1 AND deleted_at IS NULL FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let (old_role, old_status) = old.ok_or(IdentityError::NotFound("user"))?;
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
                    details: changed(
                        serde_json::json!({ "role": old_role, "status": old_status }),
                        serde_json::json!({ "role": row.role, "status": row.status }),
                    ),
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
}
