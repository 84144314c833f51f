//! Production connection strings of Redis connect: a Redis Cluster whose nodes demand a user and
//! password given in every seed URL, and a Redis that speaks TLS only (`rediss://`) with a
//! certificate of a private CA. Each against a real server the test starts.

use std::time::Duration;

use fred::interfaces::KeysInterface;

use aimesh_kit::config::RedisConfig;
use aimesh_kit::data::redis::Redis;
use aimesh_kit::testing::{ScratchCluster, ScratchRedis, TestCertificates};

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
