//! The rate limiter against real Redis Clusters: the shared test cluster for the exact-limit
//! and shadow tests, a scratch cluster of the test's own for the tests that kill nodes.

use std::sync::OnceLock;
use std::time::Duration;

use aimesh_kit::config::{RateLimitConfig, RateLimitMode, RedisConfig, RedisFailureMode};
use aimesh_kit::ratelimit::{DecisionSource, Dimension, Limit, LimitRequest, RateLimiter};
use aimesh_kit::redis::Redis;
use aimesh_kit::testing::{self, ScratchCluster};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// A limit of `count` per hour: refill is then one request per 3600/count seconds, nothing a
/// test of a few seconds could mistake for the limit.
fn per_hour(dimension: Dimension, id: &str, count: u32) -> LimitRequest {
    LimitRequest { dimension, id: id.to_owned(), limit: Limit { count, period: Duration::from_secs(3600) }, cost: 1 }
}

fn settings(mode: RateLimitMode, on_redis_failure: RedisFailureMode) -> RateLimitConfig {
    RateLimitConfig { mode, on_redis_failure, ..RateLimitConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_limiters_sharing_a_limit_let_exactly_the_limit_through() {
    const LIMIT: u32 = 60;
    const TASKS_PER_LIMITER: usize = 8;
    const ATTEMPTS_PER_TASK: usize = 25;
    let prefix = format!("test-{}", uuid::Uuid::new_v4().simple());
    // Two "gateways": their own connections, one deployment's key prefix.
    let enforce = settings(RateLimitMode::Enforce, RedisFailureMode::Closed);
    let limiters = [
        RateLimiter::new(testing::redis_with_prefix(&prefix).await, &enforce),
        RateLimiter::new(testing::redis_with_prefix(&prefix).await, &enforce),
    ];
    let request = [per_hour(Dimension::ApiKey, "shared-key", LIMIT)];
    let mut tasks = Vec::new();
    for limiter in &limiters {
        for _ in 0..TASKS_PER_LIMITER {
            let (limiter, request) = (limiter.clone(), request.clone());
            tasks.push(tokio::spawn(async move {
                let mut allowed = 0u32;
                for _ in 0..ATTEMPTS_PER_TASK {
                    let decision = limiter.decide(&request).await.expect("redis answers");
                    assert_eq!(decision.source, DecisionSource::Redis);
                    allowed += u32::from(decision.allowed);
                }
                allowed
            }));
        }
    }
    let mut allowed = 0;
    for task in tasks {
        allowed += task.await.expect("task");
    }
    let attempts = 2 * TASKS_PER_LIMITER * ATTEMPTS_PER_TASK;
    assert!(attempts as u32 > 3 * LIMIT, "the load must exceed the limit well");
    assert_eq!(allowed, LIMIT, "exactly the limit across both limiters, of {attempts} attempts");

    let denied = limiters[1].decide(&request).await.expect("decide");
    assert!(!denied.allowed);
    assert_eq!((denied.limit, denied.remaining, denied.dimension), (LIMIT, 0, Some(Dimension::ApiKey)));
    let retry_after = denied.retry_after.expect("a denial says when to retry");
    // One request comes back every 3600/60 = 60 s.
    assert!(retry_after > Duration::from_secs(55) && retry_after <= Duration::from_secs(60), "{retry_after:?}");
    assert!(denied.reset > Duration::from_secs(3500), "{:?}", denied.reset);
    let headers: Vec<(&str, String)> = denied.headers();
    assert_eq!(headers[0], ("ratelimit-limit", LIMIT.to_string()));
    assert_eq!(headers[1], ("ratelimit-remaining", "0".to_owned()));
    assert!(headers.iter().any(|(name, value)| *name == "retry-after" && value.parse::<u64>().is_ok_and(|s| s >= 56)));
}

#[tokio::test]
async fn the_tightest_of_several_limits_decides_and_cost_counts() {
    let limiter = RateLimiter::new(testing::redis().await, &RateLimitConfig::default());
    let mut heavy_key = per_hour(Dimension::ApiKey, "key", 10);
    heavy_key.cost = 4;
    let mut heavy_project = per_hour(Dimension::Project, "project", 100);
    heavy_project.cost = 4;
    let requests = [heavy_key, heavy_project];
    let first = limiter.decide(&requests).await.expect("decide");
    assert!(first.allowed);
    assert_eq!((first.dimension, first.remaining), (Some(Dimension::ApiKey), 6), "the key has the least left");
    assert!(limiter.decide(&requests).await.expect("decide").allowed);
    let third = limiter.decide(&requests).await.expect("decide");
    assert!(!third.allowed, "4 + 4 + 4 exceeds the key's 10");
    assert_eq!(third.dimension, Some(Dimension::ApiKey));
    let project_only = limiter.decide(&[per_hour(Dimension::Project, "project", 100)]).await.expect("decide");
    // The project was consumed by all three requests (limits are decided independently).
    assert_eq!(project_only.remaining, 100 - 12 - 1);
}

/// The process's metrics recorder, installed once.
fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().expect("install a metrics recorder"))
}

/// The value of a counter line of the Prometheus text with all of `labels`.
fn counter(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn shadow_mode_lets_everything_through_and_counts_would_be_denials() {
    let metrics = metrics();
    let shadow_denied = ["dimension=\"user\"", "outcome=\"shadow_denied\"", "source=\"redis\""];
    let before = counter(&metrics.render(), "rate_limit_decisions_total", &shadow_denied);
    let limiter = RateLimiter::new(testing::redis().await, &settings(RateLimitMode::Shadow, RedisFailureMode::Open));
    let request = [per_hour(Dimension::User, "someone", 3)];
    let mut shadowed = 0;
    for _ in 0..10 {
        let decision = limiter.decide(&request).await.expect("decide");
        assert!(decision.allowed, "shadow mode never denies");
        shadowed += u64::from(decision.shadow);
    }
    assert_eq!(shadowed, 7, "the 7 requests above the limit are marked");
    let after = counter(&metrics.render(), "rate_limit_decisions_total", &shadow_denied);
    assert_eq!(after - before, 7, "and counted");
}

/// Polls `limiter` with `request` until a decision comes from Redis, at most `limit`.
async fn until_redis_decides(limiter: &RateLimiter, request: &[LimitRequest], limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(decision) = limiter.decide(request).await
            && decision.source == DecisionSource::Redis
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "redis did not decide again within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn connect(cluster: &ScratchCluster) -> Redis {
    // A short command timeout: a dead node costs that much before the fallback takes over.
    let settings = RedisConfig { command_timeout_ms: 300, ..RedisConfig::default() };
    Redis::connect_with_prefix(&cluster.urls(), &settings, "scratch").await.expect("connect to the scratch cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_fail_open_limits_locally_fail_closed_refuses_and_both_recover() {
    let mut cluster = ScratchCluster::start().await;
    let open = RateLimiter::new(connect(&cluster).await, &settings(RateLimitMode::Enforce, RedisFailureMode::Open));
    let closed = RateLimiter::new(connect(&cluster).await, &settings(RateLimitMode::Enforce, RedisFailureMode::Closed));
    let request = [per_hour(Dimension::Ip, "192.0.2.7", 3)];
    assert_eq!(open.decide(&request).await.expect("decide").source, DecisionSource::Redis);
    assert_eq!(closed.decide(&request).await.expect("decide").source, DecisionSource::Redis);

    cluster.kill_all();
    let mut local = Vec::new();
    for _ in 0..5 {
        let decision = open.decide(&request).await.expect("fail open never refuses for redis");
        assert_eq!(decision.source, DecisionSource::Local);
        local.push(decision.allowed);
    }
    // The local limiter starts from a full bucket of its own: 3 more, then denials.
    assert_eq!(local, [true, true, true, false, false], "the local limiter enforces the same limit");
    let refused = closed.decide(&request).await.expect_err("fail closed refuses without redis");
    assert_eq!(refused.code, aimesh_kit::ErrorCode::Unavailable);

    cluster.restart().await;
    until_redis_decides(&open, &request, Duration::from_secs(20)).await;
    until_redis_decides(&closed, &request, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_fails_over_and_the_limiter_keeps_deciding() {
    let mut cluster = ScratchCluster::start().await;
    let limiter = RateLimiter::new(connect(&cluster).await, &RateLimitConfig::default());
    let request = [per_hour(Dimension::Project, "failover", 100_000)];
    assert_eq!(limiter.decide(&request).await.expect("decide").source, DecisionSource::Redis);

    let key = limiter.redis_key(&request[0]);
    let primary = cluster.primary_of(&key).expect("the slot has a primary");
    cluster.kill(primary);
    let started = tokio::time::Instant::now();
    let (mut local, mut redis_after_failover) = (0, 0);
    // Decide all along the failover: every decision answers (from the fallback while the slot
    // has no primary), and Redis decides again once the replica took over.
    while started.elapsed() < Duration::from_secs(30) && redis_after_failover < 20 {
        let decision = limiter.decide(&request).await.expect("fail open keeps deciding");
        assert!(decision.allowed);
        match decision.source {
            DecisionSource::Local => local += 1,
            DecisionSource::Redis if cluster.primary_of(&key).is_some_and(|now| now != primary) => {
                redis_after_failover += 1;
            }
            DecisionSource::Redis | DecisionSource::None => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(redis_after_failover, 20, "redis decides again after the failover ({local} local decisions)");
    assert!(local > 0 || redis_after_failover > 0);
}
