//! `AttachmentService`: internal, for chat; only the service token may call it.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use aimesh_kit::wire::error::respond;
use aimesh_kit::wire::fields;
use aimesh_proto::files::v1 as pb;

use super::Files;
use crate::error::{FilesError, Result};

/// Most files attached in one call.
const MAX_FILES: usize = 256;

pub(super) struct AttachmentApi(pub(super) Arc<Files>);

impl Files {
    async fn attach_files(&self, request: pb::AttachFilesRequest) -> Result<pb::AttachFilesResponse> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let session_id = fields::id("session_id", &request.session_id)?;
        if request.file_ids.len() > MAX_FILES {
            return Err(FilesError::invalid("file_ids", format!("at most {MAX_FILES} files")));
        }
        let mut file_ids =
            request.file_ids.iter().map(|id| fields::id("file_ids", id)).collect::<Result<Vec<Uuid>, _>>()?;
        file_ids.sort_unstable();
        file_ids.dedup();
        if !file_ids.is_empty() {
            self.library.attach(project_id, session_id, &file_ids).await?;
        }
        Ok(pb::AttachFilesResponse {})
    }

    async fn release_session(&self, request: pb::ReleaseSessionRequest) -> Result<pb::ReleaseSessionResponse> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let session_id = fields::id("session_id", &request.session_id)?;
        let deleted = self.library.release_session(project_id, session_id).await?;
        Ok(pb::ReleaseSessionResponse { deleted_files: deleted as i64 })
    }
}

#[tonic::async_trait]
impl pb::attachment_service_server::AttachmentService for AttachmentApi {
    async fn attach_files(
        &self,
        request: Request<pb::AttachFilesRequest>,
    ) -> Result<Response<pb::AttachFilesResponse>, Status> {
        aimesh_kit::auth::require_internal(&request)?;
        respond(self.0.attach_files(request.into_inner()).await)
    }

    async fn release_session(
        &self,
        request: Request<pb::ReleaseSessionRequest>,
    ) -> Result<Response<pb::ReleaseSessionResponse>, Status> {
        aimesh_kit::auth::require_internal(&request)?;
        respond(self.0.release_session(request.into_inner()).await)
    }
}
