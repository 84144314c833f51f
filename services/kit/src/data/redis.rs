//! The shared Redis (a Redis Cluster in production and tests): connection, key namespacing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fred::clients::{Pool, SubscriberClient};
use fred::error::ErrorKind;
use fred::interfaces::{ClientLike, EventInterface};
use fred::prelude::{Builder, Config as FredConfig, ReconnectPolicy};
use fred::types::config::TlsConnector;

use crate::config::RedisConfig;

/// A pool of connections to the shared Redis plus the key prefix of this deployment.
#[derive(Clone)]
pub struct Redis {
    pool: Pool,
    config: FredConfig,
    prefix: Arc<str>,
    command_timeout: Duration,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// Why Redis could not be reached.
pub type RedisError = fred::error::Error;

impl Redis {
    /// Connects to the nodes in `urls` (see [`crate::config::CommonConfig::redis_urls`]).
    pub async fn connect(urls: &str, settings: &RedisConfig) -> Result<Self, RedisError> {
        Self::connect_with_prefix(urls, settings, &settings.key_prefix).await
    }

    /// Like [`Redis::connect`] with another key prefix; tests use a fresh one each.
    pub async fn connect_with_prefix(urls: &str, settings: &RedisConfig, prefix: &str) -> Result<Self, RedisError> {
        let config = fred_config(urls, settings)?;
        let command_timeout = Duration::from_millis(settings.command_timeout_ms);
        let pool = Builder::from_config(config.clone())
            .with_performance_config(|perf| perf.default_command_timeout = command_timeout)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .build_pool(settings.pool_size.max(1))?;
        pool.init().await?;
        Ok(Self { pool, config, prefix: prefix.into(), command_timeout })
    }

    /// The connection pool, for commands.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// `"{prefix}:{service}:{rest}"`: every key aimesh writes is namespaced by service.
    pub fn key(&self, service: &str, rest: &str) -> String {
        format!("{}:{service}:{rest}", self.prefix)
    }

    /// A new dedicated connection for pub/sub that resubscribes after reconnecting.
    pub async fn subscriber(&self) -> Result<SubscriberClient, RedisError> {
        let subscriber = Builder::from_config(self.config.clone())
            .with_performance_config(|perf| perf.default_command_timeout = self.command_timeout)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .build_subscriber_client()?;
        subscriber.init().await?;
        let _resubscribe = subscriber.manage_subscriptions();
        Ok(subscriber)
    }

    /// Whether Redis answers a PING now.
    pub async fn is_healthy(&self) -> bool {
        self.pool.ping::<String>(None).await.is_ok()
    }

    /// Closes every connection.
    pub async fn quit(&self) {
        let _ = self.pool.quit().await;
    }

    /// Logs connection errors instead of letting them pass silently.
    pub fn log_errors(&self) {
        for client in self.pool.clients() {
            let _task = client.on_error(|(error, server)| async move {
                tracing::warn!(%error, server = ?server, "redis connection error");
                Ok(())
            });
        }
    }
}

/// Skips Redis for a while after a command failed: while Redis is unreachable each command
/// waits for the command timeout, which would otherwise be added to every request that needs it.
#[derive(Debug)]
pub struct RedisBreaker {
    epoch: Instant,
    retry_after_ms: u64,
    /// Milliseconds after `epoch` until which Redis is skipped.
    open_until: AtomicU64,
}

impl RedisBreaker {
    /// A closed breaker that, once tripped, stays open for `retry_after`.
    pub fn new(retry_after: Duration) -> Self {
        let retry_after_ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
        Self { epoch: Instant::now(), retry_after_ms, open_until: AtomicU64::new(0) }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether Redis is being skipped now.
    pub fn is_open(&self) -> bool {
        self.now() < self.open_until.load(Ordering::Relaxed)
    }

    /// Records a failure: Redis is skipped for the next `retry_after`.
    pub fn trip(&self) {
        let until = self.now().saturating_add(self.retry_after_ms);
        self.open_until.fetch_max(until, Ordering::Relaxed);
    }
}

/// fred's configuration for `redis_urls` (see [`crate::config::CommonConfig::redis_urls`]), with
/// `redis.tls_ca_file` trusted for TLS.
fn fred_config(urls: &str, settings: &RedisConfig) -> Result<FredConfig, RedisError> {
    let url = fred_url(urls).map_err(|message| RedisError::new(ErrorKind::Config, format!("redis_urls: {message}")))?;
    let mut config = FredConfig::from_url(&url)?;
    if config.tls.is_some() {
        let tls = crate::data::tls::client_config(settings.tls_ca_file.as_deref(), "redis.tls_ca_file")
            .map_err(|e| RedisError::new(ErrorKind::Config, e.to_string()))?;
        config.tls = Some(TlsConnector::from(tls).into());
    } else if settings.tls_ca_file.is_some() {
        let message = "redis.tls_ca_file is set but redis_urls do not use TLS (rediss://)";
        return Err(RedisError::new(ErrorKind::Config, message));
    }
    Ok(config)
}

/// One URL fred reads for the seed nodes in `urls`: a single URL passes through unchanged;
/// several (`redis://user:pw@a:1,redis://user:pw@b:2`) become fred's cluster form
/// (`redis-cluster://user:pw@a:1?node=b:2`), TLS (`rediss://`) kept, the credentials given once.
/// Nodes must agree on TLS and on credentials (a node may leave them out).
fn fred_url(urls: &str) -> Result<String, String> {
    let nodes: Vec<&str> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    let [first, rest @ ..] = nodes.as_slice() else {
        return Err("no Redis node is given".to_owned());
    };
    if rest.is_empty() {
        return Ok((*first).to_owned());
    }
    let (mut tls, mut credentials, mut hosts) = (None, None, Vec::with_capacity(nodes.len()));
    for node in &nodes {
        let url = url::Url::parse(node).map_err(|e| format!("{node:?} is not a URL: {e}"))?;
        let node_tls = match url.scheme() {
            "redis" | "redis-cluster" => false,
            "rediss" | "rediss-cluster" => true,
            other => return Err(format!("the scheme {other:?} is not redis, rediss, redis-cluster or rediss-cluster")),
        };
        if *tls.get_or_insert(node_tls) != node_tls {
            return Err("nodes mix TLS (rediss://) and plain (redis://) connections".to_owned());
        }
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| format!("{} names no host", url.scheme()))?;
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return Err("a node of a cluster takes no database number or options".to_owned());
        }
        // As written (still percent-encoded), so fred decodes them once.
        let given = (url.username(), url.password().unwrap_or_default());
        if given != ("", "") {
            match credentials {
                None => credentials = Some((given.0.to_owned(), given.1.to_owned())),
                Some((ref user, ref password)) if (user.as_str(), password.as_str()) != given => {
                    return Err("nodes give different credentials".to_owned());
                }
                Some(_) => {}
            }
        }
        hosts.push(format!("{host}:{}", url.port().unwrap_or(6379)));
    }
    let scheme = if tls == Some(true) { "rediss-cluster" } else { "redis-cluster" };
    let userinfo = match credentials {
        Some((user, password)) if password.is_empty() => format!("{user}@"),
        Some((user, password)) => format!("{user}:{password}@"),
        None => String::new(),
    };
    let others: Vec<String> = hosts[1..].iter().map(|host| format!("node={host}")).collect();
    Ok(format!("{scheme}://{userinfo}{}?{}", hosts[0], others.join("&")))
}

#[cfg(test)]
mod tests {
    use super::fred_url;

    #[test]
    fn several_urls_make_a_cluster_url() {
        assert_eq!(
            fred_url("redis://127.0.0.1:17001, redis://127.0.0.1:17002,redis://127.0.0.1:17003").as_deref(),
            Ok("redis-cluster://127.0.0.1:17001?node=127.0.0.1:17002&node=127.0.0.1:17003")
        );
        assert_eq!(fred_url("redis://10.0.0.1:6379").as_deref(), Ok("redis://10.0.0.1:6379"));
        assert_eq!(fred_url("rediss://:pw@10.0.0.1").as_deref(), Ok("rediss://:pw@10.0.0.1"));
    }

    #[test]
    fn credentials_and_tls_of_a_cluster_are_kept() {
        assert_eq!(
            fred_url("redis://app:s%40cret@h1:6379,redis://app:s%40cret@h2:6380").as_deref(),
            Ok("redis-cluster://app:s%40cret@h1:6379?node=h2:6380")
        );
        assert_eq!(
            fred_url("rediss://:pw@h1,rediss://h2:7000,rediss://[::1]:7001").as_deref(),
            Ok("rediss-cluster://:pw@h1:6379?node=h2:7000&node=[::1]:7001")
        );
    }

    #[test]
    fn nodes_that_disagree_or_are_not_redis_are_refused() {
        for (urls, why) in [
            ("redis://h1,rediss://h2", "mix TLS"),
            ("redis://a:x@h1,redis://b:x@h2", "different credentials"),
            ("redis://h1,http://h2", "not redis"),
            ("redis://h1/2,redis://h2", "no database number"),
            ("redis://h1,not a url", "is not a URL"),
            (" , ", "no Redis node"),
        ] {
            let refused = fred_url(urls).expect_err(urls);
            assert!(refused.contains(why), "{urls}: {refused}");
        }
    }
}
