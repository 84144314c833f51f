//! Errors of the analytics domain, and their one mapping to the kit's [`ServiceError`].

use aimesh_kit::{ErrorCode, ServiceError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum AnalyticsError {
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// ClickHouse did not answer: the caller (an outbox relay) retries later.
    #[error("clickhouse is unavailable: {0}")]
    Unavailable(String),
    /// ClickHouse answered with an error: a bug or a schema out of step.
    #[error("clickhouse: {0}")]
    ClickHouse(String),
    /// Redis, which holds the ingest claims, did not answer: the caller retries later.
    #[error("redis is unavailable: {0}")]
    RedisUnavailable(String),
    /// Another replica is storing some of the events right now: the caller retries later.
    #[error("another analytics replica is storing some of these events")]
    ClaimedElsewhere,
}

impl AnalyticsError {
    /// A malformed or out-of-range request field.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { field, message: message.into() }
    }
}

impl From<clickhouse::error::Error> for AnalyticsError {
    fn from(error: clickhouse::error::Error) -> Self {
        use clickhouse::error::Error;
        match error {
            Error::Network(_) | Error::TimedOut => Self::Unavailable(error.to_string()),
            other => Self::ClickHouse(other.to_string()),
        }
    }
}

impl From<AnalyticsError> for ServiceError {
    fn from(error: AnalyticsError) -> Self {
        match error {
            AnalyticsError::Invalid { field, message } => ServiceError::invalid_field(field, message),
            AnalyticsError::Service(error) => error,
            AnalyticsError::Unavailable(cause) => ServiceError::unavailable(format!("clickhouse: {cause}")),
            error @ (AnalyticsError::RedisUnavailable(_) | AnalyticsError::ClaimedElsewhere) => {
                ServiceError::unavailable(error.to_string())
            }
            AnalyticsError::ClickHouse(cause) => {
                ServiceError::new(ErrorCode::Internal, "CLICKHOUSE_ERROR", format!("clickhouse: {cause}"))
            }
        }
    }
}

impl From<AnalyticsError> for tonic::Status {
    fn from(error: AnalyticsError) -> Self {
        ServiceError::from(error).into()
    }
}

/// The result type of the analytics domain.
pub type Result<T, E = AnalyticsError> = std::result::Result<T, E>;
