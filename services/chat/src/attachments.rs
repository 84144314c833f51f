//! Files attached to messages. The files service owns them; chat only keeps their ids. It plugs
//! in here: `check` before a message that names files is stored (which also links them to the
//! session), `release` before a session is purged, so deleting a session leaves no orphaned
//! files.

use std::time::Duration;

use futures::future::BoxFuture;
use tonic::transport::Channel;
use uuid::Uuid;

use aimesh_kit::auth::ServiceToken;
use aimesh_kit::{ErrorCode, ServiceError};
use aimesh_proto::files::v1 as pb;

use crate::error::{ChatError, Result};

/// What chat asks of the files service.
pub trait Attachments: Send + Sync + 'static {
    /// Refuses unless every file exists, belongs to `project_id` and may be attached; then
    /// links them to the session.
    fn check<'a>(&'a self, project_id: Uuid, session_id: Uuid, file_ids: &'a [Uuid]) -> BoxFuture<'a, Result<()>>;

    /// Tells the files service the session no longer references these files. Must be
    /// idempotent: a purge that fails after it runs it again.
    fn release<'a>(&'a self, project_id: Uuid, session_id: Uuid, file_ids: &'a [Uuid]) -> BoxFuture<'a, Result<()>>;
}

/// What chat uses without a files service: it refuses every attachment (so none can be
/// orphaned) and has nothing to release.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFilesService;

impl Attachments for NoFilesService {
    fn check<'a>(&'a self, _project_id: Uuid, _session_id: Uuid, file_ids: &'a [Uuid]) -> BoxFuture<'a, Result<()>> {
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

/// The files service's internal `AttachmentService`, called with the deployment's service token.
#[derive(Debug, Clone)]
pub struct FilesService {
    client: pb::attachment_service_client::AttachmentServiceClient<Channel>,
    token: ServiceToken,
}

impl FilesService {
    /// A lazily connecting client of the files service at `url` (`services.files`).
    pub fn connect(url: &str, token: ServiceToken) -> Result<Self, ServiceError> {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| ServiceError::internal(format!("services.files: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        Ok(Self { client: pb::attachment_service_client::AttachmentServiceClient::new(channel), token })
    }

    fn request<T>(&self, message: T) -> Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        self.token.authorize(&mut request)?;
        aimesh_kit::telemetry::inject_current_context(request.metadata_mut());
        Ok(request)
    }
}

/// The files service's refusal as chat's: a file it does not know is the message's field.
fn files_error(status: &tonic::Status) -> ChatError {
    let error = ServiceError::from_status(status);
    match error.code {
        ErrorCode::NotFound | ErrorCode::InvalidArgument => {
            ChatError::Service(ServiceError { field: Some("attachment_ids".into()), ..error })
        }
        ErrorCode::Unavailable | ErrorCode::DeadlineExceeded => {
            ChatError::Service(ServiceError::unavailable(format!("files service: {}", status.message())))
        }
        _ => ChatError::Service(error),
    }
}

impl Attachments for FilesService {
    fn check<'a>(&'a self, project_id: Uuid, session_id: Uuid, file_ids: &'a [Uuid]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let request = self.request(pb::AttachFilesRequest {
                project_id: project_id.to_string(),
                session_id: session_id.to_string(),
                file_ids: file_ids.iter().map(Uuid::to_string).collect(),
            })?;
            self.client.clone().attach_files(request).await.map_err(|status| files_error(&status))?;
            Ok(())
        })
    }

    fn release<'a>(&'a self, project_id: Uuid, session_id: Uuid, _file_ids: &'a [Uuid]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // Files releases every link of the session, whichever messages named them.
            let request = self.request(pb::ReleaseSessionRequest {
                project_id: project_id.to_string(),
                session_id: session_id.to_string(),
            })?;
            let released = self.client.clone().release_session(request).await.map_err(|status| files_error(&status))?;
            tracing::debug!(%project_id, %session_id, deleted_files = released.into_inner().deleted_files, "released a session's attachments");
            Ok(())
        })
    }
}
