//! Redis for tests: handles on the test run's cluster, and servers of a test's own.

use std::time::Duration;

use super::{TestCertificates, free_ports, wait_for};
use crate::config::RedisConfig;
use crate::data::redis::Redis;

/// The Redis seed nodes of the test run (`AIMESH_REDIS_URLS`).
pub fn redis_urls() -> String {
    std::env::var("AIMESH_REDIS_URLS").unwrap_or_else(|_| crate::config::CommonConfig::default().redis_urls)
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
    /// The ACL user (and its password) every client must log in as, when the cluster has one.
    user: Option<(String, String)>,
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
        Self::start_as(None).await
    }

    /// Like [`ScratchCluster::start`], with the `default` user off: every client (the nodes'
    /// replication and the tests' `redis-cli` included) logs in as `user` with `password`.
    pub async fn start_with_user(user: &str, password: &str) -> Self {
        Self::start_as(Some((user.to_owned(), password.to_owned()))).await
    }

    async fn start_as(user: Option<(String, String)>) -> Self {
        let dir = std::env::temp_dir().join(format!("aimesh-cluster-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the scratch cluster's directory");
        let ports = free_ports(12);
        let nodes =
            ports.chunks(2).map(|pair| ScratchNode { port: pair[0], bus_port: pair[1], process: None }).collect();
        let mut cluster = Self { dir, nodes, user };
        for index in 0..cluster.nodes.len() {
            cluster.spawn(index);
        }
        for node in &cluster.nodes {
            wait_for(Duration::from_secs(10), || cluster.cli(node.port, &["PING"]).is_some_and(|out| out == "PONG"))
                .await;
        }
        let addresses: Vec<String> = cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let created = cluster
            .cli_command()
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
                cluster
                    .cli(node.port, &["INFO", "replication"])
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
            .args(acl_arguments(self.user.as_ref()))
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed? scripts/deps.sh installs it)");
        node.process = Some(child);
    }

    /// The seed URLs, in the form of `redis_urls`, with the user's credentials in each.
    pub fn urls(&self) -> String {
        let userinfo = self.user.as_ref().map(|(user, password)| format!("{user}:{password}@")).unwrap_or_default();
        self.nodes.iter().map(|n| format!("redis://{userinfo}127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// `redis-cli`, logged in as the cluster's user when it has one.
    fn cli_command(&self) -> std::process::Command {
        let mut command = std::process::Command::new("redis-cli");
        if let Some((user, password)) = &self.user {
            command.args(["--user", user, "--pass", password, "--no-auth-warning"]);
        }
        command
    }

    /// `redis-cli -p port args...` as [`ScratchCluster::cli_command`], its output trimmed; none
    /// if it failed.
    fn cli(&self, port: u16, args: &[&str]) -> Option<String> {
        output_of(self.cli_command().args(["-p", &port.to_string()]).args(args))
    }

    /// The port of the healthy primary that serves `key` now, as a live node sees it; none
    /// while the slot's primary is failing.
    pub fn primary_of(&self, key: &str) -> Option<u16> {
        let node = self.nodes.iter().find(|n| n.process.is_some()).expect("a live node");
        let slot: u16 = self
            .cli(node.port, &["CLUSTER", "KEYSLOT", key])
            .and_then(|slot| slot.parse().ok())
            .expect("CLUSTER KEYSLOT");
        let nodes = self.cli(node.port, &["CLUSTER", "NODES"]).expect("CLUSTER NODES");
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
                .all(|&port| self.cli(port, &["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:ok")))
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

/// The settings of a node whose clients must log in as `user` (replication included).
fn acl_arguments(user: Option<&(String, String)>) -> Vec<String> {
    let Some((user, password)) = user else { return Vec::new() };
    let rule = format!(">{password}");
    let (user, password) = (user.as_str(), password.as_str());
    ["--user", "default", "off", "--user", user, "on", &rule, "~*", "&*", "+@all"]
        .into_iter()
        .chain(["--masteruser", user, "--masterauth", password])
        .map(str::to_owned)
        .collect()
}

/// A command's output trimmed; none if it failed or printed nothing.
fn output_of(command: &mut std::process::Command) -> Option<String> {
    let output = command.output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned()).filter(|o| !o.is_empty())
}

/// A single Redis server of a test's own that accepts TLS only (`rediss://`), with a certificate
/// of [`TestCertificates`]; killed and removed on drop.
#[derive(Debug)]
pub struct ScratchRedis {
    dir: std::path::PathBuf,
    port: u16,
    process: std::process::Child,
}

impl ScratchRedis {
    /// Starts the server with `certificates` and waits until it answers over TLS.
    pub async fn start_tls(certificates: &TestCertificates) -> Self {
        let dir = std::env::temp_dir().join(format!("aimesh-redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the scratch server's directory");
        let port = free_ports(1)[0];
        let process = std::process::Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--tls-cert-file")
            .arg(&certificates.certificate)
            .arg("--tls-key-file")
            .arg(&certificates.key)
            .arg("--tls-ca-cert-file")
            .arg(&certificates.ca)
            // Clients show no certificate of their own; the server shows its own.
            .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--logfile", "redis.log"])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed? scripts/deps.sh installs it)");
        let server = Self { dir, port, process };
        let mut ping = std::process::Command::new("redis-cli");
        ping.args(["--tls", "--cacert"]).arg(&certificates.ca).args(["-p", &port.to_string(), "PING"]);
        wait_for(Duration::from_secs(10), || output_of(&mut ping).is_some_and(|out| out == "PONG")).await;
        server
    }

    /// Its URL, in the form of `redis_urls`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for ScratchRedis {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
