//! The gRPC edge of chat. A handler decodes and validates, authorizes, calls the domain
//! ([`Conversations`]) and encodes; the handlers live in `sessions`, `messages` and `streams`,
//! and this module holds what they share: the access rules and the protobuf encodings.
//!
//! Access: a request naming a session loads it (through the cache) and checks the caller's
//! role in its project. A session that is missing, soft-deleted (except for restore and purge)
//! or in a project the caller cannot read is NOT_FOUND (`SESSION_NOT_FOUND`) alike, so ids
//! cannot be probed. A caller who may read it but not do what it asks gets PERMISSION_DENIED.
//! Streams check again while they are open, and are bounded (see `streams`).

mod messages;
mod sessions;
mod streams;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use aimesh_kit::ErrorCode;
use aimesh_kit::auth::CredentialRef;
use aimesh_kit::auth::{Access, Caller, ProjectAccess, ProjectRole, StreamAccess};
use aimesh_kit::wire::error::respond;
use aimesh_kit::wire::proto_json;
use aimesh_proto::chat::v1 as pb;

use crate::conversations::{Conversations, SessionMeta};
use crate::domain::{MessageRole, SessionStatus};
use crate::error::{ChatError, Result};
use crate::store::{MessageRow, SessionRow, Store};

/// The scope an API key needs to read a project's chats.
const CHAT_READ: &str = "chat:read";
/// The scope an API key needs to write to them.
const CHAT_WRITE: &str = "chat:write";

/// What a request wants to do with a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Any role in the project, or a key with chat:read.
    Read,
    /// The session's creator (at least a member), an admin, or a key with chat:write.
    Write,
    /// An admin.
    Purge,
}

/// Whether a soft-deleted session counts as found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deleted {
    NotFound,
    Found,
}

/// What every handler of chat works with.
#[derive(Debug)]
pub struct Chat {
    conversations: Conversations,
    access: ProjectAccess,
    /// Bounds the open streams and re-checks their callers' access while they run.
    streams: StreamAccess,
    /// Ends the open streams (watches, exports) when the server shuts down.
    shutdown: CancellationToken,
}

impl Chat {
    pub fn new(
        conversations: Conversations,
        access: ProjectAccess,
        streams: StreamAccess,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self { conversations, access, streams, shutdown })
    }

    /// Every gRPC service of chat, ready for the server.
    pub fn routes(self: &Arc<Self>) -> tonic::service::Routes {
        tonic::service::Routes::new(pb::chat_service_server::ChatServiceServer::new(ChatApi(Arc::clone(self))))
    }

    /// The fully qualified names of those services, for grpc.health.v1.
    pub const GRPC_SERVICES: [&'static str; 1] = ["aimesh.chat.v1.ChatService"];

    /// The session `id` if `caller` may do `need` to it; see the module docs.
    async fn session_for(&self, caller: &Caller, id: Uuid, need: Need, deleted: Deleted) -> Result<Arc<SessionMeta>> {
        let session = self.conversations.session_meta(id).await?.ok_or(ChatError::SessionNotFound)?;
        if session.is_deleted() && deleted == Deleted::NotFound {
            return Err(ChatError::SessionNotFound);
        }
        let scope = if need == Need::Read { CHAT_READ } else { CHAT_WRITE };
        let access = match self.access.require(caller, session.project_id, ProjectRole::Viewer, scope).await {
            Ok(access) => access,
            // A key of this very project lacking the scope knows the project; anyone else
            // must not learn the session exists.
            Err(error) if error.code == ErrorCode::PermissionDenied && !is_key_of(caller, session.project_id) => {
                return Err(ChatError::SessionNotFound);
            }
            Err(error) => return Err(error.into()),
        };
        let allowed = match (need, access) {
            (Need::Read, _) | (Need::Write, Access::ApiKey) => true,
            (Need::Write, Access::Member(role)) => {
                role >= ProjectRole::Admin
                    || (role >= ProjectRole::Member && session.user_id == caller.principal.user_id)
            }
            (Need::Purge, Access::Member(role)) => role >= ProjectRole::Admin,
            (Need::Purge, Access::ApiKey) => false,
        };
        if !allowed {
            return Err(ChatError::forbidden(match need {
                Need::Purge => "purging a session needs the admin role in its project",
                _ => "only the session's creator or a project admin may change it",
            }));
        }
        Ok(session)
    }

    /// Refuses a caller without `needed` in the project (or an API key of it without `scope`).
    /// The store as a read-only request of `caller` reads it: from a replica that has replayed
    /// the caller's own writes, or from the primary.
    async fn reader(&self, caller: &Caller) -> Store {
        self.conversations.store().reading_for(caller.principal.user_id).await
    }

    async fn require(&self, caller: &Caller, project_id: Uuid, needed: ProjectRole, scope: &str) -> Result<()> {
        self.access.require(caller, project_id, needed, scope).await?;
        Ok(())
    }
}

fn is_key_of(caller: &Caller, project: Uuid) -> bool {
    matches!(caller.principal.credential, CredentialRef::ApiKey { project_id, .. } if project_id == project)
}

fn session_to_proto(row: SessionRow) -> Result<pb::Session> {
    Ok(pb::Session {
        id: row.id.to_string(),
        project_id: row.project_id.to_string(),
        user_id: row.user_id.to_string(),
        status: SessionStatus::parse_db(&row.status)?.to_proto().into(),
        config: proto_json::json_to_struct(&row.config),
        model: row.model,
        title: row.title,
        system_prompt: row.system_prompt,
        message_count: row.message_count,
        total_tokens: row.total_tokens,
        create_time: Some(proto_json::timestamp(row.created_at)),
        update_time: Some(proto_json::timestamp(row.updated_at)),
        delete_time: proto_json::opt_timestamp(row.deleted_at),
        purge_time: proto_json::opt_timestamp(row.purge_at),
    })
}

fn message_to_proto(row: MessageRow) -> Result<pb::Message> {
    Ok(pb::Message {
        id: row.id.to_string(),
        session_id: row.session_id.to_string(),
        sequence: row.sequence,
        role: MessageRole::parse_db(&row.role)?.to_proto().into(),
        metadata: proto_json::json_to_struct(&row.metadata),
        content: row.content,
        content_type: row.content_type,
        tokens: row.tokens,
        parent_message_id: row.parent_message_id.map(|id| id.to_string()).unwrap_or_default(),
        client_message_id: row.client_message_id.unwrap_or_default(),
        attachment_ids: row.attachment_ids.iter().map(Uuid::to_string).collect(),
        user_id: row.user_id.to_string(),
        create_time: Some(proto_json::timestamp(row.created_at)),
    })
}

/// A server stream of the chat API.
type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

struct ChatApi(Arc<Chat>);

#[tonic::async_trait]
impl pb::chat_service_server::ChatService for ChatApi {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.create_session(&caller, request.into_inner()).await)
    }

    async fn get_session(&self, request: Request<pb::GetSessionRequest>) -> Result<Response<pb::Session>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.get_session(&caller, request.into_inner()).await)
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.list_sessions(&caller, request.into_inner()).await)
    }

    async fn update_session(
        &self,
        request: Request<pb::UpdateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.update_session(&caller, request.into_inner()).await)
    }

    async fn delete_session(
        &self,
        request: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.delete_session(&caller, request.into_inner()).await)
    }

    async fn restore_session(
        &self,
        request: Request<pb::RestoreSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.restore_session(&caller, request.into_inner()).await)
    }

    async fn purge_session(
        &self,
        request: Request<pb::PurgeSessionRequest>,
    ) -> Result<Response<pb::PurgeSessionResponse>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.purge_session(&caller, request.into_inner()).await)
    }

    async fn append_message(
        &self,
        request: Request<pb::AppendMessageRequest>,
    ) -> Result<Response<pb::Message>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.append_message(&caller, request.into_inner()).await)
    }

    async fn get_message(&self, request: Request<pb::GetMessageRequest>) -> Result<Response<pb::Message>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.get_message(&caller, request.into_inner()).await)
    }

    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.list_messages(&caller, request.into_inner()).await)
    }

    async fn get_branch(
        &self,
        request: Request<pb::GetBranchRequest>,
    ) -> Result<Response<pb::GetBranchResponse>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.get_branch(&caller, request.into_inner()).await)
    }

    async fn edit_message(&self, request: Request<pb::EditMessageRequest>) -> Result<Response<pb::Message>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.edit_message(&caller, request.into_inner()).await)
    }

    type WatchSessionStream = ResponseStream<pb::Message>;

    async fn watch_session(
        &self,
        request: Request<pb::WatchSessionRequest>,
    ) -> Result<Response<Self::WatchSessionStream>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.watch_session(&caller, request.into_inner()).await)
    }

    async fn search_messages(
        &self,
        request: Request<pb::SearchMessagesRequest>,
    ) -> Result<Response<pb::SearchMessagesResponse>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.search_messages(&caller, request.into_inner()).await)
    }

    type ExportSessionStream = ResponseStream<pb::ExportChunk>;

    async fn export_session(
        &self,
        request: Request<pb::ExportSessionRequest>,
    ) -> Result<Response<Self::ExportSessionStream>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.export_session(&caller, request.into_inner()).await)
    }

    type ExportProjectStream = ResponseStream<pb::ExportChunk>;

    async fn export_project(
        &self,
        request: Request<pb::ExportProjectRequest>,
    ) -> Result<Response<Self::ExportProjectStream>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.export_project(&caller, request.into_inner()).await)
    }
}
