//! The two-level cache against the real Redis Cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aimesh_kit::config::RedisConfig;
use aimesh_kit::data::cache::{CacheSettings, InvalidationBus, TwoLevelCache, jitter_with};
use aimesh_kit::data::redis::Redis;
use aimesh_kit::testing;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Profile {
    name: String,
    level: u32,
}

fn profile(name: &str) -> Profile {
    Profile { name: name.to_owned(), level: 7 }
}

fn settings() -> CacheSettings {
    CacheSettings {
        local_ttl: Duration::from_secs(60),
        shared_ttl: Duration::from_secs(60),
        negative_ttl: Duration::from_secs(60),
        local_capacity: 1_000,
    }
}

/// The source: counts how often it is asked and answers `value` after `delay`.
async fn source<T>(calls: &AtomicUsize, delay: Duration, value: Option<T>) -> Result<Option<T>, String> {
    calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(delay).await;
    Ok(value)
}

/// One "replica": its own connections and bus, on the key prefix `prefix` shared with the others.
async fn replica(prefix: &str, settings: CacheSettings) -> (TwoLevelCache<Profile>, InvalidationBus) {
    let redis = Redis::connect_with_prefix(&testing::redis_urls(), &RedisConfig::default(), prefix)
        .await
        .expect("connect to the redis cluster");
    let bus = InvalidationBus::start(&redis).await.expect("subscribe to invalidations");
    (TwoLevelCache::new("profiles", "test", redis, &bus, settings), bus)
}

fn fresh_prefix() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

/// Reads `key` on `cache` until it answers `expected` (the source answering `expected`), for at
/// most `within`; returns how long that took.
async fn wait_for(cache: &TwoLevelCache<Profile>, key: &str, expected: &Profile, within: Duration) -> Duration {
    let started = Instant::now();
    let calls = AtomicUsize::new(0);
    loop {
        let got = cache.get_or_load(key, || source(&calls, Duration::ZERO, Some(expected.clone()))).await;
        if got.expect("load").as_deref() == Some(expected) {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{key} still not {expected:?} after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_value_is_loaded_once_then_served_from_cache() {
    let redis = testing::redis().await;
    let bus = InvalidationBus::start(&redis).await.expect("bus");
    let cache = TwoLevelCache::<Profile>::new("profiles", "test", redis, &bus, settings());
    let calls = AtomicUsize::new(0);

    for _ in 0..3 {
        let got = cache.get_or_load("u1", || source(&calls, Duration::ZERO, Some(profile("ada")))).await;
        assert_eq!(got.expect("load").as_deref(), Some(&profile("ada")));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Another key is another entry.
    let got = cache.get_or_load("u2", || source(&calls, Duration::ZERO, Some(profile("bob")))).await;
    assert_eq!(got.expect("load").as_deref(), Some(&profile("bob")));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// `cache_requests_total` of the cache "profiles" in `metrics`, by `(level, result)`.
fn requests_by_level(metrics: &PrometheusHandle) -> BTreeMap<(String, String), u64> {
    let mut counts = BTreeMap::new();
    for line in metrics.render().lines() {
        let Some((labels, value)) = line.strip_prefix("cache_requests_total{").and_then(|rest| rest.split_once("} "))
        else {
            continue;
        };
        let labels: BTreeMap<&str, &str> = labels
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(name, value)| (name, value.trim_matches('"')))
            .collect();
        if labels.get("cache") == Some(&"profiles") {
            let level = (
                labels.get("level").copied().unwrap_or_default().to_owned(),
                labels.get("result").copied().unwrap_or_default().to_owned(),
            );
            counts.insert(level, value.trim().parse().expect("a counter value"));
        }
    }
    counts
}

fn counts(expected: &[(&str, &str, u64)]) -> BTreeMap<(String, String), u64> {
    expected.iter().map(|(level, result, count)| (((*level).to_owned(), (*result).to_owned()), *count)).collect()
}

// A current-thread runtime: the recorder below is this thread's, and the cache counts on the
// caller's task.
#[tokio::test]
async fn each_level_counts_its_hits_and_misses_once() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let _recorder = metrics::set_default_local_recorder(&recorder);
    let prefix = fresh_prefix();
    let (a, _bus_a) = replica(&prefix, settings()).await;
    let (b, _bus_b) = replica(&prefix, settings()).await;
    let calls = AtomicUsize::new(0);

    // Nowhere yet: a miss in both levels, then the source finds it.
    let got = a.get_or_load("u1", || source(&calls, Duration::ZERO, Some(profile("ada")))).await;
    assert_eq!(got.expect("load").as_deref(), Some(&profile("ada")));
    assert_eq!(
        requests_by_level(&metrics),
        counts(&[("local", "miss", 1), ("shared", "miss", 1), ("source", "hit", 1)])
    );
    // Again on the same cache: its local level answers.
    let got = a.get_or_load("u1", || source(&calls, Duration::ZERO, Some(profile("ada")))).await;
    assert_eq!(got.expect("load").as_deref(), Some(&profile("ada")));
    assert_eq!(
        requests_by_level(&metrics),
        counts(&[("local", "hit", 1), ("local", "miss", 1), ("shared", "miss", 1), ("source", "hit", 1)])
    );
    // A second cache, its local level empty: Redis answers.
    let got = b.get_or_load("u1", || source(&calls, Duration::ZERO, Some(profile("ada")))).await;
    assert_eq!(got.expect("load").as_deref(), Some(&profile("ada")));
    assert_eq!(
        requests_by_level(&metrics),
        counts(&[
            ("local", "hit", 1),
            ("local", "miss", 2),
            ("shared", "hit", 1),
            ("shared", "miss", 1),
            ("source", "hit", 1)
        ])
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn absent_answers_are_cached_in_both_levels_until_the_negative_ttl_ends() {
    let prefix = fresh_prefix();
    let negative = CacheSettings { negative_ttl: Duration::from_millis(400), ..settings() };
    let (a, _bus_a) = replica(&prefix, negative).await;
    let (b, _bus_b) = replica(&prefix, negative).await;
    let calls = AtomicUsize::new(0);

    assert_eq!(a.get_or_load("ghost", || source::<Profile>(&calls, Duration::ZERO, None)).await, Ok(None));
    assert_eq!(a.get_or_load("ghost", || source::<Profile>(&calls, Duration::ZERO, None)).await, Ok(None));
    // A replica with an empty L1 finds the negative answer in Redis.
    assert_eq!(b.get_or_load("ghost", || source::<Profile>(&calls, Duration::ZERO, None)).await, Ok(None));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Past the longest jittered negative TTL, both levels have forgotten it.
    tokio::time::sleep(Duration::from_millis(400 * 11 / 10 + 100)).await;
    assert_eq!(a.get_or_load("ghost", || source::<Profile>(&calls, Duration::ZERO, None)).await, Ok(None));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn concurrent_misses_in_one_process_run_the_loader_once() {
    let redis = testing::redis().await;
    let bus = InvalidationBus::start(&redis).await.expect("bus");
    let cache = TwoLevelCache::<Profile>::new("profiles", "test", redis, &bus, settings());
    let calls = Arc::new(AtomicUsize::new(0));

    let readers: Vec<_> = (0..50)
        .map(|_| {
            let cache = cache.clone();
            let calls = Arc::clone(&calls);
            tokio::spawn(async move {
                cache.get_or_load("hot", || source(&calls, Duration::from_millis(100), Some(profile("hot")))).await
            })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.expect("reader").expect("load").as_deref(), Some(&profile("hot")));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_misses_across_replicas_run_the_loader_once() {
    let prefix = fresh_prefix();
    let (a, _bus_a) = replica(&prefix, settings()).await;
    let (b, _bus_b) = replica(&prefix, settings()).await;
    let calls = Arc::new(AtomicUsize::new(0));

    let readers: Vec<_> = [a, b]
        .into_iter()
        .flat_map(|cache| std::iter::repeat_n(cache, 10))
        .map(|cache| {
            let calls = Arc::clone(&calls);
            tokio::spawn(async move {
                cache.get_or_load("hot", || source(&calls, Duration::from_millis(200), Some(profile("hot")))).await
            })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.expect("reader").expect("load").as_deref(), Some(&profile("hot")));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the replica that lost the lock should wait for the other's value");
}

#[tokio::test]
async fn replicas_share_loaded_values_and_drop_them_on_invalidation() {
    let prefix = fresh_prefix();
    let (a, _bus_a) = replica(&prefix, settings()).await;
    let (b, _bus_b) = replica(&prefix, settings()).await;
    let calls_a = AtomicUsize::new(0);
    let calls_b = AtomicUsize::new(0);

    let got = a.get_or_load("u1", || source(&calls_a, Duration::ZERO, Some(profile("v1")))).await;
    assert_eq!(got.expect("load").as_deref(), Some(&profile("v1")));
    let got = b.get_or_load("u1", || source(&calls_b, Duration::ZERO, Some(profile("never")))).await;
    assert_eq!(got.expect("load").as_deref(), Some(&profile("v1")), "b should read what a loaded");
    assert_eq!(calls_b.load(Ordering::SeqCst), 0);

    // The source changes; a reports it. Without the broadcast b would keep v1 for local_ttl (60 s).
    a.invalidate("u1").await.expect("invalidate");
    let got = a.get_or_load("u1", || source(&calls_a, Duration::ZERO, Some(profile("v2")))).await;
    assert_eq!(got.expect("load").as_deref(), Some(&profile("v2")), "a drops its own entry at once");
    assert_eq!(calls_a.load(Ordering::SeqCst), 2);
    wait_for(&b, "u1", &profile("v2"), Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_slow_loader_racing_an_invalidation_never_brings_the_old_value_back() {
    let prefix = fresh_prefix();
    let (a, _bus_a) = replica(&prefix, settings()).await;
    let (b, _bus_b) = replica(&prefix, settings()).await;
    let calls = Arc::new(AtomicUsize::new(0));

    // b reads the old row, then the change commits and a invalidates, then b's load finishes:
    // slower than any fixed "delete again later" delay would allow for.
    let slow_reader = {
        let b = b.clone();
        let calls = Arc::clone(&calls);
        tokio::spawn(async move {
            b.get_or_load("u1", || source(&calls, Duration::from_millis(1500), Some(profile("old")))).await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.invalidate("u1").await.expect("invalidate");
    // The slow caller gets what it read; nobody else ever sees it.
    assert_eq!(slow_reader.await.expect("reader").expect("load").as_deref(), Some(&profile("old")));

    let fresh = AtomicUsize::new(0);
    for cache in [&a, &b] {
        let got = cache.get_or_load("u1", || source(&fresh, Duration::ZERO, Some(profile("new")))).await;
        assert_eq!(got.expect("load").as_deref(), Some(&profile("new")), "the old value came back");
    }
    // One of them loaded it from the source, the other found it in Redis.
    assert_eq!(fresh.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn loader_errors_reach_the_caller_and_are_not_cached() {
    let redis = testing::redis().await;
    let bus = InvalidationBus::start(&redis).await.expect("bus");
    let cache = TwoLevelCache::<Profile>::new("profiles", "test", redis, &bus, settings());
    let calls = AtomicUsize::new(0);

    let failed = cache
        .get_or_load("u1", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<Option<Profile>, _>("database down".to_owned())
        })
        .await;
    assert_eq!(failed, Err("database down".to_owned()));
    let got = cache.get_or_load("u1", || source(&calls, Duration::ZERO, Some(profile("ok")))).await;
    assert_eq!(got.expect("load").as_deref(), Some(&profile("ok")));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Redis commands the cache tried and saw fail, by operation.
fn redis_errors(metrics: &PrometheusHandle) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in metrics.render().lines() {
        let Some((labels, value)) = line.strip_prefix("cache_redis_errors_total{").and_then(|r| r.split_once("} "))
        else {
            continue;
        };
        let operation = labels.split(',').find_map(|pair| pair.strip_prefix("operation=")).unwrap_or_default();
        let count: u64 = value.trim().parse().expect("a counter value");
        // Every operation's series exists from the cache's start, at 0.
        if count > 0 {
            counts.insert(operation.trim_matches('"').to_owned(), count);
        }
    }
    counts
}

#[tokio::test(flavor = "current_thread")]
async fn a_broken_redis_degrades_to_the_source() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let _recorder = metrics::set_default_local_recorder(&recorder);
    let redis = testing::redis().await;
    let bus = InvalidationBus::local();
    let cache = TwoLevelCache::<Profile>::new("profiles", "test", redis.clone(), &bus, settings());
    // Every command on a closed pool fails, as when the cluster is unreachable.
    redis.quit().await;
    let calls = AtomicUsize::new(0);

    let got = cache.get_or_load("u1", || source(&calls, Duration::ZERO, Some(profile("ada")))).await;
    assert_eq!(got.expect("no error despite redis").as_deref(), Some(&profile("ada")));
    let got = cache.get_or_load("u1", || source(&calls, Duration::ZERO, Some(profile("ada")))).await;
    assert_eq!(got.expect("no error despite redis").as_deref(), Some(&profile("ada")));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the local level still works");
    let tried = redis_errors(&metrics);
    assert_eq!(tried, BTreeMap::from([("get".to_owned(), 1)]), "one read tried Redis, and nothing after it");

    // Once Redis failed, further misses skip it (for REDIS_RETRY_AFTER, 2 s) instead of paying
    // for another failed command: they count as shared errors without a Redis command.
    let got = cache.get_or_load("u2", || source(&calls, Duration::ZERO, Some(profile("bob")))).await;
    assert_eq!(got.expect("no error despite redis").as_deref(), Some(&profile("bob")));
    assert_eq!(redis_errors(&metrics), tried, "a miss while the breaker is open sends no command");
    assert_eq!(requests_by_level(&metrics).get(&("shared".to_owned(), "error".to_owned())), Some(&2));

    // Invalidation reports the failure but still drops the local entry.
    assert!(cache.invalidate("u1").await.is_err());
    let got = cache.get_or_load("u1", || source(&calls, Duration::ZERO, Some(profile("eve")))).await;
    assert_eq!(got.expect("load").as_deref(), Some(&profile("eve")));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[test]
fn jitter_stays_within_ten_percent() {
    const SEED: u64 = 20261206;
    println!("jitter samples from seed {SEED}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    let ttl = Duration::from_secs(100);
    let samples: Vec<Duration> = (0..10_000).map(|_| jitter_with(ttl, &mut rng)).collect();
    let (min, max) = (samples.iter().min().copied(), samples.iter().max().copied());
    assert!(samples.iter().all(|d| *d >= Duration::from_secs(90) && *d <= Duration::from_secs(110)));
    // Spread over the range, not a constant: that is what spreads expiries apart.
    assert!(min < Some(Duration::from_secs(92)) && max > Some(Duration::from_secs(108)), "{min:?}..{max:?}");
    assert_eq!(jitter_with(Duration::ZERO, &mut rng), Duration::from_millis(1), "redis rejects PX 0");
}
