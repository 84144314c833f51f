//! Server streams: watching a session, exporting a session or a project. Each runs in a task of
//! its own that stops when the client goes away or the server shuts down.

use std::future::Future;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use aimesh_kit::auth::{Caller, ProjectRole};
use aimesh_kit::wire::fields;
use aimesh_proto::chat::v1 as pb;

use super::{CHAT_READ, Chat, Deleted, Need, ResponseStream, message_to_proto};
use crate::error::{ChatError, Result};
use crate::export::{self, ChunkWriter, Format, Stopped};

/// Messages or chunks buffered per stream ahead of a slow client.
const STREAM_BUFFER: usize = 16;

impl Chat {
    pub(super) async fn watch_session(
        &self,
        caller: &Caller,
        request: pb::WatchSessionRequest,
    ) -> Result<ResponseStream<pb::Message>> {
        let session_id = fields::id("session_id", &request.session_id)?;
        if request.after_sequence < 0 {
            return Err(ChatError::invalid("after_sequence", "must not be negative"));
        }
        self.session_for(caller, session_id, Need::Read, Deleted::NotFound).await?;
        let mut watch = self.conversations.watch(session_id, request.after_sequence).await?;
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => {
                        // Ending quietly would read as "no more messages"; clients must reconnect.
                        let _ = sender.send(Err(Status::unavailable("the server is shutting down"))).await;
                        break;
                    }
                    () = sender.closed() => break,
                    next = watch.next() => next,
                };
                let item = next.and_then(message_to_proto).map_err(Status::from);
                let failed = item.is_err();
                if sender.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }

    pub(super) async fn export_session(
        &self,
        caller: &Caller,
        request: pb::ExportSessionRequest,
    ) -> Result<ResponseStream<pb::ExportChunk>> {
        let session_id = fields::id("session_id", &request.session_id)?;
        let format = match pb::ExportFormat::try_from(request.format) {
            Ok(pb::ExportFormat::Json) => Format::Json,
            Ok(pb::ExportFormat::Markdown) => Format::Markdown,
            _ => return Err(ChatError::invalid("format", "must be one of: json, markdown")),
        };
        self.session_for(caller, session_id, Need::Read, Deleted::NotFound).await?;
        let session = self.conversations.live_session(session_id).await?;
        let store = self.conversations.store().clone();
        let file_name = format!("{session_id}.{}", format.extension());
        Ok(stream_chunks(format.content_type(), file_name, self.shutdown.clone(), move |writer| async move {
            export::export_session(&store, &session, format, writer).await
        }))
    }

    pub(super) async fn export_project(
        &self,
        caller: &Caller,
        request: pb::ExportProjectRequest,
    ) -> Result<ResponseStream<pb::ExportChunk>> {
        let project_id = fields::id("project_id", &request.project_id)?;
        self.require(caller, project_id, ProjectRole::Admin, CHAT_READ).await?;
        let store = self.conversations.store().clone();
        Ok(stream_chunks(
            "application/x-tar",
            format!("{project_id}.tar"),
            self.shutdown.clone(),
            move |writer| async move { export::export_project(&store, project_id, writer).await },
        ))
    }
}

/// Runs `export` in a task and streams what it writes as `ExportChunk`s, the first carrying the
/// content type and file name. A failure part way ends the stream with the error after the
/// bytes written before it, so the client knows the file is incomplete.
fn stream_chunks<F, Fut>(
    content_type: &'static str,
    file_name: String,
    shutdown: CancellationToken,
    export: F,
) -> ResponseStream<pb::ExportChunk>
where
    F: FnOnce(ChunkWriter) -> Fut,
    Fut: Future<Output = Result<(), Stopped>> + Send + 'static,
{
    let (bytes_sender, mut bytes) = mpsc::channel::<Vec<u8>>(2);
    let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
    let export = export(ChunkWriter::new(bytes_sender));
    tokio::spawn(async move {
        tokio::pin!(export);
        let mut header = Some((content_type.to_owned(), file_name));
        let mut failure: Option<ChatError> = None;
        let mut exporting = true;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    let _ = sender.send(Err(Status::unavailable("the server is shutting down"))).await;
                    break;
                }
                () = sender.closed() => break,
                result = &mut export, if exporting => {
                    exporting = false;
                    if let Err(Stopped::Failed(error)) = result {
                        failure = Some(error);
                    }
                }
                chunk = bytes.recv() => match chunk {
                    Some(data) => {
                        let (content_type, file_name) = header.take().unwrap_or_default();
                        if sender.send(Ok(pb::ExportChunk { data, content_type, file_name })).await.is_err() {
                            break;
                        }
                    }
                    // Every byte is out: the export is done (its writer is dropped).
                    None => {
                        if let Some(error) = failure.take() {
                            let _ = sender.send(Err(Status::from(error))).await;
                        } else if let Some((content_type, file_name)) = header.take() {
                            // An empty document still tells its type and name.
                            let _ = sender.send(Ok(pb::ExportChunk { data: Vec::new(), content_type, file_name })).await;
                        }
                        break;
                    }
                },
            }
        }
    });
    Box::pin(ReceiverStream::new(receiver))
}
