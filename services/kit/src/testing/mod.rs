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

/// Where the servers a test starts itself listen: below Linux's ephemeral range (32768 to
/// 60999), from which every outgoing connection takes its local port, so that a port found free
/// is not taken by some connection before its server binds it; and clear of the dev servers'
/// fixed ports (`scripts/deps.sh`: 17001 and up, 18xxx, 19333, and 27001 and up).
const SCRATCH_PORTS: std::ops::Range<u16> = 20_000..27_000;

/// `count` distinct loopback ports for servers a test starts, each free now and claimed for
/// this process against the other test processes of the run (see [`claim_port`]), so two tests
/// running at once never pick the same one.
pub fn free_ports(count: usize) -> Vec<u16> {
    let claims = std::env::temp_dir().join("aimesh-test-ports");
    std::fs::create_dir_all(&claims).expect("create the directory of port claims");
    let span = u128::from(SCRATCH_PORTS.end - SCRATCH_PORTS.start);
    let (mut held, mut ports) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for _ in 0..20_000 {
        if ports.len() == count {
            return ports;
        }
        // Any spread will do: a port is only taken once it is claimed and found free.
        let port = SCRATCH_PORTS.start + (uuid::Uuid::new_v4().as_u128() % span) as u16;
        if ports.contains(&port) || !claim_port(&claims, port) {
            continue;
        }
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
            ports.push(port);
        }
    }
    panic!("no {count} free ports in {SCRATCH_PORTS:?}")
}

/// Claims `port` for this process: a file named by the port in `claims`, holding the pid of the
/// process that claimed it, made only if none exists; a claim whose process has ended is taken
/// over. A claim stays while its process lives, as the port may be in use until then.
fn claim_port(claims: &std::path::Path, port: u16) -> bool {
    use std::io::Write;
    let path = claims.join(port.to_string());
    let me = std::process::id().to_string();
    for _ in 0..2 {
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut file) => return file.write_all(me.as_bytes()).is_ok(),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                let owner = owner.trim();
                // Just made and not yet written, or ours, or a live process's: not free.
                if owner.is_empty() || owner == me || std::path::Path::new("/proc").join(owner).exists() {
                    return false;
                }
                let _ = std::fs::remove_file(&path);
            }
            Err(_) => return false,
        }
    }
    false
}
