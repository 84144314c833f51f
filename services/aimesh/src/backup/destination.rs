//! Where a backup lives: a directory or `s3://bucket/prefix`, seen as one object store, and the
//! same place as ClickHouse's BACKUP names it (`File(...)` or `S3(...)`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use aimesh_files::config::S3Config;

use super::manifest::Artifact;

/// Size of the parts a large artifact is uploaded in (S3 wants at least 5 MiB).
const PART_BYTES: usize = 8 * 1024 * 1024;

/// A backup's place, opened.
#[derive(Debug, Clone)]
pub struct Destination {
    /// Everything under the backup's root.
    store: Arc<dyn ObjectStore>,
    kind: Kind,
    /// As the operator gave it, for messages.
    spelled: String,
}

#[derive(Debug, Clone)]
enum Kind {
    /// An absolute directory.
    Dir(PathBuf),
    /// The HTTP URL of the backup's root (`{endpoint}/{bucket}/{prefix}`) and static
    /// credentials, if any, as ClickHouse's `S3()` takes them.
    S3 { url: String, credentials: Option<(String, String)> },
}

impl Destination {
    /// Opens `spelled`: `s3://bucket/prefix` (credentials, region and endpoint from the usual
    /// `AWS_*` variables, else from the files service's `files.s3` settings) or a directory
    /// (created if `create`).
    pub fn open(spelled: &str, files_s3: &S3Config, create: bool) -> anyhow::Result<Self> {
        if spelled.is_empty() {
            bail!("the destination is empty: give a directory or s3://bucket/prefix");
        }
        // They would end ClickHouse's quoted path or be taken for a query parameter.
        if spelled.contains(['\'', '\\', '?']) {
            bail!("the destination {spelled:?} contains a quote, a backslash or a question mark");
        }
        if let Some(rest) = spelled.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/');
            if bucket.is_empty() {
                bail!("the destination {spelled:?} names no bucket");
            }
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            let missing = |builder: &AmazonS3Builder, key| builder.get_config_value(&key).is_none();
            if missing(&builder, AmazonS3ConfigKey::Endpoint)
                && let Some(endpoint) = &files_s3.endpoint
            {
                builder = builder.with_endpoint(endpoint);
            }
            if missing(&builder, AmazonS3ConfigKey::Region) {
                builder = builder.with_region(&files_s3.region);
            }
            if missing(&builder, AmazonS3ConfigKey::AccessKeyId)
                && let (Some(id), Some(secret)) = (&files_s3.access_key_id, &files_s3.secret_access_key)
            {
                builder = builder.with_access_key_id(id).with_secret_access_key(secret);
            }
            let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
            if endpoint.as_deref().is_some_and(|e| e.starts_with("http://")) {
                builder = builder.with_allow_http(true);
            }
            let region = builder.get_config_value(&AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
            let root = match &endpoint {
                Some(endpoint) => format!("{}/{bucket}", endpoint.trim_end_matches('/')),
                None => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            };
            let url = if prefix.is_empty() { root } else { format!("{root}/{prefix}") };
            let credentials = builder
                .get_config_value(&AmazonS3ConfigKey::AccessKeyId)
                .zip(builder.get_config_value(&AmazonS3ConfigKey::SecretAccessKey));
            let s3 = builder.build().with_context(|| format!("configuring S3 for {spelled}"))?;
            let store: Arc<dyn ObjectStore> = Arc::new(PrefixStore::new(s3, prefix));
            return Ok(Self { store, kind: Kind::S3 { url, credentials }, spelled: spelled.to_owned() });
        }
        let dir = PathBuf::from(spelled);
        if create {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating the directory {spelled}"))?;
        }
        let dir = std::fs::canonicalize(&dir).with_context(|| format!("opening the directory {spelled}"))?;
        let store =
            LocalFileSystem::new_with_prefix(&dir).with_context(|| format!("opening the directory {spelled}"))?;
        Ok(Self { store: Arc::new(store), kind: Kind::Dir(dir), spelled: spelled.to_owned() })
    }

    /// The destination as the operator spelled it.
    pub fn spelled(&self) -> &str {
        &self.spelled
    }

    /// The store of everything in the backup.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// ClickHouse's name of the place `path` (relative to the backup's root), for BACKUP and
    /// RESTORE: `File('/abs/dir/path')` or `S3('url/path'[, 'key', 'secret'])`.
    pub fn clickhouse_target(&self, path: &str) -> String {
        match &self.kind {
            Kind::Dir(dir) => format!("File('{}')", dir.join(path).display()),
            Kind::S3 { url, credentials: Some((id, secret)) } => format!("S3('{url}/{path}', '{id}', '{secret}')"),
            Kind::S3 { url, credentials: None } => format!("S3('{url}/{path}')"),
        }
    }

    /// Whether nothing is stored under the backup's root yet.
    pub async fn is_empty(&self) -> anyhow::Result<bool> {
        let first = self.store.list(None).next().await.transpose();
        Ok(first.with_context(|| format!("listing {}", self.spelled))?.is_none())
    }

    /// Writes `chunks` as the artifact `path`, hashing as it goes.
    pub async fn write_stream<S, E>(&self, path: &str, chunks: S) -> anyhow::Result<Artifact>
    where
        S: futures::Stream<Item = Result<Bytes, E>>,
        E: Into<anyhow::Error>,
    {
        write_to(&self.store, path, chunks).await.with_context(|| format!("writing {path} to {}", self.spelled))
    }

    /// Writes `bytes` as the artifact `path`.
    pub async fn write(&self, path: &str, bytes: Vec<u8>) -> anyhow::Result<Artifact> {
        let chunks = futures::stream::iter([Ok::<_, std::convert::Infallible>(Bytes::from(bytes))]);
        self.write_stream(path, chunks).await
    }

    /// The whole artifact `expected.path`, checked against `expected`.
    pub async fn read(&self, expected: &Artifact) -> anyhow::Result<Vec<u8>> {
        let bytes = self.read_unchecked(&expected.path).await?;
        expected.check(&Artifact::of(&expected.path, &bytes))?;
        Ok(bytes)
    }

    /// The whole artifact `path`, as stored (the manifest, which nothing vouches for).
    pub async fn read_unchecked(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        let mut chunks = self.chunks(path).await?;
        while let Some(chunk) = chunks.next().await {
            bytes.extend_from_slice(&chunk.with_context(|| format!("reading {path}"))?);
        }
        Ok(bytes)
    }

    /// The artifact `path` as it is read.
    pub async fn chunks(
        &self,
        path: &str,
    ) -> anyhow::Result<futures::stream::BoxStream<'static, Result<Bytes, object_store::Error>>> {
        let found = self.store.get(&Path::from(path)).await;
        Ok(found.with_context(|| format!("reading {path} from {}", self.spelled))?.into_stream())
    }

    /// Hashes the stored artifact `expected.path` and compares.
    pub async fn verify(&self, expected: &Artifact) -> anyhow::Result<()> {
        let actual = hash_stream(&expected.path, self.chunks(&expected.path).await?).await?;
        expected.check(&actual)
    }

    /// Every artifact under `prefix`, hashed, in path order.
    pub async fn hash_all(&self, prefix: &str) -> anyhow::Result<Vec<Artifact>> {
        let listed: Vec<_> = self.store.list(Some(&Path::from(prefix))).collect().await;
        let mut paths = listed
            .into_iter()
            .map(|meta| meta.map(|meta| meta.location.to_string()))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("listing {prefix} in {}", self.spelled))?;
        paths.sort();
        let mut artifacts = Vec::with_capacity(paths.len());
        for path in paths {
            artifacts.push(hash_stream(&path, self.chunks(&path).await?).await?);
        }
        Ok(artifacts)
    }
}

/// Writes `chunks` to `store` at `path` (one PUT, or a multipart upload when large).
pub async fn write_to<S, E>(store: &Arc<dyn ObjectStore>, path: &str, chunks: S) -> anyhow::Result<Artifact>
where
    S: futures::Stream<Item = Result<Bytes, E>>,
    E: Into<anyhow::Error>,
{
    let mut writer = BufWriter::with_capacity(Arc::clone(store), Path::from(path), PART_BYTES);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut chunks = std::pin::pin!(chunks);
    while let Some(chunk) = chunks.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(error) => {
                let _ = writer.abort().await;
                return Err(error.into());
            }
        };
        hasher.update(&chunk);
        size += chunk.len() as u64;
        if let Err(error) = writer.put(chunk).await {
            let _ = writer.abort().await;
            return Err(error.into());
        }
    }
    writer.shutdown().await?;
    Ok(Artifact { path: path.to_owned(), size, sha256: hex::encode(hasher.finalize()) })
}

/// The size and sha256 of what `chunks` yields, as the artifact `path`.
async fn hash_stream<S>(path: &str, chunks: S) -> anyhow::Result<Artifact>
where
    S: futures::Stream<Item = Result<Bytes, object_store::Error>>,
{
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut chunks = std::pin::pin!(chunks);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.with_context(|| format!("reading {path}"))?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
    }
    Ok(Artifact { path: path.to_owned(), size, sha256: hex::encode(hasher.finalize()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clickhouse_names_the_same_place() {
        let s3 = S3Config {
            endpoint: Some("http://127.0.0.1:18333".into()),
            access_key_id: Some("id".into()),
            secret_access_key: Some("secret".into()),
            ..S3Config::default()
        };
        let destination = Destination::open("s3://backups/aimesh/2026-12-07", &s3, false).expect("open");
        assert_eq!(
            destination.clickhouse_target("clickhouse"),
            "S3('http://127.0.0.1:18333/backups/aimesh/2026-12-07/clickhouse', 'id', 'secret')"
        );
    }

    #[test]
    fn a_quote_or_an_empty_bucket_is_refused() {
        let s3 = S3Config::default();
        assert!(Destination::open("/tmp/it's", &s3, false).is_err());
        assert!(Destination::open("s3:///prefix", &s3, false).is_err());
        assert!(Destination::open("", &s3, false).is_err());
    }
}
