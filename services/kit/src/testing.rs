//! Test support: a fresh PostgreSQL database per test, a Redis handle with a key prefix of its
//! own, both on the real servers `scripts/deps.sh` starts (or those named in the environment),
//! a scratch Redis Cluster for tests that kill nodes, and a TCP proxy a test can cut between a
//! service and a shared server (a server outage nobody else sees).

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};

use crate::config::{DatabaseConfig, RedisConfig};
use crate::redis::Redis;

/// The PostgreSQL server of the test run (`AIMESH_POSTGRES_URL`).
pub fn postgres_url() -> String {
    std::env::var("AIMESH_POSTGRES_URL").unwrap_or_else(|_| crate::config::CommonConfig::default().postgres_url)
}

/// The Redis seed nodes of the test run (`AIMESH_REDIS_URLS`).
pub fn redis_urls() -> String {
    std::env::var("AIMESH_REDIS_URLS").unwrap_or_else(|_| crate::config::CommonConfig::default().redis_urls)
}

/// A database name no other test uses, on the test server; the database (if something created
/// it) is dropped with this value. For services that create and migrate their own database.
#[derive(Debug)]
pub struct ScratchDatabase {
    pub url: String,
    name: String,
}

impl ScratchDatabase {
    pub fn new() -> Self {
        let name = format!("aimesh_test_{}", uuid::Uuid::new_v4().simple());
        Self { url: crate::db::database_url(&postgres_url(), &name), name }
    }
}

impl Default for ScratchDatabase {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        // Drop runs outside async; a thread of its own may block on a small runtime.
        let name = self.name.clone();
        let server = postgres_url();
        let dropper = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                let Ok(options) = PgConnectOptions::from_str(&server) else { return };
                if let Ok(mut admin) = PgConnection::connect_with(&options.database("postgres")).await {
                    let statement = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut admin).await;
                }
            });
        });
        let _ = dropper.join();
    }
}

/// A database that exists for one test, migrated, and is dropped with this value.
#[derive(Debug)]
pub struct TestDatabase {
    pub pool: PgPool,
    pub url: String,
    _scratch: ScratchDatabase,
}

impl TestDatabase {
    /// Creates an empty database with a unique name and applies `migrator` to it.
    pub async fn new(migrator: &Migrator) -> Self {
        let scratch = ScratchDatabase::new();
        crate::db::ensure_database(&scratch.url).await.unwrap_or_else(|e| {
            panic!(
                "cannot create a test database on {}: {e} (run `make test`, which starts PostgreSQL)",
                postgres_url()
            )
        });
        let settings = DatabaseConfig { max_connections: 10, min_connections: 0, ..DatabaseConfig::default() };
        let pool = crate::db::connect(&scratch.url, &settings).await.expect("connect to the test database");
        crate::db::migrate(&pool, migrator).await.expect("migrate the test database");
        Self { pool, url: scratch.url.clone(), _scratch: scratch }
    }
}

/// A Redis handle whose keys and channels carry a prefix no other test uses.
pub async fn redis() -> Redis {
    redis_with_prefix(&format!("test-{}", uuid::Uuid::new_v4().simple())).await
}

/// A Redis handle on the test cluster with the key prefix `prefix`: tests that play several
/// replicas of one deployment give each its own connections on one prefix.
pub async fn redis_with_prefix(prefix: &str) -> Redis {
    Redis::connect_with_prefix(&redis_urls(), &RedisConfig::default(), prefix).await.unwrap_or_else(|e| {
        panic!("cannot reach Redis at {}: {e} (run `make test`, which starts the cluster)", redis_urls())
    })
}

/// A six-node Redis Cluster (three primaries, three replicas) of this test's own, for tests that
/// kill nodes, which the shared cluster must never see. Its `redis-server` processes listen on
/// free loopback ports, keep their files in a temporary directory and are killed on drop.
#[derive(Debug)]
pub struct ScratchCluster {
    dir: std::path::PathBuf,
    nodes: Vec<ScratchNode>,
}

#[derive(Debug)]
struct ScratchNode {
    port: u16,
    bus_port: u16,
    process: Option<std::process::Child>,
}

impl ScratchCluster {
    /// Starts the nodes and joins them into a cluster, with `cluster-node-timeout` 1000 ms so a
    /// killed primary fails over within a few seconds.
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("aimesh-cluster-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the scratch cluster's directory");
        let ports = free_ports(12);
        let nodes =
            ports.chunks(2).map(|pair| ScratchNode { port: pair[0], bus_port: pair[1], process: None }).collect();
        let mut cluster = Self { dir, nodes };
        for index in 0..cluster.nodes.len() {
            cluster.spawn(index);
        }
        for node in &cluster.nodes {
            wait_for(Duration::from_secs(10), || redis_cli(node.port, &["PING"]).is_some_and(|out| out == "PONG"))
                .await;
        }
        let addresses: Vec<String> = cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let created = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(created.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&created.stdout));
        cluster.wait_until_ok().await;
        // A replica that never finished its first sync refuses to take over from a dead primary.
        for node in &cluster.nodes {
            wait_for(Duration::from_secs(30), || {
                redis_cli(node.port, &["INFO", "replication"])
                    .is_some_and(|info| info.contains("role:master") || info.contains("master_link_status:up"))
            })
            .await;
        }
        cluster
    }

    fn spawn(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        let (port, bus_port) = (node.port.to_string(), node.bus_port.to_string());
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port, "--cluster-port", &bus_port, "--bind", "127.0.0.1", "--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf"), "--cluster-node-timeout", "1000"])
            // A replica takes over however long ago it last heard from its primary.
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--logfile", &format!("{port}.log")])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed? scripts/deps.sh installs it)");
        node.process = Some(child);
    }

    /// The seed URLs, in the form of `redis_urls`.
    pub fn urls(&self) -> String {
        self.nodes.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// The port of the healthy primary that serves `key` now, as a live node sees it; none
    /// while the slot's primary is failing.
    pub fn primary_of(&self, key: &str) -> Option<u16> {
        let node = self.nodes.iter().find(|n| n.process.is_some()).expect("a live node");
        let slot: u16 = redis_cli(node.port, &["CLUSTER", "KEYSLOT", key])
            .and_then(|slot| slot.parse().ok())
            .expect("CLUSTER KEYSLOT");
        let nodes = redis_cli(node.port, &["CLUSTER", "NODES"]).expect("CLUSTER NODES");
        nodes
            .lines()
            .filter(|line| line.split(' ').nth(2).is_some_and(|flags| flags.contains("master") && !flags.contains("fail")))
            .find(|line| {
                line.split(' ').skip(8).any(|range| {
                    let (low, high) = range.split_once('-').unwrap_or((range, range));
                    matches!((low.parse::<u16>(), high.parse::<u16>()), (Ok(low), Ok(high)) if (low..=high).contains(&slot))
                })
            })
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|address| address.split(['@', ':']).nth(1))
            .and_then(|port| port.parse().ok())
    }

    /// Kills the node on `port` (SIGKILL: no goodbye to the cluster).
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).expect("a node of this cluster");
        if let Some(mut process) = node.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Kills every node: Redis is unreachable until [`ScratchCluster::restart`].
    pub fn kill_all(&mut self) {
        let ports: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
        for port in ports {
            self.kill(port);
        }
    }

    /// Starts the killed nodes again on their ports; they rejoin from their cluster files (with
    /// no data: nothing is persisted) and this waits until the cluster is whole.
    pub async fn restart(&mut self) {
        for index in 0..self.nodes.len() {
            if self.nodes[index].process.is_none() {
                self.spawn(index);
            }
        }
        self.wait_until_ok().await;
    }

    /// Waits until every live node reports `cluster_state:ok`.
    pub async fn wait_until_ok(&self) {
        let live: Vec<u16> = self.nodes.iter().filter(|n| n.process.is_some()).map(|n| n.port).collect();
        wait_for(Duration::from_secs(30), || {
            live.iter()
                .all(|&port| redis_cli(port, &["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:ok")))
        })
        .await;
    }
}

impl Drop for ScratchCluster {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL server of a test's own, which the test may stop and start: the shared dev server
/// must never restart under the other tests. Made with `initdb` in a temporary directory,
/// listening on a free loopback port with trust authentication; stopped and removed on drop.
/// Needs `AIMESH_PG_BIN` (and, when tests run as root, `AIMESH_PG_USER`), which
/// `scripts/deps.sh up` writes to `.dev/env`.
#[derive(Debug)]
pub struct ScratchPostgres {
    dir: std::path::PathBuf,
    port: u16,
    bin: std::path::PathBuf,
    user: Option<String>,
}

impl ScratchPostgres {
    /// Creates and starts the server.
    pub fn start() -> Self {
        let bin = std::env::var("AIMESH_PG_BIN").expect("AIMESH_PG_BIN names PostgreSQL's binaries (. .dev/env)");
        let user = std::env::var("AIMESH_PG_USER").ok().filter(|user| !user.is_empty());
        // Under /var/tmp, which the PostgreSQL user can reach whoever owns the checkout.
        let dir = std::path::PathBuf::from("/var/tmp").join(format!("aimesh-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the scratch server's directory");
        let server = Self { dir, port: free_ports(1)[0], bin: bin.into(), user };
        if let Some(user) = &server.user {
            let owned = std::process::Command::new("chown").arg(user).arg(&server.dir).status();
            assert!(owned.is_ok_and(|s| s.success()), "chown {user} {}", server.dir.display());
        }
        let data = server.dir.join("data");
        let mut initdb = server.command("initdb");
        initdb.arg("-D").arg(&data).args(["-U", "postgres", "--auth=trust", "--no-sync"]);
        run_checked(initdb);
        server.start_again();
        server
    }

    /// `postgres://postgres@127.0.0.1:port`, without a database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Stops the server (fast shutdown: sessions are ended, as in a restart).
    pub fn stop(&self) {
        let mut stop = self.pg_ctl();
        stop.args(["-m", "fast", "-w", "stop"]);
        run_checked(stop);
    }

    /// Starts the stopped server on the same port and data, waiting until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off -c max_connections=100",
            self.port,
            self.dir.display()
        );
        let mut start = self.pg_ctl();
        start.arg("-l").arg(self.dir.join("server.log")).arg("-o").arg(options).args(["-w", "start"]);
        run_checked(start);
    }

    /// `pg_ctl -D <data directory>`, to be run as PostgreSQL's user.
    fn pg_ctl(&self) -> std::process::Command {
        let mut command = self.command("pg_ctl");
        command.arg("-D").arg(self.dir.join("data"));
        command
    }

    /// One of PostgreSQL's programs, to be run as its user.
    fn command(&self, program: &str) -> std::process::Command {
        let program = self.bin.join(program);
        let Some(user) = &self.user else { return std::process::Command::new(program) };
        let mut command = std::process::Command::new("setpriv");
        command
            .arg(format!("--reuid={user}"))
            .arg(format!("--regid={user}"))
            .args(["--init-groups", "--"])
            .arg(program);
        command
    }
}

/// Runs `command`, panicking with its output if it fails.
fn run_checked(mut command: std::process::Command) {
    let output = command.output().unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl().args(["-m", "immediate", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-cli -p port args...`, its output trimmed; none if it failed.
fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let output = std::process::Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned()).filter(|o| !o.is_empty())
}

/// Polls `done` every 100 ms until it holds, panicking after `limit`.
async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "the scratch cluster did not get ready within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `count` distinct ports the system had free a moment ago.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> =
        (0..count).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port")).collect();
    listeners.iter().map(|l| l.local_addr().expect("local address").port()).collect()
}

/// A TCP proxy in front of a server that a test can cut or stall. Cut (down), it drops new
/// connections as soon as it accepts them and closes the open ones, which is what a client sees
/// of a stopped or restarting server. Stalled, it keeps every connection open and passes
/// nothing, which is what a client sees of a partition or a server that stopped answering:
/// the connections open at the time stay silent for good (until the proxy is cut or dropped),
/// new ones wait and are served once the stall ends. The shared server itself never notices,
/// so other tests keep using it. Stops with the test's runtime.
#[derive(Debug)]
pub struct CuttableProxy {
    /// The proxy's `host:port`.
    pub address: std::net::SocketAddr,
    link: std::sync::Arc<tokio::sync::watch::Sender<Link>>,
}

/// What a [`CuttableProxy`] does with the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    Down,
    Stalled,
}

impl CuttableProxy {
    /// A proxy on a free loopback port forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let address = listener.local_addr().expect("proxy address");
        let upstream = upstream.to_owned();
        let link = std::sync::Arc::new(tokio::sync::watch::channel(Link::Up).0);
        let state = std::sync::Arc::clone(&link);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if *state.borrow() == Link::Down {
                    continue;
                }
                let (mut down, mut stalled) = (state.subscribe(), state.subscribe());
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(link) = down.wait_for(|link| *link != Link::Stalled).await.map(|link| *link) else { return };
                    if link == Link::Down {
                        return;
                    }
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let stalled = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                        _ = down.wait_for(|link| *link == Link::Down) => false,
                        _ = stalled.wait_for(|link| *link == Link::Stalled) => true,
                    };
                    if stalled {
                        // Silent, both ends open, until the link goes down or the proxy is gone.
                        let _ = down.wait_for(|link| *link == Link::Down).await.map(drop);
                    }
                });
            }
        });
        Self { address, link }
    }

    /// `url` with its `host:port` (that of `upstream`) replaced by the proxy's.
    pub fn rewrite(&self, url: &str, upstream: &str) -> String {
        assert!(url.contains(upstream), "{url} does not name {upstream}");
        url.replacen(upstream, &self.address.to_string(), 1)
    }

    /// Cuts (`true`) or restores (`false`) the connection to the server.
    pub fn set_down(&self, down: bool) {
        self.link.send_replace(if down { Link::Down } else { Link::Up });
    }

    /// Stalls (`true`) the connections to the server, or lets new ones through again (`false`).
    pub fn set_stalled(&self, stalled: bool) {
        self.link.send_replace(if stalled { Link::Stalled } else { Link::Up });
    }
}

/// The `host:port` of a URL such as `postgres://postgres@127.0.0.1:55432/db` or
/// `http://127.0.0.1:18123`.
pub fn authority_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}
