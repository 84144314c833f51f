//! Messages: append, read, list, branches, edits, search.

use aimesh_kit::ServiceError;
use aimesh_kit::auth::{Caller, ProjectRole};
use aimesh_kit::wire::fields;
use aimesh_kit::wire::pagination::{Page, PageKey};
use aimesh_proto::chat::v1 as pb;

use super::{CHAT_READ, Chat, Deleted, Need, message_to_proto};
use crate::domain::{self, MessageEdit, NewMessage, PageToken};
use crate::error::{ChatError, Result};

/// The lists of messages page by position: a sequence number, or an offset into search hits.
impl PageKey for PageToken {
    fn encode(&self) -> String {
        PageToken::encode(self.position)
    }

    fn decode(token: &str) -> Result<Option<Self>, ServiceError> {
        Ok(PageToken::decode(token)?.map(|position| Self { position }))
    }
}

impl Chat {
    pub(super) async fn append_message(
        &self,
        caller: &Caller,
        request: pb::AppendMessageRequest,
    ) -> Result<pb::Message> {
        let session_id = fields::id("session_id", &request.session_id)?;
        let message = NewMessage::validate(&request, caller.principal.user_id, self.conversations.settings().limits)?;
        let session = self.session_for(caller, session_id, Need::Write, Deleted::NotFound).await?;
        message_to_proto(self.conversations.append(&session, &message).await?.into_message())
    }

    pub(super) async fn get_message(&self, caller: &Caller, request: pb::GetMessageRequest) -> Result<pb::Message> {
        let session_id = fields::id("session_id", &request.session_id)?;
        let message_id = fields::id("message_id", &request.message_id)?;
        self.session_for(caller, session_id, Need::Read, Deleted::NotFound).await?;
        let message = self.reader(caller).await.message(session_id, message_id).await?;
        message_to_proto(message.ok_or(ChatError::MessageNotFound { field: "message_id" })?)
    }

    pub(super) async fn list_messages(
        &self,
        caller: &Caller,
        request: pb::ListMessagesRequest,
    ) -> Result<pb::ListMessagesResponse> {
        let session_id = fields::id("session_id", &request.session_id)?;
        if request.after_sequence < 0 {
            return Err(ChatError::invalid("after_sequence", "must not be negative"));
        }
        let page = Page::<PageToken>::new(&request.page_token, request.page_size)?;
        // The token holds the last sequence of the previous page, so it replaces after_sequence.
        let after = page.after().map_or(request.after_sequence, |token| token.position);
        self.session_for(caller, session_id, Need::Read, Deleted::NotFound).await?;
        let rows = self.reader(caller).await.messages_after(session_id, after, None, page.fetch_limit()).await?;
        let (rows, next_page_token) = page.finish(rows, |last| PageToken { position: last.sequence });
        let messages = rows.into_iter().map(message_to_proto).collect::<Result<_>>()?;
        Ok(pb::ListMessagesResponse { messages, next_page_token })
    }

    pub(super) async fn get_branch(
        &self,
        caller: &Caller,
        request: pb::GetBranchRequest,
    ) -> Result<pb::GetBranchResponse> {
        let session_id = fields::id("session_id", &request.session_id)?;
        let leaf = fields::optional_id("message_id", &request.message_id)?;
        self.session_for(caller, session_id, Need::Read, Deleted::NotFound).await?;
        let path = self.conversations.branch(session_id, leaf).await?;
        Ok(pb::GetBranchResponse { messages: path.into_iter().map(message_to_proto).collect::<Result<_>>()? })
    }

    pub(super) async fn edit_message(&self, caller: &Caller, request: pb::EditMessageRequest) -> Result<pb::Message> {
        let session_id = fields::id("session_id", &request.session_id)?;
        let edit = MessageEdit::validate(&request, caller.principal.user_id, self.conversations.settings().limits)?;
        let session = self.session_for(caller, session_id, Need::Write, Deleted::NotFound).await?;
        message_to_proto(self.conversations.edit(&session, edit).await?.into_message())
    }

    pub(super) async fn search_messages(
        &self,
        caller: &Caller,
        request: pb::SearchMessagesRequest,
    ) -> Result<pb::SearchMessagesResponse> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let query = domain::search_query("query", &request.query)?;
        let session_id = fields::optional_id("session_id", &request.session_id)?;
        let page = Page::<PageToken>::new(&request.page_token, request.page_size)?;
        // An offset: ranks are floats shared by many rows, a poor key for a keyset.
        let offset = page.after().map_or(0, |token| token.position);
        self.require(caller, project_id, ProjectRole::Viewer, CHAT_READ).await?;
        let rows = self.reader(caller).await.search(project_id, &query, session_id, offset, page.limit()).await?;
        // The next page starts after this one's hits, whichever they are.
        let (rows, next_page_token) = page.finish(rows, |_| PageToken { position: offset + page.limit() });
        let hits = rows
            .into_iter()
            .map(|row| {
                Ok(pb::SearchHit {
                    message: Some(message_to_proto(row.message)?),
                    session_title: row.session_title,
                    rank: row.rank,
                    snippet: row.snippet,
                })
            })
            .collect::<Result<_>>()?;
        Ok(pb::SearchMessagesResponse { hits, next_page_token })
    }
}
