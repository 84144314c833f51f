//! `aimesh backup` and `aimesh restore`: every service database (pg_dump), the analytics
//! database (ClickHouse's BACKUP) and the files objects, with a manifest naming the consistent
//! point. Redis is not backed up: its caches fill again and usage's budget counters are rebuilt
//! from PostgreSQL when missing. See docs/backup.md.
//!
//! Order: ClickHouse first, then PostgreSQL, then objects. The ClickHouse backup holds every
//! event delivered before it began, and the PostgreSQL dumps, taken after, know every event
//! delivered since: restore marks those undelivered again and the relay sends them once more
//! (analytics drops what it already has, by event id). Objects are copied after the dumps, so
//! every object a restored row names is in the backup.

pub mod clickhouse;
pub mod destination;
pub mod manifest;
pub mod objects;
pub mod postgres;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::Utc;

use crate::MeshConfig;
use destination::Destination;
use manifest::{FORMAT_VERSION, MANIFEST_PATH, Manifest, from_lines};

/// Replaced in [`BackupOptions::to`] by the backup's start, UTC (`20261207T031700Z`), so that
/// a schedule writes each backup to a place of its own.
pub const TIME_PLACEHOLDER: &str = "{time}";

/// What `aimesh backup` is given.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// A directory or `s3://bucket/prefix`, where [`TIME_PLACEHOLDER`] is replaced; must be empty.
    pub to: String,
    /// The directory of `pg_dump`; none: the one on `PATH`.
    pub pg_bin: Option<PathBuf>,
}

/// What `aimesh restore` is given.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// A backup: a directory or `s3://bucket/prefix` holding a manifest.
    pub from: String,
    /// Replace databases and objects that exist instead of refusing.
    pub force: bool,
    /// The directory of `pg_restore`; none: the one on `PATH`.
    pub pg_bin: Option<PathBuf>,
}

/// How a backup or restore went: each step with its time, and the bytes it moved.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub steps: Vec<Step>,
}

/// One step of a [`Report`].
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub took: Duration,
    pub bytes: u64,
    /// What it did, for people.
    pub detail: String,
}

impl Report {
    fn step(&mut self, name: impl Into<String>, started: Instant, bytes: u64, detail: impl Into<String>) {
        let step = Step { name: name.into(), took: started.elapsed(), bytes, detail: detail.into() };
        tracing::info!(step = step.name, seconds = step.took.as_secs_f64(), bytes, detail = step.detail, "done");
        self.steps.push(step);
    }

    /// All steps' time.
    pub fn total(&self) -> Duration {
        self.steps.iter().map(|s| s.took).sum()
    }

    /// All steps' bytes.
    pub fn bytes(&self) -> u64 {
        self.steps.iter().map(|s| s.bytes).sum()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for step in &self.steps {
            writeln!(
                f,
                "{:<22} {:>9.3} s {:>14} bytes  {}",
                step.name,
                step.took.as_secs_f64(),
                step.bytes,
                step.detail
            )?;
        }
        write!(f, "{:<22} {:>9.3} s {:>14} bytes", "total", self.total().as_secs_f64(), self.bytes())
    }
}

/// Backs up every store of the mesh `config` describes to `options.to`; the manifest written
/// last names what it holds.
pub async fn backup(config: &MeshConfig, options: &BackupOptions) -> anyhow::Result<(Manifest, Report)> {
    let started_at = Utc::now();
    let to = options.to.replace(TIME_PLACEHOLDER, &started_at.format("%Y%m%dT%H%M%SZ").to_string());
    let destination = Destination::open(&to, &config.files.s3, true)?;
    if !destination.is_empty().await? {
        bail!("the destination {to} is not empty: back up to a new directory or prefix");
    }
    let mut report = Report::default();
    let databases = postgres::service_databases(config);

    // Each database's own clock, read before ClickHouse's BACKUP begins: the outbox marks
    // deliveries by that clock.
    let started = Instant::now();
    let mut redeliver_from = Vec::with_capacity(databases.len());
    for database in &databases {
        redeliver_from.push(database.clock().await?);
    }
    let clickhouse = clickhouse::backup(&config.analytics, &destination).await?;
    let rows: u64 = clickhouse.rows.values().sum();
    let detail = format!("{} rows in {} tables, {} files", rows, clickhouse.rows.len(), clickhouse.files);
    report.step("clickhouse", started, clickhouse.bytes, detail);

    let mut dumps = Vec::with_capacity(databases.len());
    for (database, from) in databases.iter().zip(redeliver_from) {
        let started = Instant::now();
        let dump = database.dump(options.pg_bin.as_deref(), &destination, from).await?;
        let detail = format!("{} at LSN {}", dump.database, dump.lsn);
        report.step(format!("postgres {}", database.service), started, dump.dump.size, detail);
        dumps.push(dump);
    }

    let started = Instant::now();
    let objects = objects::backup(&config.files, &destination).await?;
    report.step("objects", started, objects.bytes, format!("{} objects", objects.count));

    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        aimesh_version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at,
        finished_at: Utc::now(),
        clickhouse,
        postgres: dumps,
        objects,
    };
    let started = Instant::now();
    let written = destination.write(MANIFEST_PATH, serde_json::to_vec_pretty(&manifest)?).await?;
    report.step("manifest", started, written.size, format!("{to}/{MANIFEST_PATH}"));
    Ok((manifest, report))
}

/// Restores the backup at `options.from` into the stores `config` describes: checks every
/// artifact, then PostgreSQL, ClickHouse, the objects, and re-arms the outbox.
pub async fn restore(config: &MeshConfig, options: &RestoreOptions) -> anyhow::Result<(Manifest, Report)> {
    let destination = Destination::open(&options.from, &config.files.s3, false)?;
    let mut report = Report::default();
    let started = Instant::now();
    let manifest_bytes = destination
        .read_unchecked(MANIFEST_PATH)
        .await
        .with_context(|| format!("{} holds no readable {MANIFEST_PATH}: not a finished backup", options.from))?;
    let manifest = Manifest::parse(&manifest_bytes)?;
    let databases = postgres::service_databases(config);
    for database in &databases {
        if !manifest.postgres.iter().any(|d| d.service == database.service) {
            bail!("the backup holds no dump of the {} database", database.service);
        }
    }

    // Every artifact is checked before anything is changed.
    let scratch = tempdir()?;
    let mut dump_files = Vec::new();
    let mut bytes = 0;
    for dump in &manifest.postgres {
        let file = scratch.path.join(format!("{}.dump", dump.service));
        postgres::download(&destination, &dump.dump, &file).await?;
        bytes += dump.dump.size;
        dump_files.push((dump.service.clone(), file));
    }
    let clickhouse_files =
        from_lines(&destination.read(&manifest.clickhouse.index).await?, clickhouse::CLICKHOUSE_INDEX)?;
    clickhouse::verify(&destination, &clickhouse_files).await?;
    let object_index = from_lines(&destination.read(&manifest.objects.index).await?, objects::OBJECTS_INDEX)?;
    objects::verify(&destination, &object_index).await?;
    bytes += manifest.clickhouse.bytes + manifest.objects.bytes;
    let artifacts = dump_files.len() + clickhouse_files.len() + object_index.len();
    // Its bytes are those the later steps count: only the time is its own.
    report.step("verify", started, 0, format!("{artifacts} artifacts ({bytes} bytes) match the manifest"));

    for database in &databases {
        let started = Instant::now();
        let (_, file) = dump_files.iter().find(|(service, _)| service == database.service).context("a dump")?;
        database.create(options.force).await?;
        database.restore(options.pg_bin.as_deref(), file).await?;
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or_default();
        report.step(format!("postgres {}", database.service), started, size, database.name()?);
    }

    let started = Instant::now();
    let rows = clickhouse::restore(&config.analytics, &destination, &manifest.clickhouse, options.force).await?;
    if rows != manifest.clickhouse.rows {
        tracing::warn!(restored = ?rows, manifest = ?manifest.clickhouse.rows,
            "the restored ClickHouse tables hold other row counts than counted after the backup (rows inserted \
             while it ran are counted but not in it)");
    }
    let detail = format!("{} rows in {} tables", rows.values().sum::<u64>(), rows.len());
    report.step("clickhouse", started, manifest.clickhouse.bytes, detail);

    let started = Instant::now();
    objects::restore(&config.files, &destination, &object_index, options.force).await?;
    report.step("objects", started, manifest.objects.bytes, format!("{} objects", object_index.len()));

    let started = Instant::now();
    let mut rearmed = 0;
    for database in &databases {
        let dump = manifest.postgres.iter().find(|d| d.service == database.service).context("a dump")?;
        rearmed += database.redeliver(dump.redeliver_from).await?;
    }
    report.step("outbox", started, 0, format!("{rearmed} events to deliver to analytics again"));
    Ok((manifest, report))
}

/// A directory of this process's own, removed when dropped.
struct TempDir {
    path: PathBuf,
}

fn tempdir() -> anyhow::Result<TempDir> {
    let path =
        std::env::temp_dir().join(format!("aimesh-restore-{}-{}", std::process::id(), Utc::now().timestamp_micros()));
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(TempDir { path })
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
