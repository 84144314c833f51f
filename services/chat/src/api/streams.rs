//! Server streams: watching a session, exporting a session or a project. Each runs in a task of
//! its own that stops when the client goes away or the server shuts down.
//!
//! A stream takes one of its caller's stream slots (at most `chat.max_streams_per_principal`
//! per person or API key, across replicas) and, while it runs, re-checks every
//! `chat.stream_recheck_secs` that its caller still may read what it streams (see
//! [`aimesh_kit::auth::StreamAccess`]): a logout, a revoked key, a removal from the project, a
//! demotion below what the stream needs or a deleted session ends it with the error a new call
//! would get (UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND). After
//! `chat.stream_max_lifetime_secs` it ends with UNAVAILABLE (`STREAM_LIFETIME_REACHED`): the
//! client reconnects, a watch with `after_sequence` set to the last sequence it received.
//! Such a final error goes out ahead of anything still buffered for a slow client, so nothing
//! more reaches a caller who lost access.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use uuid::Uuid;

use aimesh_kit::ServiceError;
use aimesh_kit::auth::{Caller, ProjectRole, StreamGuard};
use aimesh_kit::wire::fields;
use aimesh_proto::chat::v1 as pb;

use super::{CHAT_READ, Chat, Deleted, Need, ResponseStream, message_to_proto};
use crate::error::{ChatError, Result};
use crate::export::{self, ChunkWriter, Format, Stopped};

/// Messages or chunks buffered per stream ahead of a slow client.
const STREAM_BUFFER: usize = 16;

/// The items of a stream, as its producing task sends them.
type ItemSender<T> = mpsc::Sender<Result<T, Status>>;

/// What an open stream reads, and so what its caller must still be allowed.
#[derive(Debug, Clone, Copy)]
enum Reach {
    /// A session, as [`Need::Read`]: any role in its project, or a key with chat:read.
    Session(Uuid),
    /// A whole project, as its admin.
    Project(Uuid),
}

impl Chat {
    pub(super) async fn watch_session(
        self: &Arc<Self>,
        caller: &Caller,
        request: pb::WatchSessionRequest,
    ) -> Result<ResponseStream<pb::Message>> {
        let session_id = fields::id("session_id", &request.session_id)?;
        if request.after_sequence < 0 {
            return Err(ChatError::invalid("after_sequence", "must not be negative"));
        }
        self.session_for(caller, session_id, Need::Read, Deleted::NotFound).await?;
        let guard = self.streams.open(caller).await?;
        let mut watch = self.conversations.watch(session_id, request.after_sequence).await?;
        Ok(self.spawn_stream(guard, Reach::Session(session_id), move |sender| async move {
            loop {
                let item = watch.next().await.and_then(message_to_proto).map_err(Status::from);
                let failed = item.is_err();
                if sender.send(item).await.is_err() || failed {
                    break;
                }
            }
        }))
    }

    pub(super) async fn export_session(
        self: &Arc<Self>,
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
        let guard = self.streams.open(caller).await?;
        let store = self.reader(caller).await;
        let session = store.live_session(session_id).await?;
        let file_name = format!("{session_id}.{}", format.extension());
        Ok(self.spawn_stream(guard, Reach::Session(session_id), move |sender| {
            send_chunks(sender, format.content_type(), file_name, move |writer| async move {
                export::export_session(&store, &session, format, writer).await
            })
        }))
    }

    pub(super) async fn export_project(
        self: &Arc<Self>,
        caller: &Caller,
        request: pb::ExportProjectRequest,
    ) -> Result<ResponseStream<pb::ExportChunk>> {
        let project_id = fields::id("project_id", &request.project_id)?;
        self.require(caller, project_id, ProjectRole::Admin, CHAT_READ).await?;
        let guard = self.streams.open(caller).await?;
        let store = self.reader(caller).await;
        Ok(self.spawn_stream(guard, Reach::Project(project_id), move |sender| {
            send_chunks(sender, "application/x-tar", format!("{project_id}.tar"), move |writer| async move {
                export::export_project(&store, project_id, writer).await
            })
        }))
    }

    /// Whether `caller` may still read what an open stream reads. Unlike the first check, a
    /// lost role is PERMISSION_DENIED rather than NOT_FOUND: the caller knew the session, and
    /// learns why its stream ended.
    async fn still_reads(&self, caller: &Caller, reach: Reach) -> Result<()> {
        match reach {
            Reach::Session(session_id) => {
                let session = self
                    .conversations
                    .session_meta(session_id)
                    .await?
                    .filter(|session| !session.is_deleted())
                    .ok_or(ChatError::SessionNotFound)?;
                self.require(caller, session.project_id, ProjectRole::Viewer, CHAT_READ).await
            }
            Reach::Project(project_id) => self.require(caller, project_id, ProjectRole::Admin, CHAT_READ).await,
        }
    }

    /// Runs `produce` (which sends the stream's items) in a task of its own until it is done,
    /// the client goes away, the server shuts down or `guard` says the stream must end; the
    /// last two end the stream with an error. The task holds `guard`, and so the caller's
    /// stream slot, until it stops.
    fn spawn_stream<T, F, Fut>(self: &Arc<Self>, guard: StreamGuard, reach: Reach, produce: F) -> ResponseStream<T>
    where
        T: Send + 'static,
        F: FnOnce(ItemSender<T>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (sender, items) = mpsc::channel(STREAM_BUFFER);
        let (last_sender, last) = oneshot::channel();
        let produce = produce(sender.clone());
        let chat = Arc::clone(self);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let ended = guard.ended(move |caller| {
                let chat = Arc::clone(&chat);
                async move { chat.still_reads(&caller, reach).await.map_err(ServiceError::from) }
            });
            let status = tokio::select! {
                () = produce => return,
                () = sender.closed() => return,
                // Ending quietly would read as "no more messages"; clients must reconnect.
                () = shutdown.cancelled() => Status::unavailable("the server is shutting down"),
                end = ended => Status::from(end.into_error()),
            };
            let _ = last_sender.send(status);
        });
        last_first(items, last)
    }
}

/// The stream of `items`, except that an error given through `last` goes out at once, ahead of
/// anything still buffered, and ends the stream.
fn last_first<T: Send + 'static>(
    items: mpsc::Receiver<Result<T, Status>>,
    last: oneshot::Receiver<Status>,
) -> ResponseStream<T> {
    struct Open<T> {
        items: mpsc::Receiver<Result<T, Status>>,
        /// `None` once the task ended without a final error.
        last: Option<oneshot::Receiver<Status>>,
    }
    let stream = futures::stream::unfold(Some(Open { items, last: Some(last) }), |state| async move {
        let mut open = state?;
        loop {
            let Some(last) = open.last.as_mut() else {
                return open.items.recv().await.map(|item| (item, Some(open)));
            };
            let next = tokio::select! {
                biased;
                status = last => Err(status),
                item = open.items.recv() => Ok(item),
            };
            match next {
                Err(Ok(status)) => return Some((Err(status), None)),
                Err(Err(_)) => open.last = None,
                Ok(item) => return item.map(|item| (item, Some(open))),
            }
        }
    });
    Box::pin(stream)
}

/// Runs `export` and sends what it writes as `ExportChunk`s, the first carrying the content
/// type and file name. A failure part way ends the stream with the error after the bytes
/// written before it, so the client knows the file is incomplete.
async fn send_chunks<F, Fut>(
    sender: ItemSender<pb::ExportChunk>,
    content_type: &'static str,
    file_name: String,
    export: F,
) where
    F: FnOnce(ChunkWriter) -> Fut,
    Fut: Future<Output = Result<(), Stopped>>,
{
    let (bytes_sender, mut bytes) = mpsc::channel::<Vec<u8>>(2);
    let export = export(ChunkWriter::new(bytes_sender));
    tokio::pin!(export);
    let mut header = Some((content_type.to_owned(), file_name));
    let mut failure: Option<ChatError> = None;
    let mut exporting = true;
    loop {
        tokio::select! {
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
}
