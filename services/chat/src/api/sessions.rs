//! Sessions: create, read, list, update, soft delete, restore, purge.

use aimesh_kit::auth::{Caller, ProjectRole};
use aimesh_kit::wire::fields;
use aimesh_kit::wire::pagination::{Cursor, Page};
use aimesh_proto::chat::v1 as pb;

use super::{CHAT_READ, CHAT_WRITE, Chat, Deleted, Need, session_to_proto};
use crate::domain::{self, NewSession, SessionPatch, SessionStatus, UPDATE_PATHS};
use crate::error::{ChatError, Result};
use crate::store::SessionFilter;

impl Chat {
    pub(super) async fn create_session(
        &self,
        caller: &Caller,
        request: pb::CreateSessionRequest,
    ) -> Result<pb::Session> {
        let new = NewSession::validate(&request, caller.principal.user_id)?;
        self.require(caller, new.project_id, ProjectRole::Member, CHAT_WRITE).await?;
        session_to_proto(self.conversations.create_session(&new).await?)
    }

    pub(super) async fn get_session(&self, caller: &Caller, request: pb::GetSessionRequest) -> Result<pb::Session> {
        let id = fields::id("session_id", &request.session_id)?;
        self.session_for(caller, id, Need::Read, Deleted::NotFound).await?;
        session_to_proto(self.reader(caller).await.live_session(id).await?)
    }

    pub(super) async fn list_sessions(
        &self,
        caller: &Caller,
        request: pb::ListSessionsRequest,
    ) -> Result<pb::ListSessionsResponse> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let filter = SessionFilter {
            user_id: (!request.all_users).then_some(caller.principal.user_id),
            status: match request.status {
                0 => None,
                value => Some(SessionStatus::require_proto(value, "status")?),
            },
            model: if request.model.is_empty() { None } else { Some(domain::model("model", &request.model)?) },
            deleted: request.deleted,
        };
        let page = Page::new(&request.page_token, request.page_size)?;
        self.require(caller, project_id, ProjectRole::Viewer, CHAT_READ).await?;
        let rows = self.reader(caller).await.list_sessions(project_id, &filter, &page).await?;
        let (rows, next_page_token) = page.finish(rows, |r| Cursor { time: r.created_at, id: r.id });
        let sessions = rows.into_iter().map(session_to_proto).collect::<Result<_>>()?;
        Ok(pb::ListSessionsResponse { sessions, next_page_token })
    }

    pub(super) async fn update_session(
        &self,
        caller: &Caller,
        request: pb::UpdateSessionRequest,
    ) -> Result<pb::Session> {
        let id = fields::id("session_id", &request.session_id)?;
        let session = request.session.ok_or_else(|| ChatError::invalid("session", "is required"))?;
        let paths = fields::mask_paths(request.update_mask.as_ref(), UPDATE_PATHS)?;
        let patch = SessionPatch::validate(&session, &paths)?;
        self.session_for(caller, id, Need::Write, Deleted::NotFound).await?;
        session_to_proto(self.conversations.update_session(id, &patch).await?)
    }

    pub(super) async fn delete_session(
        &self,
        caller: &Caller,
        request: pb::DeleteSessionRequest,
    ) -> Result<pb::Session> {
        let id = fields::id("session_id", &request.session_id)?;
        self.session_for(caller, id, Need::Write, Deleted::NotFound).await?;
        session_to_proto(self.conversations.delete_session(id).await?)
    }

    pub(super) async fn restore_session(
        &self,
        caller: &Caller,
        request: pb::RestoreSessionRequest,
    ) -> Result<pb::Session> {
        let id = fields::id("session_id", &request.session_id)?;
        self.session_for(caller, id, Need::Write, Deleted::Found).await?;
        session_to_proto(self.conversations.restore_session(id).await?)
    }

    pub(super) async fn purge_session(
        &self,
        caller: &Caller,
        request: pb::PurgeSessionRequest,
    ) -> Result<pb::PurgeSessionResponse> {
        let id = fields::id("session_id", &request.session_id)?;
        self.session_for(caller, id, Need::Purge, Deleted::Found).await?;
        self.conversations.purge_session(id).await?;
        Ok(pb::PurgeSessionResponse {})
    }
}
