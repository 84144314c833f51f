//! ClickHouse clusters of a test's own: several chDB `clickhouse-local` processes, each serving
//! HTTP and the native protocol on free loopback ports, named in one `remote_servers` cluster,
//! with a one-node ZooKeeper as their Keeper. See docs/clickhouse-cluster.md for what such a
//! node can and cannot do (no interserver HTTP and no distributed DDL queue in clickhouse-local).

use std::io::{Read, Write};
use std::time::Duration;

use super::{free_ports, wait_for};

/// Keeps a clickhouse-local alive as a server (the script deps.sh runs for the dev server).
const SERVER_PY: &str = include_str!("../../../../scripts/clickhouse_server.py");

/// A cluster of `shards` × `replicas` ClickHouse nodes and a ZooKeeper, all killed and removed
/// on drop. Needs `AIMESH_CLICKHOUSE_PYTHON` (the Python with chDB) and
/// `AIMESH_ZOOKEEPER_CLASSPATH`, which `scripts/deps.sh up` writes to `.dev/env`.
#[derive(Debug)]
pub struct ScratchClickHouse {
    dir: std::path::PathBuf,
    cluster: String,
    keeper: Option<std::process::Child>,
    keeper_port: u16,
    nodes: Vec<ScratchNode>,
}

#[derive(Debug)]
struct ScratchNode {
    shard: usize,
    replica: usize,
    http_port: u16,
    tcp_port: u16,
    process: Option<std::process::Child>,
}

impl ScratchClickHouse {
    /// Starts the Keeper and the nodes, waiting until each answers over HTTP and sees the others
    /// over the native protocol.
    pub async fn start(shards: usize, replicas: usize) -> Self {
        let python = std::env::var("AIMESH_CLICKHOUSE_PYTHON")
            .expect("AIMESH_CLICKHOUSE_PYTHON names chDB's Python (. .dev/env)");
        let classpath = std::env::var("AIMESH_ZOOKEEPER_CLASSPATH")
            .expect("AIMESH_ZOOKEEPER_CLASSPATH names ZooKeeper's jars (. .dev/env)");
        let dir = std::env::temp_dir().join(format!("aimesh-clickhouse-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the scratch cluster's directory");
        let count = shards * replicas;
        let ports = free_ports(2 * count + 1);
        let nodes = (0..count)
            .map(|i| ScratchNode {
                shard: i / replicas + 1,
                replica: i % replicas + 1,
                http_port: ports[2 * i],
                tcp_port: ports[2 * i + 1],
                process: None,
            })
            .collect();
        let keeper_port = ports[2 * count];
        let mut scratch = Self { dir, cluster: "aimesh_test".into(), keeper: None, keeper_port, nodes };
        scratch.keeper = Some(scratch.spawn_keeper(&classpath));
        wait_for(Duration::from_secs(30), || {
            four_letter_word(keeper_port, "ruok").is_some_and(|answer| answer == "imok")
        })
        .await;
        for index in 0..scratch.nodes.len() {
            scratch.write_config(index);
            let node_dir = scratch.node_dir(index);
            let child = std::process::Command::new(&python)
                .args(["-c", SERVER_PY])
                .arg(node_dir.join("data"))
                .arg("HTTP,TCP")
                .current_dir(&node_dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(node_dir.join("server.log")).expect("create the node's log"))
                .spawn()
                .expect("start a chDB node (scripts/deps.sh installs chdb-core)");
            scratch.nodes[index].process = Some(child);
        }
        for node in &scratch.nodes {
            let port = node.http_port;
            wait_for(Duration::from_secs(30), || http_query(port, "SELECT 1").is_some_and(|out| out == "1")).await;
        }
        // Every node reaches every other one over the native protocol (what Distributed uses).
        let probe = format!("SELECT count() FROM clusterAllReplicas({}, system.one)", scratch.cluster);
        for node in &scratch.nodes {
            let port = node.http_port;
            wait_for(Duration::from_secs(30), || http_query(port, &probe).is_some_and(|out| out == count.to_string()))
                .await;
        }
        scratch
    }

    /// The name of the cluster in every node's `remote_servers`.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Every node's HTTP URL, shard by shard.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("http://127.0.0.1:{}", n.http_port)).collect()
    }

    /// `host:port` of the Keeper (ZooKeeper's client port).
    pub fn keeper_address(&self) -> String {
        format!("127.0.0.1:{}", self.keeper_port)
    }

    /// Runs `sql` on node `index` over HTTP; its output trimmed, or the server's error.
    pub fn query(&self, index: usize, sql: &str) -> Result<String, String> {
        http_request(self.nodes[index].http_port, sql)
    }

    fn node_dir(&self, index: usize) -> std::path::PathBuf {
        self.dir.join(format!("node{}", index + 1))
    }

    fn spawn_keeper(&self, classpath: &str) -> std::process::Child {
        let data = self.dir.join("keeper");
        std::fs::create_dir_all(&data).expect("create the keeper's directory");
        std::process::Command::new("java")
            .args(["-Xmx128m", "-Dzookeeper.admin.enableServer=false", "-Dzookeeper.4lw.commands.whitelist=ruok"])
            .args(["-cp", classpath, "org.apache.zookeeper.server.ZooKeeperServerMain"])
            .arg(self.keeper_port.to_string())
            .arg(&data)
            .stdout(std::fs::File::create(self.dir.join("keeper.log")).expect("create the keeper's log"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start ZooKeeper (scripts/deps.sh installs zookeeper and Java)")
    }

    /// The node's config.xml: its ports and macros, the cluster of every node, the Keeper, and
    /// where BACKUP may write files.
    fn write_config(&self, index: usize) {
        let node = &self.nodes[index];
        let mut shards = String::new();
        for shard in 1..=self.nodes.iter().map(|n| n.shard).max().unwrap_or(0) {
            shards.push_str("<shard><internal_replication>true</internal_replication>");
            for member in self.nodes.iter().filter(|n| n.shard == shard) {
                shards.push_str(&format!("<replica><host>127.0.0.1</host><port>{}</port></replica>", member.tcp_port));
            }
            shards.push_str("</shard>");
        }
        let config = format!(
            "<clickhouse>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <macros><shard>{shard}</shard><replica>r{replica}</replica></macros>
    <remote_servers><{cluster}>{shards}</{cluster}></remote_servers>
    <zookeeper><node><host>127.0.0.1</host><port>{keeper}</port></node></zookeeper>
    <backups><allowed_path>{backups}</allowed_path></backups>
</clickhouse>
",
            http = node.http_port,
            tcp = node.tcp_port,
            shard = node.shard,
            replica = node.replica,
            cluster = self.cluster,
            keeper = self.keeper_port,
            // BACKUP ... TO File() of the restore drill writes to a temporary directory.
            backups = std::env::temp_dir().display(),
        );
        let dir = self.node_dir(index);
        std::fs::create_dir_all(dir.join("data")).expect("create the node's directory");
        std::fs::write(dir.join("config.xml"), config).expect("write the node's config.xml");
    }
}

impl Drop for ScratchClickHouse {
    fn drop(&mut self) {
        for process in self.nodes.iter_mut().filter_map(|n| n.process.as_mut()).chain(self.keeper.as_mut()) {
            let _ = process.kill();
            let _ = process.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One HTTP POST of `sql` to 127.0.0.1:port: the body trimmed on 200, else the error text.
fn http_request(port: u16, sql: &str) -> Result<String, String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    let request = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{sql}",
        sql.len()
    );
    stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(|e| e.to_string())?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP response")?;
    // chDB answers "Connection: close" requests without chunking; decode chunks if it did not.
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    if head.starts_with("HTTP/1.1 200") { Ok(body.trim().to_owned()) } else { Err(body.trim().to_owned()) }
}

fn http_query(port: u16, sql: &str) -> Option<String> {
    http_request(port, sql).ok()
}

/// The payload of a chunked HTTP body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// ZooKeeper's answer to a four-letter command on 127.0.0.1:port.
fn four_letter_word(port: u16, word: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(word.as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer.trim().to_owned())
}
