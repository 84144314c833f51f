//! The files domain: uploads streamed into the object store and recorded in one transaction,
//! downloads by range, download links, attachments and garbage collection. Access checks are
//! the API's; everything here trusts its caller.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::FilesConfig;
use crate::domain::{self, FileName, Purpose, RangeRequest, SNIFF_BYTES};
use crate::error::{FilesError, Result};
use crate::signing::{self, UrlSigner};
use crate::storage::{ObjectStorage, ObjectWriter};
use crate::store::{Committed, FileRow, NewFile, Store};

/// Objects deleted per transaction of the collector.
const GC_BATCH: i64 = 100;
/// Longest validity of a download link.
pub const MAX_LINK_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Validity of a download link when the request names none.
pub const DEFAULT_LINK_TTL: Duration = Duration::from_secs(15 * 60);

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
}

impl Library {
    pub fn new(store: Store, storage: ObjectStorage, signer: UrlSigner, limits: Limits, gc: GcSettings) -> Self {
        Self { store, storage, signer, limits, gc }
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
        self.store.live_file(granted.file_id).await?.ok_or(FilesError::LinkInvalid)
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
                went += self.store.delete_for_retention(project_id, &ids).await?;
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
