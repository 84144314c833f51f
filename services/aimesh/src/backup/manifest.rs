//! `manifest.json`: what a backup holds and the consistent point it names. Written last, so a
//! backup without one is incomplete.

use std::collections::BTreeMap;

use anyhow::bail;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The version of this layout; `restore` refuses others.
pub const FORMAT_VERSION: u32 = 1;

/// Where the manifest is, in the backup's root.
pub const MANIFEST_PATH: &str = "manifest.json";

/// The manifest of one backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// The version of the aimesh that wrote it.
    pub aimesh_version: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub clickhouse: ClickHouseBackup,
    /// One per service database, in backup order.
    pub postgres: Vec<PostgresDump>,
    pub objects: ObjectsCopy,
}

/// The analytics database, by ClickHouse's own BACKUP.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClickHouseBackup {
    /// The database's name where it was backed up (restore may give it another).
    pub database: String,
    /// When BACKUP began (this host's clock).
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Rows per table counted right after BACKUP ended (rows inserted meanwhile count too).
    pub rows: BTreeMap<String, u64>,
    /// The backup's files (under `clickhouse/`), listed with their sha256 in this artifact.
    pub index: Artifact,
    pub files: u64,
    pub bytes: u64,
}

/// One service database, by `pg_dump --format=custom`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PostgresDump {
    /// identity, chat, usage or files.
    pub service: String,
    /// The database's name where it was dumped.
    pub database: String,
    /// `pg_current_wal_lsn()` read in the transaction whose snapshot the dump holds: every
    /// transaction in the dump committed before it (a `recovery_target_lsn` for PITR).
    pub lsn: String,
    /// The server's clock when the dump's snapshot was taken.
    pub snapshot_at: DateTime<Utc>,
    /// The server's clock just before ClickHouse's BACKUP began: events the outbox marked
    /// delivered from then on may be missing from the ClickHouse backup, so restore re-arms them.
    pub redeliver_from: DateTime<Utc>,
    pub dump: Artifact,
}

/// The files service's objects, copied under `objects/` with their keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObjectsCopy {
    /// fs or s3: where they were copied from.
    pub backend: String,
    pub count: u64,
    pub bytes: u64,
    /// One [`Artifact`] per object, path being its key, as JSON lines.
    pub index: Artifact,
}

/// A stored file of the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Relative to the backup's root (or, in the objects index, the object's key).
    pub path: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

impl Artifact {
    /// The artifact `path` holding `bytes`.
    pub fn of(path: &str, bytes: &[u8]) -> Self {
        Self { path: path.to_owned(), size: bytes.len() as u64, sha256: hex::encode(Sha256::digest(bytes)) }
    }

    /// Fails, naming the artifact, unless `actual` has this size and digest.
    pub fn check(&self, actual: &Artifact) -> anyhow::Result<()> {
        if self.size != actual.size || self.sha256 != actual.sha256 {
            bail!(
                "{} does not match the manifest: {} bytes, sha256 {} (the manifest says {} bytes, sha256 {})",
                self.path,
                actual.size,
                actual.sha256,
                self.size,
                self.sha256
            );
        }
        Ok(())
    }
}

/// Artifacts as JSON lines, for an index.
pub fn to_lines(artifacts: &[Artifact]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    for artifact in artifacts {
        serde_json::to_writer(&mut out, artifact)?;
        out.push(b'\n');
    }
    Ok(out)
}

/// The artifacts of an index read back.
pub fn from_lines(bytes: &[u8], index: &str) -> anyhow::Result<Vec<Artifact>> {
    bytes
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .enumerate()
        .map(|(n, line)| {
            serde_json::from_slice(line).map_err(|e| anyhow::anyhow!("{index}: line {} is not an artifact: {e}", n + 1))
        })
        .collect()
}

impl Manifest {
    /// Parses a manifest, refusing another format version.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        let manifest: Self =
            serde_json::from_slice(bytes).map_err(|e| anyhow::anyhow!("{MANIFEST_PATH} is not a manifest: {e}"))?;
        if manifest.format_version != FORMAT_VERSION {
            bail!(
                "{MANIFEST_PATH} has format_version {}; this aimesh restores version {FORMAT_VERSION}",
                manifest.format_version
            );
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_reads_back_and_a_changed_artifact_is_named() {
        let artifacts = vec![Artifact::of("a/1", b"one"), Artifact::of("b", b"")];
        let lines = to_lines(&artifacts).expect("lines");
        assert_eq!(from_lines(&lines, "index").expect("read back"), artifacts);
        let error = artifacts[0].check(&Artifact::of("a/1", b"two")).expect_err("changed");
        assert!(error.to_string().starts_with("a/1 does not match the manifest"), "{error}");
        assert!(from_lines(b"{not json}\n", "objects.index.jsonl").is_err());
    }
}
