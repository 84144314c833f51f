//! Retention of usage records against the real PostgreSQL: monthly partitions past every
//! project's cutoff are detached and dropped, one a held or longer-kept project still needs stays
//! and is cleaned by row deletes, and the current budget period is never touched.

use std::collections::HashMap;

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use aimesh_kit::data::retention::{Policies, ProjectPolicy};
use aimesh_kit::testing::TestDatabase;
use aimesh_usage::retention::{self, budget_period_start};

/// The first instant of the month `back` months before `now`'s.
fn month_start(now: DateTime<Utc>, back: i32) -> DateTime<Utc> {
    let months = now.year() * 12 + now.month0() as i32 - back;
    Utc.with_ymd_and_hms(months.div_euclid(12), months.rem_euclid(12) as u32 + 1, 1, 0, 0, 0).single().expect("a month")
}

fn partition_name(start: DateTime<Utc>) -> String {
    format!("model_usage_logs_y{:04}m{:02}", start.year(), start.month())
}

async fn model(pool: &PgPool) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO ai_models (id, provider, name, model_type) VALUES ($1, 'openai', $2, 'chat')")
        .bind(id)
        .bind(format!("m-{id}"))
        .execute(pool)
        .await
        .expect("insert a model");
    id
}

/// A record of `project` requested at `request_time` and accepted at `created_at`, with its claim.
async fn record(pool: &PgPool, model: Uuid, project: Uuid, request_time: DateTime<Utc>, created_at: DateTime<Utc>) {
    let (id, request_id) = (Uuid::now_v7(), Uuid::now_v7().to_string());
    sqlx::query(
        "INSERT INTO model_usage_logs (id, request_id, project_id, user_id, model_id, request_type, input_tokens, \
         output_tokens, cached_input_tokens, total_tokens, cost, duration_ms, status, request_time, created_at) \
         VALUES ($1, $2, $3, $4, $5, 'chat', 1, 1, 0, 2, 0.01, 5, 'success', $6, $7)",
    )
    .bind(id)
    .bind(&request_id)
    .bind(project)
    .bind(Uuid::now_v7())
    .bind(model)
    .bind(request_time)
    .bind(created_at)
    .execute(pool)
    .await
    .expect("insert a usage record");
    sqlx::query("INSERT INTO usage_requests (project_id, request_id, usage_id, request_time) VALUES ($1, $2, $3, $4)")
        .bind(project)
        .bind(&request_id)
        .bind(id)
        .bind(request_time)
        .execute(pool)
        .await
        .expect("insert a claim");
}

async fn records_of(pool: &PgPool, project: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM model_usage_logs WHERE project_id = $1")
        .bind(project)
        .fetch_one(pool)
        .await
        .expect("count records")
}

async fn claims_of(pool: &PgPool, project: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM usage_requests WHERE project_id = $1")
        .bind(project)
        .fetch_one(pool)
        .await
        .expect("count claims")
}

async fn partitions(pool: &PgPool) -> Vec<String> {
    retention::month_partitions(pool).await.expect("list partitions").into_iter().map(|p| p.name).collect()
}

fn policies(default_days: Option<u32>, projects: &[(Uuid, Option<u32>, bool)]) -> Policies {
    let projects: HashMap<Uuid, ProjectPolicy> = projects
        .iter()
        .map(|(id, days, legal_hold)| (*id, ProjectPolicy { days: *days, legal_hold: *legal_hold }))
        .collect();
    Policies { default_days, projects, read_at: Utc::now() }
}

#[tokio::test]
async fn partitions_past_every_cutoff_are_dropped_and_the_rest_is_cleaned_row_by_row() {
    let db = TestDatabase::new(&aimesh_usage::MIGRATOR).await;
    let pool = &db.pool;
    let now = Utc::now();
    let (old, older) = (month_start(now, 3), month_start(now, 4));
    for start in [old, older] {
        sqlx::query("SELECT usage_create_month_partition($1::date)")
            .bind(start.date_naive())
            .execute(pool)
            .await
            .expect("create an old partition");
    }
    let model = model(pool).await;
    let (short, held, default) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    // Four months back: only the short-lived project's records; three months back: the held
    // project's too. The months since are ones RecordUsage still takes records for.
    record(pool, model, short, older + Duration::days(2), older + Duration::days(2)).await;
    record(pool, model, short, old + Duration::days(2), old + Duration::days(2)).await;
    record(pool, model, held, old + Duration::days(3), old + Duration::days(3)).await;
    record(pool, model, default, old + Duration::days(4), old + Duration::days(4)).await;
    // In the budget period (accepted this month): kept whatever its request time says.
    let period = budget_period_start(now);
    record(pool, model, short, period - Duration::days(20), now).await;

    // The default keeps forever: the partition with only the short project's rows goes whole,
    // the one where others have rows stays and loses the short project's rows.
    let round = policies(None, &[(short, Some(1), false), (held, Some(1), true)]);
    let deleted = retention::apply(pool, &round, || false).await.expect("a retention round");
    let names = partitions(pool).await;
    assert!(!names.contains(&partition_name(older)), "the partition past every cutoff is dropped: {names:?}");
    assert!(names.contains(&partition_name(old)), "the partition the held project needs stays: {names:?}");
    assert_eq!(deleted, vec![("partitions", 1), ("records", 1)]);
    assert_eq!(records_of(pool, short).await, 1, "only the short project's record of the budget period is left");
    assert_eq!(claims_of(pool, short).await, 1, "the deleted records' claims went with them");
    assert_eq!(records_of(pool, held).await, 1, "a held project loses nothing");
    assert_eq!(records_of(pool, default).await, 1, "a project on a keep-forever default loses nothing");

    // A finite default that the old partition is past, but the hold still keeps it.
    let round = policies(Some(1), &[(held, None, true)]);
    let deleted = retention::apply(pool, &round, || false).await.expect("a retention round");
    assert_eq!(deleted, vec![("partitions", 0), ("records", 1)], "the default project's old record goes by row");
    assert!(partitions(pool).await.contains(&partition_name(old)), "the held project's rows keep their partition");
    assert_eq!(records_of(pool, held).await, 1);
    assert_eq!(records_of(pool, short).await, 1, "the budget period is never touched");

    // The hold lifted: nothing needs the partition any more.
    let round = policies(Some(1), &[]);
    let deleted = retention::apply(pool, &round, || false).await.expect("a retention round");
    assert_eq!(deleted, vec![("partitions", 1), ("records", 0)]);
    assert!(!partitions(pool).await.contains(&partition_name(old)));
    assert_eq!(records_of(pool, held).await, 0);
    assert_eq!(claims_of(pool, held).await, 0, "claims of a dropped partition's records go too");
    assert_eq!(records_of(pool, short).await, 1, "the budget period is never touched");
    // Inserting into the dropped months still works: such a row lands in the default partition.
    record(pool, model, default, older + Duration::days(1), older + Duration::days(1)).await;
    assert_eq!(records_of(pool, default).await, 1);
}

#[tokio::test]
async fn a_policy_that_keeps_everything_deletes_nothing() {
    let db = TestDatabase::new(&aimesh_usage::MIGRATOR).await;
    let pool = &db.pool;
    let model = model(pool).await;
    let project = Uuid::now_v7();
    let long_ago = month_start(Utc::now(), 1) + Duration::days(1);
    record(pool, model, project, long_ago, long_ago).await;
    let before = partitions(pool).await;
    let deleted = retention::apply(pool, &policies(None, &[(project, Some(1), true)]), || false).await.expect("round");
    assert_eq!(deleted, vec![("partitions", 0), ("records", 0)]);
    assert_eq!(partitions(pool).await, before);
    assert_eq!(records_of(pool, project).await, 1);
}
