//! Fault: a Redis Cluster primary killed under load. The mesh runs on a scratch six-node cluster
//! of this test's own (the shared one is never touched) while writers reserve against a daily
//! token budget as fast as they can; the primary holding the project's counters is killed in
//! the middle. Every request is answered before its deadline, with a grant, a refusal for the
//! budget, or UNAVAILABLE while the slot has no primary (never an authentication failure:
//! credential caching and rate limiting fall back without Redis); after the failover
//! reservations are decided by Redis again, and the tokens granted never exceed the budget.

use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

use aimesh_kit::testing::ScratchCluster;
use aimesh_proto::usage::v1 as usage_pb;
use aimesh_tests::{Mesh, catalog, on_behalf, project_with_key, reason_and_field, set_daily_token_budget, test_config};

const BUDGET: i64 = 100_000;
const TOKENS_PER_RESERVATION: i64 = 500;
const DEADLINE: Duration = Duration::from_secs(3);
/// How much later than its deadline an answer may come before the request counts as hung.
const LATE: Duration = Duration::from_secs(3);
const WRITERS: usize = 4;

#[derive(Debug, Default)]
struct Outcomes {
    granted: i64,
    exhausted: usize,
    unavailable: usize,
    other: Vec<tonic::Status>,
    hung: usize,
}

/// A refusal for the budget (not for a rate limit).
fn over_budget(status: &tonic::Status) -> bool {
    status.code() == Code::ResourceExhausted && reason_and_field(status).0 != "RATE_LIMITED"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_under_load_fails_over_and_no_budget_is_overspent() {
    let mut cluster = ScratchCluster::start().await;
    let (mut config, databases) = test_config();
    config.common.redis_urls = cluster.urls();
    config.common.redis.command_timeout_ms = 300;
    // Rate limiting decides every request (in the cluster, locally while the slot fails over)
    // with room for the load: a refusal here would be the budget's.
    config.common.rate_limit.per_api_key = 1_000_000;
    config.common.rate_limit.per_project = 1_000_000;
    let mesh = Mesh::start_with(config, databases).await;
    catalog(&mesh).await;
    let ann = mesh.signup("ann").await;
    let (project, secret) = project_with_key(&mesh, &ann, &["usage:write", "usage:read"]).await;
    set_daily_token_budget(&mesh, &ann.token, &project, BUDGET).await;
    let reserve = usage_pb::ReserveRequest {
        project_id: project.clone(),
        model: "gpt-4o".into(),
        estimated_input_tokens: TOKENS_PER_RESERVATION / 2,
        estimated_output_tokens: TOKENS_PER_RESERVATION / 2,
        ttl_seconds: 600,
        ..Default::default()
    };

    let stop = tokio_util::sync::CancellationToken::new();
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let (mut client, reserve, secret, stop) = (mesh.quotas(), reserve.clone(), secret.clone(), stop.clone());
        let token = mesh.service_token();
        writers.spawn(async move {
            let mut outcomes = Outcomes::default();
            while !stop.is_cancelled() {
                let mut request = on_behalf(reserve.clone(), &token, &secret);
                request.set_timeout(DEADLINE);
                match tokio::time::timeout(DEADLINE + LATE, client.reserve(request)).await {
                    Ok(Ok(reservation)) => outcomes.granted += reservation.into_inner().tokens,
                    Ok(Err(status)) if over_budget(&status) => outcomes.exhausted += 1,
                    Ok(Err(status)) if status.code() == Code::Unavailable => outcomes.unavailable += 1,
                    Ok(Err(status)) => outcomes.other.push(status),
                    Err(_) => outcomes.hung += 1,
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            outcomes
        });
    }

    // The project's counters all live in the slot of its hash tag.
    let tag = format!("{{{project}}}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let primary = cluster.primary_of(&tag).expect("the slot has a primary");
    cluster.kill(primary);
    let killed = Instant::now();
    while cluster.primary_of(&tag).is_none_or(|now| now == primary) {
        assert!(killed.elapsed() < Duration::from_secs(30), "no replica took over within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Reservations are decided again after the failover, until the budget is spent.
    let (mut decided, mut granted_here) = (0, 0);
    while decided < 5 {
        let mut request = mesh.on_behalf(reserve.clone(), &secret);
        request.set_timeout(DEADLINE);
        match mesh.quotas().reserve(request).await {
            Ok(reservation) => {
                granted_here += reservation.into_inner().tokens;
                decided += 1;
            }
            Err(status) if over_budget(&status) => decided += 1,
            Err(status) => {
                assert!(killed.elapsed() < Duration::from_secs(45), "reserve still failing after failover: {status:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    // Long enough after the failover for the budget to be spent if it is ever going to be.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();

    let mut total = Outcomes { granted: granted_here, ..Outcomes::default() };
    while let Some(outcomes) = writers.join_next().await {
        let outcomes = outcomes.expect("writer");
        total.granted += outcomes.granted;
        total.exhausted += outcomes.exhausted;
        total.unavailable += outcomes.unavailable;
        total.other.extend(outcomes.other);
        total.hung += outcomes.hung;
    }
    assert_eq!(total.hung, 0, "requests outlived their deadline: {total:?}");
    assert!(total.other.is_empty(), "only grants, budget refusals and UNAVAILABLE: {:?}", total.other);
    assert!(total.exhausted > 0, "the load reached the budget: {total:?}");
    assert!(total.granted <= BUDGET, "granted {} tokens of a {BUDGET} budget: {total:?}", total.granted);
    // What PostgreSQL holds agrees: the open reservations fit the budget.
    let reserved: i64 =
        sqlx::query_scalar("SELECT COALESCE(SUM(tokens), 0)::BIGINT FROM quota_reservations WHERE project_id = $1")
            .bind(uuid::Uuid::parse_str(&project).expect("uuid"))
            .fetch_one(&mesh.usage_db().await)
            .await
            .expect("sum reservations");
    assert!(reserved <= BUDGET, "{reserved} tokens reserved in postgresql of a {BUDGET} budget");
}
