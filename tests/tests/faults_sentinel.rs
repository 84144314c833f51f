//! Fault: the Redis primary behind Sentinels killed under a running deployment of two replicas
//! (two meshes on one set of databases and one key prefix). The mesh reaches Redis only through
//! three Sentinels of this test's own (the shared cluster is never touched). Before the kill each
//! use of Redis works: the rate limiter has spent an API key's limit, reservations count against
//! a daily token budget, a watcher on one replica hears messages appended on the other, and
//! credential verifications are cached. The Sentinels elect a replica; afterwards every
//! subscription is back on the new primary and each use works again: the spent key stays
//! refused by Redis (its counter survived), the budget is spent exactly (the counters are
//! rebuilt from PostgreSQL, the truth, when they are missing), live delivery resumes without
//! polling, a cached verification is read from Redis and a revocation reaches the other replica
//! over pub/sub. Waits are bounded polls; nothing is judged by how long it took.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;
use tonic::Code;

use aimesh_kit::testing::ScratchSentinel;
use aimesh_proto::chat::v1 as chat_pb;
use aimesh_proto::identity::v1 as pb;
use aimesh_proto::usage::v1 as usage_pb;
use aimesh_tests::{Mesh, authed, catalog, project_with_key, reason_and_field, set_daily_token_budget, test_config};

const BUDGET: i64 = 10_000;
const TOKENS_PER_RESERVATION: i64 = 500;
/// Watchers look at PostgreSQL only when they start and on a resync: anything they hear within
/// the test came over Redis pub/sub.
const WATCH_POLL_MS: u64 = 600_000;

/// Polls `done` every 100 ms until it holds, failing the test after `limit`.
async fn until<F, Fut>(limit: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of a counter's lines in the Prometheus text that carry all of `labels`.
fn counter(name: &str, labels: &[&str]) -> u64 {
    let text = aimesh_kit::telemetry::metrics_handle().expect("the metrics recorder").render();
    text.lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Every pub/sub channel on the Redis node `port` with its number of subscribers.
fn subscriptions(sentinel: &ScratchSentinel, port: u16) -> Option<BTreeMap<String, String>> {
    let channels = sentinel.cli(port, &["PUBSUB", "CHANNELS"]).unwrap_or_default();
    let channels: Vec<&str> = channels.lines().collect();
    if channels.is_empty() {
        return Some(BTreeMap::new());
    }
    let counts = sentinel.cli(port, &[&["PUBSUB", "NUMSUB"], &channels[..]].concat())?;
    let counts: Vec<&str> = counts.lines().collect();
    Some(
        counts
            .chunks(2)
            .map(|pair| (pair[0].to_owned(), pair.get(1).copied().unwrap_or_default().to_owned()))
            .collect(),
    )
}

/// A key of the owner of `token` in `project`, allowed `requests_per_minute` (0: the default).
async fn limited_key(mesh: &Mesh, token: &str, project: &str, requests_per_minute: u32) -> (String, String) {
    let request = pb::CreateApiKeyRequest {
        project_id: project.into(),
        name: "limited".into(),
        scopes: vec!["chat:read".into()],
        expire_time: None,
        requests_per_minute,
        project_owned: false,
    };
    let created = mesh.api_keys().create_api_key(authed(request, token)).await.expect("create key").into_inner();
    (created.api_key.expect("key").id, created.secret)
}

async fn list_sessions(mesh: &Mesh, credential: &str, project: &str) -> Result<(), tonic::Status> {
    let request = chat_pb::ListSessionsRequest { project_id: project.into(), ..Default::default() };
    mesh.chat().list_sessions(authed(request, credential)).await.map(drop)
}

fn rate_limited(status: &tonic::Status) -> bool {
    status.code() == Code::ResourceExhausted && reason_and_field(status).0 == "RATE_LIMITED"
}

async fn append(mesh: &Mesh, token: &str, session: &str, content: &str) {
    let request = chat_pb::AppendMessageRequest {
        session_id: session.into(),
        role: chat_pb::MessageRole::User.into(),
        content: content.into(),
        tokens: 10,
        ..Default::default()
    };
    mesh.chat().append_message(authed(request, token)).await.expect("append");
}

/// The next message a watcher hears, within 10 s.
async fn heard(watch: &mut tonic::Streaming<chat_pb::Message>) -> String {
    let next = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.expect("a live message within 10 s");
    next.expect("the watch stays open").expect("a message").content
}

/// Reserves until the budget refuses; returns the tokens granted. Redis may still be settling,
/// so UNAVAILABLE is retried for a bounded while; any other error fails the test.
async fn reserve_until_refused(mesh: &Mesh, reserve: &usage_pb::ReserveRequest, secret: &str, most: usize) -> i64 {
    let (mut granted, mut grants) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match mesh.quotas().reserve(mesh.on_behalf(reserve.clone(), secret)).await {
            Ok(reservation) => {
                granted += reservation.into_inner().tokens;
                grants += 1;
                assert!(grants <= most, "more than {most} reservations granted");
            }
            Err(status)
                if status.code() == Code::ResourceExhausted && reason_and_field(&status).0 != "RATE_LIMITED" =>
            {
                return granted;
            }
            Err(status) if status.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("reserve failed: {status:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_behind_sentinels_fails_over_and_every_use_of_redis_resumes() {
    // Installed before the meshes start, so their counters are recorded where this test reads.
    aimesh_kit::telemetry::metrics_handle().expect("a metrics recorder");
    let mut sentinel = ScratchSentinel::start().await;
    let (mut config, databases) = test_config();
    config.common.redis_urls = sentinel.urls();
    config.common.redis.command_timeout_ms = 300;
    config.common.server.health_interval_secs = 1;
    // Verifications stay in each replica's memory far longer than the test: only the
    // invalidation broadcast can make the other replica refuse a revoked key in time.
    config.common.auth.local_ttl_secs = 300;
    config.common.auth.shared_ttl_secs = 300;
    config.chat.watch_poll_ms = WATCH_POLL_MS;
    let first = Mesh::start_with(config.clone(), databases).await;
    let second = Mesh::start_with(config, Vec::new()).await;
    let prefix = first.config.common.redis.key_prefix.clone();
    catalog(&first).await;
    let ann = first.signup("ann").await;
    let (project, secret) = project_with_key(&first, &ann, &["usage:write", "usage:read", "chat:read"]).await;

    // Budgets: a few reservations count against the day's tokens.
    set_daily_token_budget(&first, &ann.token, &project, BUDGET).await;
    let reserve = usage_pb::ReserveRequest {
        project_id: project.clone(),
        model: "gpt-4o".into(),
        estimated_input_tokens: TOKENS_PER_RESERVATION / 2,
        estimated_output_tokens: TOKENS_PER_RESERVATION / 2,
        ttl_seconds: 600,
        ..Default::default()
    };
    let mut granted = 0;
    for _ in 0..4 {
        let reservation = first.quotas().reserve(first.on_behalf(reserve.clone(), &secret)).await.expect("reserve");
        granted += reservation.into_inner().tokens;
    }
    assert_eq!(granted, 4 * TOKENS_PER_RESERVATION);

    // Live delivery: a watcher on the second replica hears what is appended on the first.
    let request = chat_pb::CreateSessionRequest {
        project_id: project.clone(),
        model: "gpt-4o".into(),
        title: "Live".into(),
        ..Default::default()
    };
    let session = first.chat().create_session(authed(request, &ann.token)).await.expect("session").into_inner().id;
    let watch = chat_pb::WatchSessionRequest { session_id: session.clone(), after_sequence: 0 };
    let mut watch = second.chat().watch_session(authed(watch, &ann.token)).await.expect("watch").into_inner();
    append(&first, &ann.token, &session, "before").await;
    assert_eq!(heard(&mut watch).await, "before");

    // The rate limiter: a key allowed one request a minute spends it. The next one comes back a
    // minute after the first; everything below the kill and the checks after it happen sooner.
    let (_, limited) = limited_key(&first, &ann.token, &project, 1).await;
    list_sessions(&first, &limited, &project).await.expect("the key's one request");
    let spent = Instant::now();
    let refused = list_sessions(&first, &limited, &project).await.expect_err("the key's second request");
    assert!(rate_limited(&refused), "{refused:?}");

    let old = sentinel.primary().expect("a primary");
    let subscribed = subscriptions(&sentinel, old).expect("the primary's subscriptions");
    assert!(subscribed.len() >= 2, "the cache bus and the watched session are subscribed: {subscribed:?}");
    sentinel.wait_until_replicated().await;
    assert_eq!(sentinel.kill_primary(), old);
    let new = sentinel.wait_for_failover(old).await;
    // Every subscriber of both replicas is back, on the new primary.
    until(Duration::from_secs(30), "every subscription is back on the new primary", || async {
        subscriptions(&sentinel, new).as_ref() == Some(&subscribed)
    })
    .await;

    // The limiter: while Redis was away it decided locally (approximately, per process); the
    // first decision Redis makes again continues the key's counter, so it is a refusal.
    let redis_decisions = || counter("rate_limit_decisions_total", &["dimension=\"api_key\"", "source=\"redis\""]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = redis_decisions();
        let answer = list_sessions(&first, &limited, &project).await;
        if redis_decisions() > before {
            assert!(spent.elapsed() < Duration::from_secs(60), "the test ran past the key's minute; nothing to judge");
            let refused = answer.expect_err("redis decides on the counter kept through the failover");
            assert!(rate_limited(&refused), "{refused:?}");
            break;
        }
        if let Err(status) = &answer {
            assert!(rate_limited(status), "the fallback only refuses for the limit: {status:?}");
        }
        assert!(Instant::now() < deadline, "redis did not decide the key's limit again within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Budgets: the counters lost as if the dead primary had never replicated them are rebuilt
    // from PostgreSQL, so the budget is still spent exactly, never more.
    let pattern = format!("{prefix}:usage:{{{project}}}:*");
    let keys =
        sentinel.cli(new, &["--scan", "--pattern", &pattern]).expect("the project's counters are on the new primary");
    for key in keys.lines() {
        sentinel.cli(new, &["DEL", key]).expect("DEL");
    }
    let most = usize::try_from(BUDGET / TOKENS_PER_RESERVATION).expect("a count");
    granted += reserve_until_refused(&first, &reserve, &secret, most).await;
    assert_eq!(granted, BUDGET, "the budget is spent exactly");
    let reserved: i64 =
        sqlx::query_scalar("SELECT COALESCE(SUM(tokens), 0)::BIGINT FROM quota_reservations WHERE project_id = $1")
            .bind(uuid::Uuid::parse_str(&project).expect("uuid"))
            .fetch_one(&first.usage_db().await)
            .await
            .expect("sum reservations");
    assert_eq!(reserved, BUDGET, "postgresql holds the same reservations");

    // Live delivery resumes: nothing polls PostgreSQL within the test, so the second message
    // (after any resync the reconnect caused) comes over pub/sub.
    for content in ["after", "and after"] {
        append(&first, &ann.token, &session, content).await;
        assert_eq!(heard(&mut watch).await, content);
    }

    // Caches: a verification the first replica loaded is read by the second from Redis; a
    // revocation on the first reaches the second's memory over the invalidation bus. A cache
    // skips Redis for 2 s after any failed command (a pooled connection may meet the failover
    // only now, on a loaded machine), so a new key is tried until one is shared, within 10 s.
    let shared_hits =
        || counter("cache_requests_total", &["cache=\"credentials\"", "level=\"shared\"", "result=\"hit\""]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (key_id, fresh) = loop {
        let (key_id, fresh) = limited_key(&first, &ann.token, &project, 0).await;
        list_sessions(&first, &fresh, &project).await.expect("the first replica verifies the new key");
        let hits = shared_hits();
        list_sessions(&second, &fresh, &project).await.expect("the second replica verifies it");
        if shared_hits() > hits {
            break (key_id, fresh);
        }
        assert!(Instant::now() < deadline, "the second replica read no verification from redis within 10 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let revoke = pb::RevokeApiKeyRequest { project_id: project.clone(), api_key_id: key_id };
    first.api_keys().revoke_api_key(authed(revoke, &ann.token)).await.expect("revoke");
    until(Duration::from_secs(5), "the second replica refuses the revoked key", || async {
        matches!(list_sessions(&second, &fresh, &project).await, Err(status) if status.code() == Code::Unauthenticated)
    })
    .await;

    // Health: each service of each replica reports its dependencies (Redis among them) serving.
    for mesh in [&first, &second] {
        for address in [mesh.identity, mesh.chat, mesh.usage] {
            until(Duration::from_secs(10), "health is serving", || async move {
                let channel = tonic::transport::Channel::from_shared(format!("http://{address}")).expect("url");
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel.connect_lazy());
                let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
                health.check(request).await.is_ok_and(|answer| {
                    answer.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                })
            })
            .await;
        }
    }
    drop(watch);
    second.stop().await.expect("the second replica stops cleanly");
    first.stop().await.expect("the first replica stops cleanly");
}
