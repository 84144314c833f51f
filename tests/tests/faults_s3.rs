//! Fault: the S3 server stops during an upload. The files service reaches the test run's S3
//! through a proxy the test cuts after the first 5 MiB multipart part went out (the shared server
//! keeps serving the other tests): the upload fails with UNAVAILABLE, and nothing is
//! half-written: no object in the bucket, no file row, no bytes counted against the quota; an upload succeeds once S3 is back.

use std::time::Duration;

use tonic::Code;

use aimesh_kit::testing::{CuttableProxy, authority_of};
use aimesh_proto::files::v1 as files_pb;
use aimesh_proto::identity::v1 as pb;
use aimesh_tests::{Mesh, authed, expect_code, test_config, use_s3};

const MIB: usize = 1024 * 1024;

async fn count(mesh: &Mesh, sql: &'static str, project: &str) -> i64 {
    let pool = mesh.files_db().await;
    let n = sqlx::query_scalar(sql).bind(uuid::Uuid::parse_str(project).expect("uuid")).fetch_one(&pool).await;
    pool.close().await;
    n.expect("count")
}

/// An upload in progress: metadata sent, chunks sent as the test chooses.
struct UploadInProgress {
    sender: tokio::sync::mpsc::Sender<files_pb::UploadRequest>,
    call: tokio::task::JoinHandle<Result<tonic::Response<files_pb::File>, tonic::Status>>,
}

impl UploadInProgress {
    /// Starts uploading `name` (binary) into `project` and sends its metadata.
    async fn start(mesh: &Mesh, token: &str, project: &str, name: &str) -> Self {
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        let request = authed(tokio_stream::wrappers::ReceiverStream::new(receiver), token);
        let mut client = mesh.files();
        let call = tokio::spawn(async move { client.upload(request).await });
        let metadata = files_pb::UploadMetadata {
            project_id: project.to_owned(),
            name: name.into(),
            mime_type: "application/octet-stream".into(),
            ..Default::default()
        };
        let first =
            files_pb::UploadRequest { part: Some(files_pb::upload_request::Part::Metadata(metadata)), finish: false };
        sender.send(first).await.expect("send metadata");
        Self { sender, call }
    }

    /// Sends chunk `i` (1 MiB of the byte `i`); false when the service stopped reading.
    async fn chunk(&self, i: u8) -> bool {
        let part = files_pb::UploadRequest {
            part: Some(files_pb::upload_request::Part::Chunk(vec![i; MIB].into())),
            finish: false,
        };
        self.sender.send(part).await.is_ok()
    }

    /// Sends the end (if the service still reads) and returns the call, not yet awaited.
    async fn finish(self) -> tokio::task::JoinHandle<Result<tonic::Response<files_pb::File>, tonic::Status>> {
        let _ = self.sender.send(files_pb::UploadRequest { part: None, finish: true }).await;
        self.call
    }
}

/// Uploads 20 MiB as `name` (a multipart upload of 5 MiB parts).
async fn upload_whole(mesh: &Mesh, token: &str, project: &str, name: &str) -> Result<files_pb::File, tonic::Status> {
    let upload = UploadInProgress::start(mesh, token, project, name).await;
    for i in 0..20u8 {
        assert!(upload.chunk(i).await, "send a chunk");
    }
    upload.finish().await.await.expect("join").map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_stopped_during_an_upload_is_unavailable_and_leaves_nothing_half_written() {
    let (mut config, databases) = test_config();
    use_s3(&mut config);
    let direct = config.files.clone();
    let endpoint = direct.s3.endpoint.clone().expect("s3 endpoint");
    let proxy = CuttableProxy::start(&authority_of(&endpoint)).await;
    config.files.s3.endpoint = Some(proxy.rewrite(&endpoint, &authority_of(&endpoint)));
    config.files.part_size_bytes = 5 * MIB;
    let mesh = Mesh::start_with(config, databases).await;
    let owner = mesh.signup("owner").await;
    let request = pb::CreateProjectRequest { name: "Files".into(), description: String::new() };
    let project =
        mesh.projects().create_project(authed(request, &owner.token)).await.expect("create project").into_inner().id;

    let upload = UploadInProgress::start(&mesh, &owner.token, &project, "weights.bin").await;
    // 8 MiB: the first 5 MiB part goes to S3 while S3 still answers.
    for i in 0..8u8 {
        assert!(upload.chunk(i).await, "send a chunk");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set_down(true);
    // The rest of the file, then the end; the service may refuse before it has read it all.
    for i in 8..12u8 {
        if !upload.chunk(i).await {
            break;
        }
    }
    let call = upload.finish().await;
    let answer =
        tokio::time::timeout(Duration::from_secs(60), call).await.expect("the upload is answered").expect("join");
    let status = expect_code("upload while s3 is away", Code::Unavailable, answer);
    assert!(!status.message().is_empty(), "{status:?}");

    // Nothing half-written, neither while S3 is away nor once it is back.
    assert_eq!(count(&mesh, "SELECT count(*) FROM files WHERE project_id = $1", &project).await, 0);
    proxy.set_down(false);
    let storage = aimesh_files::storage::ObjectStorage::open(&direct).expect("open the store");
    assert_eq!(storage.keys_under(&project).await.expect("list the bucket"), Vec::<String>::new());
    assert_eq!(count(&mesh, "SELECT count(*) FROM files WHERE project_id = $1", &project).await, 0);
    let used: i64 =
        count(&mesh, "SELECT COALESCE((SELECT used_bytes FROM project_storage WHERE project_id = $1), 0)", &project)
            .await;
    assert_eq!(used, 0, "no bytes counted against the quota");
    // The same upload succeeds once S3 is back.
    let file = upload_whole(&mesh, &owner.token, &project, "after.bin").await.expect("upload after s3 returned");
    assert_eq!(file.size_bytes, 20 * MIB as i64);
    assert_eq!(count(&mesh, "SELECT count(*) FROM files WHERE project_id = $1", &project).await, 1);
}
