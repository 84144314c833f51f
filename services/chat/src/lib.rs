//! The chat service: sessions and messages, branches, live watch, search, export.

pub mod api;
pub mod config;

mod service;

pub use config::ChatConfig;
pub use service::{connect_database, run};

/// The chat database's migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();
