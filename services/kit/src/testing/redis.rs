//! Redis for tests: handles on the test run's cluster, and servers of a test's own (a cluster,
//! Sentinels and their primary, a TLS server).

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
        cli_as(self.user.as_ref(), None)
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

/// A primary, two replicas and three Sentinels (quorum 2) watching them, all of this test's own,
/// for tests that kill the primary. Every `redis-server` process (Sentinels are `redis-server
/// --sentinel`) listens on a free loopback port, keeps its files in a temporary directory and is
/// killed on drop. A killed primary is replaced within a few seconds: the Sentinels call it down
/// after 1000 ms and a failover that stalls is retried after 6 s. Optionally every node demands
/// credentials (the data nodes' and the Sentinels' own) or speaks TLS only.
#[derive(Debug)]
pub struct ScratchSentinel {
    dir: std::path::PathBuf,
    /// The data nodes; the first one is the primary at the start.
    nodes: Vec<ScratchProcess>,
    sentinels: Vec<ScratchProcess>,
    /// The ACL user (and its password) clients of the data nodes log in as, if any.
    user: Option<(String, String)>,
    /// The ACL user (and its password) clients of the Sentinels log in as, if any.
    sentinel_user: Option<(String, String)>,
    /// Certificate, key and CA of every node when they speak TLS only.
    tls: Option<TlsFiles>,
}

#[derive(Debug, Clone)]
struct TlsFiles {
    certificate: std::path::PathBuf,
    key: std::path::PathBuf,
    ca: std::path::PathBuf,
}

impl TlsFiles {
    /// The settings of a node (data node or Sentinel) that speaks TLS only, on `port`, to its
    /// clients and to the nodes it connects to; clients show no certificate of their own.
    fn settings(&self, port: u16) -> Vec<(&'static str, String)> {
        let path = |path: &std::path::Path| path.display().to_string();
        vec![
            ("port", "0".to_owned()),
            ("tls-port", port.to_string()),
            ("tls-cert-file", path(&self.certificate)),
            ("tls-key-file", path(&self.key)),
            ("tls-ca-cert-file", path(&self.ca)),
            ("tls-auth-clients", "no".to_owned()),
            ("tls-replication", "yes".to_owned()),
        ]
    }
}

#[derive(Debug)]
struct ScratchProcess {
    port: u16,
    process: Option<std::process::Child>,
}

impl ScratchProcess {
    fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

impl ScratchSentinel {
    /// The name of the primary the Sentinels watch (`sentinelServiceName`).
    pub const SERVICE_NAME: &str = "aimesh";

    /// Starts the servers and waits until every Sentinel knows the primary, both replicas and
    /// the other two Sentinels, so a failover can be agreed on.
    pub async fn start() -> Self {
        Self::start_as(None, None, None).await
    }

    /// Like [`ScratchSentinel::start`], every node (Sentinels included) speaking TLS only with
    /// the server certificate of `certificates` (which must outlive this).
    pub async fn start_tls(certificates: &TestCertificates) -> Self {
        let files = TlsFiles {
            certificate: certificates.certificate.clone(),
            key: certificates.key.clone(),
            ca: certificates.ca.clone(),
        };
        Self::start_as(None, None, Some(files)).await
    }

    /// Like [`ScratchSentinel::start`], with the `default` user off everywhere: clients of the
    /// data nodes (replication and the Sentinels included) log in as `user`, clients of the
    /// Sentinels (the other Sentinels included) as `sentinel_user`; each a (name, password).
    pub async fn start_with_users(user: (&str, &str), sentinel_user: (&str, &str)) -> Self {
        let owned = |(name, password): (&str, &str)| Some((name.to_owned(), password.to_owned()));
        Self::start_as(owned(user), owned(sentinel_user), None).await
    }

    async fn start_as(
        user: Option<(String, String)>,
        sentinel_user: Option<(String, String)>,
        tls: Option<TlsFiles>,
    ) -> Self {
        let dir = std::env::temp_dir().join(format!("aimesh-sentinel-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the scratch sentinels' directory");
        let ports = free_ports(6);
        let process = |port: &u16| ScratchProcess { port: *port, process: None };
        let nodes = ports[..3].iter().map(process).collect();
        let sentinels = ports[3..].iter().map(process).collect();
        let mut scratch = Self { dir, nodes, sentinels, user, sentinel_user, tls };
        let primary = scratch.nodes[0].port.to_string();
        for index in 0..scratch.nodes.len() {
            let mut command = std::process::Command::new("redis-server");
            let port = scratch.nodes[index].port.to_string();
            command
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--protected-mode", "no", "--logfile", &format!("{port}.log")])
                .args(acl_arguments(scratch.user.as_ref()));
            match &scratch.tls {
                Some(tls) => {
                    command.args(
                        tls.settings(scratch.nodes[index].port)
                            .into_iter()
                            .flat_map(|(name, value)| [format!("--{name}"), value]),
                    );
                }
                None => {
                    command.args(["--port", &port]);
                }
            }
            if index > 0 {
                command.args(["--replicaof", "127.0.0.1", &primary]);
            }
            scratch.nodes[index].process = Some(scratch.spawn(&mut command));
        }
        for node in &scratch.nodes {
            wait_for(Duration::from_secs(10), || scratch.cli(node.port, &["PING"]).is_some_and(|out| out == "PONG"))
                .await;
        }
        scratch.wait_until_replicated().await;
        for index in 0..scratch.sentinels.len() {
            let port = scratch.sentinels[index].port;
            let file = scratch.dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(&file, scratch.sentinel_config(port)).expect("write a sentinel's configuration");
            let mut command = std::process::Command::new("redis-server");
            command.arg(&file).arg("--sentinel");
            scratch.sentinels[index].process = Some(scratch.spawn(&mut command));
        }
        let others = (scratch.sentinels.len() - 1).to_string();
        let replicas = (scratch.nodes.len() - 1).to_string();
        for sentinel in &scratch.sentinels {
            wait_for(Duration::from_secs(30), || {
                scratch.sentinel_cli(sentinel.port, &["SENTINEL", "MASTER", Self::SERVICE_NAME]).is_some_and(|master| {
                    let fields: Vec<&str> = master.lines().collect();
                    let field = |name: &str| {
                        fields.chunks(2).find(|pair| pair[0] == name).and_then(|pair| pair.get(1).copied())
                    };
                    field("num-other-sentinels") == Some(others.as_str())
                        && field("num-slaves") == Some(replicas.as_str())
                })
            })
            .await;
        }
        scratch
    }

    fn spawn(&self, command: &mut std::process::Command) -> std::process::Child {
        command
            .current_dir(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed? scripts/deps.sh installs it)")
    }

    /// A Sentinel's configuration file (Sentinels rewrite it as they learn).
    fn sentinel_config(&self, port: u16) -> String {
        let name = Self::SERVICE_NAME;
        let mut lines = match &self.tls {
            Some(tls) => tls.settings(port).into_iter().map(|(name, value)| format!("{name} {value}")).collect(),
            None => vec![format!("port {port}")],
        };
        lines.extend([
            "bind 127.0.0.1".to_owned(),
            "protected-mode no".to_owned(),
            format!("logfile sentinel-{port}.log"),
            format!("sentinel monitor {name} 127.0.0.1 {} 2", self.nodes[0].port),
            format!("sentinel down-after-milliseconds {name} 1000"),
            // Also how long before a stalled failover is tried again (twice this).
            format!("sentinel failover-timeout {name} 3000"),
            format!("sentinel parallel-syncs {name} 2"),
        ]);
        if let Some((user, password)) = &self.user {
            lines
                .extend([format!("sentinel auth-user {name} {user}"), format!("sentinel auth-pass {name} {password}")]);
        }
        if let Some((user, password)) = &self.sentinel_user {
            lines.extend([
                "user default off".to_owned(),
                format!("user {user} on >{password} allchannels +@all"),
                format!("sentinel sentinel-user {user}"),
                format!("sentinel sentinel-pass {password}"),
            ]);
        }
        lines.join("\n") + "\n"
    }

    /// The Sentinels, in the comma separated form of `redis_urls`: the data nodes' credentials
    /// and the options in the first URL, the Sentinels' credentials as options.
    pub fn urls(&self) -> String {
        let userinfo = self.user.as_ref().map(|(user, password)| format!("{user}:{password}@")).unwrap_or_default();
        let mut options = format!("sentinelServiceName={}", Self::SERVICE_NAME);
        if let Some((user, password)) = &self.sentinel_user {
            options.push_str(&format!("&sentinelUsername={user}&sentinelPassword={password}"));
        }
        let scheme = if self.tls.is_some() { "rediss-sentinel" } else { "redis-sentinel" };
        let mut urls = vec![format!("{scheme}://{userinfo}127.0.0.1:{}?{options}", self.sentinels[0].port)];
        urls.extend(self.sentinels[1..].iter().map(|s| format!("{scheme}://127.0.0.1:{}", s.port)));
        urls.join(",")
    }

    /// The ports of the Sentinels.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// `redis-cli -p port args...` on a data node, logged in as its user; the output trimmed,
    /// none if it failed.
    pub fn cli(&self, port: u16, args: &[&str]) -> Option<String> {
        let ca = self.tls.as_ref().map(|tls| tls.ca.as_path());
        output_of(cli_as(self.user.as_ref(), ca).args(["-p", &port.to_string()]).args(args))
    }

    fn sentinel_cli(&self, port: u16, args: &[&str]) -> Option<String> {
        let ca = self.tls.as_ref().map(|tls| tls.ca.as_path());
        output_of(cli_as(self.sentinel_user.as_ref(), ca).args(["-p", &port.to_string()]).args(args))
    }

    /// The primary's port when every live Sentinel names the same live node and that node says
    /// it is a primary; none while a failover is under way.
    pub fn primary(&self) -> Option<u16> {
        let mut named = self.sentinels.iter().filter(|s| s.process.is_some()).map(|sentinel| {
            let address =
                self.sentinel_cli(sentinel.port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::SERVICE_NAME])?;
            address.lines().nth(1)?.trim().parse::<u16>().ok()
        });
        let first = named.next()??;
        if !named.all(|port| port == Some(first)) || !self.nodes.iter().any(|n| n.port == first && n.process.is_some())
        {
            return None;
        }
        let role = self.cli(first, &["ROLE"])?;
        (role.lines().next() == Some("master")).then_some(first)
    }

    /// Kills the primary (SIGKILL: no goodbye) and returns its port.
    pub fn kill_primary(&mut self) -> u16 {
        let primary = self.primary().expect("the sentinels name a live primary");
        let node = self.nodes.iter_mut().find(|n| n.port == primary).expect("a node of this test");
        node.kill();
        primary
    }

    /// Waits (at most 30 s) until the Sentinels name a primary other than `old`, and returns it.
    pub async fn wait_for_failover(&self, old: u16) -> u16 {
        let mut new = None;
        wait_for(Duration::from_secs(30), || {
            new = self.primary().filter(|&port| port != old);
            new.is_some()
        })
        .await;
        new.expect("a new primary")
    }

    /// Waits (at most 10 s) until every live replica has acknowledged all the primary wrote, so
    /// killing the primary now loses nothing (replication is asynchronous).
    pub async fn wait_until_replicated(&self) {
        let live = self.nodes.iter().filter(|n| n.process.is_some()).count();
        let primary = self.primary().unwrap_or(self.nodes[0].port);
        wait_for(Duration::from_secs(10), || {
            let Some(info) = self.cli(primary, &["INFO", "replication"]) else { return false };
            let field = |line: &str, name: &str| {
                line.split(',').find_map(|part| part.strip_prefix(name)?.trim().parse::<u64>().ok())
            };
            let own = info.lines().find_map(|line| field(line, "master_repl_offset:"));
            let acknowledged: Vec<u64> = info
                .lines()
                .filter(|line| line.starts_with("slave") && line.contains("state=online"))
                .filter_map(|line| field(line.split_once(':').map_or(line, |(_, rest)| rest), "offset="))
                .collect();
            acknowledged.len() == live - 1 && own.is_some_and(|own| acknowledged.iter().all(|&offset| offset >= own))
        })
        .await;
    }
}

impl Drop for ScratchSentinel {
    fn drop(&mut self) {
        for process in self.sentinels.iter_mut().chain(self.nodes.iter_mut()) {
            process.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-cli`, logged in as `user` when given, over TLS trusting `ca` when given.
fn cli_as(user: Option<&(String, String)>, ca: Option<&std::path::Path>) -> std::process::Command {
    let mut command = std::process::Command::new("redis-cli");
    if let Some(ca) = ca {
        command.arg("--tls").arg("--cacert").arg(ca);
    }
    if let Some((user, password)) = user {
        command.args(["--user", user, "--pass", password, "--no-auth-warning"]);
    }
    command
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
