//! System-wide settings (table system_configs).

use chrono::{DateTime, Utc};

use aimesh_kit::wire::pagination::Page;

use super::{Actor, Audit, Store, audit, changed, sql};
use crate::error::Result;

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

const SETTING_COLUMNS: &str =
    "key, value, value_ciphertext, description, category, is_public, is_encrypted, created_at, updated_at";

impl Store {
    // ---- settings ----

    pub async fn setting(&self, key: &str) -> Result<Option<SettingRow>> {
        Ok(sqlx::query_as(sql(format!("SELECT {SETTING_COLUMNS} FROM system_configs WHERE key = $1")))
            .bind(key)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Settings ordered by key, after the page's key; only public ones unless `include_private`.
    pub async fn list_settings(
        &self,
        category: Option<&str>,
        include_private: bool,
        page: &Page<String>,
    ) -> Result<Vec<SettingRow>> {
        Ok(sqlx::query_as(sql(format!(
            "SELECT {SETTING_COLUMNS} FROM system_configs WHERE ($1::text IS NULL OR category = $1) \
             AND ($2 OR is_public) AND key > $3 ORDER BY key LIMIT $4"
        )))
        .bind(category)
        .bind(include_private)
        .bind(page.after().map_or("", String::as_str))
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn put_setting(&self, row: &SettingRow, actor: &Actor) -> Result<SettingRow> {
        let mut tx = self.pool.begin().await?;
        let old: Option<SettingRow> =
            sqlx::query_as(sql(format!("SELECT {SETTING_COLUMNS} FROM system_configs WHERE key = $1 FOR UPDATE")))
                .bind(&row.key)
                .fetch_optional(&mut *tx)
                .await?;
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
                details: changed(old.as_ref().map(setting_audit_view), setting_audit_view(&stored)),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(stored)
    }

    pub async fn delete_setting(&self, key: &str, actor: &Actor) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let deleted: Option<SettingRow> =
            sqlx::query_as(sql(format!("DELETE FROM system_configs WHERE key = $1 RETURNING {SETTING_COLUMNS}")))
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(old) = &deleted {
            audit(
                &mut tx,
                Audit {
                    actor,
                    action: "setting.deleted",
                    resource_type: "setting",
                    resource_id: key.to_owned(),
                    project_id: None,
                    details: changed(setting_audit_view(old), serde_json::Value::Null),
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(deleted.is_some())
    }
}

/// What a setting's audit events show of it. An encrypted value never leaves in an event: it
/// shows as `"<redacted>"`.
fn setting_audit_view(row: &SettingRow) -> serde_json::Value {
    let value = if row.is_encrypted { serde_json::json!("<redacted>") } else { row.value.clone().unwrap_or_default() };
    serde_json::json!({
        "value": value,
        "description": row.description,
        "category": row.category,
        "public": row.is_public,
        "encrypted": row.is_encrypted,
    })
}
