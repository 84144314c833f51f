//! The chat service: sessions and messages, branches, live watch, search, export.

pub mod api;
pub mod attachments;
pub mod config;
pub mod conversations;
pub mod domain;
pub mod error;
pub mod export;
pub mod live;
pub mod store;

mod service;

pub use config::ChatConfig;
pub use service::{connect_database, run};

/// The chat database's migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();
