//! Totals of usage as the usage service answered it and as analytics counts it, for the tests
//! that check that analytics counts every record exactly once.

use std::time::Duration;

use rust_decimal::Decimal;

use aimesh_proto::analytics::v1 as pb;
use aimesh_proto::usage::v1 as usage_pb;

use crate::{Mesh, authed, record};

/// Totals of what the usage service answered: requests, input, output, cached tokens, cost.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub input: i64,
    pub output: i64,
    pub cached: i64,
    pub cost: Decimal,
}

impl Totals {
    pub fn add(&mut self, record: &usage_pb::UsageRecord) {
        self.requests += 1;
        self.input += record.input_tokens;
        self.output += record.output_tokens;
        self.cached += record.cached_input_tokens;
        self.cost += record.cost.parse::<Decimal>().expect("cost");
    }
}

const METRICS: [&str; 5] = ["requests", "input_tokens", "output_tokens", "cached_input_tokens", "cost"];

/// The project's totals in analytics over the last and next day.
pub async fn analytics_totals(mesh: &Mesh, project: &str, credential: &str) -> Totals {
    let now = chrono::Utc::now();
    let request = pb::GetUsageBreakdownRequest {
        project_id: project.into(),
        start_time: Some(aimesh_kit::wire::proto_json::timestamp(now - chrono::Duration::days(1))),
        end_time: Some(aimesh_kit::wire::proto_json::timestamp(now + chrono::Duration::days(1))),
        dimension: "model".into(),
        metrics: METRICS.iter().map(|m| (*m).to_owned()).collect(),
        ..Default::default()
    };
    let answer = mesh.analytics().get_usage_breakdown(authed(request, credential)).await.expect("breakdown");
    let total = answer.into_inner().total.expect("total").values;
    let number = |name: &str| total.get(name).map(String::as_str).unwrap_or("0").to_owned();
    Totals {
        requests: number("requests").parse().expect("requests"),
        input: number("input_tokens").parse().expect("input"),
        output: number("output_tokens").parse().expect("output"),
        cached: number("cached_input_tokens").parse().expect("cached"),
        cost: number("cost").parse().expect("cost"),
    }
}

/// What usage's outbox still holds, for a failure message: why events did not arrive.
async fn usage_outbox_state(mesh: &Mesh) -> String {
    let state: Result<(i64, i64, Option<String>), _> = sqlx::query_as(
        "SELECT count(*)::int8, coalesce(max(attempts), 0)::int8, max(last_error) FROM outbox_events \
         WHERE delivered_at IS NULL",
    )
    .fetch_one(&mesh.usage_db().await)
    .await;
    match state {
        Ok((waiting, attempts, error)) => {
            format!("{waiting} undelivered, up to {attempts} attempts, last error {error:?}")
        }
        Err(error) => format!("unreadable ({error})"),
    }
}

/// The queries running on the ClickHouse server (asked directly, not through any proxy of the
/// test), for a failure message: whether analytics' INSERTs or checks hang there.
async fn clickhouse_queries() -> String {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Running {
        elapsed: f64,
        query: String,
    }
    let client = aimesh_analytics::store::client_of(&crate::clickhouse_url());
    let running = client
        .query(
            "SELECT elapsed, substring(replaceRegexpAll(query, '\\s+', ' '), 1, 160) FROM system.processes \
             WHERE query NOT LIKE '%system.processes%' AND query NOT LIKE '%sleepEachRow%' ORDER BY elapsed DESC",
        )
        .fetch_all::<Running>()
        .await;
    match running {
        Ok(running) if running.is_empty() => "none".into(),
        Ok(running) => {
            running.iter().map(|q| format!("[{:.1} s] {}", q.elapsed, q.query)).collect::<Vec<_>>().join("; ")
        }
        Err(error) => format!("unreadable ({error})"),
    }
}

/// Waits until analytics shows `expected` (and then a little longer, so a double count would
/// show too); the time allowed covers a relay retrying with backoff on a loaded machine.
pub async fn wait_for_totals(mesh: &Mesh, project: &str, credential: &str, expected: &Totals) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let seen = analytics_totals(mesh, project, credential).await;
        if &seen == expected {
            break;
        }
        assert!(seen.requests <= expected.requests, "counted too much: {seen:?} > {expected:?}");
        if tokio::time::Instant::now() >= deadline {
            let (outbox, queries) = (usage_outbox_state(mesh).await, clickhouse_queries().await);
            panic!(
                "analytics shows {seen:?}, usage recorded {expected:?}; usage's outbox: {outbox}; \
                 queries running on ClickHouse: {queries}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(&analytics_totals(mesh, project, credential).await, expected, "stable, nothing counted twice");
}

/// Record `i` of a stream: amounts that differ per record, every seventh one failed.
pub fn varied_record(project: &str, i: i64) -> usage_pb::RecordUsageRequest {
    usage_pb::RecordUsageRequest {
        input_tokens: 1_000 + i * 37,
        cached_input_tokens: i * 5,
        output_tokens: 100 + i * 11,
        duration_ms: 100 + i,
        status: if i % 7 == 0 { usage_pb::UsageStatus::Error } else { usage_pb::UsageStatus::Success }.into(),
        ..record(project, &format!("req-{i}"))
    }
}
