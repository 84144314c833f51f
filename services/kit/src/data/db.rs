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

/// Defines a service's store, `$name`: its database (a [`crate::data::replicas::Database`],
/// cheap to clone) with `new(database or pool)`, `pool()` (the pool its queries use: the
/// primary's, unless made by `reading_for`) and `reading_for(user)`; the service adds its
/// queries in `impl $name` blocks of its own, one per entity.
/// `aimesh_kit::pg_store!(/** The chat database. */ Store);`
#[macro_export]
macro_rules! pg_store {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub struct $name {
            pool: ::sqlx::PgPool,
            database: $crate::data::replicas::Database,
        }

        impl $name {
            /// The store over `database` (a pool alone is a database without replicas).
            pub fn new(database: impl Into<$crate::data::replicas::Database>) -> Self {
                let database = database.into();
                Self { pool: database.primary().clone(), database }
            }

            /// The pool its queries use, for work that spans several calls (tests, maintenance).
            pub fn pool(&self) -> &::sqlx::PgPool {
                &self.pool
            }

            /// Its database, primary and replicas.
            pub fn database(&self) -> &$crate::data::replicas::Database {
                &self.database
            }

            /// This store reading where a read-only request of `user` may read: a replica that
            /// has replayed the user's own last write, or else the primary. Only for requests that
            /// write nothing (see [`$crate::serving::read_your_writes::is_read_only`]).
            pub async fn reading_for(&self, user: ::uuid::Uuid) -> Self {
                Self { pool: self.database.reader(user).await, database: self.database.clone() }
            }
        }
    };
}

/// `{server_url}/{database}`.
pub fn database_url(server_url: &str, database: &str) -> String {
    format!("{}/{database}", server_url.trim_end_matches('/'))
}

/// A pool for `url`, logging statements slower than the configured bound. Every statement and
/// pool acquire is also an event at TRACE, which the telemetry turns into latency histograms
/// (see [`crate::telemetry::database_metrics_layer`]) and the log filter leaves out.
pub async fn connect(url: &str, settings: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    pool_options(settings).connect_with(connect_options(url, settings)?).await
}

fn connect_options(url: &str, settings: &DatabaseConfig) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(url)?
        // Not sent as a start-up parameter, which PgBouncer refuses unless told to ignore it;
        // since PostgreSQL 12 the server's default already prints floats exactly.
        .extra_float_digits(None)
        // A slow statement is still logged at WARN only: sqlx picks one level per statement.
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(settings.slow_statement_ms)))
}

fn pool_options(settings: &DatabaseConfig) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .min_connections(settings.min_connections)
        .acquire_timeout(Duration::from_secs(settings.acquire_timeout_secs))
        .test_before_acquire(true)
        // The wait for a connection, as an event for the pool-wait histogram (slow waits
        // still warn).
        .acquire_time_level(tracing::log::LevelFilter::Trace)
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

/// Publishes the pool's size, idle connections and bound as gauges (the service runtime does so
/// every few seconds).
pub fn publish_pool_metrics(database: &crate::data::replicas::Database, name: &'static str) {
    for (server, pool) in database.pools() {
        let labels = [("database", name.to_owned()), ("server", server)];
        metrics::gauge!("db_pool_connections", &labels).set(pool.size() as f64);
        metrics::gauge!("db_pool_idle_connections", &labels).set(pool.num_idle() as f64);
        metrics::gauge!("db_pool_max_connections", &labels).set(f64::from(pool.options().get_max_connections()));
    }
}

/// A service's own database, ready: `urls.url` or `aimesh_<service>` on the configured server,
/// created if missing (through `urls.migration_url` when set), with the service's migrations and
/// the kit's outbox applied; the pool of its primary.
pub async fn service_database(
    common: &crate::config::CommonConfig,
    service: &str,
    urls: &crate::config::DatabaseUrls,
    migrator: &Migrator,
) -> anyhow::Result<PgPool> {
    use anyhow::Context;
    let url = urls.url.clone().unwrap_or_else(|| database_url_of(&common.postgres_url, service));
    let migration_url = urls.migration_url.as_deref().unwrap_or(&url);
    ensure_database(migration_url).await.with_context(|| format!("creating the {service} database"))?;
    let migrating = if migration_url == url {
        None
    } else {
        let settings =
            crate::config::DatabaseConfig { max_connections: 1, min_connections: 0, ..common.database.clone() };
        let pool = connect(migration_url, &settings)
            .await
            .with_context(|| format!("connecting to the {service} database for migrations"))?;
        Some(pool)
    };
    let pool =
        connect(&url, &common.database).await.with_context(|| format!("connecting to the {service} database"))?;
    let target = migrating.as_ref().unwrap_or(&pool);
    migrate(target, migrator).await.with_context(|| format!("migrating the {service} database"))?;
    crate::data::outbox::migrate(target).await.with_context(|| format!("migrating the {service} outbox"))?;
    if let Some(migrating) = migrating {
        migrating.close().await;
    }
    Ok(pool)
}

/// Pools for `urls`' read replicas, each named by its `host:port`. They connect lazily, so a
/// replica that is down at start-up only takes no reads until it answers.
pub fn replica_pools(
    urls: &crate::config::DatabaseUrls,
    settings: &DatabaseConfig,
) -> Result<Vec<(String, PgPool)>, crate::ServiceError> {
    urls.replica_urls
        .iter()
        .map(|url| {
            let options = connect_options(url, settings)
                .map_err(|e| crate::ServiceError::invalid_field("database_replica_urls", e.to_string()))?;
            Ok((crate::data::replicas::server_name(url), pool_options(settings).connect_lazy_with(options)))
        })
        .collect()
}

fn database_url_of(server_url: &str, service: &str) -> String {
    database_url(server_url, &format!("aimesh_{service}"))
}
