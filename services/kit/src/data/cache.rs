//! The one cache every service uses: L1 in process (moka), L2 in the shared Redis, then the
//! source (usually the service's database) through a loader the caller passes.
//!
//! Protections:
//! - penetration: a source answer "absent" is cached too, for `negative_ttl`, in both levels;
//! - stampede: concurrent misses of one key in one process run the loader once (moka coalesces
//!   them); across replicas the first loader takes a short Redis lock (`SET NX PX`) and the
//!   others poll L2 for a moment, then load themselves, so nothing waits on a dead lock holder;
//! - avalanche: L2 lifetimes are jittered by ±10%, so entries written together expire apart;
//! - staleness: [`TwoLevelCache::invalidate`] bumps the key's version and deletes it in L2, then
//!   broadcasts on Redis pub/sub so every replica drops its L1 entry. A loader writes to L2 only
//!   if the key's version is still the one it saw before reading the source, and a process drops
//!   an L1 entry whose load overlapped an invalidation, so a load that read the source before a
//!   change never brings the old value back, however slow it was (see `invalidate` for the bound).
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
//!   `lock`, `unlock`, `invalidate`, `publish`).
//! - `cache_stale_writes_refused_total{cache}`: L2 writes refused because the key was
//!   invalidated while its value was being loaded.
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

use crate::data::redis::{Redis, RedisBreaker, RedisError, timed};

/// How long a replica's load lock lives if its holder never releases it (crashed, cancelled).
const LOAD_LOCK_TTL: Duration = Duration::from_secs(3);
/// How long a replica that lost the load lock waits for the winner's value before loading itself.
const LOAD_LOCK_WAIT: Duration = Duration::from_millis(500);
/// How often a waiting replica looks at L2.
const LOAD_LOCK_POLL: Duration = Duration::from_millis(25);
/// How long the cache skips Redis reads and writes after a Redis command failed.
const REDIS_RETRY_AFTER: Duration = Duration::from_secs(2);
/// Lifetime of a key's version in L2 after an invalidation: longer than any load may take, since
/// a loader that saw no version at all could otherwise write after the version expired.
const VERSION_TTL: Duration = Duration::from_secs(600);
/// The Redis operations of a cache, the `operation` label of `cache_redis_errors_total`.
const REDIS_OPERATIONS: [&str; 6] = ["get", "set", "lock", "unlock", "invalidate", "publish"];

/// Deletes the lock only if it still holds our token, so a slow loader whose lock expired does
/// not release the lock of the next one.
const UNLOCK_SCRIPT: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// Writes a loaded value (KEYS[1]) only if the key's version (KEYS[2]) is still the one the loader
/// read before it asked the source (ARGV[1], empty for none); ARGV[2] is the value, ARGV[3] its
/// lifetime in milliseconds. Returns 1 if written, 0 if the key was invalidated meanwhile.
const WRITE_IF_CURRENT_SCRIPT: &str = "\
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1";

/// Bumps the key's version (KEYS[2], kept for ARGV[1] milliseconds) and deletes its value (KEYS[1]).
const INVALIDATE_SCRIPT: &str = "\
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])";

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
    jitter_with(ttl, &mut rand::thread_rng())
}

/// [`jitter`] drawing from `rng` (a seeded one in tests).
pub fn jitter_with(ttl: Duration, rng: &mut impl Rng) -> Duration {
    ttl.mul_f64(rng.gen_range(0.9..=1.1)).max(Duration::from_millis(1))
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

/// A key's version in L2, as read before loading; empty when it was never invalidated.
type Version = String;

/// What the L2 stage found.
enum Shared<V> {
    Hit(Slot<V>),
    /// Not in L2; the key's version, for writing what the source says.
    Miss(Version),
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
    /// Bumped by every L1 drop; a load that saw it change drops what it put in L1.
    generation: AtomicU64,
    breaker: RedisBreaker,
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
            generation: AtomicU64::new(0),
            breaker: RedisBreaker::new("cache", REDIS_RETRY_AFTER),
        });
        // Counted only when they happen; at 0 from the start, so that rates and alerts see them.
        for operation in REDIS_OPERATIONS {
            metrics::counter!("cache_redis_errors_total", "cache" => name, "operation" => operation).increment(0);
        }
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
        // Boxed: the miss path holds the loader's future (a database query: kilobytes), and
        // every caller's future would otherwise carry that size on every hit too, and copy it
        // when the RPC's future is boxed.
        Box::pin(self.load_missing(key, load)).await
    }

    /// The L1 miss of [`TwoLevelCache::get_or_load`].
    async fn load_missing<F, Fut, E>(&self, key: &str, load: F) -> Result<Option<Arc<V>>, E>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<Option<V>, E>> + Send,
        E: Clone + Send + Sync + 'static,
    {
        let inner = &self.inner;
        let generation = inner.generation.load(Ordering::SeqCst);
        let result = inner.local.try_get_with_by_ref(key, inner.load_shared(key, load)).await;
        if inner.generation.load(Ordering::SeqCst) != generation {
            // An invalidation arrived while this value was loading: it may predate the change,
            // so it answers this caller but does not stay in L1.
            inner.local.invalidate(key).await;
        }
        result.map_err(Arc::unwrap_or_clone)
    }

    /// Call after the source changed (after the commit): drops L1 here, bumps the key's version
    /// and deletes its value in L2, and broadcasts so every replica drops its L1 entry. Loads
    /// that were under way cannot write their possibly old value back (see the module docs).
    ///
    /// Staleness bound once this returns `Ok`: none in this process and in L2; other replicas
    /// drop their L1 entry as soon as the broadcast arrives (milliseconds), or, if they miss
    /// it, after at most `local_ttl`. On `Err` (Redis unreachable) the old value may live in L2
    /// until its TTL runs out, so the worst case is `1.1 × shared_ttl + local_ttl`. Callers may
    /// log the error and go on.
    pub async fn invalidate(&self, key: &str) -> Result<(), RedisError> {
        let inner = &self.inner;
        inner.bus.drop_local(inner.service, inner.name, key, "local").await;
        inner.delete_shared(key).await
    }

    /// [`TwoLevelCache::invalidate`] after a change that is committed whatever happens here: a
    /// failure only lengthens staleness to the bound given there, so it is logged at WARN (with
    /// the cache and the key), not returned.
    pub async fn invalidate_or_log(&self, key: &str) {
        if let Err(error) = self.invalidate(key).await {
            tracing::warn!(cache = self.inner.name, key, %error, "could not invalidate a cached value; it expires by TTL");
        }
    }

    /// The name given to [`TwoLevelCache::new`].
    pub fn name(&self) -> &'static str {
        self.inner.name
    }
}

impl<V: Serialize + DeserializeOwned + Send + Sync + 'static> Inner<V> {
    /// The value's key. The braces make `key` the hash tag, so the value and its version live in
    /// one cluster slot and a script may touch both (service and cache names hold no braces).
    fn entry_key(&self, key: &str) -> String {
        self.redis.key(self.service, &format!("cache:{}:{{{key}}}", self.name))
    }

    fn version_key(&self, key: &str) -> String {
        self.redis.key(self.service, &format!("cache-version:{}:{{{key}}}", self.name))
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
        let mut version = match self.read_shared(key).await {
            Shared::Hit(slot) => {
                count(self.name, "shared", "hit");
                return Ok(slot);
            }
            Shared::Down => {
                count(self.name, "shared", "error");
                return self.load_source(load, None).await;
            }
            Shared::Miss(version) => version,
        };

        let lock_key = self.lock_key(key);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let deadline = Instant::now() + LOAD_LOCK_WAIT;
        loop {
            match self.try_lock(&lock_key, &token).await {
                Ok(true) => {
                    count(self.name, "shared", "miss");
                    let result = self.load_source(load, Some((key, &version))).await;
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
            match self.read_shared(key).await {
                Shared::Hit(slot) => {
                    count(self.name, "shared", "hit");
                    return Ok(slot);
                }
                Shared::Down => {
                    count(self.name, "shared", "error");
                    return self.load_source(load, None).await;
                }
                // Retrying the lock next: if the holder gave up, this replica loads instead.
                Shared::Miss(latest) => version = latest,
            }
        }
        // The holder is slow or gone; loading here costs one extra source query, waiting longer
        // would cost the caller's latency.
        count(self.name, "shared", "miss");
        self.load_source(load, Some((key, &version))).await
    }

    fn redis_error(&self, operation: &'static str, error: &RedisError) {
        tracing::warn!(cache = self.name, operation, %error, "redis cache operation failed, skipping redis for a moment");
        metrics::counter!("cache_redis_errors_total", "cache" => self.name, "operation" => operation).increment(1);
        self.breaker.trip();
    }

    /// The value and the version of `key` in L2, in one round trip.
    async fn read_shared(&self, key: &str) -> Shared<V> {
        if self.breaker.is_open() {
            return Shared::Down;
        }
        let keys = vec![self.entry_key(key), self.version_key(key)];
        match timed("cache_get", self.redis.pool().mget::<Vec<Option<String>>, _>(keys)).await {
            Ok(mut found) if found.len() == 2 => {
                let version = found.pop().flatten().unwrap_or_default();
                match found.pop().flatten().map(|text| decode::<V>(&text)) {
                    None => Shared::Miss(version),
                    Some(Ok(slot)) => Shared::Hit(slot),
                    Some(Err(error)) => {
                        // Written by another version of the value type: reload and overwrite it.
                        tracing::warn!(cache = self.name, %error, "undecodable shared cache entry, reloading");
                        Shared::Miss(version)
                    }
                }
            }
            Ok(found) => {
                let error =
                    RedisError::new(fred::error::ErrorKind::Parse, format!("MGET of 2 keys gave {}", found.len()));
                self.redis_error("get", &error);
                Shared::Down
            }
            Err(error) => {
                self.redis_error("get", &error);
                Shared::Down
            }
        }
    }

    /// Runs the loader; writes its answer to L2 for `(key, version seen before loading)` unless
    /// that is `None`.
    async fn load_source<F, Fut, E>(&self, load: F, write: Option<(&str, &Version)>) -> Result<Slot<V>, E>
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
        if let Some((key, version)) = write {
            self.write_shared(key, version, &slot).await;
        }
        Ok(slot)
    }

    async fn write_shared(&self, key: &str, version: &Version, slot: &Slot<V>) {
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
        let millis = jitter(ttl).as_millis().to_string();
        let keys = vec![self.entry_key(key), self.version_key(key)];
        let written: Result<i64, RedisError> = timed(
            "cache_set",
            self.redis.pool().eval(WRITE_IF_CURRENT_SCRIPT, keys, vec![version.clone(), text, millis]),
        )
        .await;
        match written {
            Ok(0) => metrics::counter!("cache_stale_writes_refused_total", "cache" => self.name).increment(1),
            Ok(_) => {}
            Err(error) => self.redis_error("set", &error),
        }
    }

    /// `Ok(true)`: this replica loads the key; `Ok(false)`: another one does; `Err`: Redis failed.
    async fn try_lock(&self, lock_key: &str, token: &str) -> Result<bool, ()> {
        if self.breaker.is_open() {
            return Err(());
        }
        let millis = i64::try_from(LOAD_LOCK_TTL.as_millis()).unwrap_or(i64::MAX);
        let lock = self.redis.pool().set(lock_key, token, Some(Expiration::PX(millis)), Some(SetOptions::NX), false);
        let reply: Result<Option<String>, RedisError> = timed("cache_lock", lock).await;
        reply.map(|ok| ok.is_some()).map_err(|error| self.redis_error("lock", &error))
    }

    async fn unlock(&self, lock_key: &str, token: &str) {
        let reply: Result<i64, RedisError> =
            timed("cache_unlock", self.redis.pool().eval(UNLOCK_SCRIPT, lock_key, token)).await;
        if let Err(error) = reply {
            // The lock expires by itself; waiting replicas load after LOAD_LOCK_WAIT at worst.
            self.redis_error("unlock", &error);
        }
    }

    /// Bumps the version and deletes the L2 entry, then broadcasts, in that order: a replica
    /// that drops its L1 entry on the broadcast must not find the old value in L2. Ignores the
    /// breaker (an invalidation is worth a try) and broadcasts even if the delete failed: with
    /// one cluster node down the broadcast may still get through, and replicas that cannot read
    /// L2 load from the source.
    async fn delete_shared(&self, key: &str) -> Result<(), RedisError> {
        let keys = vec![self.entry_key(key), self.version_key(key)];
        let version_ttl = VERSION_TTL.as_millis().to_string();
        let deleted: Result<i64, RedisError> =
            timed("cache_invalidate", self.redis.pool().eval(INVALIDATE_SCRIPT, keys, version_ttl)).await;
        if let Err(error) = &deleted {
            self.redis_error("invalidate", error);
        }
        let message = InvalidationMessage { service: self.service.into(), cache: self.name.into(), key: key.into() };
        let published = match serde_json::to_string(&message) {
            Ok(text) => {
                timed(
                    "cache_publish",
                    self.redis.pool().next_connected().publish::<i64, _, _>(self.channel.as_str(), text),
                )
                .await
            }
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
        self.generation.fetch_add(1, Ordering::SeqCst);
        Box::pin(self.local.invalidate(key))
    }

    fn drop_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
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
