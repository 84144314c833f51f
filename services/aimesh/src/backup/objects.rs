//! The files service's objects: every object of its store copied under `objects/<key>`, with
//! an index of keys, sizes and sha256s, and copied back on restore.

use std::sync::Arc;

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use aimesh_files::FilesConfig;
use aimesh_files::storage::ObjectStorage;

use super::destination::{Destination, write_to};
use super::manifest::{Artifact, ObjectsCopy, to_lines};

/// Where the objects go, under the backup's root.
pub const OBJECTS_DIR: &str = "objects";
/// The list of the objects with their sha256.
pub const OBJECTS_INDEX: &str = "objects.index.jsonl";
/// Objects copied at once.
const CONCURRENCY: usize = 8;

fn in_backup(key: &str) -> String {
    format!("{OBJECTS_DIR}/{key}")
}

/// Copies every object of the files store into `destination`.
pub async fn backup(config: &FilesConfig, destination: &Destination) -> anyhow::Result<ObjectsCopy> {
    let storage = ObjectStorage::open(config)?;
    let source = Arc::clone(storage.object_store());
    let listed: Vec<_> = source.list(None).collect().await;
    let mut keys = listed
        .into_iter()
        .map(|m| m.map(|m| m.location))
        .collect::<Result<Vec<_>, _>>()
        .context("listing the files store")?;
    keys.sort();
    let copied: Vec<Artifact> = futures::stream::iter(keys)
        .map(|key| {
            let (source, target) = (Arc::clone(&source), Arc::clone(destination.store()));
            async move { copy(&source, &key, &target, &in_backup(key.as_ref())).await }
        })
        .buffered(CONCURRENCY)
        .try_collect()
        .await?;
    // The index names each object by its key in the files store.
    let index: Vec<Artifact> =
        copied.into_iter().map(|a| Artifact { path: a.path[OBJECTS_DIR.len() + 1..].to_owned(), ..a }).collect();
    let bytes = index.iter().map(|a| a.size).sum();
    let count = index.len() as u64;
    let index_artifact = destination.write(OBJECTS_INDEX, to_lines(&index)?).await?;
    Ok(ObjectsCopy { backend: storage.backend().as_str().to_owned(), count, bytes, index: index_artifact })
}

async fn copy(
    source: &Arc<dyn ObjectStore>,
    key: &Path,
    target: &Arc<dyn ObjectStore>,
    target_key: &str,
) -> anyhow::Result<Artifact> {
    let read = source.get(key).await.with_context(|| format!("reading the object {key}"))?;
    write_to(target, target_key, read.into_stream()).await.with_context(|| format!("copying the object {key}"))
}

/// Checks every object of the backup against `index`.
pub async fn verify(destination: &Destination, index: &[Artifact]) -> anyhow::Result<()> {
    futures::stream::iter(index)
        .map(|object| async move {
            let stored = Artifact { path: in_backup(&object.path), ..object.clone() };
            destination.verify(&stored).await
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await
}

/// Copies the objects of `index` into the files store, refusing a store that holds objects
/// unless `force` (objects of the same key are then replaced; others are left).
pub async fn restore(
    config: &FilesConfig,
    destination: &Destination,
    index: &[Artifact],
    force: bool,
) -> anyhow::Result<()> {
    let storage = ObjectStorage::open(config)?;
    let target = Arc::clone(storage.object_store());
    let first = target.list(None).next().await.transpose().context("listing the files store")?;
    if let Some(object) = first
        && !force
    {
        bail!(
            "the files store ({}) already holds objects ({} and maybe more): restore into an empty one, or pass \
             --force",
            storage.backend().as_str(),
            object.location
        );
    }
    futures::stream::iter(index)
        .map(|object| {
            let (source, target) = (Arc::clone(destination.store()), Arc::clone(&target));
            async move {
                let copied = copy(&source, &Path::from(in_backup(&object.path)), &target, &object.path).await?;
                object.check(&copied)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await
}
