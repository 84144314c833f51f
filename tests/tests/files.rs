//! The files service end to end, one contract suite run against both backends: the local
//! filesystem and the real S3 server of the test run (SeaweedFS). Each test runs twice, in
//! `fs::` and `s3::`.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tonic::Code;

use aimesh::MeshConfig;
use aimesh_proto::files::v1 as files_pb;
use aimesh_tests::{Account, Mesh, authed, eventually, expect_code, reason_and_field, test_config, use_s3};

const MIB: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Fs,
    S3,
}

/// Runs each named test against both backends.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod fs {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Fs).await })*
        }
        mod s3 {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::S3).await })*
        }
    };
}

contract!(
    round_trip_of_50_mib_streams_and_keeps_the_checksum,
    ranges_serve_exact_bytes,
    same_content_is_stored_once_per_project,
    quota_holds_under_concurrent_uploads,
    interrupted_and_refused_uploads_leave_nothing,
    garbage_collector_removes_unreferenced_objects,
    download_links_work_then_expire,
);

/// A mesh on `backend`, with `tune` applied to its configuration, an owner and a project.
async fn setup(backend: Backend, tune: impl FnOnce(&mut MeshConfig)) -> (Mesh, Account, String) {
    let (mut config, databases) = test_config();
    if backend == Backend::S3 {
        use_s3(&mut config);
    }
    tune(&mut config);
    let mesh = Mesh::start_with(config, databases).await;
    let owner = mesh.signup("owner").await;
    let project = mesh.create_project(&owner, "Files").await;
    (mesh, owner, project)
}

fn metadata(project: &str, name: &str, mime_type: &str) -> files_pb::UploadMetadata {
    files_pb::UploadMetadata {
        project_id: project.into(),
        name: name.into(),
        mime_type: mime_type.into(),
        ..Default::default()
    }
}

/// Deterministic pseudo-random bytes: `seed` picks the content, `index` the chunk.
fn chunk(seed: u64, index: usize, len: usize) -> Vec<u8> {
    let mut state = (seed.wrapping_add(1).wrapping_mul(0x2545_F491_4F6C_DD1D)
        ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Uploads `metadata`, then the chunks `chunks` yields, generated as they are sent.
async fn upload_stream(
    mesh: &Mesh,
    credential: &str,
    metadata: files_pb::UploadMetadata,
    chunks: impl Iterator<Item = Vec<u8>> + Send + 'static,
) -> Result<files_pb::File, tonic::Status> {
    let first =
        files_pb::UploadRequest { part: Some(files_pb::upload_request::Part::Metadata(metadata)), finish: false };
    let rest = chunks.map(|bytes| files_pb::UploadRequest {
        part: Some(files_pb::upload_request::Part::Chunk(bytes.into())),
        finish: false,
    });
    let last = files_pb::UploadRequest { part: None, finish: true };
    let messages = futures::stream::iter(std::iter::once(first).chain(rest).chain(std::iter::once(last)));
    mesh.files().upload(authed(messages, credential)).await.map(tonic::Response::into_inner)
}

async fn upload(
    mesh: &Mesh,
    credential: &str,
    metadata: files_pb::UploadMetadata,
    content: &[u8],
) -> Result<files_pb::File, tonic::Status> {
    let chunks: Vec<Vec<u8>> = content.chunks(64 * 1024).map(<[u8]>::to_vec).collect();
    upload_stream(mesh, credential, metadata, chunks.into_iter()).await
}

/// A download's header and bytes.
async fn download(
    mesh: &Mesh,
    credential: &str,
    request: files_pb::DownloadRequest,
) -> Result<(files_pb::DownloadHeader, Vec<u8>), tonic::Status> {
    let stream = mesh.files().download(authed(request, credential)).await?.into_inner();
    collect(stream).await
}

async fn collect(
    mut stream: tonic::Streaming<files_pb::DownloadResponse>,
) -> Result<(files_pb::DownloadHeader, Vec<u8>), tonic::Status> {
    let mut header = None;
    let mut bytes = Vec::new();
    while let Some(message) = stream.message().await? {
        match message.part {
            Some(files_pb::download_response::Part::Header(h)) => header = Some(h),
            Some(files_pb::download_response::Part::Chunk(chunk)) => {
                assert!(chunk.len() <= MIB, "a chunk of {} bytes", chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            None => panic!("an empty download message"),
        }
    }
    Ok((header.expect("a header first"), bytes))
}

fn whole(file_id: &str) -> files_pb::DownloadRequest {
    files_pb::DownloadRequest { file_id: file_id.into(), ..Default::default() }
}

/// Every object (and, on the fs backend, every staging file) stored for `project`.
async fn objects(mesh: &Mesh, project: &str) -> Vec<String> {
    if mesh.config.files.backend == aimesh_files::config::Backend::Fs {
        let mut found = Vec::new();
        let mut dirs = vec![mesh.config.files.fs_root.join(project)];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() { dirs.push(path) } else { found.push(path.display().to_string()) }
            }
        }
        return found;
    }
    let storage = aimesh_files::storage::ObjectStorage::open(&mesh.config.files).expect("open the store");
    storage.keys_under(project).await.expect("list the bucket")
}

async fn count(mesh: &Mesh, sql: &'static str, project: &str) -> i64 {
    let pool = mesh.files_db().await;
    let n = sqlx::query_scalar(sql).bind(uuid::Uuid::parse_str(project).expect("uuid")).fetch_one(&pool).await;
    pool.close().await;
    n.expect("count")
}

async fn round_trip_of_50_mib_streams_and_keeps_the_checksum(backend: Backend) {
    let (mesh, owner, project) = setup(backend, |_| {}).await;
    let chunks = 50;
    let mut expected = Sha256::new();
    for i in 0..chunks {
        expected.update(chunk(7, i, MIB));
    }
    let expected = hex::encode(expected.finalize());
    let metadata = files_pb::UploadMetadata {
        size_bytes: (chunks * MIB) as i64,
        sha256: expected.clone(),
        ..metadata(&project, "weights.bin", "application/octet-stream")
    };
    let file = upload_stream(&mesh, &owner.token, metadata, (0..chunks).map(|i| chunk(7, i, MIB)))
        .await
        .expect("upload 50 MiB");
    assert_eq!((file.size_bytes, file.sha256.as_str()), ((chunks * MIB) as i64, expected.as_str()));

    // Streamed back and hashed on the fly.
    let mut stream = mesh.files().download(authed(whole(&file.id), &owner.token)).await.expect("download").into_inner();
    let (mut hasher, mut size, mut header) = (Sha256::new(), 0usize, None);
    while let Some(message) = stream.message().await.expect("a message") {
        match message.part.expect("a part") {
            files_pb::download_response::Part::Header(h) => header = Some(h),
            files_pb::download_response::Part::Chunk(bytes) => {
                assert!(bytes.len() <= MIB);
                size += bytes.len();
                hasher.update(&bytes);
            }
        }
    }
    let header = header.expect("header");
    assert_eq!((header.offset, header.length), (0, (chunks * MIB) as i64));
    assert_eq!(size, chunks * MIB);
    assert_eq!(hex::encode(hasher.finalize()), expected);
    assert_eq!(objects(&mesh, &project).await.len(), 1);
}

async fn ranges_serve_exact_bytes(backend: Backend) {
    let (mesh, owner, project) = setup(backend, |_| {}).await;
    let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let file = upload(&mesh, &owner.token, metadata(&project, "data.bin", "application/octet-stream"), &content)
        .await
        .expect("upload");
    let range = |offset, length, suffix_length| files_pb::DownloadRequest {
        file_id: file.id.clone(),
        offset,
        length,
        suffix_length,
    };
    let cases: [(files_pb::DownloadRequest, std::ops::Range<usize>); 5] = [
        (range(100, 50, 0), 100..150),
        (range(9_990, 0, 0), 9_990..10_000),
        (range(9_990, 500, 0), 9_990..10_000),
        (range(0, 0, 10), 9_990..10_000),
        (range(0, 0, 0), 0..10_000),
    ];
    for (request, expected) in cases {
        let (header, bytes) = download(&mesh, &owner.token, request.clone()).await.expect("ranged download");
        assert_eq!(bytes, content[expected.clone()], "{request:?}");
        assert_eq!((header.offset, header.length), (expected.start as i64, expected.len() as i64));
        assert_eq!(header.file.expect("file").size_bytes, 10_000);
    }
    let status =
        expect_code("past the end", Code::InvalidArgument, download(&mesh, &owner.token, range(10_000, 1, 0)).await);
    assert_eq!(reason_and_field(&status), ("RANGE_NOT_SATISFIABLE".into(), Some("offset".into())));
    let status = expect_code("negative", Code::InvalidArgument, download(&mesh, &owner.token, range(-1, 0, 0)).await);
    assert_eq!(reason_and_field(&status).1.as_deref(), Some("offset"));
}

async fn same_content_is_stored_once_per_project(backend: Backend) {
    let (mesh, owner, project) = setup(backend, |_| {}).await;
    let content = b"# Notes\n\nthe same words twice\n".repeat(100);
    let first =
        upload(&mesh, &owner.token, metadata(&project, "a.md", "text/markdown"), &content).await.expect("first");
    let second =
        upload(&mesh, &owner.token, metadata(&project, "b.md", "text/markdown"), &content).await.expect("second");
    assert_ne!(first.id, second.id);
    assert_eq!(first.sha256, second.sha256);
    assert_eq!(objects(&mesh, &project).await.len(), 1, "one object for both");
    let usage = mesh
        .files()
        .get_storage_usage(authed(files_pb::GetStorageUsageRequest { project_id: project.clone() }, &owner.token))
        .await
        .expect("usage")
        .into_inner();
    let size = content.len() as i64;
    assert_eq!((usage.used_bytes, usage.stored_bytes, usage.file_count), (2 * size, size, 2));

    // Another project with the same content gets its own object.
    let other = mesh.create_project(&owner, "Files").await;
    upload(&mesh, &owner.token, metadata(&other, "c.md", "text/markdown"), &content).await.expect("other project");
    assert_eq!(objects(&mesh, &other).await.len(), 1);

    // Deleting one record keeps the object for the other.
    mesh.files()
        .delete_file(authed(files_pb::DeleteFileRequest { file_id: first.id.clone() }, &owner.token))
        .await
        .expect("delete");
    let (_, bytes) = download(&mesh, &owner.token, whole(&second.id)).await.expect("still there");
    assert_eq!(bytes, content);
    expect_code("deleted", Code::NotFound, download(&mesh, &owner.token, whole(&first.id)).await);
}

async fn quota_holds_under_concurrent_uploads(backend: Backend) {
    let quota = 1_000_000u64;
    let (mesh, owner, project) = setup(backend, |config| config.files.project_quota_bytes = quota).await;
    let size = 300_000usize;
    let uploads = (0..8u64).map(|seed| {
        let (mesh, token, project) = (&mesh, owner.token.clone(), project.clone());
        async move {
            let metadata = metadata(&project, &format!("part-{seed}.bin"), "application/octet-stream");
            upload(mesh, &token, metadata, &chunk(seed, 0, size)).await
        }
    });
    let results = futures::future::join_all(uploads).await;
    let stored = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(stored, 3, "exactly what fits: {results:?}");
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert_eq!(reason_and_field(refused).0, "QUOTA_EXCEEDED");
    }
    let used = count(&mesh, "SELECT used_bytes FROM project_storage WHERE project_id = $1", &project).await;
    assert_eq!(used, (3 * size) as i64);
    assert_eq!(objects(&mesh, &project).await.len(), 3, "refused uploads left no object");
    assert_eq!(count(&mesh, "SELECT count(*) FROM pending_uploads WHERE project_id = $1", &project).await, 0);
}

async fn interrupted_and_refused_uploads_leave_nothing(backend: Backend) {
    let (mesh, owner, project) = setup(backend, |config| config.files.max_file_bytes = 8 * MIB as u64).await;

    // A client that goes away in the middle of an upload.
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let mut client = mesh.files();
    let request = authed(tokio_stream::wrappers::ReceiverStream::new(receiver), &owner.token);
    let call = tokio::spawn(async move { client.upload(request).await });
    let first = files_pb::UploadRequest {
        part: Some(files_pb::upload_request::Part::Metadata(metadata(&project, "big.bin", "application/octet-stream"))),
        finish: false,
    };
    sender.send(first).await.expect("send metadata");
    for i in 0..6 {
        let part = files_pb::UploadRequest {
            part: Some(files_pb::upload_request::Part::Chunk(chunk(1, i, MIB).into())),
            finish: false,
        };
        sender.send(part).await.expect("send a chunk");
    }
    eventually("the upload has begun", || async {
        count(&mesh, "SELECT count(*) FROM pending_uploads WHERE project_id = $1", &project).await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.abort();
    drop(sender);
    eventually("the interrupted upload is cleaned up", || async {
        count(&mesh, "SELECT count(*) FROM pending_uploads WHERE project_id = $1", &project).await == 0
            && objects(&mesh, &project).await.is_empty()
    })
    .await;

    // Bad input: a clear error naming the field, and nothing stored.
    let png_named_text = metadata(&project, "photo.png", "image/png");
    let declared_sha =
        files_pb::UploadMetadata { sha256: "00".repeat(32), ..metadata(&project, "a.txt", "text/plain") };
    let declared_big = files_pb::UploadMetadata {
        size_bytes: 9 * MIB as i64,
        ..metadata(&project, "a.bin", "application/octet-stream")
    };
    let cases = [
        (metadata(&project, "../../etc/passwd", "text/plain"), b"root:x:0:0".to_vec(), "INVALID_FIELD", "name"),
        (png_named_text, b"just some text, not a picture".to_vec(), "CONTENT_TYPE_MISMATCH", "mime_type"),
        (metadata(&project, "run.exe", "application/x-msdownload"), b"MZ".to_vec(), "TYPE_NOT_ALLOWED", "mime_type"),
        (declared_sha, b"hello".to_vec(), "CHECKSUM_MISMATCH", "sha256"),
        (declared_big, Vec::new(), "FILE_TOO_LARGE", "size_bytes"),
        (metadata(&project, "a.bin", "application/octet-stream"), chunk(2, 0, 9 * MIB), "FILE_TOO_LARGE", "size_bytes"),
    ];
    for (metadata, content, reason, field) in cases {
        let status = expect_code(reason, Code::InvalidArgument, upload(&mesh, &owner.token, metadata, &content).await);
        assert_eq!(reason_and_field(&status), (reason.to_owned(), Some(field.to_owned())));
    }
    // A stream that ends without `finish` is not a file.
    let unfinished = futures::stream::iter([
        files_pb::UploadRequest {
            part: Some(files_pb::upload_request::Part::Metadata(metadata(&project, "cut.txt", "text/plain"))),
            finish: false,
        },
        files_pb::UploadRequest {
            part: Some(files_pb::upload_request::Part::Chunk(bytes::Bytes::from_static(b"half a fi"))),
            finish: false,
        },
    ]);
    let status =
        expect_code("unfinished", Code::InvalidArgument, mesh.files().upload(authed(unfinished, &owner.token)).await);
    assert_eq!(reason_and_field(&status).1.as_deref(), Some("finish"));
    // The metadata must come first.
    let chunk_first = futures::stream::iter([files_pb::UploadRequest {
        part: Some(files_pb::upload_request::Part::Chunk(bytes::Bytes::from_static(b"x"))),
        finish: true,
    }]);
    let status =
        expect_code("chunk first", Code::InvalidArgument, mesh.files().upload(authed(chunk_first, &owner.token)).await);
    assert_eq!(reason_and_field(&status).1.as_deref(), Some("metadata"));

    assert_eq!(count(&mesh, "SELECT count(*) FROM files WHERE project_id = $1", &project).await, 0);
    assert_eq!(count(&mesh, "SELECT count(*) FROM pending_uploads WHERE project_id = $1", &project).await, 0);
    assert!(objects(&mesh, &project).await.is_empty());
}

async fn garbage_collector_removes_unreferenced_objects(backend: Backend) {
    let (mesh, owner, project) = setup(backend, |config| {
        config.files.gc_interval_secs = 1;
        config.files.gc_grace_secs = 0;
    })
    .await;
    let content = b"%PDF-1.7 a small document".repeat(50);
    let kept =
        upload(&mesh, &owner.token, metadata(&project, "kept.pdf", "application/pdf"), &content).await.expect("kept");
    let gone = upload(&mesh, &owner.token, metadata(&project, "gone.bin", "application/octet-stream"), b"short-lived")
        .await
        .expect("gone");
    assert_eq!(objects(&mesh, &project).await.len(), 2);
    mesh.files()
        .delete_file(authed(files_pb::DeleteFileRequest { file_id: gone.id.clone() }, &owner.token))
        .await
        .expect("delete");
    eventually("the deleted file's object is collected", || async { objects(&mesh, &project).await.len() == 1 }).await;
    assert_eq!(count(&mesh, "SELECT count(*) FROM blobs WHERE project_id = $1", &project).await, 1);
    let (_, bytes) = download(&mesh, &owner.token, whole(&kept.id)).await.expect("the other file");
    assert_eq!(bytes, content);

    // The same content uploaded again, even while the collector runs, gets a usable object.
    for round in 0..5 {
        let again =
            upload(&mesh, &owner.token, metadata(&project, "again.bin", "application/octet-stream"), b"short-lived")
                .await
                .expect("upload again");
        let (_, bytes) = download(&mesh, &owner.token, whole(&again.id)).await.expect("download again");
        assert_eq!(bytes, b"short-lived", "round {round}");
        mesh.files()
            .delete_file(authed(files_pb::DeleteFileRequest { file_id: again.id.clone() }, &owner.token))
            .await
            .expect("delete again");
        tokio::time::sleep(Duration::from_millis(300 * round)).await;
    }
    eventually("only the kept file's object remains", || async { objects(&mesh, &project).await.len() == 1 }).await;
}

async fn download_links_work_then_expire(backend: Backend) {
    let (mesh, owner, project) = setup(backend, |_| {}).await;
    let content = b"a linked file\n".repeat(10);
    let file =
        upload(&mesh, &owner.token, metadata(&project, "linked.txt", "text/plain"), &content).await.expect("upload");
    let link = mesh
        .files()
        .create_download_url(authed(
            files_pb::CreateDownloadUrlRequest { file_id: file.id.clone(), expires_in_seconds: 3 },
            &owner.token,
        ))
        .await
        .expect("link")
        .into_inner();
    let fetch = || async {
        match backend {
            Backend::S3 => {
                let response = reqwest::get(&link.url).await.expect("GET the presigned URL");
                let status = response.status().as_u16();
                (status, response.bytes().await.expect("body").to_vec())
            }
            Backend::Fs => {
                assert_eq!(link.url, format!("/v1/files/signed/{}", link.token));
                let request = files_pb::DownloadSignedRequest { token: link.token.clone(), ..Default::default() };
                match mesh.files().download_signed(request).await {
                    Ok(stream) => match collect(stream.into_inner()).await {
                        Ok((_, bytes)) => (200, bytes),
                        Err(status) => (403, status.message().as_bytes().to_vec()),
                    },
                    Err(status) => {
                        assert_eq!(reason_and_field(&status).0, "LINK_INVALID");
                        (403, Vec::new())
                    }
                }
            }
        }
    };
    let (status, bytes) = fetch().await;
    assert_eq!((status, bytes), (200, content.clone()));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (status, _) = fetch().await;
    assert_eq!(status, 403, "the link has expired");

    let refused = mesh
        .files()
        .create_download_url(authed(
            files_pb::CreateDownloadUrlRequest { file_id: file.id.clone(), expires_in_seconds: 8 * 24 * 3600 },
            &owner.token,
        ))
        .await;
    let status = expect_code("too long", Code::InvalidArgument, refused);
    assert_eq!(reason_and_field(&status).1.as_deref(), Some("expires_in_seconds"));
}
