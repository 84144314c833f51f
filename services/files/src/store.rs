//! The files database. Lock order, so concurrent transactions cannot deadlock: a project's
//! `project_storage` row, then `files` rows, then `blobs` rows. The garbage collector locks only
//! orphaned `blobs` rows (skipping locked ones).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use aimesh_kit::data::db::sql;
use aimesh_kit::data::outbox::{self, OutboxEvent};
use aimesh_kit::wire::pagination::Page;

use crate::error::{FilesError, Result};

/// A file as stored, with the sessions it is attached to. Serializable for the cache of live
/// files (see [`crate::library::Library::live_file_cached`]).
#[derive(Debug, Clone, sqlx::FromRow, Serialize, Deserialize)]
pub struct FileRow {
    pub id: Uuid,
    pub project_id: Uuid,
    pub user_id: Uuid,
    pub display_name: String,
    pub original_name: String,
    pub safe_name: String,
    pub mime_type: String,
    pub file_type: String,
    pub size_bytes: i64,
    pub sha256: Vec<u8>,
    pub storage_provider: String,
    pub purpose: String,
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub session_ids: Vec<Uuid>,
}

const FILE_COLUMNS: &str = "f.id, f.project_id, f.user_id, f.display_name, f.original_name, f.safe_name, \
    f.mime_type, f.file_type, f.size_bytes, f.sha256, f.storage_provider, f.purpose, f.metadata, f.created_at, \
    f.updated_at, f.deleted_at, \
    ARRAY(SELECT a.session_id FROM file_attachments a WHERE a.file_id = f.id ORDER BY a.session_id) AS session_ids";

/// A file about to be recorded, its content written under `storage_key`.
#[derive(Debug, Clone)]
pub struct NewFile {
    pub id: Uuid,
    pub project_id: Uuid,
    pub user_id: Uuid,
    pub display_name: String,
    pub original_name: String,
    pub safe_name: String,
    pub mime_type: String,
    pub size_bytes: u64,
    pub sha256: [u8; 32],
    pub storage_provider: &'static str,
    pub purpose: &'static str,
    pub metadata: serde_json::Value,
}

/// What committing an upload did.
#[derive(Debug)]
pub struct Committed {
    pub file: FileRow,
    /// The project already stored this content: the new object is not needed.
    pub deduplicated: bool,
}

/// What releasing a session did.
#[derive(Debug, Clone, Default)]
pub struct ReleasedSession {
    /// Every file the session was linked to (its `session_ids` changed; some were deleted).
    pub unlinked: Vec<Uuid>,
    /// How many of them were deleted, no other session linking them.
    pub deleted: usize,
}

/// Filters of a file list.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub mime_type: Option<String>,
    /// `image` for `image/*`.
    pub family: Option<String>,
    pub user_id: Option<Uuid>,
    pub session_id: Option<Uuid>,
    pub purpose: Option<&'static str>,
}

/// A project's storage figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct StorageUsage {
    pub used_bytes: i64,
    pub file_count: i64,
    pub stored_bytes: i64,
}

/// An object to delete, found by the collector.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Orphan {
    pub project_id: Uuid,
    pub sha256: Vec<u8>,
    pub storage_key: String,
}

aimesh_kit::pg_store!(
    /// The files database. Cheap to clone.
    Store
);

impl Store {
    // ---- uploads ----

    /// Notes an object about to be written, before its first byte, so that the collector finds
    /// it if this process dies before it commits or cleans up.
    pub async fn begin_upload(&self, storage_key: &str, project_id: Uuid) -> Result<()> {
        sqlx::query("INSERT INTO pending_uploads (storage_key, project_id) VALUES ($1, $2)")
            .bind(storage_key)
            .bind(project_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets a pending object, once it is deleted.
    pub async fn end_upload(&self, storage_key: &str) -> Result<()> {
        sqlx::query("DELETE FROM pending_uploads WHERE storage_key = $1").bind(storage_key).execute(&self.pool).await?;
        Ok(())
    }

    /// The bytes of the project's live files.
    pub async fn used_bytes(&self, project_id: Uuid) -> Result<u64> {
        let used: Option<i64> = sqlx::query_scalar("SELECT used_bytes FROM project_storage WHERE project_id = $1")
            .bind(project_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(used.map_or(0, to_u64))
    }

    /// Records an uploaded file in one transaction: the quota decision under the project's row
    /// lock, the content's object (the new one, or the project's existing one with the same
    /// SHA-256), the file row and its outbox event. When the content was new, the object stops
    /// being pending; when it was a duplicate, the caller deletes the new object.
    pub async fn commit_upload(&self, file: &NewFile, storage_key: &str, quota: u64) -> Result<Committed> {
        let size = to_i64(file.size_bytes);
        let mut tx = self.pool.begin().await?;
        let used: Option<i64> = sqlx::query_scalar(
            "INSERT INTO project_storage (project_id, used_bytes, file_count) VALUES ($1, $2, 1) \
             ON CONFLICT (project_id) DO UPDATE SET used_bytes = project_storage.used_bytes + EXCLUDED.used_bytes, \
                 file_count = project_storage.file_count + 1 \
             WHERE project_storage.used_bytes + EXCLUDED.used_bytes <= $3 \
             RETURNING used_bytes",
        )
        .bind(file.project_id)
        .bind(size)
        .bind(to_i64(quota))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(used) = used.filter(|used| *used <= to_i64(quota)) else {
            drop(tx);
            let used = self.used_bytes(file.project_id).await?;
            return Err(FilesError::QuotaExceeded { used, quota, size: file.size_bytes });
        };
        let (_, inserted): (String, bool) = sqlx::query_as(
            "INSERT INTO blobs (project_id, sha256, size_bytes, storage_key, refs) VALUES ($1, $2, $3, $4, 1) \
             ON CONFLICT (project_id, sha256) DO UPDATE SET refs = blobs.refs + 1, orphaned_at = NULL \
             RETURNING storage_key, (xmax = 0) AS inserted",
        )
        .bind(file.project_id)
        .bind(&file.sha256[..])
        .bind(size)
        .bind(storage_key)
        .fetch_one(&mut *tx)
        .await?;
        if inserted {
            sqlx::query("DELETE FROM pending_uploads WHERE storage_key = $1")
                .bind(storage_key)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO files (id, project_id, user_id, display_name, original_name, safe_name, mime_type, file_type, \
                 size_bytes, sha256, storage_provider, purpose, metadata) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(file.id)
        .bind(file.project_id)
        .bind(file.user_id)
        .bind(&file.display_name)
        .bind(&file.original_name)
        .bind(&file.safe_name)
        .bind(&file.mime_type)
        .bind(crate::domain::family(&file.mime_type))
        .bind(size)
        .bind(&file.sha256[..])
        .bind(file.storage_provider)
        .bind(file.purpose)
        .bind(&file.metadata)
        .execute(&mut *tx)
        .await?;
        let payload = serde_json::json!({
            "file_id": file.id,
            "user_id": file.user_id,
            "mime_type": file.mime_type,
            "size_bytes": file.size_bytes,
            "deduplicated": !inserted,
            "project_bytes_stored": used,
        });
        outbox::enqueue(&mut tx, &OutboxEvent::new("product", "file.uploaded", Some(file.project_id), payload)).await?;
        let row = Self::file_in(&mut tx, file.id).await?.ok_or(FilesError::FileNotFound { field: "file_id" })?;
        tx.commit().await?;
        Ok(Committed { file: row, deduplicated: !inserted })
    }

    // ---- reads ----

    async fn file_in(conn: &mut PgConnection, id: Uuid) -> Result<Option<FileRow>> {
        let statement = format!("SELECT {FILE_COLUMNS} FROM files f WHERE f.id = $1");
        Ok(sqlx::query_as(sql(statement)).bind(id).fetch_optional(conn).await?)
    }

    /// A live (not deleted) file, read where this store reads (the primary unless it came from
    /// `reading_for`), past the cache.
    pub async fn live_file(&self, id: Uuid) -> Result<Option<FileRow>> {
        let mut conn = self.pool.acquire().await?;
        Ok(Self::file_in(&mut conn, id).await?.filter(|file| file.deleted_at.is_none()))
    }

    /// Where the content of a live file is.
    pub async fn storage_key(&self, file: &FileRow) -> Result<String> {
        let key: Option<String> =
            sqlx::query_scalar("SELECT storage_key FROM blobs WHERE project_id = $1 AND sha256 = $2 AND refs > 0")
                .bind(file.project_id)
                .bind(&file.sha256)
                .fetch_optional(&self.pool)
                .await?;
        key.ok_or(FilesError::FileNotFound { field: "file_id" })
    }

    /// A page of a project's live files, newest first; one row more than the page holds.
    pub async fn list(&self, project_id: Uuid, filter: &ListFilter, page: &Page) -> Result<Vec<FileRow>> {
        let (time, id) = page.bounds();
        let statement = format!(
            "SELECT {FILE_COLUMNS} FROM files f WHERE f.project_id = $1 AND f.deleted_at IS NULL \
               AND ($2::text IS NULL OR f.mime_type = $2) \
               AND ($3::text IS NULL OR f.file_type = $3) \
               AND ($4::uuid IS NULL OR f.user_id = $4) \
               AND ($5::uuid IS NULL OR EXISTS (SELECT 1 FROM file_attachments a WHERE a.file_id = f.id AND a.session_id = $5)) \
               AND ($6::text IS NULL OR f.purpose = $6) \
               AND (f.created_at, f.id) < ($7, $8) \
             ORDER BY f.created_at DESC, f.id DESC LIMIT $9"
        );
        Ok(sqlx::query_as(sql(statement))
            .bind(project_id)
            .bind(&filter.mime_type)
            .bind(&filter.family)
            .bind(filter.user_id)
            .bind(filter.session_id)
            .bind(filter.purpose)
            .bind(time)
            .bind(id)
            .bind(page.fetch_limit())
            .fetch_all(&self.pool)
            .await?)
    }

    /// A project's storage figures.
    pub async fn storage_usage(&self, project_id: Uuid) -> Result<StorageUsage> {
        let (used_bytes, file_count, stored_bytes): (i64, i64, i64) = sqlx::query_as(
            "SELECT COALESCE((SELECT used_bytes FROM project_storage WHERE project_id = $1), 0), \
                    COALESCE((SELECT file_count FROM project_storage WHERE project_id = $1), 0), \
                    COALESCE((SELECT sum(size_bytes)::bigint FROM blobs WHERE project_id = $1), 0)",
        )
        .bind(project_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(StorageUsage { used_bytes, file_count, stored_bytes })
    }

    // ---- changes ----

    /// Sets the display name (and its safe form) and/or the metadata of a live file. Only
    /// through [`crate::library::Library::update_file`], which drops the cached row.
    pub(crate) async fn update(
        &self,
        id: Uuid,
        name: Option<&crate::domain::FileName>,
        metadata: Option<&serde_json::Value>,
    ) -> Result<FileRow> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE files SET display_name = COALESCE($2, display_name), safe_name = COALESCE($3, safe_name), \
                 metadata = COALESCE($4, metadata), updated_at = now() \
             WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(name.map(|n| n.original.as_str()))
        .bind(name.map(|n| n.safe.as_str()))
        .bind(metadata)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(FilesError::FileNotFound { field: "file_id" });
        }
        let row = Self::file_in(&mut tx, id).await?.ok_or(FilesError::FileNotFound { field: "file_id" })?;
        tx.commit().await?;
        Ok(row)
    }

    /// Soft-deletes a live file of `project_id`; returns it as deleted. Only through
    /// [`crate::library::Library::delete_file`], which drops the cached row.
    pub(crate) async fn delete(&self, project_id: Uuid, id: Uuid) -> Result<FileRow> {
        let mut tx = self.pool.begin().await?;
        lock_project(&mut tx, project_id).await?;
        let deleted = soft_delete(&mut tx, project_id, &[id], Announce::Events).await?;
        if deleted.is_empty() {
            return Err(FilesError::FileNotFound { field: "file_id" });
        }
        let row = Self::file_in(&mut tx, id).await?.ok_or(FilesError::FileNotFound { field: "file_id" })?;
        tx.commit().await?;
        Ok(row)
    }

    // ---- attachments ----

    /// Links files to a session; refused unless every one is live and in `project_id`. Returns
    /// the files newly linked (their `session_ids` changed). Only through
    /// [`crate::library::Library::attach`], which drops their cached rows.
    pub(crate) async fn attach(&self, project_id: Uuid, session_id: Uuid, file_ids: &[Uuid]) -> Result<Vec<Uuid>> {
        let mut tx = self.pool.begin().await?;
        // FOR SHARE: a file cannot be deleted between this check and the link.
        let found: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM files WHERE id = ANY($1) AND project_id = $2 AND deleted_at IS NULL FOR SHARE",
        )
        .bind(file_ids)
        .bind(project_id)
        .fetch_all(&mut *tx)
        .await?;
        if file_ids.iter().any(|id| !found.contains(id)) {
            return Err(FilesError::FileNotFound { field: "file_ids" });
        }
        let linked: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO file_attachments (file_id, session_id, project_id) \
             SELECT unnest($1::uuid[]), $2, $3 ON CONFLICT DO NOTHING RETURNING file_id",
        )
        .bind(&found)
        .bind(session_id)
        .bind(project_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(linked)
    }

    /// Drops the session's links and deletes the attachment files no session links any more.
    /// Only through [`crate::library::Library::release_session`], which drops the cached rows
    /// of every file that was linked.
    pub(crate) async fn release_session(&self, project_id: Uuid, session_id: Uuid) -> Result<ReleasedSession> {
        let mut tx = self.pool.begin().await?;
        lock_project(&mut tx, project_id).await?;
        let linked: Vec<Uuid> = sqlx::query_scalar(
            "DELETE FROM file_attachments WHERE session_id = $1 AND project_id = $2 RETURNING file_id",
        )
        .bind(session_id)
        .bind(project_id)
        .fetch_all(&mut *tx)
        .await?;
        // Lock first, then look for other links with a fresh statement, so a link another
        // session made meanwhile is seen.
        let candidates: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM files WHERE id = ANY($1) AND purpose = 'attachment' AND deleted_at IS NULL \
             ORDER BY id FOR UPDATE",
        )
        .bind(&linked)
        .fetch_all(&mut *tx)
        .await?;
        let unlinked: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM unnest($1::uuid[]) AS c(id) \
             WHERE NOT EXISTS (SELECT 1 FROM file_attachments a WHERE a.file_id = c.id)",
        )
        .bind(&candidates)
        .fetch_all(&mut *tx)
        .await?;
        let deleted = soft_delete(&mut tx, project_id, &unlinked, Announce::Events).await?;
        tx.commit().await?;
        Ok(ReleasedSession { unlinked: linked, deleted: deleted.len() })
    }

    // ---- retention ----

    /// Up to `limit` live files created before their project's cutoff under `policies` and
    /// attached to no chat session (those go with their session), by project.
    pub async fn past_retention(
        &self,
        policies: &aimesh_kit::data::retention::Policies,
        limit: i64,
    ) -> Result<Vec<(Uuid, Uuid)>> {
        let (projects, days) = policies.sql_overrides();
        // Without a default only the projects with a policy of their own can lose files.
        let only_policies = if policies.default_days.is_none() { " AND p.project_id IS NOT NULL" } else { "" };
        Ok(sqlx::query_as(sql(format!(
            "WITH policy AS (SELECT * FROM unnest($1::uuid[], $2::int[]) AS p(project_id, days)) \
             SELECT f.project_id, f.id FROM files f LEFT JOIN policy p ON p.project_id = f.project_id \
             WHERE f.deleted_at IS NULL AND COALESCE(p.days, $3) > 0 \
             AND f.created_at < $4 - make_interval(days => COALESCE(p.days, $3)){only_policies} \
             AND NOT EXISTS (SELECT 1 FROM file_attachments a WHERE a.file_id = f.id) \
             ORDER BY f.project_id LIMIT $5"
        )))
        .bind(&projects)
        .bind(&days)
        .bind(policies.default_sql_days())
        .bind(policies.read_at)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Deletes files of a project as DeleteFile does (their objects then go by the garbage
    /// collector), without a `file.deleted` event each; those that are no longer live, or were
    /// attached to a session meanwhile, are skipped. Returns the ids that went. Only through
    /// [`crate::library::Library::delete_past_retention`], which drops their cached rows.
    pub(crate) async fn delete_for_retention(&self, project_id: Uuid, ids: &[Uuid]) -> Result<Vec<Uuid>> {
        let mut tx = self.pool.begin().await?;
        lock_project(&mut tx, project_id).await?;
        // Locked, then checked for links with a fresh statement, as a session's release does.
        let locked: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM files WHERE id = ANY($1) AND project_id = $2 AND deleted_at IS NULL ORDER BY id FOR UPDATE",
        )
        .bind(ids)
        .bind(project_id)
        .fetch_all(&mut *tx)
        .await?;
        let unlinked: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM unnest($1::uuid[]) AS c(id) \
             WHERE NOT EXISTS (SELECT 1 FROM file_attachments a WHERE a.file_id = c.id)",
        )
        .bind(&locked)
        .fetch_all(&mut *tx)
        .await?;
        let deleted = soft_delete(&mut tx, project_id, &unlinked, Announce::Quietly).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    // ---- garbage collection ----

    /// Locks up to `limit` objects no live file has used for `grace`, skipping those another
    /// transaction holds (an upload reviving one, another collector).
    pub async fn lock_orphans(conn: &mut PgConnection, grace: chrono::Duration, limit: i64) -> Result<Vec<Orphan>> {
        Ok(sqlx::query_as(
            "SELECT project_id, sha256, storage_key FROM blobs \
             WHERE refs = 0 AND orphaned_at <= now() - $1 ORDER BY orphaned_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(grace)
        .bind(limit)
        .fetch_all(conn)
        .await?)
    }

    /// Deletes the rows of collected objects.
    pub async fn forget_orphans(conn: &mut PgConnection, orphans: &[Orphan]) -> Result<()> {
        let projects: Vec<Uuid> = orphans.iter().map(|o| o.project_id).collect();
        let digests: Vec<Vec<u8>> = orphans.iter().map(|o| o.sha256.clone()).collect();
        sqlx::query(
            "DELETE FROM blobs b USING unnest($1::uuid[], $2::bytea[]) AS o(project_id, sha256) \
             WHERE b.project_id = o.project_id AND b.sha256 = o.sha256 AND b.refs = 0",
        )
        .bind(&projects)
        .bind(&digests)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Locks up to `limit` uploads begun before `started_before` and never finished.
    pub async fn lock_stale_uploads(
        conn: &mut PgConnection,
        started_before: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT storage_key FROM pending_uploads WHERE started_at < $1 ORDER BY started_at LIMIT $2 \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(started_before)
        .bind(limit)
        .fetch_all(conn)
        .await?)
    }

    /// Forgets stale uploads whose objects are deleted.
    pub async fn forget_uploads(conn: &mut PgConnection, keys: &[String]) -> Result<()> {
        sqlx::query("DELETE FROM pending_uploads WHERE storage_key = ANY($1)").bind(keys).execute(conn).await?;
        Ok(())
    }
}

/// Takes the project's storage row lock (creating the row), first of every lock of a change.
async fn lock_project(conn: &mut PgConnection, project_id: Uuid) -> Result<()> {
    sqlx::query(
        "INSERT INTO project_storage (project_id) VALUES ($1) \
         ON CONFLICT (project_id) DO UPDATE SET used_bytes = project_storage.used_bytes",
    )
    .bind(project_id)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct Deleted {
    id: Uuid,
    user_id: Uuid,
    sha256: Vec<u8>,
    size_bytes: i64,
}

/// Whether a deletion tells analytics, file by file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Announce {
    /// A `file.deleted` event per file (a person's or a session's deletion).
    Events,
    /// None: retention deletes in bulk and says so in its metrics.
    Quietly,
}

/// Soft-deletes the live files among `ids` (the project's row already locked): their objects
/// lose a reference (orphaned at zero), the project's bytes shrink, their links go, and each
/// gets a `file.deleted` event unless `announce` says otherwise. Returns the ids deleted.
async fn soft_delete(conn: &mut PgConnection, project_id: Uuid, ids: &[Uuid], announce: Announce) -> Result<Vec<Uuid>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let deleted: Vec<Deleted> = sqlx::query_as(
        "UPDATE files SET deleted_at = now(), updated_at = now(), status = 'deleted' \
         WHERE id = ANY($1) AND project_id = $2 AND deleted_at IS NULL \
         RETURNING id, user_id, sha256, size_bytes",
    )
    .bind(ids)
    .bind(project_id)
    .fetch_all(&mut *conn)
    .await?;
    if deleted.is_empty() {
        return Ok(Vec::new());
    }
    let digests: Vec<Vec<u8>> = deleted.iter().map(|d| d.sha256.clone()).collect();
    sqlx::query(
        "UPDATE blobs b SET refs = b.refs - d.n, orphaned_at = CASE WHEN b.refs = d.n THEN now() END \
         FROM (SELECT sha256, count(*) AS n FROM unnest($2::bytea[]) AS s(sha256) GROUP BY sha256) d \
         WHERE b.project_id = $1 AND b.sha256 = d.sha256",
    )
    .bind(project_id)
    .bind(&digests)
    .execute(&mut *conn)
    .await?;
    let bytes: i64 = deleted.iter().map(|d| d.size_bytes).sum();
    let used: i64 = sqlx::query_scalar(
        "UPDATE project_storage SET used_bytes = used_bytes - $2, file_count = file_count - $3 \
         WHERE project_id = $1 RETURNING used_bytes",
    )
    .bind(project_id)
    .bind(bytes)
    .bind(deleted.len() as i64)
    .fetch_one(&mut *conn)
    .await?;
    let ids: Vec<Uuid> = deleted.iter().map(|d| d.id).collect();
    sqlx::query("DELETE FROM file_attachments WHERE file_id = ANY($1)").bind(&ids).execute(&mut *conn).await?;
    if announce == Announce::Quietly {
        return Ok(ids);
    }
    for file in &deleted {
        let payload = serde_json::json!({
            "file_id": file.id,
            "user_id": file.user_id,
            "size_bytes": file.size_bytes,
            "project_bytes_stored": used,
        });
        outbox::enqueue(conn, &OutboxEvent::new("product", "file.deleted", Some(project_id), payload)).await?;
    }
    Ok(ids)
}

/// A size from the database (never negative: the schema checks it).
pub fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A size for the database; sizes beyond i64 are clamped (limits keep them far below).
pub fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
