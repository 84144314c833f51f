//! The one error type crossing service boundaries. Domain errors (thiserror enums in each
//! service) convert into [`ServiceError`]; [`ErrorCode`] is the one place that maps to a gRPC
//! code and an HTTP status. The reason is a stable machine-readable string such as
//! `EMAIL_TAKEN`, carried in a `google.rpc.ErrorInfo` detail; the offending field, when there is
//! one, in a `google.rpc.BadRequest` detail.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use tonic_types::{ErrorDetails, StatusExt};

/// The domain of every `ErrorInfo` aimesh sends.
pub const ERROR_DOMAIN: &str = "aimesh";

/// What kind of failure happened, independent of transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Aborted,
    ResourceExhausted,
    DeadlineExceeded,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The gRPC status code.
    pub fn grpc(self) -> tonic::Code {
        match self {
            Self::InvalidArgument => tonic::Code::InvalidArgument,
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::PermissionDenied => tonic::Code::PermissionDenied,
            Self::NotFound => tonic::Code::NotFound,
            Self::AlreadyExists => tonic::Code::AlreadyExists,
            Self::FailedPrecondition => tonic::Code::FailedPrecondition,
            Self::Aborted => tonic::Code::Aborted,
            Self::ResourceExhausted => tonic::Code::ResourceExhausted,
            Self::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status of the standard gRPC-to-HTTP mapping (google.rpc.Code).
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidArgument | Self::FailedPrecondition => 400,
            Self::Unauthenticated => 401,
            Self::PermissionDenied => 403,
            Self::NotFound => 404,
            Self::AlreadyExists | Self::Aborted => 409,
            Self::ResourceExhausted => 429,
            Self::Internal => 500,
            Self::Unavailable => 503,
            Self::DeadlineExceeded => 504,
        }
    }

    /// The google.rpc.Code name, such as `INVALID_ARGUMENT`, as REST error bodies carry it.
    pub fn name(self) -> &'static str {
        match self {
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::FailedPrecondition => "FAILED_PRECONDITION",
            Self::Aborted => "ABORTED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::Unavailable => "UNAVAILABLE",
            Self::Internal => "INTERNAL",
        }
    }

    /// The code for a gRPC status code; codes aimesh never sends map to `Internal`.
    pub fn from_grpc(code: tonic::Code) -> Self {
        match code {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Self::InvalidArgument,
            tonic::Code::Unauthenticated => Self::Unauthenticated,
            tonic::Code::PermissionDenied => Self::PermissionDenied,
            tonic::Code::NotFound => Self::NotFound,
            tonic::Code::AlreadyExists => Self::AlreadyExists,
            tonic::Code::FailedPrecondition => Self::FailedPrecondition,
            tonic::Code::Aborted => Self::Aborted,
            tonic::Code::ResourceExhausted => Self::ResourceExhausted,
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => Self::DeadlineExceeded,
            tonic::Code::Unavailable => Self::Unavailable,
            _ => Self::Internal,
        }
    }

    /// Whether the same request may succeed if sent again later.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Unavailable | Self::Aborted | Self::DeadlineExceeded | Self::ResourceExhausted)
    }
}

/// An error as a caller sees it: a code, a stable reason, a message for people, and the field
/// of the request it is about, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    pub code: ErrorCode,
    pub reason: Cow<'static, str>,
    pub message: String,
    pub field: Option<String>,
}

impl ServiceError {
    pub fn new(code: ErrorCode, reason: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self { code, reason: reason.into(), message: message.into(), field: None }
    }

    /// Names the request field the error is about.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// A malformed or out-of-range field: `INVALID_ARGUMENT`, reason `INVALID_FIELD`.
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        let message = format!("{field}: {}", message.into());
        Self::new(ErrorCode::InvalidArgument, "INVALID_FIELD", message).with_field(field)
    }

    /// No credential, or one that is malformed, expired or revoked.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthenticated, "UNAUTHENTICATED", message)
    }

    /// The caller is known but may not do this.
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PermissionDenied, "PERMISSION_DENIED", message)
    }

    /// An unexpected failure; the message is logged here and not sent to the caller.
    pub fn internal(cause: impl fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(ErrorCode::Internal, "INTERNAL", "internal error")
    }

    /// A dependency (database, Redis, another service) cannot be reached.
    pub fn unavailable(cause: impl fmt::Display) -> Self {
        tracing::warn!(error = %cause, "dependency unavailable");
        Self::new(ErrorCode::Unavailable, "UNAVAILABLE", "a dependency is unavailable, retry later")
    }

    /// Reads back what [`From<ServiceError> for tonic::Status`] wrote, for clients and the gateway.
    pub fn from_status(status: &tonic::Status) -> Self {
        let details = status.get_error_details();
        let reason =
            details.error_info().map(|info| Cow::Owned(info.reason.clone())).unwrap_or(Cow::Borrowed("UNKNOWN"));
        let field =
            details.bad_request().and_then(|bad| bad.field_violations.first()).map(|violation| violation.field.clone());
        Self { code: ErrorCode::from_grpc(status.code()), reason, message: status.message().to_owned(), field }
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.reason, self.code.grpc(), self.message)
    }
}

impl std::error::Error for ServiceError {}

impl From<ServiceError> for tonic::Status {
    fn from(error: ServiceError) -> Self {
        let mut details = ErrorDetails::with_error_info(error.reason.clone(), ERROR_DOMAIN, HashMap::new());
        if let Some(field) = &error.field {
            details.add_bad_request_violation(field.clone(), error.message.clone());
        }
        tonic::Status::with_error_details(error.code.grpc(), error.message, details)
    }
}

/// A handler's answer as gRPC, from a result in any domain error that maps to [`ServiceError`].
pub fn respond<T, E>(result: Result<T, E>) -> Result<tonic::Response<T>, tonic::Status>
where
    ServiceError: From<E>,
{
    result.map(tonic::Response::new).map_err(|error| ServiceError::from(error).into())
}

impl From<sqlx::Error> for ServiceError {
    /// Database errors that reach this far are not the caller's fault; connection trouble is
    /// worth a retry, anything else is a bug.
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => Self::unavailable(error),
            sqlx::Error::Database(ref database) if database.code().is_some_and(|code| server_unavailable(&code)) => {
                Self::unavailable(error)
            }
            other => Self::internal(other),
        }
    }
}

/// SQLSTATEs of a server that cannot serve right now rather than of a wrong statement: class 08
/// (connection exception), 57P01-57P03 (shutting down, crashed, not yet accepting: what a
/// restart sends to open connections and new ones) and 53300 (too many connections).
fn server_unavailable(sqlstate: &str) -> bool {
    sqlstate.starts_with("08") || matches!(sqlstate, "57P01" | "57P02" | "57P03" | "53300")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a session killed by a server shutdown or an administrator gets (57P01).
    #[tokio::test]
    async fn a_terminated_database_session_is_unavailable_not_internal() {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&crate::testing::postgres_url()).await.expect("connect");
        let error = sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
            .execute(&mut conn)
            .await
            .expect_err("the session ends");
        assert!(matches!(&error, sqlx::Error::Database(e) if e.code().as_deref() == Some("57P01")), "{error:?}");
        assert_eq!(ServiceError::from(error).code, ErrorCode::Unavailable);
    }

    #[test]
    fn status_round_trip_keeps_reason_and_field() {
        let error = ServiceError::invalid_field("email", "is not an email address");
        let status = tonic::Status::from(error.clone());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(ServiceError::from_status(&status), error);
    }

    #[test]
    fn http_mapping_follows_google_rpc_code() {
        assert_eq!(ErrorCode::NotFound.http_status(), 404);
        assert_eq!(ErrorCode::AlreadyExists.http_status(), 409);
        assert_eq!(ErrorCode::FailedPrecondition.http_status(), 400);
        assert_eq!(ErrorCode::Unauthenticated.http_status(), 401);
        assert_eq!(ErrorCode::Unavailable.http_status(), 503);
        assert_eq!(ErrorCode::from_grpc(tonic::Code::DataLoss), ErrorCode::Internal);
    }
}
