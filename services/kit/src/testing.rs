//! Test support: a fresh PostgreSQL database per test, a Redis handle with a key prefix of its
//! own, both on the real servers `scripts/deps.sh` starts (or those named in the environment).

use std::str::FromStr;

use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};

use crate::config::{DatabaseConfig, RedisConfig};
use crate::redis::Redis;

/// The PostgreSQL server of the test run (`AIMESH_POSTGRES_URL`).
pub fn postgres_url() -> String {
    std::env::var("AIMESH_POSTGRES_URL").unwrap_or_else(|_| crate::config::CommonConfig::default().postgres_url)
}

/// The Redis seed nodes of the test run (`AIMESH_REDIS_URLS`).
pub fn redis_urls() -> String {
    std::env::var("AIMESH_REDIS_URLS").unwrap_or_else(|_| crate::config::CommonConfig::default().redis_urls)
}

/// A database name no other test uses, on the test server; the database (if something created
/// it) is dropped with this value. For services that create and migrate their own database.
#[derive(Debug)]
pub struct ScratchDatabase {
    pub url: String,
    name: String,
}

impl ScratchDatabase {
    pub fn new() -> Self {
        let name = format!("aimesh_test_{}", uuid::Uuid::new_v4().simple());
        Self { url: crate::db::database_url(&postgres_url(), &name), name }
    }
}

impl Default for ScratchDatabase {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        // Drop runs outside async; a thread of its own may block on a small runtime.
        let name = self.name.clone();
        let server = postgres_url();
        let dropper = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                let Ok(options) = PgConnectOptions::from_str(&server) else { return };
                if let Ok(mut admin) = PgConnection::connect_with(&options.database("postgres")).await {
                    let statement = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut admin).await;
                }
            });
        });
        let _ = dropper.join();
    }
}

/// A database that exists for one test, migrated, and is dropped with this value.
#[derive(Debug)]
pub struct TestDatabase {
    pub pool: PgPool,
    pub url: String,
    _scratch: ScratchDatabase,
}

impl TestDatabase {
    /// Creates an empty database with a unique name and applies `migrator` to it.
    pub async fn new(migrator: &Migrator) -> Self {
        let scratch = ScratchDatabase::new();
        crate::db::ensure_database(&scratch.url).await.unwrap_or_else(|e| {
            panic!(
                "cannot create a test database on {}: {e} (run `make test`, which starts PostgreSQL)",
                postgres_url()
            )
        });
        let settings = DatabaseConfig { max_connections: 10, min_connections: 0, ..DatabaseConfig::default() };
        let pool = crate::db::connect(&scratch.url, &settings).await.expect("connect to the test database");
        crate::db::migrate(&pool, migrator).await.expect("migrate the test database");
        Self { pool, url: scratch.url.clone(), _scratch: scratch }
    }
}

/// A Redis handle whose keys and channels carry a prefix no other test uses.
pub async fn redis() -> Redis {
    let prefix = format!("test-{}", uuid::Uuid::new_v4().simple());
    Redis::connect_with_prefix(&redis_urls(), &RedisConfig::default(), &prefix).await.unwrap_or_else(|e| {
        panic!("cannot reach Redis at {}: {e} (run `make test`, which starts the cluster)", redis_urls())
    })
}
