//! Errors of the identity domain, and their one mapping to the kit's [`ServiceError`].

use std::time::Duration;

use tonic_types::{ErrorDetails, StatusExt};

use aimesh_kit::wire::error::ERROR_DOMAIN;
use aimesh_kit::{ErrorCode, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("an account with this email already exists")]
    EmailTaken,
    #[error("this username is taken")]
    UsernameTaken,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("wrong login or password")]
    BadCredentials,
    #[error("the account is disabled")]
    AccountDisabled,
    #[error("the refresh token is unknown, expired or already used")]
    BadRefreshToken,
    #[error("{0}")]
    Forbidden(String),
    #[error("a project must keep at least one owner")]
    LastOwner,
    #[error("this account is the last owner of a project; transfer or delete it first")]
    OwnsProjects,
    #[error("the user is already a member of the project")]
    AlreadyMember,
    #[error("encrypted settings need identity.settings_key to be configured")]
    NoSettingsKey,
    /// Refused for now (a locked login, no free hashing slot): RESOURCE_EXHAUSTED with a
    /// retry-after.
    #[error("{message}")]
    TryLater { reason: &'static str, message: String, retry_after: Duration },
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl IdentityError {
    /// A malformed or out-of-range request field.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { field, message: message.into() }
    }

    /// The caller has no access of the kind needed.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::Forbidden(message.into())
    }
}

impl From<IdentityError> for ServiceError {
    fn from(error: IdentityError) -> Self {
        let message = error.to_string();
        match error {
            IdentityError::Invalid { field, message } => ServiceError::invalid_field(field, message),
            IdentityError::EmailTaken => {
                ServiceError::new(ErrorCode::AlreadyExists, "EMAIL_TAKEN", message).with_field("email")
            }
            IdentityError::UsernameTaken => {
                ServiceError::new(ErrorCode::AlreadyExists, "USERNAME_TAKEN", message).with_field("username")
            }
            IdentityError::NotFound(what) => {
                let reason = format!("{}_NOT_FOUND", what.to_uppercase().replace(' ', "_"));
                ServiceError::new(ErrorCode::NotFound, reason, message)
            }
            IdentityError::BadCredentials => ServiceError::new(ErrorCode::Unauthenticated, "BAD_CREDENTIALS", message),
            IdentityError::AccountDisabled => {
                ServiceError::new(ErrorCode::PermissionDenied, "ACCOUNT_DISABLED", message)
            }
            IdentityError::BadRefreshToken => {
                ServiceError::new(ErrorCode::Unauthenticated, "BAD_REFRESH_TOKEN", message).with_field("refresh_token")
            }
            IdentityError::Forbidden(_) => ServiceError::permission_denied(message),
            IdentityError::LastOwner => ServiceError::new(ErrorCode::FailedPrecondition, "LAST_OWNER", message),
            IdentityError::OwnsProjects => ServiceError::new(ErrorCode::FailedPrecondition, "LAST_OWNER", message),
            IdentityError::AlreadyMember => ServiceError::new(ErrorCode::AlreadyExists, "ALREADY_MEMBER", message),
            IdentityError::NoSettingsKey => {
                ServiceError::new(ErrorCode::FailedPrecondition, "NO_SETTINGS_KEY", message)
            }
            IdentityError::TryLater { reason, .. } => ServiceError::new(ErrorCode::ResourceExhausted, reason, message),
            IdentityError::Service(error) => error,
            IdentityError::Database(error) => ServiceError::from(error),
        }
    }
}

impl From<IdentityError> for tonic::Status {
    /// A refusal for now also carries when to retry: a `google.rpc.RetryInfo` detail and
    /// `retry-after` metadata (whole seconds), which the gateway passes on as `Retry-After`.
    fn from(error: IdentityError) -> Self {
        let IdentityError::TryLater { reason, message, retry_after } = error else {
            return ServiceError::from(error).into();
        };
        let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, std::collections::HashMap::new());
        details.set_retry_info(Some(retry_after));
        let mut status = tonic::Status::with_error_details(tonic::Code::ResourceExhausted, message, details);
        let seconds = retry_after.as_millis().div_ceil(1000).max(1);
        if let Ok(value) = seconds.to_string().parse() {
            status.metadata_mut().insert("retry-after", value);
        }
        status
    }
}

/// The result type of the identity domain.
pub type Result<T, E = IdentityError> = std::result::Result<T, E>;
