//! `FileService`: uploads, downloads, links, metadata.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, future, stream};
use tonic::{Request, Response, Status, Streaming};

use aimesh_kit::ServiceError;
use aimesh_kit::auth::{Caller, ProjectRole};
use aimesh_kit::wire::error::respond;
use aimesh_kit::wire::pagination::{Cursor, Page};
use aimesh_kit::wire::{fields, proto_json};
use aimesh_proto::files::v1 as pb;

use super::{FILES_READ, FILES_WRITE, Files, ResponseStream, file_to_proto, purpose_from_proto};
use crate::domain::{self, FileName, Purpose, RangeRequest};
use crate::error::{FilesError, Result};
use crate::library::{DEFAULT_LINK_TTL, MAX_LINK_TTL, NewUpload};
use crate::store::ListFilter;

/// Most metadata of a file, as JSON bytes.
const MAX_METADATA_BYTES: usize = 16 * 1024;

impl Files {
    async fn upload<S>(&self, caller: &Caller, mut messages: S) -> Result<pb::File>
    where
        S: Stream<Item = Result<pb::UploadRequest, Status>> + Unpin + Send,
    {
        let (metadata, finished) = match messages.next().await {
            Some(Ok(pb::UploadRequest { part: Some(pb::upload_request::Part::Metadata(metadata)), finish })) => {
                (metadata, finish)
            }
            Some(Err(status)) => return Err(ServiceError::from_status(&status).into()),
            _ => return Err(FilesError::invalid("metadata", "the first message must carry the metadata")),
        };
        let upload = parse_upload(&metadata)?;
        self.library.check_type(&upload.mime_type)?;
        self.require(caller, upload.project_id, ProjectRole::Member, FILES_WRITE).await?;
        let finished = Arc::new(AtomicBool::new(finished));
        let seen = Arc::clone(&finished);
        let chunks = messages.map(move |message| {
            let message = message.map_err(|status| FilesError::from(ServiceError::from_status(&status)))?;
            if seen.swap(message.finish, Ordering::SeqCst) {
                return Err(FilesError::invalid("finish", "no message may follow the one that finishes the upload"));
            }
            match message.part {
                Some(pb::upload_request::Part::Chunk(chunk)) => Ok(chunk),
                None => Ok(Bytes::new()),
                Some(pb::upload_request::Part::Metadata(_)) => {
                    Err(FilesError::invalid("chunk", "only the first message carries metadata"))
                }
            }
        });
        // A stream that simply stops is a client gone mid-way, not a complete file.
        let end = stream::once(async move {
            (!finished.load(Ordering::SeqCst))
                .then(|| Err(FilesError::invalid("finish", "the stream ended before the upload was finished")))
        })
        .filter_map(future::ready);
        let chunks = Box::pin(chunks.chain(end));
        let committed = self.library.upload(caller.principal.user_id, upload, chunks).await?;
        Ok(file_to_proto(committed.file))
    }

    async fn create_download_url(
        &self,
        caller: &Caller,
        request: pb::CreateDownloadUrlRequest,
    ) -> Result<pb::DownloadUrl> {
        let file_id = fields::id("file_id", &request.file_id)?;
        let ttl = match u64::try_from(request.expires_in_seconds) {
            Ok(0) => DEFAULT_LINK_TTL,
            Ok(seconds) if Duration::from_secs(seconds) <= MAX_LINK_TTL => Duration::from_secs(seconds),
            _ => return Err(FilesError::invalid("expires_in_seconds", "must be between 1 and 604800 (7 days)")),
        };
        let file = self.readable_file(caller, file_id).await?;
        let link = self.library.download_link(&file, ttl).await?;
        Ok(pb::DownloadUrl {
            url: link.url,
            token: link.token.unwrap_or_default(),
            expire_time: Some(proto_json::timestamp(link.expires_at)),
        })
    }

    async fn list_files(&self, caller: &Caller, request: pb::ListFilesRequest) -> Result<pb::ListFilesResponse> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let page = Page::new(&request.page_token, request.page_size)?;
        let mut filter = ListFilter {
            user_id: fields::optional_id("user_id", &request.user_id)?,
            session_id: fields::optional_id("session_id", &request.session_id)?,
            purpose: purpose_from_proto("purpose", request.purpose)?.map(Purpose::as_str),
            ..ListFilter::default()
        };
        if !request.mime_type.is_empty() {
            match request.mime_type.strip_suffix("/*") {
                Some(family) => filter.family = Some(family.to_ascii_lowercase()),
                None => filter.mime_type = Some(domain::mime_type("mime_type", &request.mime_type)?),
            }
        }
        self.require(caller, project_id, ProjectRole::Viewer, FILES_READ).await?;
        let rows = self.reader(caller).await.list(project_id, &filter, &page).await?;
        let (rows, next_page_token) = page.finish(rows, |row| Cursor { time: row.created_at, id: row.id });
        Ok(pb::ListFilesResponse { files: rows.into_iter().map(file_to_proto).collect(), next_page_token })
    }

    async fn update_file(&self, caller: &Caller, request: pb::UpdateFileRequest) -> Result<pb::File> {
        let file_id = fields::id("file_id", &request.file_id)?;
        let paths = fields::mask_paths(request.update_mask.as_ref(), &["display_name", "metadata"])?;
        let changes = request.file.unwrap_or_default();
        let name = if paths.iter().any(|p| p == "display_name") {
            Some(FileName::parse("file.display_name", &changes.display_name)?)
        } else {
            None
        };
        let metadata = if paths.iter().any(|p| p == "metadata") {
            Some(metadata_json("file.metadata", changes.metadata.as_ref())?)
        } else {
            None
        };
        self.writable_file(caller, file_id).await?;
        let row = self.library.update_file(file_id, name.as_ref(), metadata.as_ref()).await?;
        Ok(file_to_proto(row))
    }

    async fn delete_file(&self, caller: &Caller, request: pb::DeleteFileRequest) -> Result<pb::File> {
        let file_id = fields::id("file_id", &request.file_id)?;
        let file = self.writable_file(caller, file_id).await?;
        Ok(file_to_proto(self.library.delete_file(file.project_id, file_id).await?))
    }

    async fn storage_usage(&self, caller: &Caller, request: pb::GetStorageUsageRequest) -> Result<pb::StorageUsage> {
        let project_id = fields::id("project_id", &request.project_id)?;
        self.require(caller, project_id, ProjectRole::Viewer, FILES_READ).await?;
        let usage = self.reader(caller).await.storage_usage(project_id).await?;
        Ok(pb::StorageUsage {
            project_id: project_id.to_string(),
            used_bytes: usage.used_bytes,
            quota_bytes: crate::store::to_i64(self.library.limits().project_quota_bytes),
            file_count: usage.file_count,
            stored_bytes: usage.stored_bytes,
        })
    }
}

/// The metadata message of an upload, validated.
fn parse_upload(metadata: &pb::UploadMetadata) -> Result<NewUpload> {
    Ok(NewUpload {
        project_id: fields::id("project_id", &metadata.project_id)?,
        name: FileName::parse("name", &metadata.name)?,
        mime_type: domain::mime_type("mime_type", &metadata.mime_type)?,
        declared_size: match metadata.size_bytes {
            0 => None,
            size => Some(u64::try_from(size).map_err(|_| FilesError::invalid("size_bytes", "must not be negative"))?),
        },
        declared_sha256: domain::sha256("sha256", &metadata.sha256)?,
        purpose: purpose_from_proto("purpose", metadata.purpose)?.unwrap_or(Purpose::Library),
        metadata: metadata_json("metadata", metadata.metadata.as_ref())?,
    })
}

fn metadata_json(field: &'static str, value: Option<&prost_types::Struct>) -> Result<serde_json::Value> {
    let json = value.map_or_else(|| serde_json::json!({}), proto_json::struct_to_json);
    if json.to_string().len() > MAX_METADATA_BYTES {
        return Err(FilesError::invalid(field, format!("must be at most {MAX_METADATA_BYTES} bytes as JSON")));
    }
    Ok(json)
}

fn range_of(offset: i64, length: i64, suffix_length: i64) -> Result<RangeRequest> {
    RangeRequest::parse(offset, length, suffix_length)
}

pub(super) struct FileApi(pub(super) Arc<Files>);

#[tonic::async_trait]
impl pb::file_service_server::FileService for FileApi {
    async fn upload(&self, request: Request<Streaming<pb::UploadRequest>>) -> Result<Response<pb::File>, Status> {
        let caller = Caller::of(&request)?;
        let files = Arc::clone(&self.0);
        let messages = request.into_inner();
        // A task of its own: when the client goes away this handler is dropped, but the upload
        // still runs to its end (the stream fails) and deletes what it wrote.
        let upload = tokio::spawn(async move { files.upload(&caller, messages).await });
        match upload.await {
            Ok(result) => respond(result),
            Err(error) => Err(ServiceError::internal(format!("upload task failed: {error}")).into()),
        }
    }

    type DownloadStream = ResponseStream<pb::DownloadResponse>;

    async fn download(&self, request: Request<pb::DownloadRequest>) -> Result<Response<Self::DownloadStream>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        let result = async {
            let file_id = fields::id("file_id", &request.file_id)?;
            let range = range_of(request.offset, request.length, request.suffix_length)?;
            let file = self.0.readable_file(&caller, file_id).await?;
            self.0.stream_download(file, range).await
        }
        .await;
        respond(result)
    }

    async fn create_download_url(
        &self,
        request: Request<pb::CreateDownloadUrlRequest>,
    ) -> Result<Response<pb::DownloadUrl>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.create_download_url(&caller, request.into_inner()).await)
    }

    type DownloadSignedStream = ResponseStream<pb::DownloadResponse>;

    async fn download_signed(
        &self,
        request: Request<pb::DownloadSignedRequest>,
    ) -> Result<Response<Self::DownloadSignedStream>, Status> {
        let request = request.into_inner();
        let result = async {
            let range = range_of(request.offset, request.length, request.suffix_length)?;
            let file = self.0.library.file_of_link(&request.token).await?;
            self.0.stream_download(file, range).await
        }
        .await;
        respond(result)
    }

    async fn get_file(&self, request: Request<pb::GetFileRequest>) -> Result<Response<pb::File>, Status> {
        let caller = Caller::of(&request)?;
        let result = async {
            let file_id = fields::id("file_id", &request.get_ref().file_id)?;
            Ok(file_to_proto(self.0.readable_file(&caller, file_id).await?))
        }
        .await;
        respond::<_, FilesError>(result)
    }

    async fn list_files(
        &self,
        request: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.list_files(&caller, request.into_inner()).await)
    }

    async fn update_file(&self, request: Request<pb::UpdateFileRequest>) -> Result<Response<pb::File>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.update_file(&caller, request.into_inner()).await)
    }

    async fn delete_file(&self, request: Request<pb::DeleteFileRequest>) -> Result<Response<pb::File>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.delete_file(&caller, request.into_inner()).await)
    }

    async fn get_storage_usage(
        &self,
        request: Request<pb::GetStorageUsageRequest>,
    ) -> Result<Response<pb::StorageUsage>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.storage_usage(&caller, request.into_inner()).await)
    }
}
