//! Projects and their memberships.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use aimesh_kit::auth::ProjectRole;
use aimesh_kit::data::db::unique_violation;
use aimesh_kit::wire::pagination::Page;

use super::{Actor, Audit, Store, audit, changed, sql};
use crate::domain::role_from_db;
use crate::error::{IdentityError, Result};

/// A live project as `GetProject` answers it, and as identity's project cache holds it (JSON in
/// Redis): a write that changes any of these fields must invalidate that cache after its commit.
#[derive(Debug, Clone, sqlx::FromRow, Serialize, Deserialize)]
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

/// A change of a project; `None` leaves a field as it is, `Some(None)` clears a limit.
#[derive(Debug, Default)]
pub struct ProjectPatch<'a> {
    pub name: Option<&'a str>,
    pub description: Option<&'a str>,
    pub requests_per_minute: Option<Option<i32>>,
}

const PROJECT_COLUMNS: &str = "id, name, description, requests_per_minute, created_at, updated_at";

impl Store {
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

    /// The live project `id`; `None` if there is none or it was deleted.
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
    pub async fn list_projects(&self, user_id: Uuid, page: &Page) -> Result<Vec<(ProjectRow, String)>> {
        let (time, id) = page.bounds();
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
        .bind(page.fetch_limit())
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
        let old: Option<ProjectRow> = sqlx::query_as(sql(format!(
            "SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1 AND deleted_at IS NULL FOR UPDATE"
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let old = old.ok_or(IdentityError::NotFound("project"))?;
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
                details: changed(project_audit_view(&old), project_audit_view(&row)),
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
                details: changed(member_audit_view(None), member_audit_view(Some(role))),
            },
        )
        .await?;
        let row = member(&mut tx, project_id, user_id).await?.ok_or(IdentityError::NotFound("member"))?;
        tx.commit().await?;
        Ok(row)
    }

    pub async fn list_members(&self, project_id: Uuid, page: &Page) -> Result<Vec<MemberRow>> {
        let (time, id) = page.bounds();
        Ok(sqlx::query_as(
            "SELECT m.project_id, m.user_id, u.email, u.username, m.role, m.created_at FROM project_members m \
             JOIN users u ON u.id = m.user_id WHERE m.project_id = $1 AND (m.created_at, m.user_id) < ($2, $3) \
             ORDER BY m.created_at DESC, m.user_id DESC LIMIT $4",
        )
        .bind(project_id)
        .bind(time)
        .bind(id)
        .bind(page.fetch_limit())
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
                details: changed(member_audit_view(Some(current)), member_audit_view(Some(role))),
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
                details: changed(member_audit_view(Some(current)), member_audit_view(None)),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// What a project's audit events show of it.
fn project_audit_view(row: &ProjectRow) -> serde_json::Value {
    serde_json::json!({
        "name": row.name,
        "description": row.description,
        "requests_per_minute": row.requests_per_minute,
    })
}

/// What a membership's audit events show of it: its role, or null when there is none.
fn member_audit_view(role: Option<ProjectRole>) -> serde_json::Value {
    match role {
        Some(role) => serde_json::json!({ "role": role.as_str() }),
        None => serde_json::Value::Null,
    }
}

#[derive(sqlx::FromRow)]
struct ProjectWithRole {
    #[sqlx(flatten)]
    project: ProjectRow,
    role: String,
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
