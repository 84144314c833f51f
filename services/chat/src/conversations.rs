//! The chat domain as the handlers (and the tests) use it: the store, the session cache, live
//! delivery and attachments composed, so that every path keeps them in step (invalidate after
//! a change, publish after a commit, release files before a purge).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use aimesh_kit::ServiceError;
use aimesh_kit::data::cache::{CacheSettings, InvalidationBus, TwoLevelCache};
use aimesh_kit::data::redis::Redis;

use crate::attachments::Attachments;
use crate::domain::{MessageEdit, MessageLimits, MessageRole, NewMessage, NewSession, Parent, SessionPatch};
use crate::error::{ChatError, Result};
use crate::live::{Hub, Watch};
use crate::store::{Appended, MessageRow, SessionRow, Store};

/// What the cache keeps of a session: what access checks need, and nothing an append changes.
/// Counts are not cached: appends change them all the time, and invalidating on every append
/// would cost two Redis round trips and a broadcast to every replica per message. Reads that
/// return counts (GetSession, ListSessions) read PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    pub id: Uuid,
    pub project_id: Uuid,
    pub user_id: Uuid,
    pub deleted_at: Option<DateTime<Utc>>,
    pub purge_at: Option<DateTime<Utc>>,
}

impl SessionMeta {
    pub fn is_deleted(&self) -> bool {
        self.deleted_at.is_some()
    }
}

impl From<&SessionRow> for SessionMeta {
    fn from(row: &SessionRow) -> Self {
        Self {
            id: row.id,
            project_id: row.project_id,
            user_id: row.user_id,
            deleted_at: row.deleted_at,
            purge_at: row.purge_at,
        }
    }
}

/// Tunables of the domain, from [`crate::ChatConfig`].
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub limits: MessageLimits,
    /// How long a soft-deleted session can be restored.
    pub grace: chrono::Duration,
    /// How long a quiet watcher waits before looking at PostgreSQL anyway.
    pub watch_poll: Duration,
}

impl Settings {
    pub fn from_config(config: &crate::ChatConfig) -> Self {
        Self {
            limits: MessageLimits { max_content_bytes: config.max_message_bytes },
            grace: chrono::Duration::days(i64::from(config.purge_after_days)),
            watch_poll: Duration::from_millis(config.watch_poll_ms.max(10)),
        }
    }
}

/// Sessions and messages; see the module docs. Cheap to clone.
#[derive(Clone)]
pub struct Conversations {
    store: Store,
    sessions: TwoLevelCache<SessionMeta>,
    hub: Hub,
    attachments: Arc<dyn Attachments>,
    settings: Settings,
}

impl std::fmt::Debug for Conversations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conversations").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl Conversations {
    /// The chat domain over `database`; `bus` carries cache invalidations between replicas. Opens
    /// this process's live-message subscriber. Tests build several over one database to act as
    /// replicas.
    pub async fn new(
        database: impl Into<aimesh_kit::data::replicas::Database>,
        redis: Redis,
        bus: &InvalidationBus,
        attachments: Arc<dyn Attachments>,
        settings: Settings,
    ) -> Result<Self> {
        // Seed 003 keeps chat_session:{id} for 24 hours; invalidation keeps it exact.
        let cache = CacheSettings {
            local_ttl: Duration::from_secs(10),
            shared_ttl: Duration::from_secs(24 * 3600),
            negative_ttl: Duration::from_secs(5),
            local_capacity: 100_000,
        };
        Ok(Self {
            store: Store::new(database),
            sessions: TwoLevelCache::new("sessions", "chat", redis.clone(), bus, cache),
            hub: Hub::start(&redis).await?,
            attachments,
            settings,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    // ---- sessions ----

    /// What the cache knows of a session, live or soft-deleted; `None` if there is none.
    pub async fn session_meta(&self, id: Uuid) -> Result<Option<Arc<SessionMeta>>> {
        let store = self.store.clone();
        let meta = self
            .sessions
            .get_or_load(&id.to_string(), || async move {
                match store.session(id).await {
                    Ok(row) => Ok(row.as_ref().map(SessionMeta::from)),
                    Err(error) => Err(ServiceError::from(error)),
                }
            })
            .await?;
        Ok(meta)
    }

    /// Forgets the cached session on every replica, after it changed.
    async fn forget(&self, id: Uuid) {
        self.sessions.invalidate_or_log(&id.to_string()).await;
    }

    pub async fn create_session(&self, new: &NewSession) -> Result<SessionRow> {
        self.store.create_session(new).await
    }

    /// A live session as stored now (with exact counts).
    pub async fn live_session(&self, id: Uuid) -> Result<SessionRow> {
        self.store.live_session(id).await
    }

    pub async fn update_session(&self, id: Uuid, patch: &SessionPatch) -> Result<SessionRow> {
        let row = self.store.update_session(id, patch).await?.ok_or(ChatError::SessionNotFound)?;
        self.forget(id).await;
        Ok(row)
    }

    /// Soft delete: gone from lists and reads, purged after the grace period unless restored.
    pub async fn delete_session(&self, id: Uuid) -> Result<SessionRow> {
        let row = self.store.soft_delete(id, self.settings.grace).await?.ok_or(ChatError::SessionNotFound)?;
        self.forget(id).await;
        Ok(row)
    }

    pub async fn restore_session(&self, id: Uuid) -> Result<SessionRow> {
        let restored = self.store.restore(id).await;
        self.forget(id).await;
        restored
    }

    /// Deletes a soft-deleted session and its messages now, after releasing its files.
    pub async fn purge_session(&self, id: Uuid) -> Result<()> {
        let mut tx = self.store.pool().begin().await?;
        let Some(session) = Store::lock_deleted(&mut tx, id, false).await? else {
            drop(tx);
            return match self.store.session(id).await? {
                Some(_) => Err(ChatError::SessionNotDeleted),
                None => Err(ChatError::SessionNotFound),
            };
        };
        self.purge_locked(&mut tx, &session).await?;
        tx.commit().await?;
        self.forget(id).await;
        Ok(())
    }

    /// Files first, rows second: if the release fails the session stays and is tried again;
    /// the reverse order could leave files nobody references.
    async fn purge_locked(&self, tx: &mut sqlx::PgConnection, session: &SessionRow) -> Result<()> {
        let files = Store::attachments_of(tx, session.id).await?;
        self.attachments.release(session.project_id, session.id, &files).await?;
        Store::delete_session(tx, session.id).await
    }

    /// Purges up to `limit` sessions past their purge time; returns how many. Replicas running
    /// it at once take different sessions (`SKIP LOCKED`).
    pub async fn purge_due(&self, limit: i64) -> Result<usize> {
        let mut tx = self.store.pool().begin().await?;
        let due = Store::lock_due_for_purge(&mut tx, limit).await?;
        for session in &due {
            self.purge_locked(&mut tx, session).await?;
        }
        tx.commit().await?;
        for session in &due {
            self.forget(session.id).await;
        }
        if !due.is_empty() {
            tracing::info!(purged = due.len(), "purged sessions past their grace period");
        }
        Ok(due.len())
    }

    /// Deletes up to `limit` sessions past their project's retention under `policies`, whole,
    /// as a purge does (files released first, then the session and its messages); returns how
    /// many sessions and messages went. Replicas running it at once take different sessions.
    pub async fn delete_past_retention(
        &self,
        policies: &aimesh_kit::data::retention::Policies,
        limit: i64,
    ) -> Result<(usize, u64)> {
        let mut tx = self.store.pool().begin().await?;
        let due = Store::lock_past_retention(&mut tx, policies, limit).await?;
        for session in &due {
            self.purge_locked(&mut tx, session).await?;
        }
        tx.commit().await?;
        for session in &due {
            self.forget(session.id).await;
        }
        let messages = due.iter().map(|s| u64::try_from(s.message_count).unwrap_or(0)).sum();
        Ok((due.len(), messages))
    }

    // ---- messages ----

    /// Appends to a live session (see [`Store::append`]) and publishes a newly stored message
    /// to the watchers; a duplicate of an earlier append is returned as it was stored.
    pub async fn append(&self, session: &SessionMeta, message: &NewMessage) -> Result<Appended> {
        if !message.attachment_ids.is_empty() {
            self.attachments.check(session.project_id, session.id, &message.attachment_ids).await?;
        }
        let appended = self.store.append(session.id, session.project_id, message).await?;
        if let Appended::Stored(stored) = &appended {
            self.hub.publish(stored).await;
        }
        Ok(appended)
    }

    /// A new message beside the edited one: the same role, type, parent and files, new content
    /// (and the edited one's metadata unless the edit gives it).
    pub async fn edit(&self, session: &SessionMeta, edit: MessageEdit) -> Result<Appended> {
        let original = self
            .store
            .message(session.id, edit.message_id)
            .await?
            .ok_or(ChatError::MessageNotFound { field: "message_id" })?;
        let message = NewMessage {
            role: MessageRole::parse_db(&original.role)?,
            content: edit.content,
            content_type: original.content_type,
            metadata: edit.metadata.unwrap_or(original.metadata),
            tokens: edit.tokens,
            parent: Parent::Exactly(original.parent_message_id),
            client_message_id: edit.client_message_id,
            // Already attached to this session: the files service was asked then.
            attachment_ids: original.attachment_ids,
            user_id: edit.user_id,
        };
        let appended = self.store.append(session.id, session.project_id, &message).await?;
        if let Appended::Stored(stored) = &appended {
            self.hub.publish(stored).await;
        }
        Ok(appended)
    }

    /// The path from `leaf` (by default the latest message) to its root, root first.
    pub async fn branch(&self, session_id: Uuid, leaf: Option<Uuid>) -> Result<Vec<MessageRow>> {
        let leaf = match leaf {
            Some(id) => id,
            None => match self.store.latest_message(session_id).await? {
                Some(latest) => latest.id,
                None => return Ok(Vec::new()),
            },
        };
        let path = self.store.branch(session_id, leaf).await?;
        if path.is_empty() {
            return Err(ChatError::MessageNotFound { field: "message_id" });
        }
        Ok(path)
    }

    /// The session's messages after `after_sequence`, stored then live; see [`Watch`].
    pub async fn watch(&self, session_id: Uuid, after_sequence: i64) -> Result<Watch> {
        Watch::start(&self.hub, self.store.clone(), session_id, after_sequence, self.settings.watch_poll).await
    }
}
