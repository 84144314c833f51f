//! The mesh as separate processes on this machine, one per service as on Kubernetes: the release
//! `aimesh` binary built beside the bench's (`make bench` builds both), each process reading the
//! configuration the bench wrote to a TOML file (no `AIMESH_` variable of the bench's own
//! environment reaches it), serving its own `/metrics`, logging to a file of its own.

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use http_body_util::BodyExt;

use aimesh::{MeshConfig, ServiceName};

use crate::work::WorkCounters;

/// How long a process may take to serve, and to stop after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The running processes; each is killed, and the directory of their configuration and logs
/// removed, when dropped.
pub struct MeshProcesses {
    binary: PathBuf,
    dir: PathBuf,
    running: Vec<ServiceProcess>,
}

struct ServiceProcess {
    service: ServiceName,
    child: Child,
    /// Where its `/metrics` is served.
    metrics: SocketAddr,
    log: PathBuf,
}

impl MeshProcesses {
    /// Ready to start processes with `config` (written to a file here).
    pub fn new(config: &MeshConfig) -> anyhow::Result<Self> {
        let binary = std::env::current_exe()?.with_file_name("aimesh");
        anyhow::ensure!(
            binary.exists(),
            "{} is missing: build it with `cargo build --release -p aimesh` (`make bench` does)",
            binary.display()
        );
        let dir = std::env::temp_dir().join(format!("aimesh-bench-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let processes = MeshProcesses { binary, dir, running: Vec::new() };
        std::fs::write(processes.config_file(), config_toml(config)?)?;
        Ok(processes)
    }

    fn config_file(&self) -> PathBuf {
        self.dir.join("aimesh.toml")
    }

    /// Starts `service` listening on `listen`; for a gRPC service, returns once it serves
    /// (the gateway's readiness is for the caller to wait for).
    pub async fn start(&mut self, service: ServiceName, listen: SocketAddr) -> anyhow::Result<()> {
        let metrics = free_address()?;
        let log = self.dir.join(format!("{}-{}.log", self.running.len(), service.as_str()));
        let output = File::create(&log)?;
        let mut command = Command::new(&self.binary);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("AIMESH_") {
                command.env_remove(name);
            }
        }
        command
            .arg("--config")
            .arg(self.config_file())
            .args(["--metrics-listen", &metrics.to_string(), service.as_str(), "--listen", &listen.to_string()])
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output);
        let child = command.spawn().with_context(|| format!("start {}", self.binary.display()))?;
        self.running.push(ServiceProcess { service, child, metrics, log });
        if service == ServiceName::Gateway {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while !aimesh_tests::serving(listen).await {
            let process = self.running.last_mut().context("the process just started")?;
            if let Some(status) = process.child.try_wait()? {
                anyhow::bail!("{} exited ({status}) before serving: {}", service.as_str(), process.log_tail());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} did not serve within {START_TIMEOUT:?}: {}",
                service.as_str(),
                process.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The work of each service's processes so far (CPU time, and round trips from their
    /// `/metrics`), by service, in start order.
    pub async fn work_by_service(&self) -> anyhow::Result<Vec<(ServiceName, WorkCounters)>> {
        let mut by_service: Vec<(ServiceName, WorkCounters)> = Vec::new();
        for process in &self.running {
            let work = process.work().await?;
            match by_service.iter_mut().find(|(service, _)| *service == process.service) {
                Some((_, total)) => total.add(work),
                None => by_service.push((process.service, work)),
            }
        }
        Ok(by_service)
    }

    /// The resident memory (VmRSS) of each process of `service` now, in MiB.
    pub fn resident_mib(&self, service: ServiceName) -> Vec<f64> {
        self.running
            .iter()
            .filter(|process| process.service == service)
            .map(|process| crate::work::memory_mib(&process.child.id().to_string(), "VmRSS"))
            .collect()
    }

    /// Stops the process of `service` started last, as a scale-down does (see [`terminate`]).
    pub async fn stop_last(&mut self, service: ServiceName) -> anyhow::Result<()> {
        let index = self
            .running
            .iter()
            .rposition(|process| process.service == service)
            .with_context(|| format!("no {} process runs", service.as_str()))?;
        let mut process = self.running.remove(index);
        terminate(std::slice::from_mut(&mut process)).await
    }

    /// Stops every process (see [`terminate`]).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        terminate(&mut self.running).await
    }
}

/// Stops `processes` as Kubernetes stops a pod: SIGTERM, then SIGKILL for one still running
/// after [`STOP_TIMEOUT`].
async fn terminate(processes: &mut [ServiceProcess]) -> anyhow::Result<()> {
    for process in processes.iter() {
        Command::new("kill").args(["-TERM", &process.child.id().to_string()]).status()?;
    }
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    for process in processes.iter_mut() {
        while process.child.try_wait()?.is_none() {
            if tokio::time::Instant::now() >= deadline {
                process.child.kill()?;
                process.child.wait()?;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

impl Drop for MeshProcesses {
    fn drop(&mut self) {
        for process in &mut self.running {
            if matches!(process.child.try_wait(), Ok(None)) {
                let _ = process.child.kill();
                let _ = process.child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl ServiceProcess {
    async fn work(&self) -> anyhow::Result<WorkCounters> {
        let response = aimesh_tests::rest::Rest::new(self.metrics).get("/metrics").open().await?;
        anyhow::ensure!(response.status().is_success(), "{} /metrics: {}", self.service.as_str(), response.status());
        let body = response.into_body().collect().await?.to_bytes();
        Ok(WorkCounters::of_process(self.child.id(), &String::from_utf8_lossy(&body)))
    }

    /// The last lines of its log, for an error.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

/// `config` as a TOML file `aimesh --config` reads. TOML has no null: a setting that is unset
/// here but set by default reads back as the default (`metrics.listen`, which is why each
/// process gets its own on the command line).
fn config_toml(config: &MeshConfig) -> anyhow::Result<String> {
    Ok(toml::to_string(config)?)
}

/// A loopback address with a port free now (the OS picked it; it stays free until a process
/// of the bench binds it, barring a race with another program).
pub fn free_address() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    /// Every setting survives the file: the sections read back from it write the same file.
    #[test]
    fn the_config_file_reads_back_as_the_same_configuration() {
        let mut config = MeshConfig::default();
        config.common.redis.key_prefix = "bench-prefix".into();
        config.common.auth.service_token = Some(aimesh_kit::auth::ServiceToken::generate());
        config.common.auth.link_signing_key = Some(aimesh_kit::auth::DeploymentSecret::generate());
        config.common.metrics.listen = Some(SocketAddr::from(([127, 0, 0, 1], 4243)));
        config.usage.database.url = Some("postgres://postgres@127.0.0.1:1/usage_bench".into());
        config.usage.listen = SocketAddr::from(([127, 0, 0, 1], 4242));
        config.identity.settings_key = Some("a2V5".into());
        config.analytics.clickhouse_database = "aimesh_bench".into();
        let written = config_toml(&config).expect("the configuration as TOML");

        let file: toml::Table = toml::from_str(&written).expect("the file parses");
        let section = |name: &str| file.get(name).cloned().unwrap_or_else(|| panic!("no [{name}] in the file"));
        let read = MeshConfig {
            common: aimesh_kit::config::CommonConfig::deserialize(file.clone()).expect("the shared settings"),
            identity: Deserialize::deserialize(section("identity")).expect("[identity]"),
            chat: Deserialize::deserialize(section("chat")).expect("[chat]"),
            usage: Deserialize::deserialize(section("usage")).expect("[usage]"),
            gateway: Deserialize::deserialize(section("gateway")).expect("[gateway]"),
            files: Deserialize::deserialize(section("files")).expect("[files]"),
            analytics: Deserialize::deserialize(section("analytics")).expect("[analytics]"),
        };
        assert_eq!(config_toml(&read).expect("the read configuration as TOML"), written);
        for setting in ["bench-prefix", "usage_bench", "127.0.0.1:4242", "127.0.0.1:4243", "aimesh_bench"] {
            assert!(written.contains(setting), "{setting} is missing from the file");
        }
        assert_eq!(read.common.auth.service_token, config.common.auth.service_token);
    }
}
