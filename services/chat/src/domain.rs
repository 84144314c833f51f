//! Domain types and rules of chat: what a session and a message may hold, and how request
//! fields become them. Every refusal names the field to fix.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use aimesh_proto::chat::v1 as pb;

use crate::error::{ChatError, Result};

/// Longest session title, in characters.
pub const MAX_TITLE_CHARS: usize = 255;
/// Longest system prompt, in bytes of UTF-8.
pub const MAX_SYSTEM_PROMPT_BYTES: usize = 64 * 1024;
/// Largest message metadata or session config, in bytes of JSON.
pub const MAX_JSON_BYTES: usize = 16 * 1024;
/// Longest client message id, in bytes.
pub const MAX_CLIENT_MESSAGE_ID_BYTES: usize = 128;
/// Most attachments of one message.
pub const MAX_ATTACHMENTS: usize = 32;
/// Longest search query, in characters.
pub const MAX_QUERY_CHARS: usize = 1000;
/// The content types a message may declare; "text" when empty.
pub const CONTENT_TYPES: &[&str] = &["text", "markdown", "json", "code", "html"];

aimesh_kit::spelled_enum!(
    /// Who wrote a message.
    MessageRole, pb::MessageRole, { System = "system", User = "user", Assistant = "assistant", Tool = "tool" }
);

aimesh_kit::spelled_enum!(
    /// Whether a session is in use or put away.
    SessionStatus, pb::SessionStatus, { Active = "active", Archived = "archived" }
);

/// What a new session stores; built by [`NewSession::validate`].
#[derive(Debug, Clone)]
pub struct NewSession {
    pub project_id: Uuid,
    pub user_id: Uuid,
    pub model: String,
    pub title: String,
    pub system_prompt: String,
    pub config: serde_json::Value,
}

impl NewSession {
    /// A CreateSession request of `user_id`, checked field by field.
    pub fn validate(request: &pb::CreateSessionRequest, user_id: Uuid) -> Result<Self> {
        Ok(Self {
            project_id: aimesh_kit::wire::fields::id("project_id", &request.project_id)?,
            user_id,
            model: model("model", &request.model)?,
            title: title("title", &request.title)?,
            system_prompt: system_prompt("system_prompt", &request.system_prompt)?,
            config: json_object("config", request.config.as_ref())?,
        })
    }
}

/// Fields of a session to change; `None` keeps the stored value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionPatch {
    pub title: Option<String>,
    pub system_prompt: Option<String>,
    pub config: Option<serde_json::Value>,
    pub status: Option<SessionStatus>,
    pub model: Option<String>,
}

/// The paths UpdateSession accepts.
pub const UPDATE_PATHS: &[&str] = &["title", "system_prompt", "config", "status", "model"];

impl SessionPatch {
    /// The fields of `session` named by `paths` (already checked against [`UPDATE_PATHS`]).
    pub fn validate(session: &pb::Session, paths: &[String]) -> Result<Self> {
        let mut patch = Self::default();
        for path in paths {
            match path.as_str() {
                "title" => patch.title = Some(title("session.title", &session.title)?),
                "system_prompt" => {
                    patch.system_prompt = Some(system_prompt("session.system_prompt", &session.system_prompt)?);
                }
                "config" => patch.config = Some(json_object("session.config", session.config.as_ref())?),
                "status" => patch.status = Some(SessionStatus::require_proto(session.status, "session.status")?),
                "model" => patch.model = Some(model("session.model", &session.model)?),
                other => return Err(ChatError::invalid("update_mask", format!("unknown path {other:?}"))),
            }
        }
        Ok(patch)
    }
}

/// Where a new message hangs in the session's tree of branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parent {
    /// The session's latest message when the message is stored (none for the first).
    Latest,
    /// This message of the session, or none: a new root.
    Exactly(Option<Uuid>),
}

/// A message to append; built by [`NewMessage::validate`] or for an edit.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub role: MessageRole,
    pub content: String,
    pub content_type: String,
    pub metadata: serde_json::Value,
    pub tokens: i32,
    pub parent: Parent,
    pub client_message_id: Option<String>,
    pub attachment_ids: Vec<Uuid>,
    /// Who appends it.
    pub user_id: Uuid,
}

/// Limits of message fields that come from configuration.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimits {
    pub max_content_bytes: usize,
}

impl NewMessage {
    /// An AppendMessage request of `user_id`, checked field by field.
    pub fn validate(request: &pb::AppendMessageRequest, user_id: Uuid, limits: MessageLimits) -> Result<Self> {
        let parent = match aimesh_kit::wire::fields::optional_id("parent_message_id", &request.parent_message_id)? {
            Some(id) => Parent::Exactly(Some(id)),
            None => Parent::Latest,
        };
        Ok(Self {
            role: MessageRole::require_proto(request.role, "role")?,
            content: content("content", &request.content, limits)?,
            content_type: content_type("content_type", &request.content_type)?,
            metadata: json_object("metadata", request.metadata.as_ref())?,
            tokens: tokens("tokens", request.tokens)?,
            parent,
            client_message_id: client_message_id("client_message_id", &request.client_message_id)?,
            attachment_ids: attachment_ids("attachment_ids", &request.attachment_ids)?,
            user_id,
        })
    }
}

/// An edit: the new content of a message, appended beside it. Metadata the request leaves unset
/// is the edited message's; tokens are what the request says (new content, a new count: the
/// old message's count would be wrong for it).
#[derive(Debug, Clone, PartialEq)]
pub struct MessageEdit {
    pub message_id: Uuid,
    pub content: String,
    pub metadata: Option<serde_json::Value>,
    pub tokens: i32,
    pub client_message_id: Option<String>,
    /// Who edits.
    pub user_id: Uuid,
}

impl MessageEdit {
    /// An EditMessage request of `user_id`, checked field by field; content is required.
    pub fn validate(request: &pb::EditMessageRequest, user_id: Uuid, limits: MessageLimits) -> Result<Self> {
        Ok(Self {
            message_id: aimesh_kit::wire::fields::id("message_id", &request.message_id)?,
            content: content("content", &request.content, limits)?,
            metadata: request.metadata.as_ref().map(|m| json_object("metadata", Some(m))).transpose()?,
            tokens: tokens("tokens", request.tokens)?,
            client_message_id: client_message_id("client_message_id", &request.client_message_id)?,
            user_id,
        })
    }
}

/// A session's model: 1 to 256 characters without spaces.
pub fn model(field: &'static str, value: &str) -> Result<String> {
    let model = value.trim();
    if model.is_empty() {
        return Err(ChatError::invalid(field, "is required"));
    }
    if model.chars().count() > 256 || model.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ChatError::invalid(field, "must be at most 256 characters without spaces"));
    }
    Ok(model.to_owned())
}

/// A session title: optional, one line.
pub fn title(field: &'static str, value: &str) -> Result<String> {
    Ok(aimesh_kit::wire::fields::text(field, value, MAX_TITLE_CHARS, false)?)
}

/// A system prompt: optional, any text PostgreSQL can store.
pub fn system_prompt(field: &'static str, value: &str) -> Result<String> {
    if value.len() > MAX_SYSTEM_PROMPT_BYTES {
        return Err(ChatError::invalid(field, format!("must be at most {MAX_SYSTEM_PROMPT_BYTES} bytes")));
    }
    no_nul(field, value)?;
    Ok(value.to_owned())
}

/// Message content: not blank, at most the configured size, stored as given.
pub fn content(field: &'static str, value: &str, limits: MessageLimits) -> Result<String> {
    if value.trim().is_empty() {
        return Err(ChatError::invalid(field, "is required"));
    }
    if value.len() > limits.max_content_bytes {
        return Err(ChatError::invalid(field, format!("must be at most {} bytes", limits.max_content_bytes)));
    }
    no_nul(field, value)?;
    Ok(value.to_owned())
}

/// PostgreSQL text cannot hold NUL; refusing it here names the field instead of failing the insert.
fn no_nul(field: &'static str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(ChatError::invalid(field, "must not contain NUL characters"));
    }
    Ok(())
}

/// One of [`CONTENT_TYPES`]; "text" when empty.
pub fn content_type(field: &'static str, value: &str) -> Result<String> {
    let value = value.trim().to_ascii_lowercase();
    if value.is_empty() {
        return Ok("text".to_owned());
    }
    if !CONTENT_TYPES.contains(&value.as_str()) {
        return Err(ChatError::invalid(field, format!("must be one of: {}", CONTENT_TYPES.join(", "))));
    }
    Ok(value)
}

/// A token count: 0 or more.
pub fn tokens(field: &'static str, value: i32) -> Result<i32> {
    if value < 0 {
        return Err(ChatError::invalid(field, "must not be negative"));
    }
    Ok(value)
}

/// An optional idempotency key: at most 128 bytes, no control characters.
pub fn client_message_id(field: &'static str, value: &str) -> Result<Option<String>> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > MAX_CLIENT_MESSAGE_ID_BYTES || value.chars().any(char::is_control) {
        return Err(ChatError::invalid(
            field,
            format!("must be at most {MAX_CLIENT_MESSAGE_ID_BYTES} bytes without control characters"),
        ));
    }
    Ok(Some(value.to_owned()))
}

/// File ids: each a UUID, at most [`MAX_ATTACHMENTS`], duplicates dropped.
pub fn attachment_ids(field: &'static str, values: &[String]) -> Result<Vec<Uuid>> {
    if values.len() > MAX_ATTACHMENTS {
        return Err(ChatError::invalid(field, format!("at most {MAX_ATTACHMENTS} attachments")));
    }
    let mut ids = Vec::with_capacity(values.len());
    for value in values {
        let id =
            Uuid::parse_str(value).map_err(|_| ChatError::invalid(field, format!("{value:?} is not a valid id")))?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// A `Struct` field as a JSON object (empty when absent), at most [`MAX_JSON_BYTES`] as JSON.
pub fn json_object(field: &'static str, value: Option<&prost_types::Struct>) -> Result<serde_json::Value> {
    let json = value.map_or_else(|| serde_json::json!({}), aimesh_kit::wire::proto_json::struct_to_json);
    let text = serde_json::to_string(&json).map_err(|e| ChatError::invalid(field, e.to_string()))?;
    if text.len() > MAX_JSON_BYTES {
        return Err(ChatError::invalid(field, format!("must be at most {MAX_JSON_BYTES} bytes as JSON")));
    }
    // jsonb refuses NUL in strings and keys; serde_json writes it as this escape.
    if text.contains("\\u0000") {
        return Err(ChatError::invalid(field, "must not contain NUL characters"));
    }
    Ok(json)
}

/// A search query: words as people type them, not blank.
pub fn search_query(field: &'static str, value: &str) -> Result<String> {
    let query = value.trim();
    if query.is_empty() {
        return Err(ChatError::invalid(field, "is required"));
    }
    if query.chars().count() > MAX_QUERY_CHARS {
        return Err(ChatError::invalid(field, format!("must be at most {MAX_QUERY_CHARS} characters long")));
    }
    no_nul(field, query)?;
    Ok(query.to_owned())
}

/// A page token of an ordered list: the position (a sequence number or an offset) after which
/// the next page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageToken {
    #[serde(rename = "p")]
    pub position: i64,
}

impl PageToken {
    pub fn encode(position: i64) -> String {
        // Serialising one integer cannot fail.
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&Self { position }).unwrap_or_default())
    }

    /// Reads a `page_token`; empty is `None`.
    pub fn decode(token: &str) -> Result<Option<i64>> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || ChatError::invalid("page_token", "is not a token this list returned");
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        let token: Self = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        if token.position < 0 {
            return Err(invalid());
        }
        Ok(Some(token.position))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of<T: std::fmt::Debug>(result: Result<T>) -> Option<String> {
        aimesh_kit::ServiceError::from(result.expect_err("should be refused")).field
    }

    fn append() -> pb::AppendMessageRequest {
        pb::AppendMessageRequest {
            session_id: Uuid::new_v4().to_string(),
            role: pb::MessageRole::User.into(),
            content: "hello".into(),
            ..Default::default()
        }
    }

    const LIMITS: MessageLimits = MessageLimits { max_content_bytes: 16 };

    #[test]
    fn messages_are_checked_field_by_field() {
        let user = Uuid::new_v4();
        let ok = NewMessage::validate(&append(), user, LIMITS).expect("valid");
        assert_eq!((ok.content_type.as_str(), ok.parent), ("text", Parent::Latest));
        let refused = |edit: fn(&mut pb::AppendMessageRequest)| {
            let mut request = append();
            edit(&mut request);
            field_of(NewMessage::validate(&request, user, LIMITS))
        };
        assert_eq!(refused(|r| r.role = 0), Some("role".into()));
        assert_eq!(refused(|r| r.role = 99), Some("role".into()));
        assert_eq!(refused(|r| r.content = "  \n".into()), Some("content".into()));
        assert_eq!(refused(|r| r.content = "x".repeat(17)), Some("content".into()));
        assert_eq!(refused(|r| r.content = "a\0b".into()), Some("content".into()));
        assert_eq!(refused(|r| r.content_type = "image/png".into()), Some("content_type".into()));
        assert_eq!(refused(|r| r.tokens = -1), Some("tokens".into()));
        assert_eq!(refused(|r| r.parent_message_id = "nope".into()), Some("parent_message_id".into()));
        assert_eq!(refused(|r| r.attachment_ids = vec!["x".into()]), Some("attachment_ids".into()));
        assert_eq!(refused(|r| r.client_message_id = "a\nb".into()), Some("client_message_id".into()));
    }

    #[test]
    fn json_fields_have_a_size_limit() {
        let big = serde_json::json!({ "x": "y".repeat(MAX_JSON_BYTES) });
        let serde_json::Value::Object(map) = &big else { panic!("object") };
        let value = aimesh_kit::wire::proto_json::json_object_to_struct(map);
        assert_eq!(field_of(json_object("metadata", Some(&value))), Some("metadata".into()));
        assert_eq!(json_object("metadata", None).expect("empty"), serde_json::json!({}));
    }

    #[test]
    fn page_tokens_round_trip() {
        assert_eq!(PageToken::decode(&PageToken::encode(42)).expect("token"), Some(42));
        assert_eq!(PageToken::decode("").expect("empty"), None);
        assert!(PageToken::decode("garbage!").is_err());
    }
}
