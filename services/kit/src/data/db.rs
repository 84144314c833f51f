//! PostgreSQL: pools, creating a service's database, migrations, recognising errors by SQLSTATE.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::config::DatabaseConfig;

/// A statement a store built with `format!` from its own constants (column lists, literal
/// predicates that steer the planner to a partial index), vouched for as SQL-safe: values from
/// a request are always bound, never formatted in.
pub fn sql(statement: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(statement)
}

/// Defines a service's store, `$name`: its PostgreSQL pool, cheap to clone, with `new(pool)`
/// and `pool()`; the service adds its queries in `impl $name` blocks of its own, one per entity.
/// `aimesh_kit::pg_store!(/** The chat database. */ Store);`
#[macro_export]
macro_rules! pg_store {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub struct $name {
            pool: ::sqlx::PgPool,
        }

        impl $name {
            /// The store over `pool`.
            pub fn new(pool: ::sqlx::PgPool) -> Self {
                Self { pool }
            }

            /// Its pool, for work that spans several calls (tests, maintenance).
            pub fn pool(&self) -> &::sqlx::PgPool {
                &self.pool
            }
        }
    };
}

/// `{server_url}/{database}`.
pub fn database_url(server_url: &str, database: &str) -> String {
    format!("{}/{database}", server_url.trim_end_matches('/'))
}

/// A pool for `url`, logging statements slower than the configured bound.
pub async fn connect(url: &str, settings: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(settings.slow_statement_ms));
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .min_connections(settings.min_connections)
        .acquire_timeout(Duration::from_secs(settings.acquire_timeout_secs))
        .test_before_acquire(true)
        .connect_with(options)
        .await
}

/// Creates the database `url` names if it does not exist yet (development and tests; in
/// production the database usually exists and the role may not create one).
pub async fn ensure_database(url: &str) -> Result<(), sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?;
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await?;
    if !exists {
        let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut admin).await {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another replica created it between our check and our statement.
            Err(error) if is_sqlstate(&error, "42P04") => {}
            Err(error) => return Err(error),
        }
    }
    admin.close().await
}

/// Applies `migrator` to `pool`; several replicas may do so at once (sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool, migrator: &Migrator) -> Result<(), sqlx::migrate::MigrateError> {
    migrator.run(pool).await
}

/// Whether `error` is a PostgreSQL error with this SQLSTATE.
pub fn is_sqlstate(error: &sqlx::Error, code: &str) -> bool {
    error.as_database_error().and_then(|e| e.code()).is_some_and(|c| c == code)
}

/// The constraint a unique violation (23505) hit, if `error` is one.
pub fn unique_violation(error: &sqlx::Error) -> Option<&str> {
    let db = error.as_database_error()?;
    (db.code()? == "23505").then(|| db.constraint().unwrap_or_default())
}

/// Publishes the pool's size and idle connections as gauges (the service runtime does so every
/// few seconds).
pub fn publish_pool_metrics(pool: &PgPool, database: &'static str) {
    metrics::gauge!("db_pool_connections", "database" => database).set(pool.size() as f64);
    metrics::gauge!("db_pool_idle_connections", "database" => database).set(pool.num_idle() as f64);
}

/// A service's own database, ready: `database_url` or `aimesh_<service>` on the configured
/// server, created if missing, with the service's migrations and the kit's outbox applied.
pub async fn service_database(
    common: &crate::config::CommonConfig,
    service: &str,
    database_url: Option<&str>,
    migrator: &Migrator,
) -> anyhow::Result<PgPool> {
    use anyhow::Context;
    let url = database_url.map_or_else(|| database_url_of(&common.postgres_url, service), str::to_owned);
    ensure_database(&url).await.with_context(|| format!("creating the {service} database"))?;
    let pool =
        connect(&url, &common.database).await.with_context(|| format!("connecting to the {service} database"))?;
    migrate(&pool, migrator).await.with_context(|| format!("migrating the {service} database"))?;
    crate::data::outbox::migrate(&pool).await.with_context(|| format!("migrating the {service} outbox"))?;
    Ok(pool)
}

fn database_url_of(server_url: &str, service: &str) -> String {
    database_url(server_url, &format!("aimesh_{service}"))
}
