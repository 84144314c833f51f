//! Production connection strings of Redis connect: a Redis Cluster whose nodes demand a user and
//! password given in every seed URL, a Redis that speaks TLS only (`rediss://`) with a
//! certificate of a private CA, and a primary behind Sentinels that demand credentials of their
//! own, followed through a failover. Each against real servers the test starts.

use std::time::Duration;

use fred::interfaces::{EventInterface, KeysInterface, PubsubInterface};

use aimesh_kit::config::RedisConfig;
use aimesh_kit::data::redis::Redis;
use aimesh_kit::testing::{ScratchCluster, ScratchRedis, ScratchSentinel, TestCertificates};

/// Connecting, bounded: a refused connection must fail, not retry for ever.
async fn connect(urls: &str, settings: &RedisConfig) -> Result<Redis, String> {
    match tokio::time::timeout(Duration::from_secs(10), Redis::connect(urls, settings)).await {
        Ok(connected) => connected.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within 10 s".to_owned()),
    }
}

/// Writes and reads keys of several slots (so of every primary) and subscribes.
async fn round_trip(redis: &Redis) {
    for key in ["a", "b", "c", "d", "e", "f"] {
        let key = redis.key("test", key);
        let () = redis.pool().set(&key, "value", None, None, false).await.expect("SET");
        let read: Option<String> = redis.pool().get(&key).await.expect("GET");
        assert_eq!(read.as_deref(), Some("value"), "{key}");
    }
    let subscriber = redis.subscriber().await.expect("a pub/sub connection");
    let _ = fred::interfaces::ClientLike::quit(&subscriber).await;
}

#[tokio::test]
async fn a_cluster_demanding_a_user_and_password_connects_with_them_in_every_seed_url() {
    let cluster = ScratchCluster::start_with_user("aimesh", "pass-w0rd").await;
    let urls = cluster.urls();
    assert_eq!(urls.matches("aimesh:pass-w0rd@").count(), 6, "{urls}");
    let redis = connect(&urls, &RedisConfig::default()).await.expect("connect with the credentials");
    round_trip(&redis).await;
    redis.quit().await;

    let wrong = urls.replace("pass-w0rd", "wrong");
    let refused = connect(&wrong, &RedisConfig::default()).await.err().unwrap_or_default();
    assert!(refused.contains("WRONGPASS") || refused.contains("invalid username-password"), "{refused}");
}

#[tokio::test]
async fn a_tls_redis_connects_when_its_ca_is_trusted_and_not_otherwise() {
    let certificates = TestCertificates::generate();
    let server = ScratchRedis::start_tls(&certificates).await;
    let trusting = RedisConfig { tls_ca_file: Some(certificates.ca.clone()), ..RedisConfig::default() };
    let redis = connect(&server.url(), &trusting).await.expect("connect over TLS");
    round_trip(&redis).await;
    redis.quit().await;

    // The public CAs alone do not vouch for the test's own.
    let refused = connect(&server.url(), &RedisConfig::default()).await.err().unwrap_or_default();
    assert!(!refused.is_empty(), "a server whose CA is not trusted was accepted");
    // A CA file with plain connections is a mistake worth naming.
    let plain = format!("redis://{}", server.url().trim_start_matches("rediss://"));
    let refused = connect(&plain, &trusting).await.err().unwrap_or_default();
    assert!(refused.contains("redis.tls_ca_file"), "{refused}");
}

/// Polls `done` every 100 ms until it holds, failing the test after `limit`.
async fn until<F, Fut>(limit: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sentinels_demanding_their_own_credentials_lead_the_client_to_the_primary() {
    let sentinel = ScratchSentinel::start_with_users(("aimesh", "data-pw"), ("watcher", "sentinel-pw")).await;
    let primary = sentinel.primary().expect("a primary");
    let urls = sentinel.urls();
    let redis = connect(&urls, &RedisConfig::default()).await.expect("connect through the sentinels");
    round_trip(&redis).await;
    let key = redis.key("test", "a");
    assert_eq!(sentinel.cli(primary, &["GET", &key]).as_deref(), Some("value"), "written on the primary");
    redis.quit().await;

    // fred's own form, one URL naming the other Sentinels as `node`, connects the same way.
    let ports = sentinel.sentinel_ports();
    let [first, others @ ..] = ports.as_slice() else { panic!("three sentinels") };
    let nodes: String = others.iter().map(|port| format!("&node=127.0.0.1:{port}")).collect();
    let options = format!(
        "sentinelServiceName={}&sentinelUsername=watcher&sentinelPassword=sentinel-pw",
        ScratchSentinel::SERVICE_NAME
    );
    let fred_form = format!("redis-sentinel://aimesh:data-pw@127.0.0.1:{first}?{options}{nodes}");
    let redis = connect(&fred_form, &RedisConfig::default()).await.expect("connect with fred's form");
    round_trip(&redis).await;
    redis.quit().await;

    // Each pair of credentials is checked where it belongs: the Sentinels refuse a wrong or
    // missing password of theirs, the primary a wrong one of its own.
    for (wrong, why) in [
        (urls.replace("sentinel-pw", "wrong"), "Failed to connect to all sentinel nodes"),
        (urls.replace("&sentinelUsername=watcher&sentinelPassword=sentinel-pw", ""), "NOAUTH"),
        (urls.replace("data-pw", "wrong"), "WRONGPASS"),
    ] {
        let refused = connect(&wrong, &RedisConfig::default()).await.err().unwrap_or_default();
        assert!(refused.contains(why), "expected {why}: {refused:?}");
    }
}

#[tokio::test]
async fn sentinels_speaking_tls_connect_when_their_ca_is_trusted_and_not_otherwise() {
    let certificates = TestCertificates::generate();
    let sentinel = ScratchSentinel::start_tls(&certificates).await;
    let urls = sentinel.urls();
    assert!(urls.starts_with("rediss-sentinel://"), "{urls}");
    let trusting = RedisConfig { tls_ca_file: Some(certificates.ca.clone()), ..RedisConfig::default() };
    let redis = connect(&urls, &trusting).await.expect("connect to the sentinels and the primary over TLS");
    round_trip(&redis).await;
    let key = redis.key("test", "a");
    let primary = sentinel.primary().expect("a primary");
    assert_eq!(sentinel.cli(primary, &["GET", &key]).as_deref(), Some("value"), "written on the primary");
    redis.quit().await;

    // The public CAs alone do not vouch for the test's own.
    let refused = connect(&urls, &RedisConfig::default()).await.err().unwrap_or_default();
    assert!(!refused.is_empty(), "sentinels whose CA is not trusted were accepted");
}

#[tokio::test]
async fn a_sentinel_list_that_names_no_primary_or_mixes_kinds_is_refused_naming_redis_urls() {
    for (urls, why) in [
        ("redis-sentinel://127.0.0.1:1", "sentinelServiceName"),
        ("redis-sentinel://127.0.0.1:1?sentinelServiceName=m,redis://127.0.0.1:2", "redis-sentinel"),
        ("redis-sentinel://127.0.0.1:1?sentinelServiceName=m&sentinelUsername=u", "sentinelPassword"),
    ] {
        let refused = connect(urls, &RedisConfig::default()).await.err().unwrap_or_default();
        assert!(refused.contains("redis_urls") && refused.contains(why), "{urls}: {refused}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_sentinels_commands_subscriptions_and_health_follow_a_failover() {
    let mut sentinel = ScratchSentinel::start().await;
    // A short command timeout: commands to the dead primary fail fast instead of piling up.
    let settings = RedisConfig { command_timeout_ms: 300, ..RedisConfig::default() };
    let redis = connect(&sentinel.urls(), &settings).await.expect("connect through the sentinels");
    let subscriber = redis.subscriber().await.expect("a pub/sub connection");
    let channel = redis.key("test", "news");
    subscriber.subscribe(channel.as_str()).await.expect("SUBSCRIBE");
    let mut messages = subscriber.message_rx();
    let before = redis.key("test", "before");
    let () = redis.pool().set(&before, "kept", None, None, false).await.expect("SET");
    sentinel.wait_until_replicated().await;

    let old = sentinel.kill_primary();
    let new = sentinel.wait_for_failover(old).await;
    let after = redis.key("test", "after");
    until(Duration::from_secs(30), "writes reach the new primary", || async {
        redis.pool().set::<(), _, _>(&after, "written", None, None, false).await.is_ok()
    })
    .await;
    assert_eq!(sentinel.cli(new, &["GET", &after]).as_deref(), Some("written"), "the write went to the new primary");
    let kept: Option<String> = redis.pool().get(&before).await.expect("GET");
    assert_eq!(kept.as_deref(), Some("kept"), "what was replicated before the kill survives");
    until(Duration::from_secs(30), "the pool is healthy again", || redis.is_healthy()).await;

    // The subscriber resubscribed on the new primary by itself.
    until(Duration::from_secs(30), "the subscription is back", || async {
        sentinel.cli(new, &["PUBSUB", "NUMSUB", &channel]).is_some_and(|out| out.lines().nth(1) == Some("1"))
    })
    .await;
    let _: i64 = redis.pool().next_connected().publish(channel.as_str(), "hello").await.expect("PUBLISH");
    let heard = loop {
        let message =
            tokio::time::timeout(Duration::from_secs(5), messages.recv()).await.expect("a message within 5 s");
        let message = message.expect("the subscriber is open");
        if message.channel == channel {
            break message.value.as_string();
        }
    };
    assert_eq!(heard.as_deref(), Some("hello"));
    let _ = fred::interfaces::ClientLike::quit(&subscriber).await;
    redis.quit().await;
}
