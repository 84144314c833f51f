//! Errors of the files domain, and their one mapping to the kit's [`ServiceError`].

use aimesh_kit::{ErrorCode, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    /// Missing, deleted, or in a project the caller cannot read: one answer for all three, so
    /// file ids cannot be probed.
    #[error("no such file")]
    FileNotFound { field: &'static str },
    #[error("the file is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the project's storage quota is exceeded: {used} of {quota} bytes used, {size} more asked")]
    QuotaExceeded { used: u64, quota: u64, size: u64 },
    #[error("files of type {0} may not be uploaded")]
    TypeNotAllowed(String),
    #[error("the content is not {declared}{}", detected.map(|d| format!(" (it looks like {d})")).unwrap_or_default())]
    TypeMismatch { declared: String, detected: Option<&'static str> },
    #[error("the content's SHA-256 is {actual}, not the declared {declared}")]
    ChecksumMismatch { declared: String, actual: String },
    #[error("the content has {actual} bytes, not the declared {declared}")]
    SizeMismatch { declared: u64, actual: u64 },
    #[error("the range starts at {offset}, beyond the file's {size} bytes")]
    RangeNotSatisfiable { offset: u64, size: u64 },
    #[error("the download link is invalid or has expired")]
    LinkInvalid,
    #[error("{0}")]
    Forbidden(String),
    #[error("object store: {0}")]
    Storage(#[from] object_store::Error),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl FilesError {
    /// A malformed or out-of-range request field.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { field, message: message.into() }
    }

    /// The caller may see the file but not do this to it.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::Forbidden(message.into())
    }
}

impl From<FilesError> for ServiceError {
    fn from(error: FilesError) -> Self {
        use ErrorCode::{InvalidArgument, NotFound, ResourceExhausted};
        let message = error.to_string();
        match error {
            FilesError::Invalid { field, message } => ServiceError::invalid_field(field, message),
            FilesError::FileNotFound { field } => {
                ServiceError::new(NotFound, "FILE_NOT_FOUND", message).with_field(field)
            }
            FilesError::TooLarge { .. } => {
                ServiceError::new(InvalidArgument, "FILE_TOO_LARGE", message).with_field("size_bytes")
            }
            FilesError::QuotaExceeded { .. } => ServiceError::new(ResourceExhausted, "QUOTA_EXCEEDED", message),
            FilesError::TypeNotAllowed(_) => {
                ServiceError::new(InvalidArgument, "TYPE_NOT_ALLOWED", message).with_field("mime_type")
            }
            FilesError::TypeMismatch { .. } => {
                ServiceError::new(InvalidArgument, "CONTENT_TYPE_MISMATCH", message).with_field("mime_type")
            }
            FilesError::ChecksumMismatch { .. } => {
                ServiceError::new(InvalidArgument, "CHECKSUM_MISMATCH", message).with_field("sha256")
            }
            FilesError::SizeMismatch { .. } => {
                ServiceError::new(InvalidArgument, "SIZE_MISMATCH", message).with_field("size_bytes")
            }
            // The gateway answers 416 for this reason.
            FilesError::RangeNotSatisfiable { .. } => {
                ServiceError::new(InvalidArgument, "RANGE_NOT_SATISFIABLE", message).with_field("offset")
            }
            FilesError::LinkInvalid => ServiceError::new(ErrorCode::PermissionDenied, "LINK_INVALID", message),
            FilesError::Forbidden(_) => ServiceError::permission_denied(message),
            FilesError::Service(error) => error,
            FilesError::Database(error) => ServiceError::from(error),
            FilesError::Storage(error) => ServiceError::unavailable(format!("object store: {error}")),
        }
    }
}

impl From<FilesError> for tonic::Status {
    fn from(error: FilesError) -> Self {
        ServiceError::from(error).into()
    }
}

/// The result type of the files domain.
pub type Result<T, E = FilesError> = std::result::Result<T, E>;
