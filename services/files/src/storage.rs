//! The object store behind one interface: the local filesystem or S3 (object_store). Every
//! upload writes a fresh key, `{project_id}/{uuid}`, so two uploads never share an object until
//! the database says they do (deduplication happens in the commit, see `store`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::RetryConfig;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::signer::{SignedUrlOptions, Signer};
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::config::{Backend, FilesConfig};

/// Parts of a multipart upload sent at once; with the part size this bounds an upload's memory.
const UPLOAD_CONCURRENCY: usize = 2;

/// The object store of the deployment. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ObjectStorage {
    store: Arc<dyn ObjectStore>,
    /// The same store, typed, for presigned URLs.
    s3: Option<Arc<AmazonS3>>,
    backend: Backend,
    part_size: usize,
}

/// Retries of an S3 request: object_store's default keeps retrying an unreachable server for
/// 3 minutes, far past any request's deadline, holding the upload's locks meanwhile; a few
/// quick retries ride out a blip and then the caller gets UNAVAILABLE.
static S3_RETRY: std::sync::LazyLock<RetryConfig> = std::sync::LazyLock::new(|| RetryConfig {
    max_retries: 3,
    retry_timeout: Duration::from_secs(10),
    ..RetryConfig::default()
});

impl ObjectStorage {
    /// Opens the backend `config` names; the fs root is created if missing.
    pub fn open(config: &FilesConfig) -> anyhow::Result<Self> {
        let part_size = config.part_size_bytes.max(5 * 1024 * 1024);
        match config.backend {
            Backend::Fs => {
                std::fs::create_dir_all(&config.fs_root)
                    .with_context(|| format!("creating files.fs_root {}", config.fs_root.display()))?;
                let store = LocalFileSystem::new_with_prefix(&config.fs_root)
                    .with_context(|| format!("opening files.fs_root {}", config.fs_root.display()))?
                    .with_automatic_cleanup(true);
                Ok(Self { store: Arc::new(store), s3: None, backend: Backend::Fs, part_size })
            }
            Backend::S3 => {
                let s3 = &config.s3;
                let mut builder = AmazonS3Builder::new()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region)
                    .with_retry(S3_RETRY.clone());
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
                }
                if let (Some(id), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) {
                    builder = builder.with_access_key_id(id).with_secret_access_key(secret);
                }
                let store = Arc::new(builder.build().context("configuring the files.s3 backend")?);
                Ok(Self { store: store.clone(), s3: Some(store), backend: Backend::S3, part_size })
            }
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The store itself, for tests and benchmarks that look underneath.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// A key no other upload uses.
    pub fn new_key(project_id: Uuid) -> String {
        format!("{project_id}/{}", Uuid::now_v7())
    }

    /// A streaming writer of a new object at `key`: small objects are one PUT, larger ones a
    /// multipart upload of `part_size` parts, at most [`UPLOAD_CONCURRENCY`] in flight.
    pub fn writer(&self, key: &str) -> ObjectWriter {
        let writer = BufWriter::with_capacity(Arc::clone(&self.store), Path::from(key), self.part_size)
            .with_max_concurrency(UPLOAD_CONCURRENCY);
        ObjectWriter { inner: writer, finishing: false }
    }

    /// `length` bytes of the object at `key` from `offset`, as they arrive.
    pub async fn read(
        &self,
        key: &str,
        offset: u64,
        length: u64,
    ) -> Result<BoxStream<'static, Result<Bytes, object_store::Error>>, object_store::Error> {
        if length == 0 {
            return Ok(futures::stream::empty().boxed());
        }
        let options = GetOptions::new().with_range(Some(GetRange::Bounded(offset..offset + length)));
        Ok(self.store.get_opts(&Path::from(key), options).await?.into_stream())
    }

    /// The keys of every object under `prefix` (such as a project id), for checks and tests.
    pub async fn keys_under(&self, prefix: &str) -> Result<Vec<String>, object_store::Error> {
        let listed: Vec<_> = self.store.list(Some(&Path::from(prefix))).collect().await;
        listed.into_iter().map(|meta| meta.map(|meta| meta.location.to_string())).collect()
    }

    /// Deletes the object at `key`; one that is already gone is fine.
    pub async fn delete(&self, key: &str) -> Result<(), object_store::Error> {
        match self.store.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// A presigned GET URL of the object at `key`, where the backend has them (S3), that
    /// downloads it as `file_name`.
    pub async fn presign(
        &self,
        key: &str,
        file_name: &str,
        expires_in: Duration,
    ) -> Result<Option<String>, object_store::Error> {
        let Some(s3) = &self.s3 else { return Ok(None) };
        let path = Path::from(key);
        let disposition = crate::content_disposition(file_name);
        let options = SignedUrlOptions::new().with_query([("response-content-disposition", disposition)]);
        let url = match s3.signed_url_opts(http::Method::GET, &path, expires_in, &options).await {
            Err(object_store::Error::NotSupported { .. }) => {
                s3.signed_url(http::Method::GET, &path, expires_in).await?
            }
            other => other?,
        };
        Ok(Some(url.to_string()))
    }
}

/// An object being written; [`ObjectWriter::finish`] makes it visible, [`ObjectWriter::abort`]
/// drops what was written.
pub struct ObjectWriter {
    inner: BufWriter,
    /// Whether `finish` began: the multipart upload then belongs to the finishing step and
    /// `BufWriter::abort` would panic, so an unfinished object is left to the collector.
    finishing: bool,
}

impl ObjectWriter {
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), object_store::Error> {
        self.inner.put(bytes).await
    }

    pub async fn finish(&mut self) -> Result<(), object_store::Error> {
        self.finishing = true;
        self.inner
            .shutdown()
            .await
            .map_err(|error| object_store::Error::Generic { store: "writer", source: Box::new(error) })
    }

    pub async fn abort(&mut self) -> Result<(), object_store::Error> {
        if self.finishing {
            let reason = std::io::Error::other("the upload failed while completing; it cannot be aborted");
            return Err(object_store::Error::Generic { store: "writer", source: Box::new(reason) });
        }
        self.inner.abort().await
    }
}
