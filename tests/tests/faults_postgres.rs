//! Fault: PostgreSQL restarted under load. The mesh runs on a PostgreSQL server of the test's
//! own (the shared one never restarts under the other tests), which is stopped with a fast
//! shutdown (every session ended, as in a restart) and started again 8 s later. Each request
//! carries a 2 s deadline and is answered before it passes, success or a retryable error; health
//! turns NOT_SERVING while the server is down and SERVING after it; requests succeed again
//! without restarting anything, and every record answered OK is stored exactly once.

use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use aimesh_kit::testing::ScratchPostgres;
use aimesh_tests::{Mesh, catalog, on_behalf, project_with_key, record, test_config, use_postgres_server};

/// The deadline every request of the load carries (`grpc-timeout`).
const DEADLINE: Duration = Duration::from_secs(2);
/// How much later than its deadline an answer may come (scheduling on a loaded machine) before
/// the request counts as hung.
const LATE: Duration = Duration::from_secs(3);
const OUTAGE: Duration = Duration::from_secs(8);
const WRITERS: usize = 4;

async fn usage_health(mesh: &Mesh) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", mesh.usage)).expect("url");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.connect_lazy());
    let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
    let answer = tokio::time::timeout(DEADLINE + LATE, health.check(request)).await;
    answer.expect("health answers while postgres is away").expect("health").into_inner().status
}

/// What became of each request of one writer.
#[derive(Debug, Default)]
struct Outcomes {
    ok: Vec<String>,
    failed: Vec<Code>,
    hung: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_no_request_hangs_health_flips_and_services_reconnect() {
    let postgres = ScratchPostgres::start();
    // test_config's scratch databases are on the shared server, which this test does not use:
    // its databases live and go with its own server.
    let (mut config, _shared_server_databases) = test_config();
    use_postgres_server(&mut config, &postgres.url(), None);
    config.common.server.health_interval_secs = 1;
    config.common.database.acquire_timeout_secs = 1;
    // The writers go as fast as the mesh answers; the fault under test is PostgreSQL's.
    config.common.rate_limit.enabled = false;
    let mesh = Mesh::start_with(config, Vec::new()).await;
    catalog(&mesh).await;
    let ann = mesh.signup("ann").await;
    let (project, secret) = project_with_key(&mesh, &ann, &["usage:write", "usage:read"]).await;

    let stop = tokio_util::sync::CancellationToken::new();
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let (mut client, project, secret, stop) = (mesh.usage(), project.clone(), secret.clone(), stop.clone());
        let token = mesh.service_token();
        writers.spawn(async move {
            let mut outcomes = Outcomes::default();
            let mut sequence = 0;
            while !stop.is_cancelled() {
                let request_id = format!("w{writer}-{sequence}");
                sequence += 1;
                let mut request = on_behalf(record(&project, &request_id), &token, &secret);
                request.set_timeout(DEADLINE);
                match tokio::time::timeout(DEADLINE + LATE, client.record_usage(request)).await {
                    Ok(Ok(_)) => outcomes.ok.push(request_id),
                    Ok(Err(status)) => outcomes.failed.push(status.code()),
                    Err(_) => outcomes.hung += 1,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            outcomes
        });
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(usage_health(&mesh).await, ServingStatus::Serving as i32);
    tokio::task::block_in_place(|| postgres.stop());
    let cut = Instant::now();
    let mut not_serving = false;
    while cut.elapsed() < OUTAGE {
        not_serving |= usage_health(&mesh).await == ServingStatus::NotServing as i32;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(not_serving, "usage never reported NOT_SERVING while postgres was down");
    tokio::task::block_in_place(|| postgres.start_again());

    let back = Instant::now();
    while usage_health(&mesh).await != ServingStatus::Serving as i32 {
        assert!(back.elapsed() < Duration::from_secs(30), "usage did not report SERVING again within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Requests succeed again on the same processes.
    let mut recovered = 0;
    while recovered < 10 {
        let mut request = mesh.on_behalf(record(&project, &format!("after-{recovered}")), &secret);
        request.set_timeout(DEADLINE);
        match mesh.usage().record_usage(request).await {
            Ok(_) => recovered += 1,
            Err(status) => {
                assert!(
                    back.elapsed() < Duration::from_secs(30),
                    "usage still failing after postgres returned: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    stop.cancel();

    let (mut ok, mut failed, mut hung) = (Vec::new(), Vec::new(), 0);
    while let Some(outcomes) = writers.join_next().await {
        let outcomes = outcomes.expect("writer");
        ok.extend(outcomes.ok);
        failed.extend(outcomes.failed);
        hung += outcomes.hung;
    }
    assert_eq!(hung, 0, "requests outlived their {DEADLINE:?} deadline by more than {LATE:?}");
    assert!(!failed.is_empty(), "the outage should have failed some requests");
    let mut unexpected: Vec<Code> =
        failed.iter().copied().filter(|code| !matches!(code, Code::Unavailable | Code::DeadlineExceeded)).collect();
    unexpected.dedup();
    assert!(unexpected.is_empty(), "a database outage is UNAVAILABLE or DEADLINE_EXCEEDED, not {unexpected:?}");

    // Everything answered OK is stored, once.
    let usage = mesh.usage_db().await;
    for request_id in &ok {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM model_usage_logs WHERE request_id = $1")
            .bind(request_id)
            .fetch_one(&usage)
            .await
            .expect("count records");
        assert_eq!(rows, 1, "request {request_id} was answered OK");
    }
}
