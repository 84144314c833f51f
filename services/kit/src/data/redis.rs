//! The shared Redis (a Redis Cluster in production and tests, or a primary behind Sentinels, or a
//! single server): connection, key namespacing.

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
    /// Shared: fred's configuration is large, and every clone of this handle carries it.
    config: Arc<FredConfig>,
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
        Ok(Self { pool, config: Arc::new(config), prefix: prefix.into(), command_timeout })
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
        let subscriber = Builder::from_config(FredConfig::clone(&self.config))
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

/// Awaits `call`, one Redis command or script, timing it into
/// `redis_command_duration_seconds{operation}`; `operation` is one of a small fixed set of
/// names (`cache_get`, `ratelimit`, `reserve`, ...), never a key. Every Redis call of the mesh
/// goes through it, so the histogram's count is the mesh's round trips to Redis (the bench
/// divides it by requests).
pub async fn timed<T>(operation: &'static str, call: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let answer = call.await;
    metrics::histogram!("redis_command_duration_seconds", "operation" => operation)
        .record(started.elapsed().as_secs_f64());
    answer
}

/// Skips Redis for a while after a command failed: while Redis is unreachable each command
/// waits for the command timeout, which would otherwise be added to every request that needs it.
/// Each trip from closed to open counts in `redis_breaker_trips_total{component}`.
#[derive(Debug)]
pub struct RedisBreaker {
    epoch: Instant,
    retry_after_ms: u64,
    /// Milliseconds after `epoch` until which Redis is skipped.
    open_until: AtomicU64,
    trips: metrics::Counter,
}

impl RedisBreaker {
    /// A closed breaker of `component` (`cache`, `ratelimit`, ...) that, once tripped, stays
    /// open for `retry_after`; its trip counter exists, at 0, from now on.
    pub fn new(component: &'static str, retry_after: Duration) -> Self {
        let retry_after_ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
        let trips = metrics::counter!("redis_breaker_trips_total", "component" => component);
        // Registers the series without resetting what other breakers of the component counted.
        trips.increment(0);
        Self { epoch: Instant::now(), retry_after_ms, open_until: AtomicU64::new(0), trips }
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
        let now = self.now();
        let was_open_until = self.open_until.fetch_max(now.saturating_add(self.retry_after_ms), Ordering::Relaxed);
        if was_open_until <= now {
            self.trips.increment(1);
        }
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

/// One URL fred reads for `urls` (see [`crate::config::CommonConfig::redis_urls`]): a single
/// server's URL passes through unchanged; several (`redis://user:pw@a:1,redis://user:pw@b:2`)
/// become fred's cluster form (`redis-cluster://user:pw@a:1?node=b:2`); Sentinels, one URL or
/// several, become fred's sentinel form (see [`sentinel_url`]). TLS (`rediss`) is kept and the
/// credentials are given once: nodes must agree on TLS and on credentials (a node may leave
/// them out).
fn fred_url(urls: &str) -> Result<String, String> {
    let nodes: Vec<&str> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    let [first, rest @ ..] = nodes.as_slice() else {
        return Err("no Redis node is given".to_owned());
    };
    let names_sentinel = |node: &&str| node.split_once("://").is_some_and(|(scheme, _)| scheme.ends_with("-sentinel"));
    if nodes.iter().any(names_sentinel) {
        return sentinel_url(&nodes);
    }
    if rest.is_empty() {
        return Ok((*first).to_owned());
    }
    let mut agreed = Agreed::default();
    let mut hosts = Vec::with_capacity(nodes.len());
    for node in &nodes {
        let url = parse_node(node)?;
        let tls = match url.scheme() {
            "redis" | "redis-cluster" => false,
            "rediss" | "rediss-cluster" => true,
            other => return Err(format!("the scheme {other:?} is not redis, rediss, redis-cluster or rediss-cluster")),
        };
        agreed.node(&url, tls)?;
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return Err("a node of a cluster takes no database number or options".to_owned());
        }
        hosts.push(address_of(&url, 6379)?);
    }
    let scheme = if agreed.tls == Some(true) { "rediss-cluster" } else { "redis-cluster" };
    let others: Vec<String> = hosts[1..].iter().map(|host| format!("node={host}")).collect();
    Ok(format!("{scheme}://{}{}?{}", agreed.userinfo(), hosts[0], others.join("&")))
}

/// The options of a sentinel URL besides `node`: the name of the primary the Sentinels watch
/// (required) and the Sentinels' own credentials, when they demand any.
const SENTINEL_OPTIONS: [&str; 3] = ["sentinelServiceName", "sentinelUsername", "sentinelPassword"];

/// fred's sentinel URL (`redis-sentinel://user:pw@s1:26379/db?node=s2:26379&sentinelServiceName=m`)
/// for Sentinels given as fred's URL, or as several such URLs comma separated, one or more
/// Sentinels each: the Sentinels of all of them, the options and credentials given once. The
/// user and password are the data nodes' (fred asks the Sentinels with `sentinelUsername` and
/// `sentinelPassword`); the path is the database number, as in any Redis URL.
fn sentinel_url(nodes: &[&str]) -> Result<String, String> {
    let mut agreed = Agreed::default();
    let (mut database, mut hosts) = (None, Vec::with_capacity(nodes.len()));
    let mut options: [Option<String>; SENTINEL_OPTIONS.len()] = Default::default();
    for node in nodes {
        let url = parse_node(node)?;
        let tls = match url.scheme() {
            "redis-sentinel" => false,
            "rediss-sentinel" => true,
            other => {
                return Err(format!(
                    "the scheme {other:?} is not redis-sentinel or rediss-sentinel: a list of Sentinels names nothing else"
                ));
            }
        };
        agreed.node(&url, tls)?;
        hosts.push(address_of(&url, 26379)?);
        match url.path().trim_start_matches('/') {
            "" => {}
            number => {
                let number: u8 = number.parse().map_err(|_| format!("{number:?} is not a database number"))?;
                agree(&mut database, number, "database numbers")?;
            }
        }
        for (name, value) in url.query_pairs() {
            if name == "node" {
                let (host, port) = value.rsplit_once(':').ok_or_else(|| format!("node={value} is not host:port"))?;
                if host.is_empty() || host.contains(':') || port.parse::<u16>().is_err() {
                    return Err(format!("node={value} is not host:port (an IPv4 address or a name)"));
                }
                hosts.push(value.into_owned());
            } else if let Some(index) = SENTINEL_OPTIONS.iter().position(|option| *option == name) {
                agree(&mut options[index], value.into_owned(), SENTINEL_OPTIONS[index])?;
            } else {
                return Err(format!("a sentinel URL takes node, {} but not {name:?}", SENTINEL_OPTIONS.join(", ")));
            }
        }
    }
    let [service_name, sentinel_user, sentinel_password] = &options;
    if service_name.as_deref().is_none_or(str::is_empty) {
        return Err("no sentinelServiceName names the primary the Sentinels watch".to_owned());
    }
    if sentinel_user.is_some() && sentinel_password.is_none() {
        return Err("sentinelUsername is given without a sentinelPassword".to_owned());
    }
    let mut seen = std::collections::HashSet::new();
    hosts.retain(|host| seen.insert(host.clone()));
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for other in &hosts[1..] {
        query.append_pair("node", other);
    }
    for (name, value) in SENTINEL_OPTIONS.iter().zip(&options) {
        if let Some(value) = value {
            query.append_pair(name, value);
        }
    }
    let scheme = if agreed.tls == Some(true) { "rediss-sentinel" } else { "redis-sentinel" };
    let database = database.map(|number| format!("/{number}")).unwrap_or_default();
    Ok(format!("{scheme}://{}{}{database}?{}", agreed.userinfo(), hosts[0], query.finish()))
}

/// A node's URL; the error leaves the URL out, as it may hold a password.
fn parse_node(node: &str) -> Result<url::Url, String> {
    url::Url::parse(node).map_err(|e| format!("a node is not a URL: {e}"))
}

/// `host:port` of a node's URL, `default_port` if it names none.
fn address_of(url: &url::Url, default_port: u16) -> Result<String, String> {
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| format!("{} names no host", url.scheme()))?;
    Ok(format!("{host}:{}", url.port().unwrap_or(default_port)))
}

/// Keeps the first `value` given and refuses a different one later.
fn agree<T: PartialEq>(kept: &mut Option<T>, value: T, what: &str) -> Result<(), String> {
    match kept {
        Some(kept) if *kept != value => Err(format!("nodes give different {what}")),
        Some(_) => Ok(()),
        None => {
            *kept = Some(value);
            Ok(())
        }
    }
}

/// What the nodes of one list must agree on, gathered node by node.
#[derive(Debug, Default)]
struct Agreed {
    tls: Option<bool>,
    /// User and password as written (still percent-encoded), so fred decodes them once.
    credentials: Option<(String, String)>,
}

impl Agreed {
    fn node(&mut self, url: &url::Url, tls: bool) -> Result<(), String> {
        if *self.tls.get_or_insert(tls) != tls {
            return Err("nodes mix TLS (rediss) and plain (redis) connections".to_owned());
        }
        let given = (url.username(), url.password().unwrap_or_default());
        if given == ("", "") {
            return Ok(());
        }
        agree(&mut self.credentials, (given.0.to_owned(), given.1.to_owned()), "credentials")
    }

    /// `user:password@` for the URL fred reads.
    fn userinfo(&self) -> String {
        match &self.credentials {
            Some((user, password)) if password.is_empty() => format!("{user}@"),
            Some((user, password)) => format!("{user}:{password}@"),
            None => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{RedisBreaker, fred_url};

    #[test]
    fn a_breaker_counts_its_trips_from_closed_to_open_and_its_counter_exists_before_any() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let trips = |count: u64| format!("redis_breaker_trips_total{{component=\"unit\"}} {count}\n");
        metrics::with_local_recorder(&recorder, || {
            let breaker = RedisBreaker::new("unit", Duration::from_secs(3600));
            assert!(handle.render().contains(&trips(0)), "{}", handle.render());
            breaker.trip();
            breaker.trip();
            assert!(handle.render().contains(&trips(1)), "a failure while open is the same trip");
            let reopening = RedisBreaker::new("unit", Duration::ZERO);
            reopening.trip();
            reopening.trip();
            assert!(handle.render().contains(&trips(3)), "closed again at once: each failure trips it");
        });
    }

    #[test]
    fn sentinels_in_fred_form_or_as_a_list_make_one_sentinel_url() {
        let fred_form = "redis-sentinel://app:pw@s1:26379?node=s2:26380&sentinelServiceName=mymaster";
        assert_eq!(
            fred_url(fred_form).as_deref(),
            Ok("redis-sentinel://app:pw@s1:26379?node=s2%3A26380&sentinelServiceName=mymaster")
        );
        assert_eq!(
            fred_url("redis-sentinel://app:pw@s1?sentinelServiceName=mymaster, redis-sentinel://s2:26380,redis-sentinel://app:pw@s3:26381")
                .as_deref(),
            Ok("redis-sentinel://app:pw@s1:26379?node=s2%3A26380&node=s3%3A26381&sentinelServiceName=mymaster")
        );
        // The Sentinels' own credentials, percent-encoded in the query; a database; TLS.
        assert_eq!(
            fred_url(
                "rediss-sentinel://:data%40pw@s1:26379/2?sentinelServiceName=m&sentinelUsername=watch&sentinelPassword=a%26b,\
                 rediss-sentinel://s2/2?sentinelServiceName=m"
            )
            .as_deref(),
            Ok("rediss-sentinel://:data%40pw@s1:26379/2?node=s2%3A26379&sentinelServiceName=m&sentinelUsername=watch&sentinelPassword=a%26b")
        );
    }

    #[test]
    fn fred_reads_a_sentinel_url_with_both_credentials() {
        let url = fred_url("redis-sentinel://app:d%40ta@s1:26379/3?sentinelServiceName=m&sentinelUsername=w&sentinelPassword=a%26b,redis-sentinel://s2:26380")
            .expect("a sentinel url");
        let config = fred::prelude::Config::from_url(&url).expect("fred reads it");
        assert_eq!(
            (config.username.as_deref(), config.password.as_deref(), config.database),
            (Some("app"), Some("d@ta"), Some(3))
        );
        let fred::types::config::ServerConfig::Sentinel { hosts, service_name, username, password } = config.server
        else {
            panic!("not a sentinel config: {:?}", config.server);
        };
        let hosts: Vec<String> = hosts.iter().map(ToString::to_string).collect();
        assert_eq!(hosts, ["s2:26380", "s1:26379"]);
        assert_eq!((service_name.as_str(), username.as_deref(), password.as_deref()), ("m", Some("w"), Some("a&b")));
    }

    #[test]
    fn sentinel_lists_that_disagree_or_lack_the_primary_name_are_refused() {
        for (urls, why) in [
            ("redis-sentinel://s1:26379", "no sentinelServiceName"),
            ("redis-sentinel://s1?sentinelServiceName=", "no sentinelServiceName"),
            (
                "redis-sentinel://s1?sentinelServiceName=a,redis-sentinel://s2?sentinelServiceName=b",
                "different sentinelServiceName",
            ),
            ("redis-sentinel://s1?sentinelServiceName=a,redis://h2", "not redis-sentinel"),
            ("redis://h1,redis-sentinel://s1?sentinelServiceName=a", "not redis-sentinel"),
            ("redis-sentinel://s1?sentinelServiceName=a,rediss-sentinel://s2", "mix TLS"),
            ("redis-sentinel://u:a@s1?sentinelServiceName=a,redis-sentinel://u:b@s2", "different credentials"),
            ("redis-sentinel://s1/1?sentinelServiceName=a,redis-sentinel://s2/2", "different database"),
            ("redis-sentinel://s1/x?sentinelServiceName=a", "not a database number"),
            ("redis-sentinel://s1?sentinelServiceName=a&node=s2", "not host:port"),
            ("redis-sentinel://s1?sentinelServiceName=a&node=[::1]:26379", "not host:port"),
            ("redis-sentinel://s1?sentinelServiceName=a&master=b", "not \"master\""),
            ("redis-sentinel://s1?sentinelServiceName=a&sentinelUsername=w", "without a sentinelPassword"),
        ] {
            let refused = fred_url(urls).expect_err(urls);
            assert!(refused.contains(why), "{urls}: {refused}");
        }
    }

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
