//! The files domain: uploads streamed into the object store and recorded in one transaction,
//! downloads by range, download links, attachments and garbage collection. Access checks are
//! the API's; everything here trusts its caller.
//!
//! Reads of a live file by id (GetFile, downloads, download links) go through the kit's
//! two-level cache of file rows, keyed by file id; every change of a files row, or of the links
//! that make its `session_ids`, goes through this type and drops the cached row after its
//! commit. Staleness: none on the replica that made the change; others drop their in-process
//! copy when the invalidation broadcast arrives (milliseconds), or after `local_ttl` (10 s) if
//! they miss it; if Redis was unreachable at the change, an old row may live in Redis for up to
//! 1.1 × `shared_ttl` + `local_ttl` (340 s). A change made to the database behind the service's
//! back (SQL by hand) is seen only when those lifetimes run out.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use aimesh_kit::ServiceError;
use aimesh_kit::data::cache::{CacheSettings, InvalidationBus, TwoLevelCache};
use aimesh_kit::data::redis::Redis;

use crate::config::FilesConfig;
use crate::domain::{self, FileName, Purpose, RangeRequest, SNIFF_BYTES};
use crate::error::{FilesError, Result};
use crate::signing::{self, UrlSigner};
use crate::storage::{ObjectStorage, ObjectWriter};
use crate::store::{Committed, FileRow, NewFile, ReleasedSession, Store};

/// Objects deleted per transaction of the collector.
const GC_BATCH: i64 = 100;
/// Longest validity of a download link.
pub const MAX_LINK_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Validity of a download link when the request names none.
pub const DEFAULT_LINK_TTL: Duration = Duration::from_secs(15 * 60);
/// Cached rows dropped at once after a change of many files (retention, a released session).
const INVALIDATIONS_IN_FLIGHT: usize = 16;

/// The limits uploads are held to.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_file_bytes: u64,
    pub project_quota_bytes: u64,
    pub allowed_types: Vec<String>,
}

/// How the collector paces itself.
#[derive(Debug, Clone, Copy)]
pub struct GcSettings {
    /// How long an unused object is kept.
    pub grace: Duration,
    /// When an unfinished upload counts as abandoned.
    pub stale_upload: Duration,
}

impl GcSettings {
    pub fn from_config(config: &FilesConfig) -> Self {
        Self {
            grace: Duration::from_secs(config.gc_grace_secs),
            stale_upload: Duration::from_secs(config.stale_upload_secs),
        }
    }
}

/// An upload's metadata, validated.
#[derive(Debug, Clone)]
pub struct NewUpload {
    pub project_id: Uuid,
    pub name: FileName,
    pub mime_type: String,
    pub declared_size: Option<u64>,
    pub declared_sha256: Option<[u8; 32]>,
    pub purpose: Purpose,
    pub metadata: serde_json::Value,
}

/// What the collector removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    /// Objects no file used any more.
    pub objects: usize,
    /// Objects of uploads abandoned by a crashed process.
    pub abandoned_uploads: usize,
}

/// A download: the range served and its bytes.
pub struct Download {
    pub offset: u64,
    pub length: u64,
    pub bytes: BoxStream<'static, Result<Bytes, object_store::Error>>,
}

/// A link that downloads a file without a credential.
#[derive(Debug, Clone)]
pub struct DownloadLink {
    pub url: String,
    /// For gateway links, what DownloadSigned takes.
    pub token: Option<String>,
    pub expires_at: DateTime<Utc>,
}

/// The files domain; cheap to clone.
#[derive(Debug, Clone)]
pub struct Library {
    store: Store,
    storage: ObjectStorage,
    signer: UrlSigner,
    limits: Limits,
    gc: GcSettings,
    /// Live file rows by id; `None` cached for ids that are no live file (see the module docs).
    live_files: TwoLevelCache<FileRow>,
}

impl Library {
    /// The domain over `store`; `redis` and `bus` carry the cache of live files, shared with the
    /// other replicas (tests build several over one database to act as replicas).
    pub fn new(
        store: Store,
        storage: ObjectStorage,
        signer: UrlSigner,
        limits: Limits,
        gc: GcSettings,
        redis: Redis,
        bus: &InvalidationBus,
    ) -> Self {
        // Files has no cache settings of its own.
        let live_files = TwoLevelCache::new("files", "files", redis, bus, CacheSettings::default());
        Self { store, storage, signer, limits, gc, live_files }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn storage(&self) -> &ObjectStorage {
        &self.storage
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn signer(&self) -> &UrlSigner {
        &self.signer
    }

    /// Refuses a type the deployment does not allow.
    pub fn check_type(&self, mime_type: &str) -> Result<()> {
        if domain::is_allowed(mime_type, &self.limits.allowed_types) {
            Ok(())
        } else {
            Err(FilesError::TypeNotAllowed(mime_type.to_owned()))
        }
    }

    // ---- uploads ----

    /// Streams `chunks` into a new object while hashing and checking them, then records the
    /// file (or, for content the project already has, records it against the existing object
    /// and drops the new one). On any failure the new object is deleted and nothing is recorded.
    pub async fn upload<S>(&self, user_id: Uuid, upload: NewUpload, chunks: S) -> Result<Committed>
    where
        S: Stream<Item = Result<Bytes>> + Unpin + Send,
    {
        let quota = self.limits.project_quota_bytes;
        let used = self.store.used_bytes(upload.project_id).await?;
        let room = quota.saturating_sub(used);
        if let Some(size) = upload.declared_size {
            self.check_size(size, used, room)?;
        }
        let key = ObjectStorage::new_key(upload.project_id);
        self.store.begin_upload(&key, upload.project_id).await?;
        let outcome = match self.write_object(&key, &upload, chunks, used, room).await {
            Ok((size, sha256)) => {
                let file = NewFile {
                    id: Uuid::now_v7(),
                    project_id: upload.project_id,
                    user_id,
                    display_name: upload.name.original.clone(),
                    original_name: upload.name.original.clone(),
                    safe_name: upload.name.safe.clone(),
                    mime_type: upload.mime_type.clone(),
                    size_bytes: size,
                    sha256,
                    storage_provider: self.storage.backend().as_str(),
                    purpose: upload.purpose.as_str(),
                    metadata: upload.metadata.clone(),
                };
                self.store.commit_upload(&file, &key, quota).await
            }
            Err(error) => Err(error),
        };
        match &outcome {
            Ok(committed) if !committed.deduplicated => {}
            _ => self.discard(&key).await,
        }
        outcome
    }

    fn check_size(&self, size: u64, used: u64, room: u64) -> Result<()> {
        if size > self.limits.max_file_bytes {
            return Err(FilesError::TooLarge { limit: self.limits.max_file_bytes });
        }
        if size > room {
            return Err(FilesError::QuotaExceeded { used, quota: self.limits.project_quota_bytes, size });
        }
        Ok(())
    }

    /// Writes the object; returns its size and SHA-256. Aborts the write on any failure.
    async fn write_object<S>(
        &self,
        key: &str,
        upload: &NewUpload,
        mut chunks: S,
        used: u64,
        room: u64,
    ) -> Result<(u64, [u8; 32])>
    where
        S: Stream<Item = Result<Bytes>> + Unpin + Send,
    {
        let mut writer = self.storage.writer(key);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        // The start of the content, until the type check has seen enough of it.
        let mut head: Option<Vec<u8>> = Some(Vec::with_capacity(SNIFF_BYTES));
        let written: Result<()> = async {
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                if chunk.is_empty() {
                    continue;
                }
                size += chunk.len() as u64;
                self.check_size(size, used, room)?;
                if let Some(start) = head.as_mut() {
                    let wanted = (SNIFF_BYTES - start.len()).min(chunk.len());
                    start.extend_from_slice(&chunk[..wanted]);
                    if start.len() >= SNIFF_BYTES {
                        domain::check_content(&upload.mime_type, start)?;
                        head = None;
                    }
                }
                hasher.update(&chunk);
                write(&mut writer, chunk).await?;
            }
            if let Some(start) = head.take() {
                domain::check_content(&upload.mime_type, &start)?;
            }
            Ok(())
        }
        .await;
        let checked = written.and_then(|()| {
            let sha256: [u8; 32] = hasher.finalize().into();
            if let Some(declared) = upload.declared_size.filter(|declared| *declared != size) {
                return Err(FilesError::SizeMismatch { declared, actual: size });
            }
            if let Some(declared) = upload.declared_sha256.filter(|declared| *declared != sha256) {
                return Err(FilesError::ChecksumMismatch {
                    declared: hex::encode(declared),
                    actual: hex::encode(sha256),
                });
            }
            Ok(sha256)
        });
        let finished = match checked {
            Ok(sha256) => writer.finish().await.map(|()| sha256).map_err(FilesError::from),
            Err(error) => Err(error),
        };
        match finished {
            Ok(sha256) => Ok((size, sha256)),
            Err(error) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(%key, error = %abort, "cannot abort an upload; the collector will delete it");
                }
                Err(error)
            }
        }
    }

    /// Deletes a new object nobody will use (a failed upload, or a duplicate), unless a commit
    /// that reported failure in fact happened; leftovers are the collector's.
    async fn discard(&self, key: &str) {
        let pending: Result<bool> =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pending_uploads WHERE storage_key = $1)")
                .bind(key)
                .fetch_one(self.store.pool())
                .await
                .map_err(FilesError::from);
        match pending {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                tracing::warn!(%key, %error, "cannot tell whether an upload committed; the collector will decide");
                return;
            }
        }
        if let Err(error) = self.storage.delete(key).await {
            tracing::warn!(%key, %error, "cannot delete an unused object; the collector will");
            return;
        }
        if let Err(error) = self.store.end_upload(key).await {
            tracing::warn!(%key, %error, "cannot forget a deleted upload; the collector will");
        }
    }

    // ---- downloads ----

    /// The bytes of a live file that `range` asks for.
    pub async fn download(&self, file: &FileRow, range: RangeRequest) -> Result<Download> {
        let size = crate::store::to_u64(file.size_bytes);
        let (offset, length) = range.resolve(size)?;
        let key = self.store.storage_key(file).await?;
        let bytes = self.storage.read(&key, offset, length).await?;
        Ok(Download { offset, length, bytes })
    }

    /// A link that downloads `file` until `ttl` from now: presigned by the object store where
    /// it can, otherwise a gateway link signed here.
    pub async fn download_link(&self, file: &FileRow, ttl: Duration) -> Result<DownloadLink> {
        let expires_at = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::zero());
        let key = self.store.storage_key(file).await?;
        if let Some(url) = self.storage.presign(&key, &file.safe_name, ttl).await? {
            return Ok(DownloadLink { url, token: None, expires_at });
        }
        let token = self.signer.sign(file.id, expires_at);
        Ok(DownloadLink { url: signing::signed_path(&token), token: Some(token), expires_at })
    }

    /// The live file a gateway link's token grants.
    pub async fn file_of_link(&self, token: &str) -> Result<FileRow> {
        let granted = self.signer.verify(token, Utc::now())?;
        self.live_file_cached(granted.file_id).await?.ok_or(FilesError::LinkInvalid)
    }

    // ---- live files ----

    /// A live file, for reads: from the cache, else from the primary (see the module docs for
    /// how stale it may be). Downloads may use it too: what they need of the row (project,
    /// SHA-256, size) never changes while a file id is live, and the object's key is read from
    /// `blobs` afresh. Changes read the primary with [`Store::live_file`] instead.
    ///
    /// An id that is no live file is cached as absent for `negative_ttl` (5 s); that never hides
    /// a new upload: file ids are fresh UUIDs made here at commit, and the row is inserted live
    /// in the transaction that makes it visible (no row is ever "uploading", none is revived),
    /// so nobody can have asked for an id before its file exists.
    pub async fn live_file_cached(&self, id: Uuid) -> Result<Option<FileRow>> {
        // The primary, never a read replica: what this loads fills the cache every replica
        // shares, and a replica still behind a change that was just invalidated would put the
        // old row back for everyone until its TTL.
        let primary = self.store.clone();
        let cached = self
            .live_files
            .get_or_load(&id.to_string(), || async move { primary.live_file(id).await.map_err(ServiceError::from) })
            .await?;
        Ok(cached.map(Arc::unwrap_or_clone))
    }

    /// Renames a live file and/or sets its metadata; see [`Store::update`].
    pub async fn update_file(
        &self,
        id: Uuid,
        name: Option<&FileName>,
        metadata: Option<&serde_json::Value>,
    ) -> Result<FileRow> {
        let updated = self.store.update(id, name, metadata).await;
        // Whatever the answer: a commit whose reply was lost may still have happened.
        self.forget(&[id]).await;
        updated
    }

    /// Soft-deletes a live file of `project_id`; see [`Store::delete`].
    pub async fn delete_file(&self, project_id: Uuid, id: Uuid) -> Result<FileRow> {
        let deleted = self.store.delete(project_id, id).await;
        // Whatever the answer, as after an update.
        self.forget(&[id]).await;
        deleted
    }

    /// Links files to a session; see [`Store::attach`].
    pub async fn attach(&self, project_id: Uuid, session_id: Uuid, file_ids: &[Uuid]) -> Result<()> {
        let linked = self.store.attach(project_id, session_id, file_ids).await?;
        self.forget(&linked).await;
        Ok(())
    }

    /// Drops a session's links and deletes the attachments it alone held; returns how many
    /// were deleted. See [`Store::release_session`].
    pub async fn release_session(&self, project_id: Uuid, session_id: Uuid) -> Result<usize> {
        let ReleasedSession { unlinked, deleted } = self.store.release_session(project_id, session_id).await?;
        self.forget(&unlinked).await;
        Ok(deleted)
    }

    /// Drops the cached rows of `ids` on every replica, after a committed change. A failure
    /// (Redis unreachable) only lengthens staleness to the bound in the module docs, and the
    /// change itself is committed, so it is logged, not returned.
    async fn forget(&self, ids: &[Uuid]) {
        futures::stream::iter(ids)
            .for_each_concurrent(INVALIDATIONS_IN_FLIGHT, |id| async move {
                self.live_files.invalidate_or_log(&id.to_string()).await;
            })
            .await;
    }

    // ---- retention ----

    /// Deletes the files past their project's retention under `policies`, a batch at a time,
    /// until none is left or `stop` says so; returns how many went. Their objects go by the
    /// garbage collector, as after DeleteFile.
    pub async fn delete_past_retention(
        &self,
        policies: &aimesh_kit::data::retention::Policies,
        stop: impl Fn() -> bool,
    ) -> Result<u64> {
        let mut deleted = 0u64;
        if policies.keeps_everything() {
            return Ok(0);
        }
        loop {
            let due = self.store.past_retention(policies, GC_BATCH).await?;
            let mut by_project: std::collections::BTreeMap<Uuid, Vec<Uuid>> = std::collections::BTreeMap::new();
            for (project_id, id) in &due {
                by_project.entry(*project_id).or_default().push(*id);
            }
            let mut went = 0;
            for (project_id, ids) in by_project {
                let deleted = self.store.delete_for_retention(project_id, &ids).await?;
                self.forget(&deleted).await;
                went += deleted.len();
            }
            deleted += went as u64;
            // A batch none of which went (all attached meanwhile) would come back: stop there.
            if (due.len() as i64) < GC_BATCH || went == 0 || stop() {
                break;
            }
        }
        Ok(deleted)
    }

    // ---- garbage collection ----

    /// Deletes the objects no live file has used for the grace period, and those of uploads
    /// abandoned by a crashed process. Safe beside uploads of the same content: an object is
    /// deleted only while its row is locked with no reference, and a commit that would revive
    /// it waits for that lock and then records a fresh object instead.
    pub async fn collect_garbage(&self) -> Result<Collected> {
        let mut collected = Collected::default();
        let grace = chrono::Duration::from_std(self.gc.grace).unwrap_or(chrono::Duration::zero());
        loop {
            let mut tx = self.store.pool().begin().await?;
            let orphans = Store::lock_orphans(&mut tx, grace, GC_BATCH).await?;
            for orphan in &orphans {
                self.storage.delete(&orphan.storage_key).await?;
            }
            Store::forget_orphans(&mut tx, &orphans).await?;
            tx.commit().await?;
            collected.objects += orphans.len();
            if (orphans.len() as i64) < GC_BATCH {
                break;
            }
        }
        let stale = Utc::now() - chrono::Duration::from_std(self.gc.stale_upload).unwrap_or(chrono::Duration::zero());
        loop {
            let mut tx = self.store.pool().begin().await?;
            let keys = Store::lock_stale_uploads(&mut tx, stale, GC_BATCH).await?;
            for key in &keys {
                self.storage.delete(key).await?;
            }
            Store::forget_uploads(&mut tx, &keys).await?;
            tx.commit().await?;
            collected.abandoned_uploads += keys.len();
            if (keys.len() as i64) < GC_BATCH {
                break;
            }
        }
        Ok(collected)
    }
}

async fn write(writer: &mut ObjectWriter, chunk: Bytes) -> Result<()> {
    writer.write(chunk).await.map_err(FilesError::from)
}
