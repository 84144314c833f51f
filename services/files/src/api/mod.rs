//! The gRPC edge of files. A handler decodes and validates, authorizes, calls the
//! [`Library`], and encodes. `FileService` is public (through the gateway too);
//! `AttachmentService` is internal, for chat, and takes only the service token.
//!
//! Access: a request naming a file loads it and checks the caller's role in its project. A file
//! that is missing, deleted or in a project the caller cannot read is NOT_FOUND
//! (`FILE_NOT_FOUND`) alike, so ids cannot be probed.

mod attachments;
mod files;

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use tonic::Status;
use uuid::Uuid;

use aimesh_kit::ErrorCode;
use aimesh_kit::auth::CredentialRef;
use aimesh_kit::auth::{Access, Caller, ProjectAccess, ProjectRole};
use aimesh_kit::wire::proto_json;
use aimesh_proto::files::v1 as pb;

use crate::domain::{Purpose, RangeRequest};
use crate::error::{FilesError, Result};
use crate::library::Library;
use crate::store::{FileRow, Store};

/// The scope an API key needs to read a project's files.
const FILES_READ: &str = "files:read";
/// The scope an API key needs to upload, change and delete them.
const FILES_WRITE: &str = "files:write";
/// Largest chunk of a download message (gRPC's default message limit is 4 MiB).
const DOWNLOAD_CHUNK: usize = 1024 * 1024;

/// What every handler of files works with.
#[derive(Debug)]
pub struct Files {
    library: Library,
    access: ProjectAccess,
}

impl Files {
    pub fn new(library: Library, access: ProjectAccess) -> Arc<Self> {
        Arc::new(Self { library, access })
    }

    /// Every gRPC service of files, ready for the server.
    pub fn routes(self: &Arc<Self>) -> tonic::service::Routes {
        tonic::service::Routes::new(pb::file_service_server::FileServiceServer::new(files::FileApi(Arc::clone(self))))
            .add_service(pb::attachment_service_server::AttachmentServiceServer::new(attachments::AttachmentApi(
                Arc::clone(self),
            )))
    }

    /// The fully qualified names of those services, for grpc.health.v1.
    pub const GRPC_SERVICES: [&'static str; 2] = ["aimesh.files.v1.FileService", "aimesh.files.v1.AttachmentService"];

    /// The live file `id` if `caller` may read it, from the cache of live files; see the
    /// module docs.
    async fn readable_file(&self, caller: &Caller, id: Uuid) -> Result<FileRow> {
        self.file_for(caller, id, false).await
    }

    /// The live file `id` if `caller` may change it: its uploader (at least a member), a
    /// project admin, or an API key with files:write.
    async fn writable_file(&self, caller: &Caller, id: Uuid) -> Result<FileRow> {
        self.file_for(caller, id, true).await
    }

    /// The store as a read-only request of `caller` reads it: from a replica that has replayed
    /// the caller's own writes, or from the primary.
    async fn reader(&self, caller: &Caller) -> Store {
        self.library.store().reading_for(caller.principal.user_id).await
    }

    async fn file_for(&self, caller: &Caller, id: Uuid, write: bool) -> Result<FileRow> {
        // A change reads what it changes from the primary, past the cache.
        let file =
            if write { self.library.store().live_file(id).await? } else { self.library.live_file_cached(id).await? };
        let file = file.ok_or(FilesError::FileNotFound { field: "file_id" })?;
        let scope = if write { FILES_WRITE } else { FILES_READ };
        let access = match self.access.require(caller, file.project_id, ProjectRole::Viewer, scope).await {
            Ok(access) => access,
            // A key of this very project lacking the scope knows the project; anyone else must
            // not learn the file exists.
            Err(error) if error.code == ErrorCode::PermissionDenied && !is_key_of(caller, file.project_id) => {
                return Err(FilesError::FileNotFound { field: "file_id" });
            }
            Err(error) => return Err(error.into()),
        };
        let allowed = match access {
            Access::ApiKey => true,
            Access::Member(_) if !write => true,
            Access::Member(role) => {
                role >= ProjectRole::Admin || (role >= ProjectRole::Member && file.user_id == caller.principal.user_id)
            }
        };
        if !allowed {
            return Err(FilesError::forbidden("only the file's uploader or a project admin may change it"));
        }
        Ok(file)
    }

    /// Refuses a caller without `needed` in the project (or an API key of it without `scope`).
    async fn require(&self, caller: &Caller, project_id: Uuid, needed: ProjectRole, scope: &str) -> Result<()> {
        self.access.require(caller, project_id, needed, scope).await?;
        Ok(())
    }

    /// A download's messages: the header, then the bytes in chunks of at most 1 MiB.
    async fn stream_download(
        &self,
        file: FileRow,
        range: RangeRequest,
    ) -> Result<ResponseStream<pb::DownloadResponse>> {
        let download = self.library.download(&file, range).await?;
        let header = pb::DownloadResponse {
            part: Some(pb::download_response::Part::Header(pb::DownloadHeader {
                file: Some(file_to_proto(file)),
                offset: crate::store::to_i64(download.offset),
                length: crate::store::to_i64(download.length),
            })),
        };
        let chunks = download.bytes.flat_map(|item| {
            let messages: Vec<Result<pb::DownloadResponse, Status>> = match item {
                Ok(bytes) => split(bytes)
                    .map(|chunk| Ok(pb::DownloadResponse { part: Some(pb::download_response::Part::Chunk(chunk)) }))
                    .collect(),
                Err(error) => vec![Err(Status::from(FilesError::from(error)))],
            };
            stream::iter(messages)
        });
        Ok(Box::pin(stream::once(async { Ok(header) }).chain(chunks)))
    }
}

/// `bytes` in pieces of at most [`DOWNLOAD_CHUNK`], without copying.
fn split(mut bytes: Bytes) -> impl Iterator<Item = Bytes> {
    std::iter::from_fn(
        move || {
            if bytes.is_empty() { None } else { Some(bytes.split_to(bytes.len().min(DOWNLOAD_CHUNK))) }
        },
    )
}

fn is_key_of(caller: &Caller, project: Uuid) -> bool {
    matches!(caller.principal.credential, CredentialRef::ApiKey { project_id, .. } if project_id == project)
}

fn purpose_to_proto(purpose: Purpose) -> pb::FilePurpose {
    match purpose {
        Purpose::Library => pb::FilePurpose::Library,
        Purpose::Attachment => pb::FilePurpose::Attachment,
    }
}

/// The purpose a request names; unspecified is `None`.
fn purpose_from_proto(field: &'static str, value: i32) -> Result<Option<Purpose>> {
    match pb::FilePurpose::try_from(value) {
        Ok(pb::FilePurpose::Unspecified) => Ok(None),
        Ok(pb::FilePurpose::Library) => Ok(Some(Purpose::Library)),
        Ok(pb::FilePurpose::Attachment) => Ok(Some(Purpose::Attachment)),
        Err(_) => Err(FilesError::invalid(field, "is not a known purpose")),
    }
}

fn file_to_proto(row: FileRow) -> pb::File {
    pb::File {
        id: row.id.to_string(),
        project_id: row.project_id.to_string(),
        user_id: row.user_id.to_string(),
        display_name: row.display_name,
        original_name: row.original_name,
        safe_name: row.safe_name,
        mime_type: row.mime_type,
        size_bytes: row.size_bytes,
        sha256: hex::encode(&row.sha256),
        purpose: purpose_to_proto(Purpose::parse_db(&row.purpose)).into(),
        metadata: proto_json::json_to_struct(&row.metadata),
        session_ids: row.session_ids.iter().map(Uuid::to_string).collect(),
        create_time: Some(proto_json::timestamp(row.created_at)),
        update_time: Some(proto_json::timestamp(row.updated_at)),
        delete_time: proto_json::opt_timestamp(row.deleted_at),
    }
}

/// A server stream of the files API.
type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
