//! Settings of the files service (`[files]` in the config file, `AIMESH_FILES__*`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use aimesh_kit::config::DatabaseUrls;

/// Where the bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A directory of the local filesystem (`files.fs_root`).
    #[default]
    Fs,
    /// An S3 bucket (`files.s3.*`): AWS, MinIO, SeaweedFS.
    S3,
}

impl Backend {
    /// The spelling in the database's `storage_provider` and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fs => "fs",
            Self::S3 => "s3",
        }
    }
}

/// The S3 bucket of the `s3` backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct S3Config {
    /// Such as `http://127.0.0.1:18333`; none means AWS itself.
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: None,
            bucket: "aimesh-files".into(),
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct FilesConfig {
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// The service's own database: primary, read replicas, direct address for migrations.
    #[serde(flatten)]
    pub database: DatabaseUrls,
    pub backend: Backend,
    /// The directory of the `fs` backend.
    pub fs_root: PathBuf,
    pub s3: S3Config,
    /// Largest file.
    pub max_file_bytes: u64,
    /// Most bytes of live files per project.
    pub project_quota_bytes: u64,
    /// MIME types that may be uploaded: exact (`application/pdf`) or a family (`image/*`).
    pub allowed_types: Vec<String>,
    /// Size of a multipart upload's parts (S3 wants at least 5 MiB); also the most an upload
    /// buffers before the first part is sent.
    pub part_size_bytes: usize,
    /// Base64 of the key (at least 32 bytes) that signs gateway download URLs; defaults to
    /// `auth.link_signing_key`, so every process of a deployment agrees.
    pub url_signing_key: Option<String>,
    /// How often the garbage collector runs.
    pub gc_interval_secs: u64,
    /// How long an object no file uses is kept before the collector deletes it.
    pub gc_grace_secs: u64,
    /// An upload still unfinished after this long is taken for one of a crashed process, and
    /// its object is deleted by the collector.
    pub stale_upload_secs: u64,
    /// Days a file is kept after its upload for a project without a retention of its own; 0
    /// keeps files forever (the default), at most 3650 (docs/retention.md).
    pub default_retention_days: u32,
    /// Time between two retention rounds, 1 to 86400.
    pub retention_interval_secs: u64,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7104)),
            database: DatabaseUrls::default(),
            backend: Backend::Fs,
            fs_root: PathBuf::from(".dev/files"),
            s3: S3Config::default(),
            max_file_bytes: 2 * 1024 * 1024 * 1024,
            project_quota_bytes: 20 * 1024 * 1024 * 1024,
            allowed_types: [
                "image/*",
                "text/*",
                "audio/*",
                "video/*",
                "application/pdf",
                "application/json",
                "application/zip",
                "application/gzip",
                "application/octet-stream",
            ]
            .map(str::to_owned)
            .to_vec(),
            part_size_bytes: 8 * 1024 * 1024,
            url_signing_key: None,
            gc_interval_secs: 300,
            gc_grace_secs: 3600,
            stale_upload_secs: 24 * 3600,
            default_retention_days: 0,
            retention_interval_secs: 3600,
        }
    }
}
