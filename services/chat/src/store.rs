//! The chat database: sessions, messages, search. Functions taking a `PgConnection` run inside
//! the caller's transaction.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use aimesh_kit::data::db::{is_sqlstate, sql};
use aimesh_kit::data::outbox::{self, EVENT_COLUMNS, OutboxEvent};
use aimesh_kit::wire::pagination::Page;

use crate::domain::{NewMessage, NewSession, Parent, SessionPatch, SessionStatus};
use crate::error::{ChatError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct SessionRow {
    pub id: Uuid,
    pub project_id: Uuid,
    pub user_id: Uuid,
    pub model: String,
    pub title: String,
    pub system_prompt: String,
    pub config: serde_json::Value,
    pub status: String,
    pub message_count: i64,
    pub total_tokens: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub purge_at: Option<DateTime<Utc>>,
}

impl SessionRow {
    pub fn is_deleted(&self) -> bool {
        self.deleted_at.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct MessageRow {
    pub id: Uuid,
    pub session_id: Uuid,
    pub sequence: i64,
    pub role: String,
    pub content: String,
    pub content_type: String,
    pub metadata: serde_json::Value,
    pub tokens: i32,
    pub parent_message_id: Option<Uuid>,
    pub client_message_id: Option<String>,
    pub attachment_ids: Vec<Uuid>,
    pub user_id: Uuid,
    pub created_at: DateTime<Utc>,
}

/// A message that matched a search.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SearchHitRow {
    #[sqlx(flatten)]
    pub message: MessageRow,
    pub session_title: String,
    pub rank: f32,
    pub snippet: String,
}

/// Optional filters of a session listing.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    /// Only this user's sessions.
    pub user_id: Option<Uuid>,
    pub status: Option<SessionStatus>,
    pub model: Option<String>,
    /// Soft-deleted sessions instead of live ones.
    pub deleted: bool,
}

/// What an append did.
#[derive(Debug, Clone, PartialEq)]
pub enum Appended {
    /// Stored now with the next sequence number.
    Stored(MessageRow),
    /// The session already had a message with this client message id: that one.
    Duplicate(MessageRow),
}

impl Appended {
    pub fn message(&self) -> &MessageRow {
        match self {
            Self::Stored(message) | Self::Duplicate(message) => message,
        }
    }

    pub fn into_message(self) -> MessageRow {
        match self {
            Self::Stored(message) | Self::Duplicate(message) => message,
        }
    }
}

const SESSION_COLUMNS: &str = "id, project_id, user_id, model, title, system_prompt, config, status, message_count, \
                               total_tokens, created_at, updated_at, deleted_at, purge_at";
const MESSAGE_COLUMNS: &str = "id, session_id, sequence, role, content, content_type, metadata, tokens, \
                               parent_message_id, client_message_id, attachment_ids, user_id, created_at";
/// The same columns qualified by the alias `m`, for joins.
const M_MESSAGE_COLUMNS: &str = "m.id, m.session_id, m.sequence, m.role, m.content, m.content_type, m.metadata, \
                                 m.tokens, m.parent_message_id, m.client_message_id, m.attachment_ids, m.user_id, \
                                 m.created_at";

aimesh_kit::pg_store!(
    /// The chat database. Cheap to clone.
    Store
);

impl Store {
    // ---- sessions ----

    /// Stores a session and its "chat.session_created" event in one transaction.
    pub async fn create_session(&self, new: &NewSession) -> Result<SessionRow> {
        let mut tx = self.pool.begin().await?;
        let row: SessionRow = sqlx::query_as(sql(format!(
            "INSERT INTO chat_sessions (id, project_id, user_id, model, title, system_prompt, config) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {SESSION_COLUMNS}"
        )))
        .bind(Uuid::now_v7())
        .bind(new.project_id)
        .bind(new.user_id)
        .bind(&new.model)
        .bind(&new.title)
        .bind(&new.system_prompt)
        .bind(&new.config)
        .fetch_one(&mut *tx)
        .await?;
        let payload = serde_json::json!({
            "session_id": row.id,
            "project_id": row.project_id,
            "user_id": row.user_id,
            "model": row.model,
        });
        outbox::enqueue(&mut tx, &OutboxEvent::new("product", "chat.session_created", Some(row.project_id), payload))
            .await?;
        tx.commit().await?;
        Ok(row)
    }

    /// A session, live or soft-deleted.
    pub async fn session(&self, id: Uuid) -> Result<Option<SessionRow>> {
        let row = sqlx::query_as(sql(format!("SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    /// The session `id` unless it is deleted: NOT_FOUND then, as when it does not exist.
    pub async fn live_session(&self, id: Uuid) -> Result<SessionRow, crate::error::ChatError> {
        self.session(id).await?.filter(|row| !row.is_deleted()).ok_or(crate::error::ChatError::SessionNotFound)
    }

    /// [`Store::session`] on a given connection (an export's snapshot).
    pub async fn session_in(conn: &mut PgConnection, id: Uuid) -> Result<Option<SessionRow>> {
        let row = sqlx::query_as(sql(format!("SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = $1")))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
        Ok(row)
    }

    /// Sessions of a project, newest first, for `page`; one row more than it holds.
    pub async fn list_sessions(
        &self,
        project_id: Uuid,
        filter: &SessionFilter,
        page: &Page,
    ) -> Result<Vec<SessionRow>> {
        // Literal predicates, so the planner picks the partial index of live or deleted sessions.
        let deleted = if filter.deleted { "deleted_at IS NOT NULL" } else { "deleted_at IS NULL" };
        let (time, id) = page.bounds();
        let rows = sqlx::query_as(sql(format!(
            "SELECT {SESSION_COLUMNS} FROM chat_sessions \
             WHERE project_id = $1 AND {deleted} \
               AND ($2::uuid IS NULL OR user_id = $2) \
               AND ($3::text IS NULL OR status = $3) \
               AND ($4::text IS NULL OR model = $4) \
               AND (created_at, id) < ($5, $6) \
             ORDER BY created_at DESC, id DESC LIMIT $7"
        )))
        .bind(project_id)
        .bind(filter.user_id)
        .bind(filter.status.map(SessionStatus::as_str))
        .bind(filter.model.as_deref())
        .bind(time)
        .bind(id)
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Changes the fields `patch` names of a live session; `None` if there is none.
    pub async fn update_session(&self, id: Uuid, patch: &SessionPatch) -> Result<Option<SessionRow>> {
        let row = sqlx::query_as(sql(format!(
            "UPDATE chat_sessions SET \
               title = COALESCE($2, title), system_prompt = COALESCE($3, system_prompt), \
               config = COALESCE($4, config), status = COALESCE($5, status), model = COALESCE($6, model), \
               updated_at = now() \
             WHERE id = $1 AND deleted_at IS NULL RETURNING {SESSION_COLUMNS}"
        )))
        .bind(id)
        .bind(patch.title.as_deref())
        .bind(patch.system_prompt.as_deref())
        .bind(patch.config.as_ref())
        .bind(patch.status.map(SessionStatus::as_str))
        .bind(patch.model.as_deref())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// Soft-deletes a live session, to be purged after `grace`; `None` if there is none.
    pub async fn soft_delete(&self, id: Uuid, grace: chrono::Duration) -> Result<Option<SessionRow>> {
        let row = sqlx::query_as(sql(format!(
            "UPDATE chat_sessions SET deleted_at = now(), purge_at = now() + $2, updated_at = now() \
             WHERE id = $1 AND deleted_at IS NULL RETURNING {SESSION_COLUMNS}"
        )))
        .bind(id)
        .bind(grace)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// Brings back a soft-deleted session before its purge time (after it:
    /// `GracePeriodOver`). Restoring a live session changes nothing and returns it, so a
    /// retried restore succeeds.
    pub async fn restore(&self, id: Uuid) -> Result<SessionRow> {
        let mut tx = self.pool.begin().await?;
        let row: Option<SessionRow> =
            sqlx::query_as(sql(format!("SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = $1 FOR UPDATE")))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(row) = row else { return Err(ChatError::SessionNotFound) };
        match row.purge_at {
            None => return Ok(row),
            Some(purge_at) if purge_at <= Utc::now() => return Err(ChatError::GracePeriodOver),
            Some(_) => {}
        }
        let row = sqlx::query_as(sql(format!(
            "UPDATE chat_sessions SET deleted_at = NULL, purge_at = NULL, updated_at = now() \
             WHERE id = $1 RETURNING {SESSION_COLUMNS}"
        )))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Locks a soft-deleted session for purging; `None` if it is live, gone, or being purged by
    /// someone else (`skip_locked`) .
    pub async fn lock_deleted(conn: &mut PgConnection, id: Uuid, skip_locked: bool) -> Result<Option<SessionRow>> {
        let skip = if skip_locked { " SKIP LOCKED" } else { "" };
        let row = sqlx::query_as(sql(format!(
            "SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = $1 AND deleted_at IS NOT NULL FOR UPDATE{skip}"
        )))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
        Ok(row)
    }

    /// Locks up to `limit` sessions past their purge time that no other replica is purging.
    pub async fn lock_due_for_purge(conn: &mut PgConnection, limit: i64) -> Result<Vec<SessionRow>> {
        let rows = sqlx::query_as(sql(format!(
            "SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE purge_at <= now() \
             ORDER BY purge_at LIMIT $1 FOR UPDATE SKIP LOCKED"
        )))
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows)
    }

    /// Locks up to `limit` sessions (live or soft-deleted) whose last activity (a change of the
    /// session, its last message) is past their project's cutoff under `policies`, skipping
    /// those another transaction holds.
    pub async fn lock_past_retention(
        conn: &mut PgConnection,
        policies: &aimesh_kit::data::retention::Policies,
        limit: i64,
    ) -> Result<Vec<SessionRow>> {
        let (projects, days) = policies.sql_overrides();
        // Without a default only the projects with a policy of their own can lose sessions.
        let only_policies = if policies.default_days.is_none() { " AND p.project_id IS NOT NULL" } else { "" };
        let columns = SESSION_COLUMNS.split(", ").map(|c| format!("s.{c}")).collect::<Vec<_>>().join(", ");
        let rows = sqlx::query_as(sql(format!(
            "WITH policy AS (SELECT * FROM unnest($1::uuid[], $2::int[]) AS p(project_id, days)) \
             SELECT {columns} FROM chat_sessions s LEFT JOIN policy p ON p.project_id = s.project_id \
             LEFT JOIN chat_messages m ON m.id = s.last_message_id \
             WHERE COALESCE(p.days, $3) > 0 \
             AND GREATEST(s.updated_at, COALESCE(m.created_at, s.updated_at)) \
                 < $4 - make_interval(days => COALESCE(p.days, $3)){only_policies} \
             LIMIT $5 FOR UPDATE OF s SKIP LOCKED"
        )))
        .bind(&projects)
        .bind(&days)
        .bind(policies.default_sql_days())
        .bind(policies.read_at)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows)
    }

    /// Every file attached to a message of the session.
    pub async fn attachments_of(conn: &mut PgConnection, session_id: Uuid) -> Result<Vec<Uuid>> {
        let ids = sqlx::query_scalar(
            "SELECT DISTINCT a FROM chat_messages, unnest(attachment_ids) AS a WHERE session_id = $1 ORDER BY a",
        )
        .bind(session_id)
        .fetch_all(&mut *conn)
        .await?;
        Ok(ids)
    }

    /// Deletes a session and (by cascade) its messages.
    pub async fn delete_session(conn: &mut PgConnection, session_id: Uuid) -> Result<()> {
        sqlx::query("DELETE FROM chat_sessions WHERE id = $1").bind(session_id).execute(&mut *conn).await?;
        Ok(())
    }

    // ---- messages ----

    /// Appends `message` to a live session of `project_id` with the next sequence number, its
    /// "chat.message_appended" event in the same transaction; or returns the message the session
    /// already has under the same client message id. `Err(SessionNotFound)` if the session is
    /// not live.
    ///
    /// One statement, so one round trip and the session row locked only while it runs: the
    /// counter update takes the row's lock first, appenders of one session (on any replica) queue
    /// on it, and each sees the count and latest message its predecessor committed (the row's
    /// newest version, re-read after the wait; the rest of the statement's snapshot is older, so
    /// the default parent comes from the row, not from a look at chat_messages). A duplicate
    /// client message id fails the whole statement with a unique violation, so its number is
    /// never used and sequences stay gap-free.
    pub async fn append(&self, session_id: Uuid, project_id: Uuid, message: &NewMessage) -> Result<Appended> {
        let (latest, parent) = match message.parent {
            Parent::Latest => (true, None),
            Parent::Exactly(parent) => (false, parent),
        };
        let message_id = Uuid::now_v7();
        // The sequence is added by the statement, the one thing not known beforehand.
        let payload = serde_json::json!({
            "session_id": session_id,
            "project_id": project_id,
            "message_id": message_id,
            "role": message.role.as_str(),
            "tokens": message.tokens,
            "user_id": message.user_id,
        });
        let event = OutboxEvent::new("product", "chat.message_appended", Some(project_id), payload);
        // `before` locks the row and yields its values as they were: PostgreSQL before 18 has no
        // RETURNING OLD.
        let statement = sqlx::query_as(sql(format!(
            "WITH counted AS (UPDATE chat_sessions s SET message_count = s.message_count + 1, \
               total_tokens = s.total_tokens + $8, last_message_id = $1 \
             FROM (SELECT id, last_message_id FROM chat_sessions WHERE id = $2 AND deleted_at IS NULL FOR UPDATE) \
               AS before \
             WHERE s.id = before.id \
             RETURNING s.message_count AS sequence, before.last_message_id AS previous), \
             stored AS (INSERT INTO chat_messages (id, session_id, sequence, role, content, content_type, \
               metadata, tokens, parent_message_id, client_message_id, attachment_ids, user_id) \
             SELECT $1, $2, counted.sequence, $3, $4, $5, $6, $7, \
               CASE WHEN $9 THEN counted.previous ELSE $10 END, $11, $12, $13 FROM counted \
             RETURNING {MESSAGE_COLUMNS}), \
             event AS (INSERT INTO outbox_events ({EVENT_COLUMNS}) \
               SELECT $14, $15, $16, $17, $18::jsonb || jsonb_build_object('sequence', stored.sequence), $19, $20 \
               FROM stored) \
             SELECT {MESSAGE_COLUMNS} FROM stored"
        )))
        .bind(message_id)
        .bind(session_id)
        .bind(message.role.as_str())
        .bind(&message.content)
        .bind(&message.content_type)
        .bind(&message.metadata)
        .bind(message.tokens)
        .bind(i64::from(message.tokens))
        .bind(latest)
        .bind(parent)
        .bind(message.client_message_id.as_deref())
        .bind(&message.attachment_ids)
        .bind(message.user_id);
        let inserted: Result<Option<MessageRow>, sqlx::Error> =
            event.bind_to(statement).fetch_optional(&self.pool).await;
        match inserted {
            Ok(Some(row)) => Ok(Appended::Stored(row)),
            Ok(None) => Err(ChatError::SessionNotFound),
            Err(error) if is_sqlstate(&error, "23505") && message.client_message_id.is_some() => {
                // A message with this client id is committed (an earlier try, or a concurrent one
                // that held the lock first): answer with it.
                let client_id = message.client_message_id.as_deref().unwrap_or_default();
                match self.message_by_client_id(session_id, client_id).await? {
                    Some(first) => Ok(Appended::Duplicate(first)),
                    None => {
                        Err(aimesh_kit::ServiceError::internal("a client message id conflict without its message")
                            .into())
                    }
                }
            }
            Err(error) if is_sqlstate(&error, "23503") => {
                Err(ChatError::invalid("parent_message_id", "is not a message of this session"))
            }
            Err(error) => Err(error.into()),
        }
    }

    pub async fn message(&self, session_id: Uuid, id: Uuid) -> Result<Option<MessageRow>> {
        let row = sqlx::query_as(sql(format!(
            "SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE session_id = $1 AND id = $2"
        )))
        .bind(session_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    pub async fn message_by_client_id(&self, session_id: Uuid, client_message_id: &str) -> Result<Option<MessageRow>> {
        let row = sqlx::query_as(sql(format!(
            "SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE session_id = $1 AND client_message_id = $2"
        )))
        .bind(session_id)
        .bind(client_message_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// Up to `limit` messages with a sequence above `after` (and at most `until`, if given), in
    /// sequence order.
    pub async fn messages_after(
        &self,
        session_id: Uuid,
        after: i64,
        until: Option<i64>,
        limit: i64,
    ) -> Result<Vec<MessageRow>> {
        Self::messages_after_in(&mut *self.pool.acquire().await?, session_id, after, until, limit).await
    }

    /// [`Store::messages_after`] on a given connection (an export's snapshot).
    pub async fn messages_after_in(
        conn: &mut PgConnection,
        session_id: Uuid,
        after: i64,
        until: Option<i64>,
        limit: i64,
    ) -> Result<Vec<MessageRow>> {
        let rows = sqlx::query_as(sql(format!(
            "SELECT {MESSAGE_COLUMNS} FROM chat_messages \
             WHERE session_id = $1 AND sequence > $2 AND ($3::bigint IS NULL OR sequence <= $3) \
             ORDER BY sequence LIMIT $4"
        )))
        .bind(session_id)
        .bind(after)
        .bind(until)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows)
    }

    /// The session's latest message, if it has any.
    pub async fn latest_message(&self, session_id: Uuid) -> Result<Option<MessageRow>> {
        let row = sqlx::query_as(sql(format!(
            "SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE session_id = $1 ORDER BY sequence DESC LIMIT 1"
        )))
        .bind(session_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// The path from `leaf` up to the root of its branch, root first; empty if `leaf` is not a
    /// message of the session.
    pub async fn branch(&self, session_id: Uuid, leaf: Uuid) -> Result<Vec<MessageRow>> {
        let rows = sqlx::query_as(sql(format!(
            "WITH RECURSIVE path AS ( \
               SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE session_id = $1 AND id = $2 \
               UNION ALL \
               SELECT {M_MESSAGE_COLUMNS} FROM chat_messages m \
               JOIN path p ON m.session_id = p.session_id AND m.id = p.parent_message_id) \
             SELECT {MESSAGE_COLUMNS} FROM path ORDER BY sequence"
        )))
        .bind(session_id)
        .bind(leaf)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Full-text search over the messages of a project's live sessions (or of one of them),
    /// best first, `limit + 1` rows from `offset`. Snippets are HTML-escaped content with the
    /// matches between `<mark>` and `</mark>`, so they are safe to render as HTML.
    pub async fn search(
        &self,
        project_id: Uuid,
        query: &str,
        session_id: Option<Uuid>,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<SearchHitRow>> {
        let rows = sqlx::query_as(sql(format!(
            "WITH q AS (SELECT websearch_to_tsquery('english', $2) AS query), \
             hits AS ( \
               SELECT m.id, ts_rank(m.search, q.query) AS rank \
               FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id, q \
               WHERE s.project_id = $1 AND s.deleted_at IS NULL AND ($3::uuid IS NULL OR m.session_id = $3) \
                 AND m.search @@ q.query \
               ORDER BY rank DESC, m.id LIMIT $4 OFFSET $5) \
             SELECT {M_MESSAGE_COLUMNS}, s.title AS session_title, hits.rank, \
               ts_headline('english', \
                 replace(replace(replace(m.content, '&', '&amp;'), '<', '&lt;'), '>', '&gt;'), q.query, \
                 'StartSel=<mark>, StopSel=</mark>, MaxWords=35, MinWords=15, MaxFragments=2') AS snippet \
             FROM hits JOIN chat_messages m ON m.id = hits.id JOIN chat_sessions s ON s.id = m.session_id, q \
             ORDER BY hits.rank DESC, m.id"
        )))
        .bind(project_id)
        .bind(query)
        .bind(session_id)
        .bind(limit + 1)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}
