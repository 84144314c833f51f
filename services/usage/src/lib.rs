//! The usage service: the model catalog and its prices, usage records, quotas and budgets.

pub mod api;
pub mod catalog;
pub mod config;
pub mod counters;
pub mod domain;
pub mod error;
pub mod group_commit;
pub mod ledger;
pub mod retention;
pub mod store;

mod service;

pub use config::UsageConfig;
pub use service::{connect_database, run};

/// The usage database's migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();
