//! API keys of a project: creation, listing, revocation, changes and credential checks.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use aimesh_kit::wire::pagination::Page;

use super::{Actor, Audit, Store, audit, changed, sql};
use crate::error::{IdentityError, Result};

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
    /// The project's key (a service key), outliving its creator's access.
    pub project_owned: bool,
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
    pub project_owned: bool,
}

const API_KEY_COLUMNS: &str = "id, project_id, name, display_prefix, scopes, created_by, created_at, expires_at, \
                               last_used_at, revoked_at, requests_per_minute, project_owned";

impl Store {
    // ---- API keys ----

    pub async fn create_api_key(&self, key: NewApiKey<'_>, actor: &Actor) -> Result<ApiKeyRow> {
        let mut tx = self.pool.begin().await?;
        let row: ApiKeyRow = sqlx::query_as(sql(format!(
            "INSERT INTO api_keys (id, project_id, name, display_prefix, key_hash, scopes, created_by, expires_at, \
             requests_per_minute, project_owned) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             RETURNING {API_KEY_COLUMNS}"
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
        .bind(key.project_owned)
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
                    "project_owned": key.project_owned,
                    "expire_time": key.expires_at,
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

    pub async fn list_api_keys(&self, project_id: Uuid, include_revoked: bool, page: &Page) -> Result<Vec<ApiKeyRow>> {
        let (time, id) = page.bounds();
        Ok(sqlx::query_as(sql(format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE project_id = $1 AND ($2 OR revoked_at IS NULL) \
             AND (created_at, id) < ($3, $4) ORDER BY created_at DESC, id DESC LIMIT $5"
        )))
        .bind(project_id)
        .bind(include_revoked)
        .bind(time)
        .bind(id)
        .bind(page.fetch_limit())
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
                    details: changed(serde_json::json!({ "revoked": false }), serde_json::json!({ "revoked": true })),
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
        let old: Option<(String, Option<i32>)> = sqlx::query_as(
            "SELECT name, requests_per_minute FROM api_keys WHERE project_id = $1 AND id = $2 AND revoked_at IS NULL \
             FOR UPDATE",
        )
        .bind(project_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let (old_name, old_limit) = old.ok_or(IdentityError::NotFound("api key"))?;
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
                details: changed(
                    serde_json::json!({ "name": old_name, "requests_per_minute": old_limit }),
                    serde_json::json!({ "name": row.key.name, "requests_per_minute": row.key.requests_per_minute }),
                ),
            },
        )
        .await?;
        tx.commit().await?;
        Ok((row.key, row.key_hash))
    }

    /// The live key of a hash, in a live project. A key its creator owns (not project-owned)
    /// acts only while the creator could still make it: an active, undeleted account that is an
    /// admin or owner of the project, or a system admin. Whoever changes any of that forgets the
    /// cached verifications of the creator's keys (see [`Store::creator_key_hashes`]).
    pub async fn api_key_credential(&self, hash: &str) -> Result<Option<ApiKeyCredential>> {
        Ok(sqlx::query_as(
            "SELECT k.id AS api_key_id, k.project_id, k.scopes, k.created_by, k.expires_at, k.requests_per_minute, \
             p.requests_per_minute AS project_requests_per_minute FROM api_keys k \
             JOIN projects p ON p.id = k.project_id AND p.deleted_at IS NULL \
             WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now()) \
             AND (k.project_owned OR EXISTS (SELECT 1 FROM users u \
                 LEFT JOIN project_members m ON m.project_id = k.project_id AND m.user_id = u.id \
                 WHERE u.id = k.created_by AND u.deleted_at IS NULL AND u.status = 'active' \
                 AND (u.role = 'admin' OR m.role IN ('admin', 'owner'))))",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Hashes of the live keys `user_id` made and owns (not project-owned), in `project_id` or
    /// in every project: the credentials whose cached verifications a change of the creator's
    /// access makes stale.
    pub async fn creator_key_hashes(&self, user_id: Uuid, project_id: Option<Uuid>) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT key_hash FROM api_keys WHERE created_by = $1 AND ($2::uuid IS NULL OR project_id = $2) \
             AND revoked_at IS NULL AND NOT project_owned",
        )
        .bind(user_id)
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?)
    }
}

#[derive(sqlx::FromRow)]
struct ApiKeyWithHash {
    #[sqlx(flatten)]
    key: ApiKeyRow,
    key_hash: String,
}
