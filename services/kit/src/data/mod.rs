//! The stores a service uses (and the audit events written to them): its PostgreSQL database
//! and read replicas, the shared Redis, the two-level cache over both, the transactional outbox
//! to analytics, and TLS to the stores.

pub mod audit;
pub mod cache;
pub mod db;
pub mod outbox;
pub mod redis;
pub mod replicas;
pub mod retention;
pub mod tls;
