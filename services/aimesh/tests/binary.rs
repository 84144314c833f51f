//! The `aimesh` binary as an operator runs it: configured by a file, `AIMESH_` variables and
//! flags (in that order of precedence), serving gRPC and `/metrics`, and stopping cleanly on
//! SIGTERM. Against the real PostgreSQL and Redis Cluster of the test run.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aimesh_kit::testing::{self, ScratchDatabase};
use support::{free_address, terminate, wait_serving};

mod support;
use aimesh_proto::identity::v1 as pb;

/// `aimesh <args>` with the test servers and a database and key prefix of its own.
fn aimesh(args: &[&str], database: &ScratchDatabase, env: &[(&str, String)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_aimesh"));
    command
        .args(args)
        .env("AIMESH_POSTGRES_URL", testing::postgres_url())
        .env("AIMESH_REDIS_URLS", testing::redis_urls())
        .env("AIMESH_IDENTITY__DATABASE_URL", &database.url)
        .env("AIMESH_REDIS__KEY_PREFIX", format!("test-{}", uuid::Uuid::new_v4().simple()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (name, value) in env {
        command.env(name, value);
    }
    command.spawn().expect("start aimesh")
}

/// A child process killed if the test ends without stopping it (a failed assertion), so that no
/// server outlives its test holding ports and connections.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn http_get(address: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(address).expect("connect to the metrics endpoint");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").expect("send request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("read response");
    body
}

/// The value of every sample of gauge `name` in the Prometheus text for the primary's pool
/// (`server="primary"`), by its `database` label (a sample with other labels is kept under its
/// whole label set, so it shows in a mismatch).
fn pool_gauge(scraped: &str, name: &str) -> BTreeMap<String, f64> {
    scraped
        .lines()
        .filter_map(|line| {
            let (labels, value) = line.strip_prefix(name)?.strip_prefix('{')?.split_once("} ")?;
            let database = match labels.split_once(",server=\"primary\"") {
                Some((database, "")) => database.strip_prefix("database=\"").and_then(|rest| rest.strip_suffix('"')),
                _ => None,
            };
            Some((database.unwrap_or(labels).to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Waits until `/metrics` at `address` shows `db_pool_connections` and
/// `db_pool_idle_connections` of exactly `databases`, each with an open pool no larger than the
/// default `database.max_connections` and no more idle connections than that.
async fn assert_pool_metrics(address: SocketAddr, databases: &[&str]) {
    const MAX_CONNECTIONS: f64 = 20.0;
    // The gauges are published every few seconds from the start on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let scraped = http_get(address, "/metrics");
        let (size, idle) =
            (pool_gauge(&scraped, "db_pool_connections"), pool_gauge(&scraped, "db_pool_idle_connections"));
        let named = |gauge: &BTreeMap<String, f64>| gauge.keys().map(String::as_str).eq(databases.iter().copied());
        if named(&size) && named(&idle) {
            for database in databases {
                let (size, idle) = (size[*database], idle[*database]);
                assert!((1.0..=MAX_CONNECTIONS).contains(&size), "{database}: db_pool_connections {size}");
                assert!((0.0..=MAX_CONNECTIONS).contains(&idle), "{database}: db_pool_idle_connections {idle}");
            }
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool gauges of {databases:?} expected, got db_pool_connections {size:?}, db_pool_idle_connections {idle:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn all_serves_grpc_and_metrics_from_the_environment_and_stops_on_sigterm() {
    let (database, usage_database, chat_database, files_database) =
        (ScratchDatabase::new(), ScratchDatabase::new(), ScratchDatabase::new(), ScratchDatabase::new());
    let (grpc, usage, chat, files, metrics) =
        (free_address(), free_address(), free_address(), free_address(), free_address());
    // Not the default ports, which a mesh run by hand may hold.
    let (analytics, gateway) = (free_address(), free_address());
    let files_root = std::env::temp_dir().join(format!("aimesh-binary-test-{}", uuid::Uuid::new_v4().simple()));
    let env = [
        ("AIMESH_IDENTITY__LISTEN", grpc.to_string()),
        ("AIMESH_CHAT__LISTEN", chat.to_string()),
        ("AIMESH_CHAT__DATABASE_URL", chat_database.url.clone()),
        ("AIMESH_USAGE__LISTEN", usage.to_string()),
        ("AIMESH_USAGE__DATABASE_URL", usage_database.url.clone()),
        ("AIMESH_FILES__LISTEN", files.to_string()),
        ("AIMESH_FILES__DATABASE_URL", files_database.url.clone()),
        ("AIMESH_FILES__FS_ROOT", files_root.display().to_string()),
        ("AIMESH_ANALYTICS__LISTEN", analytics.to_string()),
        ("AIMESH_GATEWAY__LISTEN", gateway.to_string()),
        ("AIMESH_METRICS__LISTEN", metrics.to_string()),
    ];
    let mut child = KillOnDrop(aimesh(&["all"], &database, &env));
    for address in [grpc, usage, chat, files, analytics] {
        wait_serving(address, &mut child.0).await;
    }

    let mut users =
        pb::user_service_client::UserServiceClient::connect(format!("http://{grpc}")).await.expect("connect");
    let registered = users
        .register_user(pb::RegisterUserRequest {
            email: "op@example.org".into(),
            username: "operator".into(),
            password: "operator password".into(),
            ..Default::default()
        })
        .await;
    assert!(registered.is_ok(), "{registered:?}");

    let scraped = http_get(metrics, "/metrics");
    assert!(scraped.starts_with("HTTP/1.1 200") || scraped.starts_with("HTTP/1.0 200"), "{scraped}");
    let line = scraped
        .lines()
        .find(|line| line.starts_with("rpc_requests_total") && line.contains("method=\"RegisterUser\""))
        .unwrap_or_else(|| panic!("no RegisterUser request counted in:\n{scraped}"));
    assert!(line.contains("code=\"Ok\""), "{line}");
    assert_pool_metrics(metrics, &["chat", "files", "identity", "usage"]).await;

    assert!(terminate(&mut child.0, Duration::from_secs(20)).await, "aimesh did not exit cleanly after SIGTERM");
    let _ = std::fs::remove_dir_all(&files_root);
}

#[tokio::test]
async fn flags_override_the_environment_which_overrides_the_file() {
    let database = ScratchDatabase::new();
    let (from_file, from_env, from_flag) = (free_address(), free_address(), free_address());
    let dir = std::env::temp_dir().join(format!("aimesh-config-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("config dir");
    let file = dir.join("aimesh.toml");
    std::fs::write(
        &file,
        format!("[identity]\nlisten = \"{from_file}\"\n\n[metrics]\nlisten = \"{}\"\n", free_address()),
    )
    .expect("write config");
    let config = file.to_str().expect("utf-8 path");

    // File and environment: the environment wins.
    let mut child =
        aimesh(&["--config", config, "identity"], &database, &[("AIMESH_IDENTITY__LISTEN", from_env.to_string())]);
    wait_serving(from_env, &mut child).await;
    assert!(TcpStream::connect(from_file).is_err(), "the file's address should have been overridden");
    assert!(terminate(&mut child, Duration::from_secs(20)).await);

    // And a flag wins over both.
    let listen = from_flag.to_string();
    let mut child = aimesh(
        &["--config", config, "identity", "--listen", &listen],
        &database,
        &[("AIMESH_IDENTITY__LISTEN", from_env.to_string())],
    );
    wait_serving(from_flag, &mut child).await;
    assert!(terminate(&mut child, Duration::from_secs(20)).await);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_bad_configuration_is_refused_before_anything_starts() {
    let output = Command::new(env!("CARGO_BIN_EXE_aimesh"))
        .args(["migrate"])
        .env("AIMESH_SERVER__REQUEST_TIMEOUT_SECS", "soon")
        .output()
        .expect("run aimesh");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.to_lowercase().contains("server.request_timeout_secs"), "the error should name the key: {stderr}");
}
