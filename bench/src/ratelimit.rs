//! The `ratelimit` scenario: `RateLimiter::decide` of one limit on the dev Redis Cluster,
//! beside `redis-benchmark` sending EVALSHA of the same GCRA script to the same cluster, with
//! as many requests in flight as clients and as many requests in total. redis-benchmark has no
//! fixed-rate mode, so in an open loop the baseline is the same EVALSHA sent by this process
//! (fred, one cluster client) on the same schedule.

use std::process::Command;

use fred::interfaces::LuaInterface;

use aimesh_kit::config::{CommonConfig, RateLimitConfig};
use aimesh_kit::data::redis::Redis;
use aimesh_kit::serving::ratelimit::{DecisionSource, Dimension, GCRA_SCRIPT, Limit, LimitRequest, RateLimiter};

use crate::report::{Figures, Load, Mode, Pair, measure};

/// Limits spread over this many ids (so over the cluster's slots), in both measurements.
const IDS: u64 = 10_000;
/// Never reached, so every decision writes like an allowed request does.
const PER_MINUTE: u32 = 1_000_000_000;

pub async fn run(load: Load) -> anyhow::Result<Pair> {
    let common = CommonConfig { redis_urls: aimesh_kit::testing::redis_urls(), ..CommonConfig::default() };
    let prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let redis = Redis::connect_with_prefix(&common.redis_urls, &common.redis, &prefix).await?;
    let limiter = RateLimiter::new(redis.clone(), &RateLimitConfig::default());
    let scenario = measure("RateLimiter::decide", load, move |n| {
        let limiter = limiter.clone();
        async move {
            let request = LimitRequest {
                dimension: Dimension::ApiKey,
                id: (n % IDS).to_string(),
                limit: Limit::per_minute(PER_MINUTE),
                cost: 1,
            };
            let decision = limiter.decide(&[request]).await.map_err(|e| e.to_string())?;
            match (decision.allowed, decision.source) {
                (true, DecisionSource::Redis) => Ok(()),
                other => Err(format!("unexpected decision {other:?}")),
            }
        }
    })
    .await;
    let sha: String = redis.pool().script_load_cluster(GCRA_SCRIPT).await?;
    let (baseline, baseline_is) = match load.mode {
        Mode::Open => (
            evalsha_on_schedule(&redis, &prefix, &sha, load).await,
            "EVALSHA of the same script from this process (fred), same schedule",
        ),
        Mode::Closed | Mode::Batch => (
            redis_benchmark(&common.redis_urls, &prefix, &sha, load, scenario.requests.max(10_000))?,
            "redis-benchmark --cluster EVALSHA of the same script (p90 column: p95, p99.9: max)",
        ),
    };
    redis.quit().await;
    Ok(Pair::new(scenario, baseline, baseline_is).with_note("target: the limiter reaches half of raw Redis"))
}

/// EVALSHA of the GCRA script with the arguments redis-benchmark sends, driven by `load`.
async fn evalsha_on_schedule(redis: &Redis, prefix: &str, sha: &str, load: Load) -> Figures {
    let (redis, prefix, sha) = (redis.clone(), prefix.to_owned(), sha.to_owned());
    measure("EVALSHA (fred)", load, move |n| {
        let (redis, key, sha) = (redis.clone(), format!("{prefix}:rl:{}", n % IDS), sha.clone());
        async move {
            let args = vec![PER_MINUTE.to_string(), "60000000".to_owned(), "1".to_owned()];
            redis
                .pool()
                .evalsha::<fred::types::Value, _, _, _>(sha, key, args)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await
}

/// Runs `redis-benchmark` against the first seed node and reads its CSV line.
fn redis_benchmark(urls: &str, prefix: &str, sha: &str, load: Load, requests: u64) -> anyhow::Result<Figures> {
    let seed = urls.split(',').next().unwrap_or_default().trim().trim_start_matches("redis://").trim_end_matches('/');
    let (host, port) = seed.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("no port in {seed:?}"))?;
    // `{tag}` is redis-benchmark's placeholder for a hash tag of the node it sends to.
    let key = format!("{prefix}:rl:{{tag}}:__rand_int__");
    let args = [
        "--cluster".to_owned(),
        "-h".to_owned(),
        host.to_owned(),
        "-p".to_owned(),
        port.to_owned(),
        "-c".to_owned(),
        load.concurrency.to_string(),
        "-n".to_owned(),
        requests.to_string(),
        "-r".to_owned(),
        IDS.to_string(),
        "--csv".to_owned(),
        "EVALSHA".to_owned(),
        sha.to_owned(),
        "1".to_owned(),
        key,
        PER_MINUTE.to_string(),
        "60000000".to_owned(),
        "1".to_owned(),
    ];
    eprintln!("bench: redis-benchmark {}", args.join(" "));
    let output = Command::new("redis-benchmark").args(&args).output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        anyhow::bail!("redis-benchmark failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    }
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let line = stdout
        .lines()
        .find(|line| line.starts_with("\"EVALSHA"))
        .ok_or_else(|| anyhow::anyhow!("no EVALSHA line in redis-benchmark's output: {stdout}"))?;
    let values: Vec<f64> = line.split("\",\"").skip(1).map(|v| v.trim_matches('"').parse().unwrap_or(0.0)).collect();
    let [rps, _avg, _min, p50, p95, p99, max] = values.as_slice() else {
        anyhow::bail!("unexpected redis-benchmark line: {line}");
    };
    Ok(Figures {
        name: "redis-benchmark EVALSHA".into(),
        load,
        requests,
        errors: 0,
        dropped: 0,
        per_second: *rps,
        p50_ms: *p50,
        p90_ms: *p95,
        p99_ms: *p99,
        p999_ms: *max,
        mib_per_second: None,
        work: None,
        first_error: None,
    })
}
