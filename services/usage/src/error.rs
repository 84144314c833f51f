//! Errors of the usage domain, and their one mapping to the kit's [`ServiceError`].

use aimesh_kit::data::redis::RedisError;
use aimesh_kit::{ErrorCode, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("{what} not found")]
    NotFound { what: &'static str, field: &'static str },
    #[error("no catalog model matches {model:?}")]
    ModelNotFound { field: &'static str, model: String },
    #[error("the model {0} is retired")]
    ModelRetired(String),
    #[error("the model has no price in force at {0}")]
    NoPrice(chrono::DateTime<chrono::Utc>),
    #[error("a model with this provider, name and version already exists")]
    ModelExists,
    #[error("the model already has a price taking effect at this time")]
    PriceExists,
    #[error("quota exceeded: {limit} (used {used}, limit {allowed})")]
    QuotaExceeded { limit: String, used: String, allowed: String },
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
}

impl UsageError {
    /// A malformed or out-of-range request field.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { field, message: message.into() }
    }

    /// The caller has no access of the kind needed.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::Forbidden(message.into())
    }
}

impl From<UsageError> for ServiceError {
    fn from(error: UsageError) -> Self {
        let message = error.to_string();
        match error {
            UsageError::Invalid { field, message } => ServiceError::invalid_field(field, message),
            UsageError::NotFound { what, field } => {
                let reason = format!("{}_NOT_FOUND", what.to_uppercase().replace(' ', "_"));
                ServiceError::new(ErrorCode::NotFound, reason, message).with_field(field)
            }
            UsageError::ModelNotFound { field, .. } => {
                ServiceError::new(ErrorCode::NotFound, "MODEL_NOT_FOUND", message).with_field(field)
            }
            UsageError::ModelRetired(_) => {
                ServiceError::new(ErrorCode::FailedPrecondition, "MODEL_RETIRED", message).with_field("model")
            }
            UsageError::NoPrice(_) => ServiceError::new(ErrorCode::FailedPrecondition, "NO_PRICE", message),
            UsageError::ModelExists => ServiceError::new(ErrorCode::AlreadyExists, "MODEL_EXISTS", message),
            UsageError::PriceExists => {
                ServiceError::new(ErrorCode::AlreadyExists, "PRICE_EXISTS", message).with_field("price.effective_time")
            }
            UsageError::QuotaExceeded { .. } => {
                ServiceError::new(ErrorCode::ResourceExhausted, "QUOTA_EXCEEDED", message)
            }
            UsageError::Forbidden(_) => ServiceError::permission_denied(message),
            UsageError::Service(error) => error,
            UsageError::Database(error) => ServiceError::from(error),
            // Counters cannot be kept without Redis; the caller may retry (records are idempotent).
            UsageError::Redis(error) => ServiceError::unavailable(format!("redis: {error}")),
        }
    }
}

impl From<UsageError> for tonic::Status {
    fn from(error: UsageError) -> Self {
        ServiceError::from(error).into()
    }
}

/// The result type of the usage domain.
pub type Result<T, E = UsageError> = std::result::Result<T, E>;
