//! Analytics scenarios: events from an outbox to queryable in ClickHouse (beside a raw insert
//! of the same rows), and a daily-cost-by-model question over 10 million events (beside the
//! same question asked of PostgreSQL).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use uuid::Uuid;

use aimesh_analytics::events::UsageEventRow;
use aimesh_kit::testing::ScratchDatabase;
use aimesh_proto::analytics::v1 as pb;
use aimesh_tests::{Mesh, authed};

use crate::report::{Figures, Load, Mode, measure};

/// Events the pipeline scenario moves.
const PIPELINE_EVENTS: i64 = 100_000;
/// Events the query scenario asks about, spread over [`QUERY_DAYS`] days and 10 models.
const QUERY_EVENTS: u64 = 10_000_000;
const QUERY_DAYS: i64 = 30;

/// Mean rows per INSERT into `usage_events` in the last pipeline run; the raw insert uses
/// batches of this size so that it compares like with like (0: no run yet).
static PIPELINE_ROWS_PER_INSERT: AtomicUsize = AtomicUsize::new(0);

/// Figures of one batch of `events` moved in `elapsed`: events per second, and the quantiles
/// of the batches' latencies where they were timed one by one.
fn throughput(name: &str, events: i64, elapsed: Duration, batch_latencies_ms: &mut [f64]) -> Figures {
    let batch = Load { mode: Mode::Batch, concurrency: 1, rate: 0.0, duration: elapsed, max_requests: None };
    let succeeded = batch_latencies_ms.len() as u64;
    let mut figures = Figures::from_latencies_ms(name, batch, batch_latencies_ms, succeeded, elapsed);
    figures.requests = u64::try_from(events).unwrap_or(0);
    figures.per_second = events as f64 / elapsed.as_secs_f64();
    figures
}

async fn usage_events_in(client: &clickhouse::Client, database: &str) -> anyhow::Result<u64> {
    Ok(client.query(&format!("SELECT count() FROM {database}.usage_events")).fetch_one().await?)
}

/// The last block number of `usage_events`: every INSERT takes the next one.
async fn last_block_of_usage_events(client: &clickhouse::Client, database: &str) -> anyhow::Result<i64> {
    let sql = "SELECT toInt64(max(max_block_number)) FROM system.parts WHERE database = ? AND table = 'usage_events'";
    Ok(client.query(sql).bind(database).fetch_one().await?)
}

/// INSERT statements into `usage_events` since block `after` and the rows they wrote: each
/// INSERT makes one part of its own block number (merged parts span several), and merged
/// parts stay listed, inactive, for minutes after a merge.
async fn inserts_into_usage_events_since(
    client: &clickhouse::Client,
    database: &str,
    after: i64,
) -> anyhow::Result<(u64, u64)> {
    let sql = "SELECT count(), sum(rows) FROM system.parts WHERE database = ? AND table = 'usage_events' \
               AND min_block_number = max_block_number AND min_block_number > ?";
    Ok(client.query(sql).bind(database).bind(after).fetch_one().await?)
}

/// Writes [`PIPELINE_EVENTS`] usage events into usage's outbox in one transaction (as
/// RecordUsage writes them, one per record) and times from its commit until analytics holds
/// them all; the relays and analytics run as in `aimesh all`.
pub async fn pipeline(mesh: &Mesh) -> anyhow::Result<Figures> {
    let pool = mesh.usage_db().await;
    let project = Uuid::new_v4();
    let database = mesh.config.analytics.clickhouse_database.clone();
    // One client (one connection pool) for every count, polled every 20 ms below.
    let clickhouse = aimesh_analytics::store::client_of(&mesh.config.analytics.clickhouse_url);
    let before = usage_events_in(&clickhouse, &database).await?;
    let last_block = last_block_of_usage_events(&clickhouse, &database).await?;
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO outbox_events (event_id, topic, event_type, project_id, payload, occurred_at) \
         SELECT gen_random_uuid(), 'usage', 'usage.recorded', $1, jsonb_build_object( \
           'id', gen_random_uuid(), 'request_id', 'bench-' || n, 'project_id', $1, 'user_id', gen_random_uuid(), \
           'api_key_id', NULL, 'model_id', '00000000-0000-0000-0000-00000000000' || (n % 10), \
           'chat_session_id', NULL, 'request_type', 'chat', 'input_tokens', 1200, 'output_tokens', 300, \
           'cached_input_tokens', 200, 'total_tokens', 1500, 'cost', '0.0057500000', 'duration_ms', 900 + n % 100, \
           'status', 'success', 'error_message', NULL, 'request_time', now(), 'create_time', now()), now() \
         FROM generate_series(1, $2) AS n",
    )
    .bind(project)
    .bind(PIPELINE_EVENTS)
    .execute(&pool)
    .await?;
    // The INSERT above is the bench's own bulk write, committed as one statement: the relays
    // see none of its rows before it returns, so the pipeline's time starts here.
    let committed = Instant::now();
    let written = committed - started;
    let expected = before + u64::try_from(PIPELINE_EVENTS)?;
    let deadline = committed + Duration::from_secs(600);
    let mut first_arrival = None;
    loop {
        let stored = usage_events_in(&clickhouse, &database).await?;
        if stored > before && first_arrival.is_none() {
            first_arrival = Some(committed.elapsed());
        }
        if stored >= expected {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the events did not arrive within 10 minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = committed.elapsed();
    let (inserts, rows) = inserts_into_usage_events_since(&clickhouse, &database, last_block).await?;
    let rows_per_insert = usize::try_from(rows / inserts.max(1))?;
    PIPELINE_ROWS_PER_INSERT.store(rows_per_insert, Ordering::Relaxed);
    let outbox = &mesh.config.common.outbox;
    eprintln!(
        "bench: pipeline: outbox written in {written:.2?} (not counted), all queryable {elapsed:.2?} after the commit \
         (the first {:.2?} after it); {inserts} INSERTs into usage_events for {rows} rows ({rows_per_insert} rows per \
         INSERT), relay batches of {} with {} workers ({} batches)",
        first_arrival.unwrap_or(elapsed),
        outbox.batch_size,
        outbox.workers,
        (PIPELINE_EVENTS + i64::from(outbox.batch_size.max(1)) - 1) / i64::from(outbox.batch_size.max(1))
    );
    let name = format!("outbox -> analytics ({rows_per_insert} rows/INSERT)");
    Ok(throughput(&name, PIPELINE_EVENTS, elapsed, &mut []))
}

/// The same number of rows inserted straight into a fresh analytics schema, one INSERT after
/// the other, each as large as the pipeline's INSERTs were on average in this run (without a
/// pipeline run, as large as the relay's batches in flight at once).
pub async fn raw_insert(mesh: &Mesh) -> anyhow::Result<Figures> {
    let mut config = mesh.config.analytics.clone();
    config.clickhouse_database = format!("aimesh_bench_{}", Uuid::new_v4().simple());
    let clickhouse = aimesh_analytics::connect_clickhouse(&config).await?;
    let project = Uuid::new_v4();
    let now = Utc::now();
    let outbox = &mesh.config.common.outbox;
    let batch = match PIPELINE_ROWS_PER_INSERT.load(Ordering::Relaxed) {
        0 => usize::try_from(outbox.batch_size.max(1) * outbox.workers.max(1))?,
        measured => measured,
    };
    let rows: Vec<UsageEventRow> = (0..PIPELINE_EVENTS)
        .map(|n| UsageEventRow {
            event_id: Uuid::now_v7(),
            project_id: project,
            occurred_at: now,
            record_id: Uuid::now_v7(),
            request_id: format!("bench-{n}"),
            user_id: Uuid::new_v4(),
            api_key_id: Uuid::nil(),
            model_id: Uuid::from_u128(u128::try_from(n % 10).unwrap_or(0)),
            chat_session_id: Uuid::nil(),
            request_type: "chat".into(),
            input_tokens: 1200,
            output_tokens: 300,
            cached_input_tokens: 200,
            total_tokens: 1500,
            cost: 57_500_000,
            duration_ms: 900 + n % 100,
            status: "success".into(),
            error_message: String::new(),
            retention_days: 365,
        })
        .collect();
    let mut latencies = Vec::new();
    let started = Instant::now();
    for chunk in rows.chunks(batch) {
        let sent = Instant::now();
        let mut insert = clickhouse.client().insert::<UsageEventRow>("usage_events").await?;
        for row in chunk {
            insert.write(row).await?;
        }
        insert.end().await?;
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    let name = format!("clickhouse INSERT ({batch} rows each)");
    let figures = throughput(&name, PIPELINE_EVENTS, started.elapsed(), &mut latencies);
    clickhouse.server().query(&format!("DROP DATABASE {}", clickhouse.database())).execute().await?;
    Ok(figures)
}

/// Fills analytics with [`QUERY_EVENTS`] events of `project` (ClickHouse generates them), then
/// asks GetUsageTimeSeries for the daily cost by model of the whole period, one at a time.
pub async fn daily_cost_clickhouse(mesh: &Mesh, token: &str, project: &str, runs: u64) -> anyhow::Result<Figures> {
    let client = aimesh_analytics::store::client_of(&mesh.config.analytics.clickhouse_url)
        .with_database(&mesh.config.analytics.clickhouse_database);
    eprintln!("bench: generating {QUERY_EVENTS} events in ClickHouse");
    client
        .query(
            "INSERT INTO usage_events SELECT generateUUIDv7(number), {project:UUID}, \
             now64(6) - toIntervalMicrosecond(number * {spread:UInt64}), generateUUIDv7(number), toString(number), \
             toUUID(concat('00000000-0000-0000-0000-', leftPad(toString(number % 1000), 12, '0'))), \
             toUUID('00000000-0000-0000-0000-000000000000'), \
             toUUID(concat('00000000-0000-0000-0000-', leftPad(toString(number % 10), 12, '0'))), \
             toUUID('00000000-0000-0000-0000-000000000000'), 'chat', 1000 + number % 500, 200 + number % 100, 0, \
             1200 + number % 500 + number % 100, toDecimal128(number % 1000, 10) / 100000, 500 + number % 1000, \
             if(number % 50 = 0, 'error', 'success'), '', 365 FROM numbers({events:UInt64})",
        )
        .param("project", project)
        .param("events", QUERY_EVENTS)
        .param("spread", u64::try_from(QUERY_DAYS * 86_400 * 1_000_000)? / QUERY_EVENTS)
        .execute()
        .await?;
    let analytics = mesh.analytics();
    let (token, project) = (token.to_owned(), project.to_owned());
    let end = Utc::now() + chrono::Duration::hours(1);
    Ok(measure("analytics daily cost", Load::one_at_a_time(runs), move |_| {
        let mut analytics = analytics.clone();
        let request = pb::GetUsageTimeSeriesRequest {
            project_id: project.clone(),
            start_time: Some(aimesh_kit::wire::proto_json::timestamp(end - chrono::Duration::days(QUERY_DAYS + 1))),
            end_time: Some(aimesh_kit::wire::proto_json::timestamp(end)),
            bucket: "day".into(),
            metrics: vec!["cost".into()],
            group_by: "model".into(),
            ..Default::default()
        };
        let request = authed(request, &token);
        async move {
            let series = analytics.get_usage_time_series(request).await.map_err(|s| s.to_string())?.into_inner();
            if series.points.len() < 300 {
                return Err(format!("only {} points", series.points.len()));
            }
            Ok(())
        }
    })
    .await)
}

/// The same question asked of ClickHouse itself: SQL over the raw `usage_events` rows of
/// `project`, with no service, no rollup and no FINAL (what the service's answer costs beside
/// the cheapest raw read).
pub async fn daily_cost_raw_clickhouse(mesh: &Mesh, project: &str, runs: u64) -> anyhow::Result<Figures> {
    let client = aimesh_analytics::store::client_of(&mesh.config.analytics.clickhouse_url)
        .with_database(&mesh.config.analytics.clickhouse_database);
    let project = project.to_owned();
    Ok(measure("clickhouse SQL daily cost", Load::one_at_a_time(runs), move |_| {
        let (client, project) = (client.clone(), project.clone());
        async move {
            let groups: u64 = client
                .query(
                    "SELECT count() FROM (SELECT toStartOfDay(occurred_at, 'UTC') AS day, model_id, sum(cost) \
                     FROM usage_events WHERE project_id = {project:UUID} \
                     AND occurred_at >= now64(6) - toIntervalDay({days:UInt32}) GROUP BY day, model_id)",
                )
                .param("project", project)
                .param("days", u32::try_from(QUERY_DAYS + 1).unwrap_or(31))
                .fetch_one()
                .await
                .map_err(|e| e.to_string())?;
            if groups < 300 { Err(format!("only {groups} groups")) } else { Ok(()) }
        }
    })
    .await)
}

/// The same rows and question in PostgreSQL: a table indexed by (project, time), the daily
/// cost by model over the whole period.
pub async fn daily_cost_postgres(runs: u64) -> anyhow::Result<Figures> {
    let scratch = ScratchDatabase::new();
    aimesh_kit::data::db::ensure_database(&scratch.url).await?;
    let pool = aimesh_kit::data::db::connect(&scratch.url, &aimesh_kit::config::DatabaseConfig::default()).await?;
    eprintln!("bench: generating {QUERY_EVENTS} events in PostgreSQL");
    sqlx::query(
        "CREATE UNLOGGED TABLE usage_records (project_id UUID NOT NULL, request_time TIMESTAMPTZ NOT NULL, \
         model_id UUID NOT NULL, user_id UUID NOT NULL, total_tokens BIGINT NOT NULL, cost NUMERIC(20, 10) NOT NULL, \
         status TEXT NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let project = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO usage_records SELECT $1, now() - make_interval(secs => n * $3::float8), \
         ('00000000-0000-0000-0000-' || lpad((n % 10)::text, 12, '0'))::uuid, \
         ('00000000-0000-0000-0000-' || lpad((n % 1000)::text, 12, '0'))::uuid, \
         1200 + n % 500 + n % 100, (n % 1000)::numeric / 100000, CASE WHEN n % 50 = 0 THEN 'error' ELSE 'success' END \
         FROM generate_series(0, $2 - 1) AS n",
    )
    .bind(project)
    .bind(i64::try_from(QUERY_EVENTS)?)
    .bind((QUERY_DAYS * 86_400) as f64 / QUERY_EVENTS as f64)
    .execute(&pool)
    .await?;
    sqlx::query("CREATE INDEX ON usage_records (project_id, request_time)").execute(&pool).await?;
    sqlx::query("VACUUM ANALYZE usage_records").execute(&pool).await?;
    let pool = Arc::new(pool);
    let figures = measure("postgres daily cost", Load::one_at_a_time(runs), move |_| {
        let pool = Arc::clone(&pool);
        async move {
            let rows: Vec<(chrono::DateTime<Utc>, Uuid, rust_decimal::Decimal)> = sqlx::query_as(
                "SELECT date_trunc('day', request_time, 'UTC'), model_id, sum(cost) FROM usage_records \
                 WHERE project_id = $1 AND request_time >= now() - make_interval(days => $2) \
                 GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .bind(project)
            .bind(i32::try_from(QUERY_DAYS + 1).unwrap_or(31))
            .fetch_all(pool.as_ref())
            .await
            .map_err(|e| e.to_string())?;
            if rows.len() < 300 { Err(format!("only {} rows", rows.len())) } else { Ok(()) }
        }
    })
    .await;
    Ok(figures)
}
