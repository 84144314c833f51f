//! The one configuration loader: built-in defaults, then a TOML file, then `AIMESH_` environment
//! variables (`__` separates nested keys: `AIMESH_IDENTITY__LISTEN`), then command-line overrides.
//! Each service's settings are a section of their own (`[identity]`); [`CommonConfig`] is the
//! top level every process shares.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The layered sources of a process's configuration: an optional TOML file, then the
/// environment, then `overrides` (typically built from command-line flags); last wins. Each
/// settings struct fills what none of them sets from its `Default`. Read it with
/// [`Configuration::section`].
#[derive(Debug, Clone)]
pub struct Configuration {
    figment: Figment,
}

impl Configuration {
    pub fn new(file: Option<&Path>, overrides: impl Serialize) -> Self {
        let mut figment = Figment::new();
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        let figment = figment.merge(Env::prefixed("AIMESH_").split("__")).merge(Serialized::defaults(overrides));
        Self { figment }
    }

    /// The settings under `key` (`""` for the top level, `"identity"` for `[identity]`). Keys
    /// this struct does not know are left for other sections. The error names the offending key
    /// and where its value came from; it is boxed because `figment::Error` is large and this
    /// runs once, at start-up.
    pub fn section<T: DeserializeOwned>(&self, key: &str) -> Result<T, Box<figment::Error>> {
        let figment = if key.is_empty() { self.figment.clone() } else { self.figment.focus(key) };
        figment.extract().map_err(Box::new)
    }
}

/// Settings every service process shares: where the stores are, telemetry, server behaviour.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CommonConfig {
    /// PostgreSQL server URL without a database; each service uses `aimesh_<service>` on it
    /// unless its own `database_url` is set.
    pub postgres_url: String,
    /// Where Redis is (`rediss` instead of `redis` in a scheme for TLS):
    /// - a single server: `redis://user:password@host:port`;
    /// - a Redis Cluster: its seed nodes comma separated (`redis://user:password@host:port,...`),
    ///   or one URL of scheme `redis-cluster://`;
    /// - a primary behind Sentinels: fred's URL `redis-sentinel://user:password@s1:26379?node=s2:26379&sentinelServiceName=mymaster`,
    ///   or such URLs comma separated (`redis-sentinel://user:password@s1:26379?sentinelServiceName=mymaster,redis-sentinel://s2:26379`).
    ///   The user and password are the data nodes'; Sentinels that demand their own log in with
    ///   the options `sentinelUsername` and `sentinelPassword` (percent-encoded). A path is the
    ///   database number, as in any Redis URL; a Sentinel's port defaults to 26379.
    ///
    /// The URLs of a list agree on TLS, credentials and options (one may leave them out).
    pub redis_urls: String,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub metrics: MetricsConfig,
    pub server: ServerConfig,
    pub redis: RedisConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    /// Where each service of the mesh answers gRPC, for those that call it.
    pub services: ServiceUrls,
    pub outbox: OutboxConfig,
    pub rate_limit: RateLimitConfig,
}

impl Default for CommonConfig {
    fn default() -> Self {
        Self {
            postgres_url: "postgres://postgres@127.0.0.1:55432".into(),
            redis_urls: (17001..=17006).map(|port| format!("redis://127.0.0.1:{port}")).collect::<Vec<_>>().join(","),
            log: LogConfig::default(),
            telemetry: TelemetryConfig::default(),
            metrics: MetricsConfig::default(),
            server: ServerConfig::default(),
            redis: RedisConfig::default(),
            database: DatabaseConfig::default(),
            auth: AuthConfig::default(),
            services: ServiceUrls::default(),
            outbox: OutboxConfig::default(),
            rate_limit: RateLimitConfig::default(),
        }
    }
}

impl CommonConfig {
    /// Refuses settings no process could work with, naming the first bad one: checked when the
    /// configuration is loaded, before anything starts.
    pub fn validate(&self) -> Result<(), crate::ServiceError> {
        if let Some(token) = &self.auth.service_token {
            token.validate()?;
        }
        if let Some(token) = &self.auth.gateway_token {
            token.validate("auth.gateway_token")?;
        }
        if let Some(key) = &self.auth.link_signing_key {
            key.validate("auth.link_signing_key")?;
        }
        if self.rate_limit.lease_max_tokens > MAX_LEASE_TOKENS {
            let message = format!("must be at most {MAX_LEASE_TOKENS}");
            return Err(crate::ServiceError::invalid_field("rate_limit.lease_max_tokens", message));
        }
        self.services.validate()
    }
}

/// Where each service answers gRPC (`[services]`, `AIMESH_SERVICES__IDENTITY`): the one table of
/// peer addresses. Every service asks identity to verify credentials, every outbox relay
/// delivers to analytics, chat asks files about attachments, and the gateway calls them all.
/// `aimesh all` points it at its own listeners.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ServiceUrls {
    pub identity: String,
    pub chat: String,
    pub usage: String,
    pub files: String,
    pub analytics: String,
}

impl Default for ServiceUrls {
    fn default() -> Self {
        Self {
            identity: "http://127.0.0.1:7101".into(),
            chat: "http://127.0.0.1:7102".into(),
            usage: "http://127.0.0.1:7103".into(),
            files: "http://127.0.0.1:7104".into(),
            analytics: "http://127.0.0.1:7105".into(),
        }
    }
}

impl ServiceUrls {
    /// Every service's short name and URL.
    pub fn all(&self) -> [(&'static str, &str); 5] {
        [
            ("identity", &self.identity),
            ("chat", &self.chat),
            ("usage", &self.usage),
            ("files", &self.files),
            ("analytics", &self.analytics),
        ]
    }

    /// Each must be an `http://host:port` origin; the error names `services.<name>`.
    pub fn validate(&self) -> Result<(), crate::ServiceError> {
        for (service, url) in self.all() {
            service_origin(url).map_err(|e| crate::ServiceError::invalid_field(format!("services.{service}"), e))?;
        }
        Ok(())
    }
}

/// `url` as an `http://host:port` origin: no other scheme, no path, no query.
pub fn service_origin(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| format!("{url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(format!("{url:?} is not an http://host:port address"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("{url:?} has a path; give only http://host:port"));
    }
    Ok(uri)
}

/// How each service's outbox relay delivers to analytics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct OutboxConfig {
    /// Most events per delivery.
    pub batch_size: u32,
    /// Deliveries in flight at once per relay (each its own batch, locked apart), so one
    /// round trip to analytics does not bound a backlog's pace.
    pub workers: u32,
    /// Pause after a pass that found less than a full batch.
    pub poll_interval_ms: u64,
    /// First retry delay after a failed delivery; doubles up to `max_backoff_secs`.
    pub initial_backoff_ms: u64,
    pub max_backoff_secs: u64,
    /// How long delivered events are kept in the outbox before they are pruned.
    pub retention_hours: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            workers: 4,
            poll_interval_ms: 500,
            initial_backoff_ms: 1000,
            max_backoff_secs: 60,
            retention_hours: 24,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Structured logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info,aimesh_identity=debug`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, filter: "info".into() }
    }
}

/// OpenTelemetry traces; off unless an OTLP endpoint is given.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector endpoint, such as `http://127.0.0.1:4317`.
    pub otlp_endpoint: Option<String>,
}

/// The Prometheus scrape endpoint of the process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsConfig {
    /// Where `/metrics` is served; none disables it.
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: Some(SocketAddr::from(([127, 0, 0, 1], 7190))) }
    }
}

/// gRPC server behaviour shared by every service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// Upper bound of every request; a client's shorter `grpc-timeout` wins.
    pub request_timeout_secs: u64,
    /// After SIGTERM, how long health reports NOT_SERVING before the listener closes, so load
    /// balancers stop sending new requests first.
    pub drain_secs: u64,
    /// How long in-flight requests may take to finish after the listener closes.
    pub shutdown_grace_secs: u64,
    /// How often dependencies are probed for grpc.health.v1.
    pub health_interval_secs: u64,
}

impl ServerConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_secs)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
    pub fn health_interval(&self) -> Duration {
        Duration::from_secs(self.health_interval_secs)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { request_timeout_secs: 30, drain_secs: 0, shutdown_grace_secs: 20, health_interval_secs: 5 }
    }
}

/// The shared Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RedisConfig {
    /// Prefix of every key and channel, so several deployments (or tests) can share a cluster.
    pub key_prefix: String,
    pub pool_size: usize,
    /// Per-command timeout; a slow Redis degrades the cache instead of stalling requests.
    pub command_timeout_ms: u64,
    /// A PEM file of CA certificates to trust, besides the public ones, for `rediss://` nodes
    /// (a private CA).
    pub tls_ca_file: Option<std::path::PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self { key_prefix: "aimesh".into(), pool_size: 4, command_timeout_ms: 1000, tls_ca_file: None }
    }
}

/// PostgreSQL pool settings, the same for each service's database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DatabaseConfig {
    /// Most connections of each pool (the primary's, and each replica's).
    pub max_connections: u32,
    pub min_connections: u32,
    pub acquire_timeout_secs: u64,
    /// Statements slower than this are logged at WARN.
    pub slow_statement_ms: u64,
    /// A read replica further behind its primary than this is skipped: reads go to another
    /// replica or the primary until it catches up. 100 ms to 5 minutes.
    pub replica_max_lag_ms: u64,
    /// How often each process measures its replicas' replay position (and so their lag).
    /// 50 ms to 10 s.
    pub replica_check_interval_ms: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            max_connections: 20,
            min_connections: 1,
            acquire_timeout_secs: 5,
            slow_statement_ms: 200,
            replica_max_lag_ms: 5_000,
            replica_check_interval_ms: 500,
        }
    }
}

impl DatabaseConfig {
    /// [`DatabaseConfig::replica_max_lag_ms`], within its bounds.
    pub fn replica_max_lag(&self) -> Duration {
        Duration::from_millis(self.replica_max_lag_ms.clamp(100, 300_000))
    }

    /// [`DatabaseConfig::replica_check_interval_ms`], within its bounds.
    pub fn replica_check_interval(&self) -> Duration {
        Duration::from_millis(self.replica_check_interval_ms.clamp(50, 10_000))
    }
}

/// Where one service's database is: its primary, the primary's read replicas, and a direct
/// address of the primary for work a pooler in transaction mode cannot carry. Flattened into
/// each service's section, so the keys are `[chat] database_url`, `database_replica_urls` and
/// `database_migration_url`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct DatabaseUrls {
    /// The primary; defaults to `aimesh_<service>` on `postgres_url`. May go through PgBouncer
    /// in transaction mode (with `max_prepared_statements` set: PgBouncer 1.21 or later).
    #[serde(rename = "database_url")]
    pub url: Option<String>,
    /// Streaming replicas of that primary, for read-only RPCs (see README, "Scaling out").
    #[serde(rename = "database_replica_urls")]
    pub replica_urls: Vec<String>,
    /// A direct connection to the primary, for creating the database and migrating it (sqlx's
    /// migrator holds a session-level advisory lock, which a transaction-mode pooler would drop
    /// between statements); defaults to `database_url`.
    #[serde(rename = "database_migration_url")]
    pub migration_url: Option<String>,
}

/// How verified credentials are cached. Together these bound how long a revoked credential
/// may still work: see README, "Revocation".
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthConfig {
    /// In-process cache lifetime of a verification.
    pub local_ttl_secs: u64,
    /// Redis cache lifetime of a verification.
    pub shared_ttl_secs: u64,
    /// The shared secret services present to each other's internal RPCs (`amsvc_` and at least
    /// 32 random characters). Required when services run as separate processes; `aimesh all`
    /// makes one up for its own process when none is set.
    pub service_token: Option<crate::auth::ServiceToken>,
    /// The secret with which the gateway vouches for its clients' addresses to the services
    /// (`x-aimesh-client-ip-token`; at least 32 letters, digits, `_` or `-`), apart from the
    /// service token so that a service able to call internal RPCs cannot also pose as any
    /// client address. Required by the gateway; `aimesh all` makes one up when none is set.
    pub gateway_token: Option<crate::auth::DeploymentSecret>,
    /// The key that signs download links (at least 32 letters, digits, `_` or `-`), apart from
    /// the service token. Required by files (unless `files.url_signing_key` is set); `aimesh
    /// all` makes one up when none is set.
    pub link_signing_key: Option<crate::auth::DeploymentSecret>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            local_ttl_secs: 10,
            shared_ttl_secs: 60,
            service_token: None,
            gateway_token: None,
            link_signing_key: None,
        }
    }
}

/// Whether a rate limit denies or only reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitMode {
    /// Requests over a limit are refused.
    #[default]
    Enforce,
    /// Nothing is refused; would-be denials are counted and logged, to try limits out first.
    Shadow,
}

/// What the rate limiter does while Redis cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedisFailureMode {
    /// Decide with an in-process limiter of the same limits (per process, so approximate).
    #[default]
    Open,
    /// Refuse with UNAVAILABLE.
    Closed,
}

/// The bound of `rate_limit.lease_max_tokens`.
pub const MAX_LEASE_TOKENS: u32 = 1000;

/// Distributed rate limits (see `aimesh_kit::serving::ratelimit`). The defaults are requests per minute
/// per caller; a project's or an API key's own `requests_per_minute` (set in identity) wins
/// over `per_project` and `per_api_key`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RateLimitConfig {
    pub enabled: bool,
    pub mode: RateLimitMode,
    pub on_redis_failure: RedisFailureMode,
    /// Requests per minute of an unauthenticated peer address; 0 disables the limit.
    pub per_ip: u32,
    /// Failed authentications (unknown, malformed, expired or revoked credentials) per minute of
    /// a client address; past it, the address is refused before any credential is looked up.
    /// 0 disables the limit.
    pub per_ip_failed_auth: u32,
    /// Requests per minute of a person with a login session; 0 disables the limit.
    pub per_user: u32,
    /// Requests per minute of an API key without a limit of its own; 0 disables the limit.
    pub per_api_key: u32,
    /// Requests per minute of a project (all its API keys together) without a limit of its own;
    /// 0 disables the limit.
    pub per_project: u32,
    /// The most requests per minute a project admin may give the project (all its keys
    /// together); only a system admin sets more.
    pub max_project_requests_per_minute: u32,
    /// The most requests per minute a project admin may give one API key; only a system admin
    /// sets more.
    pub max_api_key_requests_per_minute: u32,
    /// Most tokens of a limit one process leases from Redis ahead of its requests, for limits
    /// it decides 50 times a second or more (`aimesh_kit::serving::ratelimit::lease`); at most
    /// a twentieth of the limit, 0 to 1000, 0 decides every request in Redis.
    pub lease_max_tokens: u32,
    /// Weight of a call by full gRPC method path (`/aimesh.chat.v1.ChatService/ExportProject`);
    /// other calls weigh 1, and 0 exempts a method.
    pub costs: std::collections::BTreeMap<String, u32>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: RateLimitMode::Enforce,
            on_redis_failure: RedisFailureMode::Open,
            per_ip: 1200,
            per_ip_failed_auth: 30,
            per_user: 600,
            per_api_key: 600,
            per_project: 3000,
            max_project_requests_per_minute: 30_000,
            max_api_key_requests_per_minute: 6_000,
            lease_max_tokens: 128,
            costs: [
                ("/aimesh.chat.v1.ChatService/ExportProject", 20),
                ("/aimesh.chat.v1.ChatService/ExportSession", 5),
                ("/aimesh.chat.v1.ChatService/SearchMessages", 5),
            ]
            .into_iter()
            .map(|(method, cost)| (method.to_owned(), cost))
            .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_comes_from_one_environment_variable() {
        // How the Helm chart and the kustomize overlay spell `gateway.trusted_proxies`; the
        // environment provider parses each value so.
        let value: figment::value::Value = r#"["10.0.0.0/8", "192.0.2.1"]"#.parse().expect("infallible");
        let list: Vec<String> = value.deserialize().expect("a list of strings");
        assert_eq!(list, ["10.0.0.0/8", "192.0.2.1"]);
    }

    #[test]
    fn a_services_database_urls_are_keys_of_its_own_section() {
        #[derive(Debug, Default, Deserialize)]
        #[serde(default)]
        struct Section {
            listen: String,
            #[serde(flatten)]
            database: DatabaseUrls,
        }
        let toml = r#"
            [chat]
            listen = "127.0.0.1:7102"
            database_url = "postgres://primary/aimesh_chat"
            database_replica_urls = ["postgres://replica-1/aimesh_chat", "postgres://replica-2/aimesh_chat"]
        "#;
        let sources = Configuration { figment: Figment::new().merge(Toml::string(toml)) };
        let chat: Section = sources.section("chat").expect("the chat section");
        assert_eq!(chat.listen, "127.0.0.1:7102");
        assert_eq!(chat.database.url.as_deref(), Some("postgres://primary/aimesh_chat"));
        assert_eq!(
            chat.database.replica_urls,
            ["postgres://replica-1/aimesh_chat", "postgres://replica-2/aimesh_chat"]
        );
        assert_eq!(chat.database.migration_url, None);

        // As the chart sets it, the list is one environment variable, which the environment
        // provider parses into a value so (see the test above).
        let value: figment::value::Value = r#"["postgres://ro-1/c", "postgres://ro-2/c"]"#.parse().expect("infallible");
        let section = std::collections::BTreeMap::from([("database_replica_urls", value)]);
        let sources = Configuration { figment: Figment::new().merge(Serialized::default("chat", section)) };
        let chat: Section = sources.section("chat").expect("the chat section from the environment");
        assert_eq!(chat.database.replica_urls, ["postgres://ro-1/c", "postgres://ro-2/c"]);
    }

    #[test]
    fn each_secret_is_checked_under_its_own_name() {
        let mut config = CommonConfig::default();
        config.auth.gateway_token = Some(crate::auth::DeploymentSecret::new("short"));
        let error = config.validate().expect_err("too short");
        assert_eq!(error.field.as_deref(), Some("auth.gateway_token"));
        config.auth.gateway_token = Some(crate::auth::DeploymentSecret::generate());
        config.auth.link_signing_key = Some(crate::auth::DeploymentSecret::new(format!("{}!", "k".repeat(40))));
        let error = config.validate().expect_err("a character of another kind");
        assert_eq!(error.field.as_deref(), Some("auth.link_signing_key"));
        config.auth.link_signing_key = Some(crate::auth::DeploymentSecret::generate());
        assert!(config.validate().is_ok());
    }
}
