//! The identity service: accounts, login sessions, projects and memberships, API keys, system
//! settings, and the `Authenticate` RPC every other service verifies credentials with.

pub mod api;
pub mod config;
pub mod credentials;
pub mod domain;
pub mod error;
pub mod login_throttle;
pub mod store;

mod service;

pub use config::IdentityConfig;
pub use service::{connect_database, grant_admin, purge_ended_sessions, run};

/// The identity database's migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();
