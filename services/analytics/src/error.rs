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
            Error::BadResponse(ref text) if is_transient(text) => Self::Unavailable(error.to_string()),
            other => Self::ClickHouse(other.to_string()),
        }
    }
}

/// Errors of a replicated cluster that pass by themselves, so the caller retries: a quorum
/// insert waiting for the one before it (`insert_quorum_parallel = 0`), too few live replicas
/// for a quorum, an insert whose outcome is unknown (the retry's check finds it if it was
/// stored), a replica behind the last quorum insert (`select_sequential_consistency`), and a
/// replica or shard that cannot be reached.
fn is_transient(text: &str) -> bool {
    const CODES: [u32; 6] = [
        279, // ALL_CONNECTION_TRIES_FAILED
        285, // TOO_FEW_LIVE_REPLICAS
        286, // UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE
        289, // REPLICA_IS_NOT_IN_QUORUM
        319, // UNKNOWN_STATUS_OF_INSERT
        999, // KEEPER_EXCEPTION
    ];
    let code = text.split_once("Code: ").and_then(|(_, rest)| {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    code.is_some_and(|code| CODES.contains(&code))
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

#[cfg(test)]
mod tests {
    #[test]
    fn transient_cluster_errors_are_retried() {
        assert!(super::is_transient("Code: 286. DB::Exception: Quorum for previous write has not been satisfied yet"));
        assert!(!super::is_transient("Code: 60. DB::Exception: Unknown table"));
        assert!(!super::is_transient("no code at all"));
    }
}
