//! Test support: a fresh PostgreSQL database per test, a Redis handle with a key prefix of its
//! own, both on the real servers `scripts/deps.sh` starts (or those named in the environment);
//! servers of a test's own that it may stop or kill ([`ScratchPostgres`] and its streaming
//! replicas, [`ScratchPgBouncer`], [`ScratchCluster`], [`ScratchSentinel`], [`ScratchRedis`],
//! [`ScratchClickHouse`]); proxies a test puts between a client and a server ([`CuttableProxy`] for
//! outages nobody else sees, [`TlsProxy`] for TLS in front of a plain server); and certificates
//! made for one test ([`TestCertificates`]).

mod certificates;
mod clickhouse;
mod pgbouncer;
mod postgres;
mod proxy;
mod redis;

use std::time::Duration;

pub use certificates::TestCertificates;
pub use clickhouse::ScratchClickHouse;
pub use pgbouncer::{ConsoleRow, ScratchPgBouncer};
pub use postgres::{ScratchDatabase, ScratchPostgres, TestDatabase, postgres_url};
pub use proxy::{CuttableProxy, TlsProxy, authority_of};
pub use redis::{ScratchCluster, ScratchRedis, ScratchSentinel, redis, redis_urls, redis_with_prefix};

/// Polls `done` every 100 ms until it holds, panicking after `limit`.
async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "a scratch server did not get ready within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `count` distinct ports the system had free a moment ago.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> =
        (0..count).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port")).collect();
    listeners.iter().map(|l| l.local_addr().expect("local address").port()).collect()
}
