//! The rate limiter against real Redis Clusters: the shared test cluster for the exact-limit
//! and shadow tests, a scratch cluster of the test's own for the tests that kill nodes.

use std::sync::OnceLock;
use std::time::Duration;

use aimesh_kit::config::{RateLimitConfig, RateLimitMode, RedisConfig, RedisFailureMode};
use aimesh_kit::data::redis::Redis;
use aimesh_kit::serving::ratelimit::{DecisionSource, Dimension, Limit, LimitRequest, RateLimiter, admissions};
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

/// Runs `tasks_per_limiter` tasks on each of `limiters`, each deciding `request`
/// `attempts_per_task` times, all at once; returns how many were allowed. Every decision must
/// come from Redis (directly or from a lease), never from the fallback.
async fn let_through(
    limiters: &[RateLimiter],
    request: &[LimitRequest],
    tasks_per_limiter: usize,
    attempts_per_task: usize,
) -> u32 {
    let mut tasks = Vec::new();
    for limiter in limiters {
        for _ in 0..tasks_per_limiter {
            let (limiter, request) = (limiter.clone(), request.to_vec());
            tasks.push(tokio::spawn(async move {
                let mut allowed = 0u32;
                for _ in 0..attempts_per_task {
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
    allowed
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
    let allowed = let_through(&limiters, &request, TASKS_PER_LIMITER, ATTEMPTS_PER_TASK).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_limit_is_leased_by_two_limiters_and_still_lets_exactly_the_limit_through() {
    // Large enough to be leased (a lease is at most a twentieth of the limit), and hammered far
    // beyond it by both limiters, each deciding it hundreds of times a second.
    const LIMIT: u32 = 2000;
    const TASKS_PER_LIMITER: usize = 8;
    const ATTEMPTS_PER_TASK: usize = 400;
    let metrics = metrics();
    let leased_label = ["dimension=\"project\""];
    let leased_before = counter(&metrics.render(), "rate_limit_leased_total", &leased_label);
    let trips_before = counter(&metrics.render(), "redis_command_duration_seconds_count", &["operation=\"ratelimit\""]);
    let prefix = format!("test-{}", uuid::Uuid::new_v4().simple());
    let enforce = settings(RateLimitMode::Enforce, RedisFailureMode::Closed);
    let limiters = [
        RateLimiter::new(testing::redis_with_prefix(&prefix).await, &enforce),
        RateLimiter::new(testing::redis_with_prefix(&prefix).await, &enforce),
    ];
    let request = [per_hour(Dimension::Project, "hot-project", LIMIT)];
    let allowed = let_through(&limiters, &request, TASKS_PER_LIMITER, ATTEMPTS_PER_TASK).await;
    let attempts = 2 * TASKS_PER_LIMITER * ATTEMPTS_PER_TASK;
    assert_eq!(allowed, LIMIT, "exactly the limit across both limiters, of {attempts} attempts");
    let leased = counter(&metrics.render(), "rate_limit_leased_total", &leased_label) - leased_before;
    let trips =
        counter(&metrics.render(), "redis_command_duration_seconds_count", &["operation=\"ratelimit\""]) - trips_before;
    assert!(leased > u64::from(LIMIT) / 2, "most admissions came from leases: {leased} of {LIMIT}");
    assert_eq!(trips + leased, attempts as u64, "every decision was a round trip or a leased token");
    // Spent: the last denial is Redis's own and says nothing is left.
    let denied = limiters[0].decide(&request).await.expect("decide");
    assert!(!denied.allowed);
    assert_eq!(denied.remaining, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leased_limit_beside_one_asked_of_redis_lets_exactly_the_tighter_through() {
    // The project's limit is hot and large, so it is leased; the key's is too small to lease, so
    // every decision asks Redis for it while the project's comes from the lease: both answers
    // must be combined, in order, for every request.
    const PROJECT_LIMIT: u32 = 100_000;
    const KEY_LIMIT: u32 = 10;
    const TASKS: usize = 8;
    const ATTEMPTS_PER_TASK: usize = 100;
    let metrics = metrics();
    let leased_label = ["dimension=\"project\""];
    let trips_label = ["operation=\"ratelimit\""];
    let leased_before = counter(&metrics.render(), "rate_limit_leased_total", &leased_label);
    let trips_before = counter(&metrics.render(), "redis_command_duration_seconds_count", &trips_label);
    let prefix = format!("test-{}", uuid::Uuid::new_v4().simple());
    let enforce = settings(RateLimitMode::Enforce, RedisFailureMode::Closed);
    let limiter = RateLimiter::new(testing::redis_with_prefix(&prefix).await, &enforce);
    let request = [
        per_hour(Dimension::Project, "busy-project", PROJECT_LIMIT),
        per_hour(Dimension::ApiKey, "small-key", KEY_LIMIT),
    ];
    let allowed = let_through(std::slice::from_ref(&limiter), &request, TASKS, ATTEMPTS_PER_TASK).await;
    assert_eq!(allowed, KEY_LIMIT, "exactly the key's limit, the tighter one");
    let leased = counter(&metrics.render(), "rate_limit_leased_total", &leased_label) - leased_before;
    let trips = counter(&metrics.render(), "redis_command_duration_seconds_count", &trips_label) - trips_before;
    assert!(leased > 0, "the project's limit was leased");
    let decisions = 2 * (TASKS * ATTEMPTS_PER_TASK) as u64;
    assert_eq!(trips + leased, decisions, "each limit of each request was a round trip or a leased token");
    let denied = limiter.decide(&request).await.expect("decide");
    assert!(!denied.allowed);
    assert_eq!((denied.dimension, denied.limit, denied.remaining), (Some(Dimension::ApiKey), KEY_LIMIT, 0));
}

#[tokio::test]
async fn an_admitted_address_is_remembered_until_a_failure_here_or_for_a_moment_after_failures_elsewhere() {
    const FAILURES: u32 = 8;
    let prefix = format!("test-{}", uuid::Uuid::new_v4().simple());
    let settings = RateLimitConfig { per_ip_failed_auth: FAILURES, ..RateLimitConfig::default() };
    // Two replicas of a service: their own connections and memories, one deployment's budget.
    let here = RateLimiter::new(testing::redis_with_prefix(&prefix).await, &settings);
    let elsewhere = RateLimiter::new(testing::redis_with_prefix(&prefix).await, &settings);
    let ip: std::net::IpAddr = "192.0.2.90".parse().expect("ip");
    let admit = |limiter: &RateLimiter| {
        let limiter = limiter.clone();
        async move { limiter.admit_credential(ip).await.expect("redis answers") }
    };

    assert_eq!(admit(&here).await.source, DecisionSource::Redis, "the first look asks Redis");
    assert_eq!(admit(&here).await.source, DecisionSource::Remembered, "the next one is remembered");
    here.charge_failed_auth(ip).await;
    assert_eq!(admit(&here).await.source, DecisionSource::Redis, "a failure counted here forgets the address");

    // Exhausted by another replica: seen here once the memory lapses, never later.
    for _ in 1..FAILURES {
        elsewhere.charge_failed_auth(ip).await;
    }
    assert!(!admit(&elsewhere).await.allowed, "refused where the failures were counted");
    tokio::time::sleep(admissions::LIFETIME + Duration::from_millis(50)).await;
    let refused = admit(&here).await;
    assert!(!refused.allowed && refused.source == DecisionSource::Redis, "{refused:?}");

    // Close to its limit, an address is asked about every time.
    let near = "192.0.2.91".parse().expect("ip");
    for _ in 0..=FAILURES - admissions::MARGIN {
        here.charge_failed_auth(near).await;
    }
    for _ in 0..2 {
        let decision = here.admit_credential(near).await.expect("redis answers");
        assert_eq!((decision.allowed, decision.source), (true, DecisionSource::Redis), "{decision:?}");
    }
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

/// How far `primary` has replicated to its replica and what the replica acknowledged:
/// `(master_repl_offset, the replica's offset)` from `INFO replication`.
fn replication_offsets(primary: u16) -> Option<(u64, u64)> {
    let output = std::process::Command::new("redis-cli")
        .args(["-p", &primary.to_string(), "INFO", "replication"])
        .output()
        .ok()?;
    let info = String::from_utf8(output.stdout).ok()?;
    let field = |line: &str, name: &str| line.split(',').find_map(|part| part.strip_prefix(name)?.trim().parse().ok());
    let own = info.lines().find_map(|line| field(line, "master_repl_offset:"))?;
    let replica = info.lines().filter(|line| line.starts_with("slave0:")).find_map(|line| field(line, "offset="))?;
    Some((own, replica))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_fails_over_and_the_limiter_keeps_deciding() {
    // One request comes back per hour, so no remaining count below moves during the test.
    const LIMIT: u32 = 100_000;
    let request = [LimitRequest {
        dimension: Dimension::Project,
        id: "failover".to_owned(),
        limit: Limit { count: LIMIT, period: Duration::from_secs(3600) * LIMIT },
        cost: 1,
    }];
    let local_allowed = ["dimension=\"project\"", "outcome=\"allowed\"", "source=\"local\""];
    let local_before = counter(&metrics().render(), "rate_limit_decisions_total", &local_allowed);
    let mut cluster = ScratchCluster::start().await;
    let limiter = RateLimiter::new(connect(&cluster).await, &RateLimitConfig::default());
    let first = limiter.decide(&request).await.expect("decide");
    assert_eq!((first.source, first.remaining), (DecisionSource::Redis, LIMIT - 1));

    let key = limiter.redis_key(&request[0]);
    let primary = cluster.primary_of(&key).expect("the slot has a primary");
    // The bucket reaches the replica before the primary dies (replication is asynchronous), so
    // what the replica decides after the failover must continue it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while replication_offsets(primary).is_none_or(|(own, replica)| replica < own) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replica did not catch up: {:?}",
            replication_offsets(primary)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.kill(primary);
    let started = tokio::time::Instant::now();
    // Every decision along the failover, in order: its source and what it said was left.
    let mut decisions: Vec<(DecisionSource, u32)> = Vec::new();
    let redis_decisions = |decisions: &[(DecisionSource, u32)]| {
        decisions.iter().filter(|(source, _)| *source == DecisionSource::Redis).count()
    };
    while started.elapsed() < Duration::from_secs(30) && redis_decisions(&decisions) < 20 {
        let decision = limiter.decide(&request).await.expect("fail open keeps deciding");
        assert!(decision.allowed, "{decision:?}");
        decisions.push((decision.source, decision.remaining));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let local: Vec<u32> =
        decisions.iter().filter(|(source, _)| *source == DecisionSource::Local).map(|(_, left)| *left).collect();
    let redis: Vec<u32> =
        decisions.iter().filter(|(source, _)| *source == DecisionSource::Redis).map(|(_, left)| *left).collect();
    assert_eq!(local.len() + redis.len(), decisions.len(), "every decision came from redis or the fallback");
    // The fallback: the dead primary's slot answers nothing, so the very next decision is the
    // fallback's, which counts a bucket of this process's own from full, one by one.
    assert_eq!(decisions[0].0, DecisionSource::Local, "the fallback takes over at once: {decisions:?}");
    let expected_local: Vec<u32> = (1..=local.len() as u32).map(|n| LIMIT - n).collect();
    assert_eq!(local, expected_local, "the fallback counts its own bucket");
    let local_after = counter(&metrics().render(), "rate_limit_decisions_total", &local_allowed);
    assert_eq!(local_after - local_before, local.len() as u64, "and each of its decisions is counted as local");
    // The failover: Redis decides again, on the replica that took over, and it continues the
    // bucket the dead primary held (one request before the kill).
    assert_eq!(redis.len(), 20, "redis did not decide again within 30 s of the kill: {decisions:?}");
    let expected_redis: Vec<u32> = (2..=21).map(|n| LIMIT - n).collect();
    assert_eq!(redis, expected_redis, "redis after the failover continues the bucket");
    let now = cluster.primary_of(&key).expect("the slot has a primary again");
    assert_ne!(now, primary, "the replica took over");
}
