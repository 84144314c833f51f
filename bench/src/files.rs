//! The files scenarios: upload and download throughput through the mesh (S3 backend) beside
//! raw S3 puts and gets of the same bytes through object_store, and the peak memory of this
//! process (the mesh runs in it) while a 1 GiB file is uploaded.

use std::sync::Arc;

use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;

use aimesh_files::storage::ObjectStorage;
use aimesh_proto::files::v1 as files_pb;
use aimesh_proto::identity::v1 as pb;
use aimesh_tests::{Mesh, authed, test_config, use_s3};

use crate::report::{Figures, Load, Pair, measure};

const MIB: usize = 1024 * 1024;
/// The size of each file of the throughput loops.
const FILE_MIB: usize = 16;
/// Uploads or downloads in flight at once (the cap of an open loop): each moves megabytes, so a
/// few fill the machine.
const MAX_IN_FLIGHT: usize = 4;

/// A mesh whose files service stores in the dev S3, an owner and a project.
struct Setup {
    mesh: Mesh,
    token: String,
    project: String,
    storage: ObjectStorage,
}

impl Setup {
    async fn start() -> anyhow::Result<Self> {
        let (mut config, databases) = test_config();
        use_s3(&mut config);
        config.common.log.filter = "warn".into();
        config.common.server.request_timeout_secs = 600;
        config.files.max_file_bytes = 4 * 1024 * MIB as u64;
        config.files.project_quota_bytes = 1 << 40;
        let storage = ObjectStorage::open(&config.files)?;
        let mesh = Mesh::start_with(config, databases).await;
        let owner = mesh.signup("owner").await;
        let request = pb::CreateProjectRequest { name: "bench".into(), description: String::new() };
        let project = mesh.projects().create_project(authed(request, &owner.token)).await?.into_inner().id;
        Ok(Self { mesh, token: owner.token, project, storage })
    }

    /// Deletes every object the run left (the mesh's and the baseline's).
    async fn clean_up(self) -> anyhow::Result<()> {
        for prefix in [self.project.clone(), format!("bench-raw-{}", self.project)] {
            for key in self.storage.keys_under(&prefix).await? {
                self.storage.delete(&key).await?;
            }
        }
        self.mesh.stop().await
    }
}

/// One MiB of content; `n` makes it differ between files so nothing is deduplicated.
fn mib(n: u64, index: usize) -> Vec<u8> {
    let mut bytes = vec![0x5a; MIB];
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    bytes[8..16].copy_from_slice(&(index as u64).to_le_bytes());
    bytes
}

/// Uploads `size_mib` MiB as one file of `project`, made different from others by `n`.
pub async fn upload(
    mut client: FilesClient,
    token: &str,
    project: &str,
    n: u64,
    size_mib: usize,
) -> Result<files_pb::File, tonic::Status> {
    let metadata = files_pb::UploadMetadata {
        project_id: project.to_owned(),
        name: format!("bench-{n}.bin"),
        mime_type: "application/octet-stream".into(),
        ..Default::default()
    };
    let first =
        files_pb::UploadRequest { part: Some(files_pb::upload_request::Part::Metadata(metadata)), finish: false };
    // Generated as they are sent, so the client holds a few chunks at most; the last finishes.
    let chunks = (0..size_mib).map(move |i| files_pb::UploadRequest {
        part: Some(files_pb::upload_request::Part::Chunk(mib(n, i).into())),
        finish: i + 1 == size_mib,
    });
    let messages = futures::stream::iter(std::iter::once(first).chain(chunks));
    client.upload(authed(messages, token)).await.map(tonic::Response::into_inner)
}

type FilesClient = files_pb::file_service_client::FileServiceClient<tonic::transport::Channel>;

/// The peak resident memory of this process so far (VmHWM), in MiB.
pub(crate) fn peak_memory_mib() -> f64 {
    crate::work::memory_mib("self", "VmHWM")
}

fn with_bytes(mut figures: Figures, bytes_per_request: usize) -> Figures {
    figures.mib_per_second = Some(figures.per_second * bytes_per_request as f64 / MIB as f64);
    figures
}

/// Uploads of 16 MiB through the mesh beside raw multipart puts of the same bytes; first, the
/// peak memory during one 1 GiB upload.
pub async fn upload_scenario(load: Load) -> anyhow::Result<Pair> {
    let setup = Setup::start().await?;
    let before = peak_memory_mib();
    let started = std::time::Instant::now();
    let big = upload(setup.mesh.files(), &setup.token, &setup.project, u64::MAX, 1024).await?;
    let seconds = started.elapsed().as_secs_f64();
    let after = peak_memory_mib();
    anyhow::ensure!(big.size_bytes == 1024 * MIB as i64, "the 1 GiB upload stored {} bytes", big.size_bytes);
    let note = format!(
        "1 GiB upload: {:.0} MiB/s; peak RSS (VmHWM) of the bench process, mesh included: {before:.0} MiB before, {after:.0} MiB after",
        1024.0 / seconds
    );

    let load = load.at_most_in_flight(MAX_IN_FLIGHT);
    let shared = Arc::new((setup.mesh.files(), setup.token.clone(), setup.project.clone()));
    let scenario = measure("files.Upload 16 MiB", load, move |n| {
        let shared = Arc::clone(&shared);
        async move {
            let (client, token, project) = &*shared;
            upload(client.clone(), token, project, n, FILE_MIB).await.map(drop).map_err(|s| s.to_string())
        }
    })
    .await;
    let storage = setup.storage.clone();
    let raw_prefix = format!("bench-raw-{}", setup.project);
    let baseline = measure("s3 put 16 MiB (raw)", load, move |n| {
        let (storage, key) = (storage.clone(), format!("{raw_prefix}/{n}"));
        async move {
            let mut writer = storage.writer(&key);
            for i in 0..FILE_MIB {
                writer.write(mib(n, i).into()).await.map_err(|e| e.to_string())?;
            }
            writer.finish().await.map_err(|e| e.to_string())
        }
    })
    .await;
    setup.clean_up().await?;
    Ok(Pair::new(
        with_bytes(scenario, FILE_MIB * MIB),
        with_bytes(baseline, FILE_MIB * MIB),
        "object_store multipart put of the same bytes to the same S3, same part size",
    )
    .with_note(note))
}

/// Downloads of one 16 MiB file through the mesh beside raw gets of its object.
pub async fn download_scenario(load: Load) -> anyhow::Result<Pair> {
    let setup = Setup::start().await?;
    let file = upload(setup.mesh.files(), &setup.token, &setup.project, 1, FILE_MIB).await?;
    let key = setup.storage.keys_under(&setup.project).await?.into_iter().next();
    let key = key.ok_or_else(|| anyhow::anyhow!("the uploaded file has no object"))?;
    let load = load.at_most_in_flight(MAX_IN_FLIGHT);
    let expected = FILE_MIB * MIB;

    let (client, token, file_id) = (setup.mesh.files(), setup.token.clone(), file.id.clone());
    let scenario = measure("files.Download 16 MiB", load, move |_| {
        let (mut client, token, file_id) = (client.clone(), token.clone(), file_id.clone());
        async move {
            let request = files_pb::DownloadRequest { file_id, ..Default::default() };
            let mut stream = client.download(authed(request, &token)).await.map_err(|s| s.to_string())?.into_inner();
            let mut size = 0;
            while let Some(message) = stream.message().await.map_err(|s| s.to_string())? {
                if let Some(files_pb::download_response::Part::Chunk(chunk)) = message.part {
                    size += chunk.len();
                }
            }
            if size == expected { Ok(()) } else { Err(format!("{size} bytes")) }
        }
    })
    .await;
    let store = Arc::clone(setup.storage.object_store());
    let baseline = measure("s3 get 16 MiB (raw)", load, move |_| {
        let (store, path) = (Arc::clone(&store), Path::from(key.as_str()));
        async move {
            let mut stream = store.get(&path).await.map_err(|e| e.to_string())?.into_stream();
            let mut size = 0;
            while let Some(bytes) = stream.next().await {
                size += bytes.map_err(|e| e.to_string())?.len();
            }
            if size == expected { Ok(()) } else { Err(format!("{size} bytes")) }
        }
    })
    .await;
    setup.clean_up().await?;
    Ok(Pair::new(
        with_bytes(scenario, FILE_MIB * MIB),
        with_bytes(baseline, FILE_MIB * MIB),
        "object_store streaming get of the same object from the same S3",
    ))
}
