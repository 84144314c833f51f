//! The analytics service: events from every service's outbox stored in ClickHouse and counted
//! once however often they arrive, an hourly usage rollup, and project-scoped queries (usage
//! time series and breakdowns, the audit log, retention).

pub mod api;
pub mod cluster;
pub mod config;
pub mod conversion;
pub mod error;
pub mod events;
pub mod query;
pub mod schema;
pub mod store;

mod service;

pub use config::AnalyticsConfig;
pub use service::{connect_clickhouse, connect_clickhouse_converting, run};
