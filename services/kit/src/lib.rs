//! What every aimesh service shares: configuration, telemetry, the error type, server
//! bootstrap, authentication, the two-level cache, the transactional outbox and test support.

pub mod access;
pub mod auth;
pub mod cache;
pub mod config;
pub mod db;
pub mod error;
pub mod fields;
pub mod gate;
pub mod outbox;
pub mod pagination;
pub mod periodic;
pub mod proto_json;
pub mod ratelimit;
pub mod redis;
pub mod runtime;
pub mod server;
pub mod spelled;
pub mod telemetry;
pub mod tls;

pub use error::{ErrorCode, ServiceError};

#[cfg(any(test, feature = "testing"))]
pub mod testing;
