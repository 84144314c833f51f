//! Files across the mesh: who may touch a project's files, and chat attachments (checked by
//! files when a message names them, released when the session is purged, then collected).

use std::time::Duration;

use aimesh_proto::chat::v1 as chat_pb;
use aimesh_proto::files::v1 as files_pb;
use aimesh_proto::identity::v1 as pb;
use aimesh_tests::{Mesh, authed, expect_code, reason_and_field, test_config};
use tonic::Code;

async fn upload(
    mesh: &Mesh,
    credential: &str,
    project: &str,
    name: &str,
    purpose: files_pb::FilePurpose,
    content: &[u8],
) -> Result<files_pb::File, tonic::Status> {
    let metadata = files_pb::UploadMetadata {
        project_id: project.into(),
        name: name.into(),
        mime_type: "text/plain".into(),
        purpose: purpose.into(),
        ..Default::default()
    };
    let messages = [
        files_pb::UploadRequest { part: Some(files_pb::upload_request::Part::Metadata(metadata)), finish: false },
        files_pb::UploadRequest {
            part: Some(files_pb::upload_request::Part::Chunk(bytes::Bytes::copy_from_slice(content))),
            finish: true,
        },
    ];
    mesh.files().upload(authed(futures::stream::iter(messages), credential)).await.map(tonic::Response::into_inner)
}

async fn get_file(mesh: &Mesh, credential: &str, id: &str) -> Result<files_pb::File, tonic::Status> {
    let request = files_pb::GetFileRequest { file_id: id.into() };
    mesh.files().get_file(authed(request, credential)).await.map(tonic::Response::into_inner)
}

async fn blobs(mesh: &Mesh, project: &str) -> i64 {
    let pool = mesh.files_db().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM blobs WHERE project_id = $1::uuid")
        .bind(project)
        .fetch_one(&pool)
        .await
        .expect("count blobs");
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_reaches_another_projects_files_and_keys_need_their_scope() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let eve = mesh.signup("eve").await;
    let project = mesh.create_project(&ann, "Ann's").await;
    let file = upload(&mesh, &ann.token, &project, "notes.txt", files_pb::FilePurpose::Library, b"private notes")
        .await
        .expect("upload");
    assert_eq!(file.display_name, "notes.txt");
    assert_eq!(file.purpose, files_pb::FilePurpose::Library as i32);

    // A stranger learns nothing: the file is not found, the project is not theirs.
    let status = expect_code("eve reads", Code::NotFound, get_file(&mesh, &eve.token, &file.id).await);
    assert_eq!(reason_and_field(&status).0, "FILE_NOT_FOUND");
    let list = files_pb::ListFilesRequest { project_id: project.clone(), ..Default::default() };
    expect_code("eve lists", Code::PermissionDenied, mesh.files().list_files(authed(list.clone(), &eve.token)).await);
    expect_code(
        "eve uploads",
        Code::PermissionDenied,
        upload(&mesh, &eve.token, &project, "x.txt", files_pb::FilePurpose::Library, b"x").await,
    );
    let delete = files_pb::DeleteFileRequest { file_id: file.id.clone() };
    expect_code("eve deletes", Code::NotFound, mesh.files().delete_file(authed(delete.clone(), &eve.token)).await);

    // A key with files:read reads but does not write.
    let key = pb::CreateApiKeyRequest {
        project_id: project.clone(),
        name: "reader".into(),
        scopes: vec!["files:read".into()],
        expire_time: None,
        requests_per_minute: 0,
        project_owned: false,
    };
    let secret = mesh.api_keys().create_api_key(authed(key, &ann.token)).await.expect("key").into_inner().secret;
    assert_eq!(get_file(&mesh, &secret, &file.id).await.expect("key reads").id, file.id);
    let listed = mesh.files().list_files(authed(list, &secret)).await.expect("key lists").into_inner();
    assert_eq!(listed.files.len(), 1);
    expect_code(
        "key uploads",
        Code::PermissionDenied,
        upload(&mesh, &secret, &project, "y.txt", files_pb::FilePurpose::Library, b"y").await,
    );
    expect_code("key deletes", Code::PermissionDenied, mesh.files().delete_file(authed(delete, &secret)).await);

    // Rename keeps the original name and makes a safe one.
    let update = files_pb::UpdateFileRequest {
        file_id: file.id.clone(),
        file: Some(files_pb::File { display_name: "Q1: plan?.txt".into(), ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["display_name".into()] }),
    };
    let renamed = mesh.files().update_file(authed(update, &ann.token)).await.expect("rename").into_inner();
    assert_eq!(
        (renamed.display_name.as_str(), renamed.original_name.as_str(), renamed.safe_name.as_str()),
        ("Q1: plan?.txt", "notes.txt", "Q1_ plan_.txt")
    );

    // The internal attachment RPCs take only the service token.
    let attach = files_pb::AttachFilesRequest {
        project_id: project.clone(),
        session_id: uuid::Uuid::new_v4().to_string(),
        file_ids: vec![file.id.clone()],
    };
    expect_code(
        "a person attaches",
        Code::PermissionDenied,
        mesh.attachments().attach_files(authed(attach, &ann.token)).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_attachments_are_checked_linked_and_released_with_the_session() {
    let (mut config, databases) = test_config();
    config.files.gc_interval_secs = 1;
    config.files.gc_grace_secs = 0;
    let mesh = Mesh::start_with(config, databases).await;
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "Chats").await;
    let foreign_project = mesh.create_project(&ann, "Elsewhere").await;
    let attachment = upload(&mesh, &ann.token, &project, "photo.txt", files_pb::FilePurpose::Attachment, b"for chat")
        .await
        .expect("attachment");
    let library = upload(&mesh, &ann.token, &project, "manual.txt", files_pb::FilePurpose::Library, b"keep me")
        .await
        .expect("library file");
    let foreign = upload(&mesh, &ann.token, &foreign_project, "other.txt", files_pb::FilePurpose::Attachment, b"else")
        .await
        .expect("foreign file");

    let session = mesh
        .chat()
        .create_session(authed(
            chat_pb::CreateSessionRequest { project_id: project.clone(), model: "gpt-4o".into(), ..Default::default() },
            &ann.token,
        ))
        .await
        .expect("session")
        .into_inner();
    let message = |attachment_ids: Vec<String>| chat_pb::AppendMessageRequest {
        session_id: session.id.clone(),
        role: chat_pb::MessageRole::User.into(),
        content: "see attached".into(),
        attachment_ids,
        ..Default::default()
    };

    // Unknown and foreign files are refused, naming the field; nothing is stored.
    for refused in [uuid::Uuid::new_v4().to_string(), foreign.id.clone()] {
        let status = expect_code(
            "a file that is not the project's",
            Code::NotFound,
            mesh.chat().append_message(authed(message(vec![refused]), &ann.token)).await,
        );
        assert_eq!(reason_and_field(&status), ("FILE_NOT_FOUND".into(), Some("attachment_ids".into())));
    }
    let appended = mesh
        .chat()
        .append_message(authed(message(vec![attachment.id.clone(), library.id.clone()]), &ann.token))
        .await
        .expect("append with attachments")
        .into_inner();
    assert_eq!(appended.sequence, 1, "the refused appends stored nothing");
    assert_eq!(
        get_file(&mesh, &ann.token, &attachment.id).await.expect("linked").session_ids,
        vec![session.id.clone()]
    );
    let listed = mesh
        .files()
        .list_files(authed(
            files_pb::ListFilesRequest {
                project_id: project.clone(),
                session_id: session.id.clone(),
                ..Default::default()
            },
            &ann.token,
        ))
        .await
        .expect("list the session's files")
        .into_inner();
    assert_eq!(listed.files.len(), 2);
    assert!(get_file(&mesh, &ann.token, &foreign.id).await.expect("foreign").session_ids.is_empty());

    // Deleting and purging the session releases its files: the attachment goes, the library
    // file stays (unlinked), and the collector then deletes the attachment's object.
    assert_eq!(blobs(&mesh, &project).await, 2);
    let session_id = chat_pb::DeleteSessionRequest { session_id: session.id.clone() };
    mesh.chat().delete_session(authed(session_id, &ann.token)).await.expect("delete session");
    mesh.chat()
        .purge_session(authed(chat_pb::PurgeSessionRequest { session_id: session.id.clone() }, &ann.token))
        .await
        .expect("purge session");
    let status = expect_code("released", Code::NotFound, get_file(&mesh, &ann.token, &attachment.id).await);
    assert_eq!(reason_and_field(&status).0, "FILE_NOT_FOUND");
    let kept = get_file(&mesh, &ann.token, &library.id).await.expect("the library file stays");
    assert!(kept.session_ids.is_empty());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while blobs(&mesh, &project).await != 1 {
        assert!(tokio::time::Instant::now() < deadline, "the released attachment's object was not collected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let root = mesh.config.files.fs_root.join(&project);
    let objects = std::fs::read_dir(&root).map(|entries| entries.count()).unwrap_or(0);
    assert_eq!(objects, 1, "only the library file's object is left in {}", root.display());
}
