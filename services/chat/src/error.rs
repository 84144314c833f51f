//! Errors of the chat domain, and their one mapping to the kit's [`ServiceError`].

use aimesh_kit::data::redis::RedisError;
use aimesh_kit::{ErrorCode, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    /// Missing, soft-deleted, or in a project the caller cannot read: the same answer for all
    /// three, so session ids cannot be probed.
    #[error("no such session")]
    SessionNotFound,
    #[error("no such message in this session")]
    MessageNotFound { field: &'static str },
    #[error("the session is not deleted")]
    SessionNotDeleted,
    #[error("the session's grace period is over; it is being purged")]
    GracePeriodOver,
    #[error("attachments need the files service, which is not available")]
    FilesUnavailable,
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
}

impl ChatError {
    /// A malformed or out-of-range request field.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { field, message: message.into() }
    }

    /// The caller may see the session but not do this to it.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::Forbidden(message.into())
    }
}

impl From<ChatError> for ServiceError {
    fn from(error: ChatError) -> Self {
        let message = error.to_string();
        match error {
            ChatError::Invalid { field, message } => ServiceError::invalid_field(field, message),
            ChatError::SessionNotFound => {
                ServiceError::new(ErrorCode::NotFound, "SESSION_NOT_FOUND", message).with_field("session_id")
            }
            ChatError::MessageNotFound { field } => {
                ServiceError::new(ErrorCode::NotFound, "MESSAGE_NOT_FOUND", message).with_field(field)
            }
            ChatError::SessionNotDeleted => {
                ServiceError::new(ErrorCode::FailedPrecondition, "SESSION_NOT_DELETED", message)
            }
            ChatError::GracePeriodOver => {
                ServiceError::new(ErrorCode::FailedPrecondition, "GRACE_PERIOD_OVER", message)
            }
            ChatError::FilesUnavailable => {
                ServiceError::new(ErrorCode::FailedPrecondition, "FILES_UNAVAILABLE", message)
                    .with_field("attachment_ids")
            }
            ChatError::Forbidden(_) => ServiceError::permission_denied(message),
            ChatError::Service(error) => error,
            ChatError::Database(error) => ServiceError::from(error),
            // Live delivery and the cache degrade without Redis; what reaches here is a
            // command that had to succeed, and a retry may.
            ChatError::Redis(error) => ServiceError::unavailable(format!("redis: {error}")),
        }
    }
}

impl From<ChatError> for tonic::Status {
    fn from(error: ChatError) -> Self {
        ServiceError::from(error).into()
    }
}

/// The result type of the chat domain.
pub type Result<T, E = ChatError> = std::result::Result<T, E>;
