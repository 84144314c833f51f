//! `aimesh`: runs one service, the whole mesh in one process, or the migrations.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use aimesh::{MeshConfig, ServiceName};
use aimesh_kit::serving::server::shutdown_on_signal;
use aimesh_kit::telemetry::{self, Telemetry};

/// The aimesh backend. Configuration: built-in defaults, then the file given with --config,
/// then AIMESH_ environment variables (`__` nests: AIMESH_IDENTITY__LISTEN), then these flags.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// A TOML configuration file.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// PostgreSQL server URL; each service uses its own database on it.
    #[arg(long, global = true)]
    postgres_url: Option<String>,
    /// Where Redis is: one server, Redis Cluster seeds (several, comma separated), or Sentinels
    /// (`redis-sentinel://...?sentinelServiceName=NAME`); see README, "Scaling out".
    #[arg(long, global = true)]
    redis_urls: Option<String>,
    /// Where /metrics is served.
    #[arg(long, global = true)]
    metrics_listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the identity service.
    Identity {
        /// Where its gRPC server listens.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Runs the chat service (it asks identity at `services.identity`).
    Chat {
        /// Where its gRPC server listens.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Runs the usage service (it asks identity at `services.identity`).
    Usage {
        /// Where its gRPC server listens.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Runs the files service (it asks identity at `services.identity`).
    Files {
        /// Where its gRPC server listens.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Runs the analytics service (it asks identity at `services.identity`).
    Analytics {
        /// Where its gRPC server listens.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Runs the REST gateway (it calls the services at `services.*`).
    Gateway {
        /// Where its HTTP server listens.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Runs every service and the gateway in this one process, each on its own port.
    All,
    /// Applies every service's database migrations, then exits.
    Migrate,
    /// Makes an existing account a system admin (the way to get the first one), then exits.
    GrantAdmin {
        /// The account's email.
        #[arg(long)]
        email: String,
    },
    /// Lists or replays the outbox dead letters: events analytics refused for good.
    Outbox {
        #[command(subcommand)]
        action: aimesh::outbox_admin::OutboxCommand,
    },
    /// Backs up every service database, the analytics database and the files objects, with a
    /// manifest, then exits (docs/backup.md).
    Backup {
        /// An empty directory, or s3://bucket/prefix (credentials from AWS_* or files.s3);
        /// `{time}` in it becomes the start time (20261207T031700Z).
        #[arg(long)]
        to: String,
        /// The directory of pg_dump (a major version at least the server's); default: PATH.
        #[arg(long, env = "AIMESH_PG_BIN")]
        pg_bin: Option<PathBuf>,
    },
    /// Restores a backup into new, empty stores, then exits (docs/backup.md).
    Restore {
        /// A directory or s3://bucket/prefix holding a backup's manifest.json.
        #[arg(long)]
        from: String,
        /// Replace databases and objects that exist instead of refusing.
        #[arg(long)]
        force: bool,
        /// The directory of pg_restore; default: PATH.
        #[arg(long, env = "AIMESH_PG_BIN")]
        pg_bin: Option<PathBuf>,
    },
}

impl Cli {
    /// The flags that were given, shaped like [`MeshConfig`], for the loader's last layer.
    fn overrides(&self) -> serde_json::Value {
        let mut root = serde_json::Map::new();
        if let Some(url) = &self.postgres_url {
            root.insert("postgres_url".into(), url.clone().into());
        }
        if let Some(urls) = &self.redis_urls {
            root.insert("redis_urls".into(), urls.clone().into());
        }
        if let Some(listen) = self.metrics_listen {
            root.insert("metrics".into(), serde_json::json!({ "listen": listen.to_string() }));
        }
        match &self.command {
            Command::Identity { listen: Some(listen) } => {
                root.insert("identity".into(), serde_json::json!({ "listen": listen.to_string() }));
            }
            Command::Chat { listen: Some(listen) } => {
                root.insert("chat".into(), serde_json::json!({ "listen": listen.to_string() }));
            }
            Command::Usage { listen: Some(listen) } => {
                root.insert("usage".into(), serde_json::json!({ "listen": listen.to_string() }));
            }
            Command::Files { listen: Some(listen) } => {
                root.insert("files".into(), serde_json::json!({ "listen": listen.to_string() }));
            }
            Command::Gateway { listen: Some(listen) } => {
                root.insert("gateway".into(), serde_json::json!({ "listen": listen.to_string() }));
            }
            Command::Analytics { listen: Some(listen) } => {
                root.insert("analytics".into(), serde_json::json!({ "listen": listen.to_string() }));
            }
            _ => {}
        }
        serde_json::Value::Object(root)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let sources = aimesh_kit::config::Configuration::new(cli.config.as_deref(), cli.overrides());
    let config = MeshConfig::load(&sources)?;
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(cli, config))
}

async fn run(cli: Cli, config: MeshConfig) -> anyhow::Result<()> {
    let (name, services) = match cli.command {
        Command::Identity { .. } => ("identity", vec![ServiceName::Identity]),
        Command::Chat { .. } => ("chat", vec![ServiceName::Chat]),
        Command::Usage { .. } => ("usage", vec![ServiceName::Usage]),
        Command::Gateway { .. } => ("gateway", vec![ServiceName::Gateway]),
        Command::Files { .. } => ("files", vec![ServiceName::Files]),
        Command::Analytics { .. } => ("analytics", vec![ServiceName::Analytics]),
        Command::All => ("aimesh", ServiceName::ALL.to_vec()),
        Command::Migrate | Command::GrantAdmin { .. } => ("aimesh-admin", Vec::new()),
        // Before logging starts: standard output carries its JSON lines alone.
        Command::Outbox { ref action } => return aimesh::outbox_admin::run(action, &config).await,
        Command::Backup { .. } | Command::Restore { .. } => ("aimesh-backup", Vec::new()),
    };
    let telemetry = Telemetry::init(name, &config.common.log, &config.common.telemetry)?;
    let result = async {
        match &cli.command {
            Command::Migrate => return aimesh::migrate(&config).await,
            Command::Backup { to, pg_bin } => {
                let options = aimesh::backup::BackupOptions { to: to.clone(), pg_bin: pg_bin.clone() };
                let (_, report) = aimesh::backup::backup(&config, &options).await?;
                println!("backup done:\n{report}");
                return Ok(());
            }
            Command::Restore { from, force, pg_bin } => {
                let options =
                    aimesh::backup::RestoreOptions { from: from.clone(), force: *force, pg_bin: pg_bin.clone() };
                let (manifest, report) = aimesh::backup::restore(&config, &options).await?;
                println!("restore of the backup of {} from {from} done:\n{report}", manifest.finished_at);
                return Ok(());
            }
            Command::GrantAdmin { email } => {
                let pool = aimesh_identity::connect_database(&config.common, &config.identity).await?;
                let user_id = aimesh_identity::grant_admin(&pool, email).await?;
                tracing::info!(%user_id, email, "granted the system admin role");
                pool.close().await;
                return Ok(());
            }
            Command::Identity { .. }
            | Command::Chat { .. }
            | Command::Usage { .. }
            | Command::Gateway { .. }
            | Command::Files { .. }
            | Command::Analytics { .. }
            | Command::All => {}
            Command::Outbox { .. } => return Ok(()), // ran before logging started
        }
        let listeners = aimesh::bind(&services, &config).await?;
        let config = match cli.command {
            Command::All => config.in_one_process(&listeners)?,
            _ => config,
        };
        for (service, listener) in &listeners {
            tracing::info!(service = service.as_str(), address = %listener.local_addr()?, "listening");
        }
        if let Some(address) = telemetry::serve_metrics(&config.common.metrics).await? {
            tracing::info!(%address, "metrics at http://{address}/metrics");
        }
        aimesh::run(listeners, config, shutdown_on_signal()).await
    }
    .await;
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "aimesh failed");
    }
    telemetry.shutdown();
    result
}
