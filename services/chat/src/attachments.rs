//! Files attached to messages. The files service owns them (issue 7); chat only keeps their ids.
//! It plugs in here: `check` before a message that names files is stored, `release` before a
//! session is purged, so deleting a session leaves no orphaned files.

use futures::future::BoxFuture;
use uuid::Uuid;

use crate::error::{ChatError, Result};

/// What chat asks of the files service.
pub trait Attachments: Send + Sync + 'static {
    /// Refuses unless every file exists, belongs to `project_id` and may be attached.
    fn check<'a>(&'a self, project_id: Uuid, file_ids: &'a [Uuid]) -> BoxFuture<'a, Result<()>>;

    /// Tells the files service the session no longer references these files. Must be
    /// idempotent: a purge that fails after it runs it again.
    fn release<'a>(&'a self, project_id: Uuid, session_id: Uuid, file_ids: &'a [Uuid]) -> BoxFuture<'a, Result<()>>;
}

/// What chat uses until the files service exists: it refuses every attachment (so none can be
/// orphaned) and has nothing to release.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFilesService;

impl Attachments for NoFilesService {
    fn check<'a>(&'a self, _project_id: Uuid, file_ids: &'a [Uuid]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { if file_ids.is_empty() { Ok(()) } else { Err(ChatError::FilesUnavailable) } })
    }

    fn release<'a>(&'a self, project_id: Uuid, session_id: Uuid, file_ids: &'a [Uuid]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if file_ids.is_empty() {
                tracing::debug!(%project_id, %session_id, "purged session had no attachments");
            } else {
                // Unreachable while `check` refuses every file; logged loudly in case it is not.
                tracing::warn!(%project_id, %session_id, files = file_ids.len(), "no files service to release attachments");
            }
            Ok(())
        })
    }
}
