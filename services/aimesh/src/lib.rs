//! The mesh as one program: its configuration, and starting one service or all of them. The
//! binary (`main.rs`) and the end-to-end tests both start services through here.

pub mod backup;
pub mod outbox_admin;

use std::net::SocketAddr;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use aimesh_analytics::AnalyticsConfig;
use aimesh_chat::ChatConfig;
use aimesh_files::FilesConfig;
use aimesh_gateway::GatewayConfig;
use aimesh_identity::IdentityConfig;
use aimesh_kit::ServiceError;
use aimesh_kit::auth::{DeploymentSecret, ServiceToken};
use aimesh_kit::config::{CommonConfig, Configuration};
use aimesh_usage::UsageConfig;

/// Everything `aimesh` reads: the settings every service shares at the top level, then one
/// table per service (`[identity]`, `AIMESH_IDENTITY__LISTEN`, ...). Serialized in that same
/// layout, it is a file `aimesh --config` reads.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MeshConfig {
    #[serde(flatten)]
    pub common: CommonConfig,
    pub identity: IdentityConfig,
    pub chat: ChatConfig,
    pub usage: UsageConfig,
    pub gateway: GatewayConfig,
    pub files: FilesConfig,
    pub analytics: AnalyticsConfig,
}

impl MeshConfig {
    /// Reads every section from `sources` and validates the whole: a bad setting stops the
    /// start here, named, before anything connects or listens.
    pub fn load(sources: &Configuration) -> anyhow::Result<Self> {
        let config = Self {
            common: sources.section("")?,
            identity: sources.section("identity")?,
            chat: sources.section("chat")?,
            usage: sources.section("usage")?,
            gateway: sources.section("gateway")?,
            files: sources.section("files")?,
            analytics: sources.section("analytics")?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Refuses settings no process could work with, naming the first bad one.
    pub fn validate(&self) -> Result<(), ServiceError> {
        self.common.validate()?;
        self.gateway.validate()
    }

    /// The configuration of services that run in one process on `listeners` (`aimesh all`, the
    /// tests): each calls the others where they listen, and, unless they are set, they share a
    /// service token, a gateway token and a link signing key made up for this process (they only
    /// call each other, and links are served by this process alone).
    pub fn in_one_process(mut self, listeners: &[(ServiceName, TcpListener)]) -> anyhow::Result<Self> {
        for (service, listener) in listeners {
            let url = format!("http://{}", listener.local_addr()?);
            match service {
                ServiceName::Identity => self.common.services.identity = url,
                ServiceName::Chat => self.common.services.chat = url,
                ServiceName::Usage => self.common.services.usage = url,
                ServiceName::Files => self.common.services.files = url,
                ServiceName::Analytics => self.common.services.analytics = url,
                ServiceName::Gateway => {}
            }
        }
        let auth = &mut self.common.auth;
        auth.service_token.get_or_insert_with(ServiceToken::generate);
        auth.gateway_token.get_or_insert_with(DeploymentSecret::generate);
        auth.link_signing_key.get_or_insert_with(DeploymentSecret::generate);
        Ok(self)
    }
}

/// A service of the mesh (the gateway counts as one: it is started and stopped the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceName {
    Identity,
    Chat,
    Usage,
    Gateway,
    Files,
    Analytics,
}

impl ServiceName {
    /// Every service, in start order.
    pub const ALL: [ServiceName; 6] = [
        ServiceName::Identity,
        ServiceName::Files,
        ServiceName::Chat,
        ServiceName::Usage,
        ServiceName::Analytics,
        ServiceName::Gateway,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Chat => "chat",
            Self::Usage => "usage",
            Self::Gateway => "gateway",
            Self::Files => "files",
            Self::Analytics => "analytics",
        }
    }

    /// Where it listens according to `config`.
    pub fn listen(self, config: &MeshConfig) -> SocketAddr {
        match self {
            Self::Identity => config.identity.listen,
            Self::Chat => config.chat.listen,
            Self::Usage => config.usage.listen,
            Self::Gateway => config.gateway.listen,
            Self::Files => config.files.listen,
            Self::Analytics => config.analytics.listen,
        }
    }
}

/// Where each of `listeners` listens.
pub fn local_addresses(listeners: &[(ServiceName, TcpListener)]) -> std::io::Result<Vec<(ServiceName, SocketAddr)>> {
    listeners.iter().map(|(service, listener)| Ok((*service, listener.local_addr()?))).collect()
}

/// Binds every listener first, so a port that is taken fails the start before anything runs.
pub async fn bind(services: &[ServiceName], config: &MeshConfig) -> anyhow::Result<Vec<(ServiceName, TcpListener)>> {
    let mut listeners = Vec::with_capacity(services.len());
    for &service in services {
        let address = service.listen(config);
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("{}: cannot listen on {address}", service.as_str()))?;
        listeners.push((service, listener));
    }
    Ok(listeners)
}

const SHUTDOWN_STAGES: usize = 3;

/// When a service stops within one process, after `shutdown`: callers before the services they
/// call, so a request in flight can still reach identity and files, and analytics last, so the
/// final delivery of every other service's outbox relay finds it listening. Each stage has its
/// own drain and grace period.
fn shutdown_stage(service: ServiceName) -> usize {
    match service {
        ServiceName::Gateway | ServiceName::Chat | ServiceName::Usage => 0,
        ServiceName::Identity | ServiceName::Files => 1,
        ServiceName::Analytics => 2,
    }
}

/// Runs the given services on their listeners, each on its own port and talking to the others
/// over gRPC at `services` like separate processes would (see [`MeshConfig::in_one_process`]),
/// until `shutdown`. If one fails, the others are
/// stopped and its error is returned.
pub async fn run(
    listeners: Vec<(ServiceName, TcpListener)>,
    config: MeshConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if config.common.auth.service_token.is_none() {
        tracing::warn!("auth.service_token is not set: internal calls between services will be refused");
    }
    // Each stage stops once the stages before it have: see `shutdown_stage`.
    let stages: Vec<CancellationToken> = (0..SHUTDOWN_STAGES).map(|_| CancellationToken::new()).collect();
    let mut running = [0usize; SHUTDOWN_STAGES];
    let mut stage_of = std::collections::HashMap::new();
    let mut tasks = JoinSet::new();
    for (service, listener) in listeners {
        let config = config.clone();
        let stage = shutdown_stage(service);
        let shutdown = stages[stage].clone();
        running[stage] += 1;
        let task = tasks.spawn(async move {
            let result = match service {
                ServiceName::Identity => aimesh_identity::run(listener, config.common, config.identity, shutdown).await,
                ServiceName::Chat => aimesh_chat::run(listener, config.common, config.chat, shutdown).await,
                ServiceName::Usage => aimesh_usage::run(listener, config.common, config.usage, shutdown).await,
                ServiceName::Gateway => aimesh_gateway::run(listener, config.common, config.gateway, shutdown).await,
                ServiceName::Files => aimesh_files::run(listener, config.common, config.files, shutdown).await,
                ServiceName::Analytics => {
                    aimesh_analytics::run(listener, config.common, config.analytics, shutdown).await
                }
            };
            result.with_context(|| format!("{} stopped", service.as_str()))
        });
        stage_of.insert(task.id(), stage);
    }
    // Cancels every stage whose earlier stages have all ended.
    let advance = |running: &[usize; SHUTDOWN_STAGES]| {
        for (stage, token) in stages.iter().enumerate() {
            if running[..stage].iter().any(|&n| n > 0) {
                break;
            }
            token.cancel();
        }
    };
    let mut first_error = None;
    let mut stopping = false;
    loop {
        let joined = tokio::select! {
            () = shutdown.cancelled(), if !stopping => {
                stopping = true;
                advance(&running);
                continue;
            }
            joined = tasks.join_next_with_id() => joined,
        };
        let Some(joined) = joined else { break };
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(error) => error.id(),
        };
        if let Some(stage) = stage_of.remove(&id) {
            running[stage] -= 1;
        }
        let result = joined.context("a service task panicked").and_then(|(_, r)| r);
        if let Err(error) = result {
            tracing::error!(error = format!("{error:#}"), "service failed; stopping the others");
            shutdown.cancel();
            first_error.get_or_insert(error);
        }
        if stopping {
            advance(&running);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Applies every service's migrations to its own database (creating the database if missing);
/// analytics' to its ClickHouse database.
pub async fn migrate(config: &MeshConfig) -> anyhow::Result<()> {
    for service in ServiceName::ALL {
        if service == ServiceName::Analytics {
            aimesh_analytics::connect_clickhouse(&config.analytics).await?;
        } else if let Some(pool) = connect_service_database(service, config).await? {
            pool.close().await;
        } else {
            continue; // the gateway has no database
        }
        tracing::info!(service = service.as_str(), "migrations applied");
    }
    Ok(())
}

/// The services with a PostgreSQL database of their own (and so an outbox).
pub const SERVICES_WITH_DATABASE: [ServiceName; 4] =
    [ServiceName::Identity, ServiceName::Files, ServiceName::Chat, ServiceName::Usage];

/// The URLs of `service`'s own PostgreSQL database as configured; none for a service without
/// one (analytics, the gateway).
pub fn service_database_urls(service: ServiceName, config: &MeshConfig) -> Option<&aimesh_kit::config::DatabaseUrls> {
    match service {
        ServiceName::Identity => Some(&config.identity.database),
        ServiceName::Chat => Some(&config.chat.database),
        ServiceName::Usage => Some(&config.usage.database),
        ServiceName::Files => Some(&config.files.database),
        ServiceName::Analytics | ServiceName::Gateway => None,
    }
}

/// A pool on `service`'s own PostgreSQL database, connected as the service connects (created
/// if missing, migrated); none for a service without one (analytics, the gateway).
pub async fn connect_service_database(service: ServiceName, config: &MeshConfig) -> anyhow::Result<Option<PgPool>> {
    let pool = match service {
        ServiceName::Identity => aimesh_identity::connect_database(&config.common, &config.identity).await?,
        ServiceName::Chat => aimesh_chat::connect_database(&config.common, &config.chat).await?,
        ServiceName::Usage => aimesh_usage::connect_database(&config.common, &config.usage).await?,
        ServiceName::Files => aimesh_files::connect_database(&config.common, &config.files).await?,
        ServiceName::Analytics | ServiceName::Gateway => return Ok(None),
    };
    Ok(Some(pool))
}
