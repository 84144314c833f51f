//! The service databases: `pg_dump --format=custom` of a snapshot whose WAL position is
//! recorded, `pg_restore` into a new database, and re-arming the outbox.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

use aimesh_kit::data::db::{database_url, is_sqlstate};

use super::destination::Destination;
use super::manifest::{Artifact, PostgresDump};
use crate::MeshConfig;

/// A service's own database as backup and restore reach it.
#[derive(Debug, Clone)]
pub struct ServiceDatabase {
    pub service: &'static str,
    /// A direct connection to the primary (`database_migration_url`, else `database_url`, else
    /// `aimesh_<service>` on `postgres_url`): pg_dump and pg_restore need a session, not a
    /// transaction-mode pooler.
    pub url: String,
}

/// Every service database of the mesh ([`crate::SERVICES_WITH_DATABASE`]).
pub fn service_databases(config: &MeshConfig) -> Vec<ServiceDatabase> {
    crate::SERVICES_WITH_DATABASE
        .into_iter()
        .filter_map(|service| {
            let urls = crate::service_database_urls(service, config)?;
            let service = service.as_str();
            let url = urls
                .migration_url
                .clone()
                .or_else(|| urls.url.clone())
                .unwrap_or_else(|| database_url(&config.common.postgres_url, &format!("aimesh_{service}")));
            Some(ServiceDatabase { service, url })
        })
        .collect()
}

impl ServiceDatabase {
    fn options(&self) -> anyhow::Result<PgConnectOptions> {
        PgConnectOptions::from_str(&self.url).with_context(|| format!("the {} database url", self.service))
    }

    /// The database's name.
    pub fn name(&self) -> anyhow::Result<String> {
        let options = self.options()?;
        let name =
            options.get_database().with_context(|| format!("the {} database url names no database", self.service))?;
        Ok(name.to_owned())
    }

    async fn connect(&self) -> anyhow::Result<PgConnection> {
        PgConnection::connect_with(&self.options()?)
            .await
            .with_context(|| format!("connecting to the {} database", self.service))
    }

    /// The server's clock.
    pub async fn clock(&self) -> anyhow::Result<DateTime<Utc>> {
        let mut conn = self.connect().await?;
        let now = sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(&mut conn).await?;
        conn.close().await?;
        Ok(now)
    }

    /// The url without its password and the password apart, so that it is not on a command line.
    fn url_for_tools(&self) -> anyhow::Result<(String, Option<String>)> {
        let mut url = url::Url::parse(&self.url).with_context(|| format!("the {} database url", self.service))?;
        let password = url.password().map(|p| percent_encoding::percent_decode_str(p).decode_utf8_lossy().into_owned());
        if password.is_some() {
            let _ = url.set_password(None);
        }
        Ok((url.to_string(), password))
    }

    fn tool(&self, pg_bin: Option<&Path>, name: &str) -> anyhow::Result<tokio::process::Command> {
        let program = pg_bin.map_or_else(|| PathBuf::from(name), |dir| dir.join(name));
        let (url, password) = self.url_for_tools()?;
        let mut command = tokio::process::Command::new(program);
        command.arg(format!("--dbname={url}")).kill_on_drop(true);
        if let Some(password) = password {
            command.env("PGPASSWORD", password);
        }
        Ok(command)
    }

    /// Dumps the database to `postgres/<service>.dump` in `destination`.
    pub async fn dump(
        &self,
        pg_bin: Option<&Path>,
        destination: &Destination,
        redeliver_from: DateTime<Utc>,
    ) -> anyhow::Result<PostgresDump> {
        let database = self.name()?;
        // The dump reads the snapshot of this transaction, so the WAL position read here bounds
        // every transaction in it; the transaction stays open until pg_dump is done.
        let mut conn = self.connect().await?;
        sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut conn).await?;
        let (snapshot, lsn, snapshot_at): (String, String, DateTime<Utc>) =
            sqlx::query_as("SELECT pg_export_snapshot(), pg_current_wal_lsn()::text, clock_timestamp()")
                .fetch_one(&mut conn)
                .await
                .with_context(|| format!("exporting a snapshot of the {} database", self.service))?;
        let mut command = self.tool(pg_bin, "pg_dump")?;
        command
            .args(["--format=custom", "--no-password"])
            .arg(format!("--snapshot={snapshot}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("starting pg_dump (install PostgreSQL's client or pass --pg-bin)")?;
        let stdout = child.stdout.take().context("pg_dump's output")?;
        let stderr = child.stderr.take().context("pg_dump's errors")?;
        let errors = tokio::spawn(read_all(stderr));
        let path = format!("postgres/{}.dump", self.service);
        let written = destination.write_stream(&path, ReaderStream::new(stdout)).await;
        let status = child.wait().await?;
        let errors = errors.await.unwrap_or_default();
        if !status.success() {
            bail!("pg_dump of the {} database failed ({status}): {}", self.service, errors.trim());
        }
        let dump = written?;
        sqlx::query("COMMIT").execute(&mut conn).await?;
        conn.close().await?;
        Ok(PostgresDump { service: self.service.to_owned(), database, lsn, snapshot_at, redeliver_from, dump })
    }

    /// Creates the database (dropping it first if `force`), refusing one that exists with
    /// tables in it otherwise.
    pub async fn create(&self, force: bool) -> anyhow::Result<()> {
        let name = self.name()?;
        let mut admin = PgConnection::connect_with(&self.options()?.database("postgres"))
            .await
            .with_context(|| format!("connecting to the {} database's server", self.service))?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        if exists {
            let tables = self.table_count().await?;
            if tables > 0 && !force {
                bail!(
                    "the {} database {name} exists and holds {tables} tables: restore into a new database, or pass \
                     --force to replace it",
                    self.service
                );
            }
            if tables > 0 {
                let drop = format!("DROP DATABASE {quoted} WITH (FORCE)");
                sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut admin).await?;
            }
        }
        if !exists || force {
            let create = format!("CREATE DATABASE {quoted}");
            match sqlx::query(sqlx::AssertSqlSafe(create)).execute(&mut admin).await {
                Ok(_) => {}
                // It existed empty and was kept.
                Err(error) if is_sqlstate(&error, "42P04") => {}
                Err(error) => return Err(error).with_context(|| format!("creating the {} database", self.service)),
            }
        }
        admin.close().await?;
        Ok(())
    }

    /// Tables and views outside PostgreSQL's own schemas.
    async fn table_count(&self) -> anyhow::Result<i64> {
        let mut conn = self.connect().await?;
        let count = sqlx::query_scalar(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p', 'v', 'm')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'",
        )
        .fetch_one(&mut conn)
        .await?;
        conn.close().await?;
        Ok(count)
    }

    /// Restores the dump at `file` (already checked) into the database made by [`Self::create`].
    pub async fn restore(&self, pg_bin: Option<&Path>, file: &Path) -> anyhow::Result<()> {
        let mut command = self.tool(pg_bin, "pg_restore")?;
        // Owners and grants name roles of the old server; the restoring role owns everything.
        command
            .args(["--no-owner", "--no-acl", "--exit-on-error", "--no-password"])
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let output =
            command.output().await.context("starting pg_restore (install PostgreSQL's client or pass --pg-bin)")?;
        if !output.status.success() {
            let errors = String::from_utf8_lossy(&output.stderr);
            bail!("pg_restore of the {} database failed ({}): {}", self.service, output.status, errors.trim());
        }
        Ok(())
    }

    /// Marks undelivered again every outbox event delivered at or after `from`, so the relay
    /// sends it to analytics once more (analytics drops what it already has, by event id);
    /// how many.
    pub async fn redeliver(&self, from: DateTime<Utc>) -> anyhow::Result<u64> {
        let mut conn = self.connect().await?;
        let rearmed = sqlx::query(
            "UPDATE outbox_events SET delivered_at = NULL, attempts = 0, next_attempt_at = now(), last_error = NULL
             WHERE delivered_at >= $1",
        )
        .bind(from)
        .execute(&mut conn)
        .await
        .with_context(|| format!("re-arming the outbox of the {} database", self.service))?
        .rows_affected();
        conn.close().await?;
        Ok(rearmed)
    }
}

/// Copies the artifact `expected` into the local file `file`, checking its sha256.
pub async fn download(destination: &Destination, expected: &Artifact, file: &Path) -> anyhow::Result<()> {
    let mut out = tokio::fs::File::create(file).await.with_context(|| format!("creating {}", file.display()))?;
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut size = 0u64;
    let mut chunks = destination.chunks(&expected.path).await?;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.with_context(|| format!("reading {}", expected.path))?;
        sha2::Digest::update(&mut hasher, &chunk);
        size += chunk.len() as u64;
        out.write_all(&chunk).await?;
    }
    out.flush().await?;
    let actual = Artifact { path: expected.path.clone(), size, sha256: hex::encode(sha2::Digest::finalize(hasher)) };
    expected.check(&actual)
}

async fn read_all(mut reader: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut text = String::new();
    let _ = tokio::io::AsyncReadExt::read_to_string(&mut reader, &mut text).await;
    text
}
