//! Retention of usage records (docs/retention.md): records whose request time is past their
//! project's cutoff are deleted in batches, never those of the current budget period (the
//! calendar month, UTC, by acceptance time: budgets read their truth there); a monthly
//! partition that no project still needs is detached and dropped whole instead.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use aimesh_kit::data::db::sql;
use aimesh_kit::data::retention::{Deleted, Policies};

use crate::error::Result;

/// Records deleted per statement: short transactions, no long locks.
pub const DELETE_BATCH: i64 = 1000;
/// How long a partition drop waits for its locks before leaving it to the next round.
const DROP_LOCK_TIMEOUT: &str = "5s";

/// The start of the current budget period at `now`: midnight UTC of the month's first day.
pub fn budget_period_start(now: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).single().unwrap_or(now)
}

/// One attached monthly partition of `model_usage_logs` and its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonthPartition {
    pub name: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// One round over the usage database: drops whole partitions past every cutoff, then deletes
/// the remaining records past theirs, a batch at a time, until none is left or `stop` says so.
pub async fn apply(pool: &PgPool, policies: &Policies, stop: impl Fn() -> bool) -> Result<Deleted> {
    if policies.keeps_everything() {
        return Ok(vec![("partitions", 0), ("records", 0)]);
    }
    let mut partitions = 0;
    for partition in month_partitions(pool).await? {
        if drop_partition(pool, policies, &partition).await? {
            partitions += 1;
        }
    }
    let mut records = 0;
    loop {
        let deleted = delete_batch(pool, policies).await?;
        records += deleted;
        if deleted < DELETE_BATCH as u64 || stop() {
            break;
        }
    }
    Ok(vec![("partitions", partitions), ("records", records)])
}

/// The monthly partitions attached now, oldest first (the default partition is never one).
pub async fn month_partitions(pool: &PgPool) -> Result<Vec<MonthPartition>> {
    let rows = sqlx::query(
        "SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i \
         JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'model_usage_logs'::regclass \
         AND c.relname ~ '^model_usage_logs_y[0-9]{4}m[0-9]{2}$' ORDER BY c.relname",
    )
    .fetch_all(pool)
    .await?;
    let mut partitions = Vec::with_capacity(rows.len());
    for row in rows {
        let name: String = row.try_get("name")?;
        // Named after their month (usage_create_month_partition), so the range follows.
        let (Ok(year), Ok(month)) = (name[18..22].parse::<i32>(), name[23..25].parse::<u32>()) else { continue };
        let Some(from) = Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0).single() else { continue };
        let (next_year, next_month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
        let Some(to) = Utc.with_ymd_and_hms(next_year, next_month, 1, 0, 0, 0).single() else { continue };
        partitions.push(MonthPartition { name, from, to });
    }
    Ok(partitions)
}

/// Detaches and drops `partition` if it ends before the budget period and before the oldest
/// request time RecordUsage accepts, and no row in it belongs to a project that still needs it,
/// in one transaction that first locks the partition (so no row arrives between the check and
/// the drop); gives up for this round when the locks are not granted within
/// [`DROP_LOCK_TIMEOUT`]. Returns whether it was dropped.
///
/// Not `DETACH ... CONCURRENTLY`: PostgreSQL refuses it on a table with a default partition,
/// which `model_usage_logs` has; the lock timeout bounds how long writers may wait instead.
pub async fn drop_partition(pool: &PgPool, policies: &Policies, partition: &MonthPartition) -> Result<bool> {
    // Projects whose rows in this partition must stay: a hold, no finite policy, or a cutoff
    // after the partition's end. Without a default that lets the partition go, every project
    // not named as going blocks it.
    let (going, staying): (Vec<Uuid>, Vec<Uuid>) =
        policies.projects.keys().partition(|id| policies.cutoff(**id).is_some_and(|cutoff| partition.to <= cutoff));
    let default_goes = policies
        .default_days
        .is_some_and(|days| partition.to <= policies.read_at - chrono::Duration::days(i64::from(days)));
    // A month RecordUsage still takes records for (a day of margin, as for the claims) stays:
    // dropped, its late records would only land in the default partition.
    let closed = policies.read_at - crate::domain::MAX_REQUEST_TIME_AGE - chrono::Duration::days(1);
    if partition.to > budget_period_start(policies.read_at).min(closed) || (!default_goes && going.is_empty()) {
        return Ok(false);
    }
    let mut tx = pool.begin().await?;
    sqlx::query(sql(format!("SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'"))).execute(&mut *tx).await?;
    let name = &partition.name;
    let locked = sqlx::query(sql(format!("LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE"))).execute(&mut *tx).await;
    if let Err(error) = locked {
        if lock_not_available(&error) {
            tracing::info!(partition = name, "usage partition busy; its drop waits for the next round");
            return Ok(false);
        }
        return Err(error.into());
    }
    let needed: bool = if default_goes {
        sqlx::query_scalar(sql(format!("SELECT EXISTS (SELECT 1 FROM {name} WHERE project_id = ANY($1))")))
            .bind(&staying)
            .fetch_one(&mut *tx)
            .await?
    } else {
        sqlx::query_scalar(sql(format!("SELECT EXISTS (SELECT 1 FROM {name} WHERE NOT (project_id = ANY($1)))")))
            .bind(&going)
            .fetch_one(&mut *tx)
            .await?
    };
    if needed {
        return Ok(false);
    }
    for statement in [format!("ALTER TABLE model_usage_logs DETACH PARTITION {name}"), format!("DROP TABLE {name}")] {
        if let Err(error) = sqlx::query(sql(statement)).execute(&mut *tx).await {
            if lock_not_available(&error) {
                tracing::info!(partition = name, "usage partition busy; its drop waits for the next round");
                return Ok(false);
            }
            return Err(error.into());
        }
    }
    // Claims of its records go with them (a retry of such an old request records anew).
    sqlx::query(
        "DELETE FROM usage_requests WHERE request_time >= $1 AND request_time < $2 AND NOT (project_id = ANY($3))",
    )
    .bind(partition.from)
    .bind(partition.to)
    .bind(&staying)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(partition = name, "usage partition past every project's retention dropped");
    Ok(true)
}

/// Deletes up to [`DELETE_BATCH`] records past their project's cutoff and accepted before the
/// budget period, with their idempotency claims; returns how many records went.
pub async fn delete_batch(pool: &PgPool, policies: &Policies) -> Result<u64> {
    let (projects, days) = policies.sql_overrides();
    // Without a default, only the projects with a policy of their own can lose records: the
    // join then walks their rows by index instead of the whole table.
    let only_policies = if policies.default_days.is_none() { " AND p.project_id IS NOT NULL" } else { "" };
    let deleted: i64 = sqlx::query_scalar(sql(format!(
        "WITH policy AS (SELECT * FROM unnest($1::uuid[], $2::int[]) AS p(project_id, days)), \
         doomed AS (SELECT u.id, u.request_time FROM model_usage_logs u LEFT JOIN policy p ON p.project_id = u.project_id \
                    WHERE COALESCE(p.days, $3) > 0 \
                    AND u.request_time < $4 - make_interval(days => COALESCE(p.days, $3)) \
                    AND u.created_at < $5{only_policies} LIMIT $6), \
         gone AS (DELETE FROM model_usage_logs u USING doomed d WHERE u.id = d.id AND u.request_time = d.request_time \
                  RETURNING u.project_id, u.request_id), \
         claims AS (DELETE FROM usage_requests r USING gone g \
                    WHERE r.project_id = g.project_id AND r.request_id = g.request_id) \
         SELECT count(*) FROM gone"
    )))
    .bind(&projects)
    .bind(&days)
    .bind(policies.default_sql_days())
    .bind(policies.read_at)
    .bind(budget_period_start(policies.read_at))
    .bind(DELETE_BATCH)
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(deleted).unwrap_or(0))
}

/// Whether PostgreSQL refused for a lock not granted in time (SQLSTATE 55P03).
fn lock_not_available(error: &sqlx::Error) -> bool {
    error.as_database_error().and_then(|e| e.code()).is_some_and(|code| code == "55P03")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_period_starts_at_the_first_of_the_month_utc() {
        let now = Utc.with_ymd_and_hms(2026, 12, 7, 5, 0, 0).single().expect("time");
        assert_eq!(budget_period_start(now), Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).single().expect("time"));
    }
}
