//! How the gateway answers: JSON bodies, the one error shape, and the headers it passes back
//! from the services.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Serialize;
use tonic_types::StatusExt;

use aimesh_kit::ServiceError;
use aimesh_kit::serving::ratelimit::{HEADER_LIMIT, HEADER_REMAINING, HEADER_RESET, HEADER_RETRY_AFTER};

/// Response headers a service may set that REST clients should see too: the rate-limit state.
pub const PASSED_BACK: [&str; 4] = [HEADER_LIMIT, HEADER_REMAINING, HEADER_RESET, HEADER_RETRY_AFTER];

/// Every failure the gateway reports, in one JSON shape:
/// `{"code": "NOT_FOUND", "reason": "SESSION_NOT_FOUND", "message": "...", "details": {...}}`,
/// with the HTTP status of the standard gRPC-to-HTTP mapping.
#[derive(Debug, Clone)]
pub struct RestError {
    pub status: StatusCode,
    pub code: &'static str,
    pub reason: String,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: Option<Duration>,
    /// Headers the service sent with the failure (rate-limit state); boxed to keep errors small.
    pub headers: Box<HeaderMap>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    reason: &'a str,
    message: &'a str,
    details: ErrorDetails<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorDetails<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

impl RestError {
    /// A failure of the gateway's own, outside the gRPC code mapping (404 route, 405, 413).
    pub fn new(status: StatusCode, code: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            reason: reason.to_owned(),
            message: message.into(),
            field: None,
            retry_after: None,
            headers: Box::default(),
        }
    }

    /// A failure a service reported.
    pub fn from_status(status: &tonic::Status) -> Self {
        let mut error = Self::from(ServiceError::from_status(status));
        if error.reason == "UNKNOWN" {
            error.reason = error.code.to_owned();
        }
        error.retry_after = status.get_details_retry_info().and_then(|info| info.retry_delay);
        error.headers = Box::new(passed_back(status.metadata().as_ref()));
        error
    }

    /// Whole seconds to wait before retrying, rounded up.
    fn retry_after_seconds(&self) -> Option<u64> {
        self.retry_after.map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
    }

    /// The JSON body: also what an `event: error` of a Server-Sent Events stream carries.
    pub fn body(&self, request_id: Option<&str>) -> Vec<u8> {
        let body = ErrorBody {
            code: self.code,
            reason: &self.reason,
            message: &self.message,
            details: ErrorDetails {
                field: self.field.as_deref(),
                retry_after_seconds: self.retry_after_seconds(),
                request_id,
            },
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// The response, tagged with the request id.
    pub fn into_response(self, request_id: Option<&str>) -> Response {
        let mut response = json_response(self.status, self.body(request_id));
        let retry_after_seconds = self.retry_after_seconds();
        response.headers_mut().extend(*self.headers);
        if let Some(seconds) = retry_after_seconds {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<ServiceError> for RestError {
    fn from(error: ServiceError) -> Self {
        Self {
            status: StatusCode::from_u16(error.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: error.code.name(),
            reason: error.reason.into_owned(),
            message: error.message,
            field: error.field,
            retry_after: None,
            headers: Box::default(),
        }
    }
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The headers of a service's response that REST clients should see.
pub fn passed_back(headers: &HeaderMap) -> HeaderMap {
    PASSED_BACK
        .iter()
        .filter_map(|name| headers.get(*name).map(|value| (header::HeaderName::from_static(name), value.clone())))
        .collect()
}
