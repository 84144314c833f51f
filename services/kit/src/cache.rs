//! The one cache every service uses: L1 in process (moka), L2 in the shared Redis, then the
//! source (usually the service's database) through a loader the caller passes.
//!
//! Protections:
//! - penetration: a source answer "absent" is cached too, for `negative_ttl`, in both levels;
//! - stampede: concurrent misses of one key in one process run the loader once (moka coalesces
//!   them); across replicas the first loader takes a short Redis lock (`SET NX PX`) and the
//!   others poll L2 for a moment, then load themselves, so nothing waits on a dead lock holder;
//! - avalanche: L2 lifetimes are jittered by ±10%, so entries written together expire apart;
//! - staleness: [`TwoLevelCache::invalidate`] deletes L2 and broadcasts on Redis pub/sub so every
//!   replica drops its L1 entry, then does it once more a second later (see there for the bound).
//!
//! Redis trouble never fails a request: the cache logs at WARN, counts the error and loads from
//! the source, and skips Redis for a couple of seconds so an unreachable Redis costs one command
//! timeout per cache now and then rather than one per request.
//!
//! Metrics (label `cache` is the cache name):
//! - `cache_requests_total{cache, level, result}`: one per request that reaches a level.
//!   `level="local"`: `result` is `hit` or `miss`. `level="shared"`: `hit`, `miss` or `error`
//!   (Redis failed or is being skipped after a failure; the request went to the source).
//!   `level="source"`: `hit` (found), `miss` (absent, cached negatively) or `error` (the loader
//!   failed; nothing cached). Hit ratio of a level: `hit / (hit + miss + error)` at that level.
//! - `cache_redis_errors_total{cache, operation}`: every failed Redis command (`get`, `set`,
//!   `lock`, `unlock`, `del`, `publish`).
//! - `cache_invalidations_total{cache, origin}`: L1 drops, `origin="local"` for this process's
//!   own `invalidate`, `"remote"` for broadcasts received, `"resync"` when a whole L1 is dropped
//!   because broadcasts may have been missed (reconnect, lagging listener).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fred::interfaces::{ClientLike, EventInterface, KeysInterface, LuaInterface, PubsubInterface};
use fred::types::{Expiration, SetOptions};
use futures::future::BoxFuture;
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::redis::{Redis, RedisError};

/// How long a replica's load lock lives if its holder never releases it (crashed, cancelled).
const LOAD_LOCK_TTL: Duration = Duration::from_secs(3);
/// How long a replica that lost the load lock waits for the winner's value before loading itself.
const LOAD_LOCK_WAIT: Duration = Duration::from_millis(500);
/// How often a waiting replica looks at L2.
const LOAD_LOCK_POLL: Duration = Duration::from_millis(25);
/// How long the cache skips Redis reads and writes after a Redis command failed.
const REDIS_RETRY_AFTER: Duration = Duration::from_secs(2);
/// Delay of the second delete of [`TwoLevelCache::invalidate`]: longer than a load normally takes.
pub const SECOND_DELETE_DELAY: Duration = Duration::from_secs(1);

/// Deletes the lock only if it still holds our token, so a slow loader whose lock expired does
/// not release the lock of the next one.
const UNLOCK_SCRIPT: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// Lifetimes and size of one cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// L1 lifetime of a found value; bounds staleness when an invalidation broadcast is missed.
    pub local_ttl: Duration,
    /// L2 lifetime of a found value (jittered ±10%).
    pub shared_ttl: Duration,
    /// Lifetime of an "absent" answer in L2 (jittered ±10%) and in L1 (at most `local_ttl`).
    pub negative_ttl: Duration,
    /// Most entries L1 holds; the least useful are evicted beyond that.
    pub local_capacity: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            local_ttl: Duration::from_secs(10),
            shared_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(5),
            local_capacity: 10_000,
        }
    }
}

/// `ttl` scaled by a random factor in [0.9, 1.1], at least one millisecond (Redis rejects `PX 0`).
pub fn jitter(ttl: Duration) -> Duration {
    let factor = rand::thread_rng().gen_range(0.9..=1.1);
    ttl.mul_f64(factor).max(Duration::from_millis(1))
}

/// What L1 holds for a key: the value, or `None` when the source said it does not exist.
type Slot<V> = Option<Arc<V>>;

/// Per-entry L1 lifetime: negative answers may live shorter than values.
struct SlotExpiry {
    positive: Duration,
    negative: Duration,
}

impl<V> moka::Expiry<String, Slot<V>> for SlotExpiry {
    fn expire_after_create(&self, _key: &String, value: &Slot<V>, _created_at: Instant) -> Option<Duration> {
        Some(if value.is_some() { self.positive } else { self.negative })
    }

    fn expire_after_update(
        &self,
        key: &String,
        value: &Slot<V>,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, updated_at)
    }
}

/// A value in L2: `{"v": ...}` for a value, `{"absent": true}` for a negative answer. An
/// envelope rather than a bare value, so that a value which itself serializes to `null` or to
/// an object with an `absent` field stays distinguishable.
#[derive(Serialize)]
struct Present<'a, V> {
    v: &'a V,
}

#[derive(Serialize)]
struct Absent {
    absent: bool,
}

/// Reads an L2 envelope; `Err` means it is not one (written by an incompatible version).
fn decode<V: DeserializeOwned>(text: &str) -> Result<Slot<V>, serde_json::Error> {
    let mut envelope: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)?;
    if envelope.get("absent").and_then(serde_json::Value::as_bool) == Some(true) {
        return Ok(None);
    }
    match envelope.remove("v") {
        Some(value) => Ok(Some(Arc::new(serde_json::from_value(value)?))),
        None => Err(serde::de::Error::missing_field("v")),
    }
}

fn count(cache: &'static str, level: &'static str, result: &'static str) {
    metrics::counter!("cache_requests_total", "cache" => cache, "level" => level, "result" => result).increment(1);
}

/// Skips Redis for [`REDIS_RETRY_AFTER`] after a command failed: while Redis is unreachable
/// each command waits for the command timeout, which would otherwise be added to every L1 miss.
struct Breaker {
    epoch: Instant,
    /// Milliseconds after `epoch` until which Redis is skipped.
    open_until: AtomicU64,
}

impl Breaker {
    fn new() -> Self {
        Self { epoch: Instant::now(), open_until: AtomicU64::new(0) }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn is_open(&self) -> bool {
        self.now() < self.open_until.load(Ordering::Relaxed)
    }

    fn trip(&self) {
        let until = self.now().saturating_add(u64::try_from(REDIS_RETRY_AFTER.as_millis()).unwrap_or(u64::MAX));
        self.open_until.fetch_max(until, Ordering::Relaxed);
    }
}

/// What the L2 stage found.
enum Shared<V> {
    Hit(Slot<V>),
    Miss,
    /// Redis failed; the caller loads from the source without touching Redis again.
    Down,
}

struct Inner<V> {
    name: &'static str,
    service: &'static str,
    redis: Redis,
    bus: InvalidationBus,
    channel: String,
    settings: CacheSettings,
    local: moka::future::Cache<String, Slot<V>>,
    breaker: Breaker,
}

/// One named cache of values of type `V` (JSON in Redis). Cheap to clone.
pub struct TwoLevelCache<V> {
    inner: Arc<Inner<V>>,
}

impl<V> Clone for TwoLevelCache<V> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner) }
    }
}

impl<V> std::fmt::Debug for TwoLevelCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwoLevelCache")
            .field("name", &self.inner.name)
            .field("service", &self.inner.service)
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl<V: Serialize + DeserializeOwned + Send + Sync + 'static> TwoLevelCache<V> {
    /// A cache named `name` in `service`'s Redis namespace, listening for invalidations on `bus`.
    pub fn new(
        name: &'static str,
        service: &'static str,
        redis: Redis,
        bus: &InvalidationBus,
        settings: CacheSettings,
    ) -> Self {
        let expiry =
            SlotExpiry { positive: settings.local_ttl, negative: settings.local_ttl.min(settings.negative_ttl) };
        let local = moka::future::Cache::builder()
            .name(name)
            .max_capacity(settings.local_capacity)
            .expire_after(expiry)
            .build();
        let channel = invalidation_channel(&redis);
        let inner = Arc::new(Inner {
            name,
            service,
            redis,
            bus: bus.clone(),
            channel,
            settings,
            local,
            breaker: Breaker::new(),
        });
        let weak = Arc::downgrade(&inner);
        bus.register(service, name, weak);
        Self { inner }
    }

    /// L1, then L2, then `load` (run once per key per process however many callers miss at
    /// once, and mostly once across replicas). `Ok(None)`: the source says the key does not
    /// exist; that answer is cached for `negative_ttl`. A loader error is returned to every
    /// caller that waited on it (hence `E: Clone`) and is not cached.
    pub async fn get_or_load<F, Fut, E>(&self, key: &str, load: F) -> Result<Option<Arc<V>>, E>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<Option<V>, E>> + Send,
        E: Clone + Send + Sync + 'static,
    {
        let inner = &self.inner;
        if let Some(slot) = inner.local.get(key).await {
            count(inner.name, "local", "hit");
            return Ok(slot);
        }
        count(inner.name, "local", "miss");
        inner.local.try_get_with_by_ref(key, inner.load_shared(key, load)).await.map_err(Arc::unwrap_or_clone)
    }

    /// Call after the source changed: drops L1 here, deletes the L2 entry, broadcasts so every
    /// replica drops its L1 entry, and repeats all of that [`SECOND_DELETE_DELAY`] later (in a
    /// spawned task) to remove a value a concurrent loader read before the change committed and
    /// wrote back after the first delete.
    ///
    /// Staleness bound once this returns `Ok`: replicas drop their L1 entry as soon as the
    /// broadcast arrives (milliseconds) and a racing loader's write is gone after about a
    /// second; if a replica misses the broadcast it serves the old value at most `local_ttl`.
    /// On `Err` (Redis unreachable) the old value may live in L2 until its TTL runs out, so the
    /// worst case is `1.1 × shared_ttl + local_ttl`. Callers may log the error and go on.
    pub async fn invalidate(&self, key: &str) -> Result<(), RedisError> {
        let inner = Arc::clone(&self.inner);
        inner.bus.drop_local(inner.service, inner.name, key, "local").await;
        let result = inner.delete_shared(key).await;
        let key = key.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(SECOND_DELETE_DELAY).await;
            inner.bus.drop_local(inner.service, inner.name, &key, "local").await;
            // Errors are counted and logged in `delete_shared`; nobody is left to return them to.
            let _ = inner.delete_shared(&key).await;
        });
        result
    }

    /// The name given to [`TwoLevelCache::new`].
    pub fn name(&self) -> &'static str {
        self.inner.name
    }
}

impl<V: Serialize + DeserializeOwned + Send + Sync + 'static> Inner<V> {
    fn entry_key(&self, key: &str) -> String {
        self.redis.key(self.service, &format!("cache:{}:{key}", self.name))
    }

    fn lock_key(&self, key: &str) -> String {
        self.redis.key(self.service, &format!("cache-lock:{}:{key}", self.name))
    }

    /// What runs on an L1 miss (once per key per process at a time): L2, then the source.
    async fn load_shared<F, Fut, E>(&self, key: &str, load: F) -> Result<Slot<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
    {
        let entry_key = self.entry_key(key);
        match self.read_shared(&entry_key).await {
            Shared::Hit(slot) => {
                count(self.name, "shared", "hit");
                return Ok(slot);
            }
            Shared::Down => {
                count(self.name, "shared", "error");
                return self.load_source(load, None).await;
            }
            Shared::Miss => {}
        }

        let lock_key = self.lock_key(key);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let deadline = Instant::now() + LOAD_LOCK_WAIT;
        loop {
            match self.try_lock(&lock_key, &token).await {
                Ok(true) => {
                    count(self.name, "shared", "miss");
                    let result = self.load_source(load, Some(&entry_key)).await;
                    self.unlock(&lock_key, &token).await;
                    return result;
                }
                Ok(false) => {}
                Err(()) => {
                    count(self.name, "shared", "error");
                    return self.load_source(load, None).await;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            // Another replica is loading this key: its value shows up in L2 soon.
            tokio::time::sleep(LOAD_LOCK_POLL).await;
            match self.read_shared(&entry_key).await {
                Shared::Hit(slot) => {
                    count(self.name, "shared", "hit");
                    return Ok(slot);
                }
                Shared::Down => {
                    count(self.name, "shared", "error");
                    return self.load_source(load, None).await;
                }
                // Retrying the lock next: if the holder gave up, this replica loads instead.
                Shared::Miss => {}
            }
        }
        // The holder is slow or gone; loading here costs one extra source query, waiting longer
        // would cost the caller's latency.
        count(self.name, "shared", "miss");
        self.load_source(load, Some(&entry_key)).await
    }

    fn redis_error(&self, operation: &'static str, error: &RedisError) {
        tracing::warn!(cache = self.name, operation, %error, "redis cache operation failed, skipping redis for a moment");
        metrics::counter!("cache_redis_errors_total", "cache" => self.name, "operation" => operation).increment(1);
        self.breaker.trip();
    }

    async fn read_shared(&self, entry_key: &str) -> Shared<V> {
        if self.breaker.is_open() {
            return Shared::Down;
        }
        match self.redis.pool().get::<Option<String>, _>(entry_key).await {
            Ok(None) => Shared::Miss,
            Ok(Some(text)) => match decode::<V>(&text) {
                Ok(slot) => Shared::Hit(slot),
                Err(error) => {
                    // Written by another version of the value type: reload and overwrite it.
                    tracing::warn!(cache = self.name, %error, "undecodable shared cache entry, reloading");
                    Shared::Miss
                }
            },
            Err(error) => {
                self.redis_error("get", &error);
                Shared::Down
            }
        }
    }

    /// Runs the loader; writes its answer to L2 under `entry_key` unless that is `None`.
    async fn load_source<F, Fut, E>(&self, load: F, entry_key: Option<&str>) -> Result<Slot<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
    {
        let slot = match load().await {
            Ok(Some(value)) => {
                count(self.name, "source", "hit");
                Some(Arc::new(value))
            }
            Ok(None) => {
                count(self.name, "source", "miss");
                None
            }
            Err(error) => {
                count(self.name, "source", "error");
                return Err(error);
            }
        };
        if let Some(entry_key) = entry_key {
            self.write_shared(entry_key, &slot).await;
        }
        Ok(slot)
    }

    async fn write_shared(&self, entry_key: &str, slot: &Slot<V>) {
        if self.breaker.is_open() {
            return;
        }
        let (text, ttl) = match slot {
            Some(value) => (serde_json::to_string(&Present { v: value.as_ref() }), self.settings.shared_ttl),
            None => (serde_json::to_string(&Absent { absent: true }), self.settings.negative_ttl),
        };
        let text = match text {
            Ok(text) => text,
            Err(error) => {
                tracing::warn!(cache = self.name, %error, "cannot serialize a cache value, not sharing it");
                return;
            }
        };
        let millis = i64::try_from(jitter(ttl).as_millis()).unwrap_or(i64::MAX);
        let written: Result<(), RedisError> =
            self.redis.pool().set(entry_key, text, Some(Expiration::PX(millis)), None, false).await;
        if let Err(error) = written {
            self.redis_error("set", &error);
        }
    }

    /// `Ok(true)`: this replica loads the key; `Ok(false)`: another one does; `Err`: Redis failed.
    async fn try_lock(&self, lock_key: &str, token: &str) -> Result<bool, ()> {
        if self.breaker.is_open() {
            return Err(());
        }
        let millis = i64::try_from(LOAD_LOCK_TTL.as_millis()).unwrap_or(i64::MAX);
        let reply: Result<Option<String>, RedisError> =
            self.redis.pool().set(lock_key, token, Some(Expiration::PX(millis)), Some(SetOptions::NX), false).await;
        reply.map(|ok| ok.is_some()).map_err(|error| self.redis_error("lock", &error))
    }

    async fn unlock(&self, lock_key: &str, token: &str) {
        let reply: Result<i64, RedisError> = self.redis.pool().eval(UNLOCK_SCRIPT, lock_key, token).await;
        if let Err(error) = reply {
            // The lock expires by itself; waiting replicas load after LOAD_LOCK_WAIT at worst.
            self.redis_error("unlock", &error);
        }
    }

    /// Deletes the L2 entry, then broadcasts, in that order: a replica that drops its L1 entry
    /// on the broadcast must not find the old value in L2. Ignores the breaker (an invalidation
    /// is worth a try) and broadcasts even if the delete failed: with one cluster node down the
    /// broadcast may still get through, and replicas that cannot read L2 load from the source.
    async fn delete_shared(&self, key: &str) -> Result<(), RedisError> {
        let deleted: Result<i64, RedisError> = self.redis.pool().del(self.entry_key(key)).await;
        if let Err(error) = &deleted {
            self.redis_error("del", error);
        }
        let message = InvalidationMessage { service: self.service.into(), cache: self.name.into(), key: key.into() };
        let published = match serde_json::to_string(&message) {
            Ok(text) => self.redis.pool().next_connected().publish::<i64, _, _>(self.channel.as_str(), text).await,
            Err(error) => Err(RedisError::new(fred::error::ErrorKind::Parse, error.to_string())),
        };
        if let Err(error) = &published {
            self.redis_error("publish", error);
        }
        deleted.and(published).map(drop)
    }
}

/// The L1 of one cache, as the bus sees it (the value type erased).
trait LocalEntries: Send + Sync {
    fn drop_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()>;
    fn drop_all(&self);
}

impl<V: Send + Sync + 'static> LocalEntries for Inner<V> {
    fn drop_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.local.invalidate(key))
    }

    fn drop_all(&self) {
        self.local.invalidate_all();
    }
}

/// What is published on the invalidation channel.
#[derive(Debug, Serialize, Deserialize)]
struct InvalidationMessage {
    service: String,
    cache: String,
    key: String,
}

/// `{prefix}:cache:invalidate`, one channel for every cache of the deployment.
fn invalidation_channel(redis: &Redis) -> String {
    redis.key("cache", "invalidate")
}

struct Registration {
    service: &'static str,
    cache: &'static str,
    entries: Weak<dyn LocalEntries>,
}

/// The caches of this process, by service and name. Several caches may share a name (the
/// whole mesh in one process builds one credential cache per service): all of them are dropped.
#[derive(Default)]
struct Registry {
    caches: Mutex<Vec<Registration>>,
}

impl Registry {
    fn matching(&self, service: Option<(&str, &str)>) -> Vec<Arc<dyn LocalEntries>> {
        let Ok(mut caches) = self.caches.lock() else {
            return Vec::new();
        };
        caches.retain(|registration| registration.entries.strong_count() > 0);
        caches
            .iter()
            .filter(|r| service.is_none_or(|(service, cache)| r.service == service && r.cache == cache))
            .filter_map(|r| r.entries.upgrade())
            .collect()
    }

    async fn drop_key(&self, service: &str, cache: &str, key: &str) -> usize {
        let caches = self.matching(Some((service, cache)));
        for entries in &caches {
            entries.drop_key(key).await;
        }
        caches.len()
    }

    fn drop_all(&self) {
        for entries in self.matching(None) {
            entries.drop_all();
        }
    }
}

/// One subscription per process to the invalidation channel `{prefix}:cache:invalidate`; routes
/// each message (service, cache name, key) to the L1 of the caches registered under that name.
/// Cheap to clone; the listener stops when the last clone (caches hold one) is dropped.
#[derive(Clone)]
pub struct InvalidationBus {
    registry: Arc<Registry>,
    _listener: Option<Arc<DropGuard>>,
}

impl std::fmt::Debug for InvalidationBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvalidationBus").field("listening", &self._listener.is_some()).finish_non_exhaustive()
    }
}

impl InvalidationBus {
    /// Subscribes to the invalidation channel (returning once the subscription is in place) and
    /// spawns the listener task.
    pub async fn start(redis: &Redis) -> Result<Self, RedisError> {
        let channel = invalidation_channel(redis);
        let subscriber = redis.subscriber().await?;
        // Receivers first, so nothing published after SUBSCRIBE returns is missed.
        let mut messages = subscriber.message_rx();
        let mut reconnects = subscriber.reconnect_rx();
        subscriber.subscribe(channel.as_str()).await?;

        let registry = Arc::new(Registry::default());
        let stop = CancellationToken::new();
        let listener_registry = Arc::clone(&registry);
        let listener_stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = listener_stop.cancelled() => break,
                    message = messages.recv() => match message {
                        Ok(message) if *message.channel == *channel => {
                            handle_message(&listener_registry, message.value.as_str().as_deref()).await;
                        }
                        Ok(_) => {}
                        Err(RecvError::Lagged(missed)) => {
                            tracing::warn!(missed, "cache invalidation listener lagged, dropping every local cache");
                            resync(&listener_registry);
                        }
                        Err(RecvError::Closed) => break,
                    },
                    reconnected = reconnects.recv() => match reconnected {
                        // Broadcasts sent while disconnected are lost: forget everything local.
                        Ok(_) | Err(RecvError::Lagged(_)) => {
                            tracing::info!("cache invalidation subscriber reconnected, dropping every local cache");
                            resync(&listener_registry);
                        }
                        Err(RecvError::Closed) => break,
                    },
                }
            }
            let _ = subscriber.quit().await;
        });
        Ok(Self { registry, _listener: Some(Arc::new(stop.drop_guard())) })
    }

    /// A bus that reaches only the caches of this process, for tests and tools without a
    /// listener; other replicas keep their L1 entries until `local_ttl`.
    pub fn local() -> Self {
        Self { registry: Arc::new(Registry::default()), _listener: None }
    }

    fn register(&self, service: &'static str, cache: &'static str, entries: Weak<dyn LocalEntries>) {
        if let Ok(mut caches) = self.registry.caches.lock() {
            caches.retain(|registration| registration.entries.strong_count() > 0);
            caches.push(Registration { service, cache, entries });
        }
    }

    async fn drop_local(&self, service: &'static str, cache: &'static str, key: &str, origin: &'static str) {
        let dropped = self.registry.drop_key(service, cache, key).await;
        metrics::counter!("cache_invalidations_total", "cache" => cache, "origin" => origin).increment(dropped as u64);
    }
}

async fn handle_message(registry: &Registry, text: Option<&str>) {
    let Some(message) = text.and_then(|text| serde_json::from_str::<InvalidationMessage>(text).ok()) else {
        tracing::warn!(message = ?text, "ignoring a malformed cache invalidation");
        return;
    };
    let dropped = registry.drop_key(&message.service, &message.cache, &message.key).await;
    if dropped > 0 {
        metrics::counter!("cache_invalidations_total", "cache" => message.cache, "origin" => "remote")
            .increment(dropped as u64);
    }
}

fn resync(registry: &Registry) {
    registry.drop_all();
    metrics::counter!("cache_invalidations_total", "cache" => "*", "origin" => "resync").increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_keep_values_and_absence_apart() {
        let present = serde_json::to_string(&Present { v: &Some(3) }).expect("serialize");
        let absent = serde_json::to_string(&Absent { absent: true }).expect("serialize");
        let null_value = serde_json::to_string(&Present { v: &Option::<i32>::None }).expect("serialize");
        assert_eq!(decode::<Option<i32>>(&present).expect("decode").as_deref(), Some(&Some(3)));
        assert_eq!(decode::<Option<i32>>(&absent).expect("decode"), None);
        assert_eq!(decode::<Option<i32>>(&null_value).expect("decode").as_deref(), Some(&None));
        assert!(decode::<i32>("{\"other\":1}").is_err());
        assert!(decode::<i32>("7").is_err());
    }

    #[test]
    fn negative_entries_live_at_most_local_ttl() {
        let expiry = SlotExpiry { positive: Duration::from_secs(10), negative: Duration::from_secs(2) };
        let now = Instant::now();
        let key = String::from("k");
        let positive: Slot<u8> = Some(Arc::new(1));
        let negative: Slot<u8> = None;
        assert_eq!(moka::Expiry::expire_after_create(&expiry, &key, &positive, now), Some(Duration::from_secs(10)));
        assert_eq!(moka::Expiry::expire_after_create(&expiry, &key, &negative, now), Some(Duration::from_secs(2)));
    }
}
