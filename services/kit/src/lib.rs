//! What every aimesh service shares, by concern, each layer using only those listed before it:
//!
//! - [`wire`]: what crosses the wire: the one error type, field checks, protobuf/JSON helpers,
//!   spelled enums, pagination;
//! - [`config`] and [`telemetry`]: the configuration loader and settings, logs, traces, metrics;
//! - [`data`]: the stores: PostgreSQL, Redis, the two-level cache, the transactional outbox, TLS
//!   to the stores;
//! - [`auth`]: credentials, their verification, and access to projects;
//! - [`serving`]: the gRPC server and its layers (authentication, rate limits, observation),
//!   periodic tasks, and the runtime every service starts through;
//! - [`testing`] (feature `testing`): servers and helpers for tests.
//!
//! The credential types of [`auth`] (its `credentials` module) are plain and come before
//! `config`, which holds an [`auth::ServiceToken`]; the rest of [`auth`] comes after [`data`].

pub mod auth;
pub mod config;
pub mod data;
pub mod serving;
pub mod telemetry;
pub mod wire;

pub use wire::error::{ErrorCode, ServiceError};

#[cfg(any(test, feature = "testing"))]
pub mod testing;
