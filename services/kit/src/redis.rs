//! The shared Redis (a Redis Cluster in production and tests): connection, key namespacing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fred::clients::{Pool, SubscriberClient};
use fred::interfaces::{ClientLike, EventInterface};
use fred::prelude::{Builder, Config as FredConfig, ReconnectPolicy};

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
        let config = FredConfig::from_url(&fred_url(urls))?;
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

/// Turns `redis://a:1,redis://b:2` into fred's `redis-cluster://a:1?node=b:2`; passes a single
/// URL through unchanged.
fn fred_url(urls: &str) -> String {
    let nodes: Vec<&str> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    match nodes.as_slice() {
        [single] => (*single).to_owned(),
        [first, rest @ ..] => {
            let host = |url: &str| {
                url.trim_start_matches("redis://")
                    .trim_start_matches("redis-cluster://")
                    .trim_end_matches('/')
                    .to_owned()
            };
            let extra: Vec<String> = rest.iter().map(|url| format!("node={}", host(url))).collect();
            format!("redis-cluster://{}?{}", host(first), extra.join("&"))
        }
        [] => "redis://127.0.0.1:6379".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::fred_url;

    #[test]
    fn several_urls_make_a_cluster_url() {
        assert_eq!(
            fred_url("redis://127.0.0.1:17001, redis://127.0.0.1:17002,redis://127.0.0.1:17003"),
            "redis-cluster://127.0.0.1:17001?node=127.0.0.1:17002&node=127.0.0.1:17003"
        );
        assert_eq!(fred_url("redis://10.0.0.1:6379"), "redis://10.0.0.1:6379");
    }
}
