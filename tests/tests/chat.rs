//! The chat service end to end, with identity beside it: sessions and their lifecycle,
//! messages with gap-free sequences and branches, live watch, search, export, and nobody
//! reaching another project's chats.

use std::time::Duration;

use aimesh_proto::chat::v1 as chat_pb;
use aimesh_proto::identity::v1 as pb;
use aimesh_tests::{Account, Mesh, authed, expect_code, reason_and_field};
use tokio_stream::StreamExt;
use tonic::Code;

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask { paths: paths.iter().map(|p| (*p).to_owned()).collect() })
}

async fn create_session(mesh: &Mesh, account: &Account, project_id: &str, title: &str) -> chat_pb::Session {
    let request = chat_pb::CreateSessionRequest {
        project_id: project_id.into(),
        model: "gpt-4o".into(),
        title: title.into(),
        system_prompt: "Be brief.".into(),
        config: None,
    };
    mesh.chat().create_session(authed(request, &account.token)).await.expect("create session").into_inner()
}

fn message(session_id: &str, role: chat_pb::MessageRole, content: &str) -> chat_pb::AppendMessageRequest {
    chat_pb::AppendMessageRequest {
        session_id: session_id.into(),
        role: role.into(),
        content: content.into(),
        tokens: 10,
        ..Default::default()
    }
}

async fn append(mesh: &Mesh, credential: &str, request: chat_pb::AppendMessageRequest) -> chat_pb::Message {
    mesh.chat().append_message(authed(request, credential)).await.expect("append").into_inner()
}

async fn get_session(mesh: &Mesh, credential: &str, session_id: &str) -> Result<chat_pb::Session, tonic::Status> {
    let request = chat_pb::GetSessionRequest { session_id: session_id.into() };
    mesh.chat().get_session(authed(request, credential)).await.map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_session_is_updated_soft_deleted_restored_and_purged() {
    let mesh = Mesh::start().await;
    let (ann, bob) = (mesh.signup("ann").await, mesh.signup("bob").await);
    let project = mesh.create_project(&ann, "Chats").await;
    let add = pb::AddMemberRequest {
        project_id: project.clone(),
        email: bob.email.clone(),
        role: pb::ProjectRole::Member.into(),
    };
    mesh.projects().add_member(authed(add, &ann.token)).await.expect("bob joins");
    let session = create_session(&mesh, &ann, &project, "Trip planning").await;
    create_session(&mesh, &bob, &project, "Bob's").await;
    assert_eq!(session.status, chat_pb::SessionStatus::Active as i32);

    let list = |credential: String, all_users: bool, deleted: bool| {
        let request =
            chat_pb::ListSessionsRequest { project_id: project.clone(), all_users, deleted, ..Default::default() };
        let mesh = &mesh;
        async move { mesh.chat().list_sessions(authed(request, &credential)).await.expect("list").into_inner().sessions }
    };
    assert_eq!(list(ann.token.clone(), false, false).await.len(), 1, "mine");
    assert_eq!(list(ann.token.clone(), true, false).await.len(), 2, "the project's");

    let update = chat_pb::UpdateSessionRequest {
        session_id: session.id.clone(),
        session: Some(chat_pb::Session { title: "Trip to Lisbon".into(), ..Default::default() }),
        update_mask: mask(&["title"]),
    };
    let updated = mesh.chat().update_session(authed(update, &ann.token)).await.expect("update").into_inner();
    assert_eq!((updated.title.as_str(), updated.system_prompt.as_str()), ("Trip to Lisbon", "Be brief."));
    // Bob, a member but not its creator, may read it but not change it.
    assert!(get_session(&mesh, &bob.token, &session.id).await.is_ok());
    let rename = chat_pb::UpdateSessionRequest {
        session_id: session.id.clone(),
        session: Some(chat_pb::Session { title: "Mine now".into(), ..Default::default() }),
        update_mask: mask(&["title"]),
    };
    expect_code(
        "bob renaming ann's session",
        Code::PermissionDenied,
        mesh.chat().update_session(authed(rename, &bob.token)).await,
    );

    let deleted = mesh
        .chat()
        .delete_session(authed(chat_pb::DeleteSessionRequest { session_id: session.id.clone() }, &ann.token))
        .await
        .expect("delete")
        .into_inner();
    assert!(deleted.delete_time.is_some() && deleted.purge_time.is_some());
    expect_code("a deleted session", Code::NotFound, get_session(&mesh, &ann.token, &session.id).await);
    assert_eq!(list(ann.token.clone(), false, false).await.len(), 0);
    assert_eq!(list(ann.token.clone(), false, true).await.len(), 1, "restorable");

    mesh.chat()
        .restore_session(authed(chat_pb::RestoreSessionRequest { session_id: session.id.clone() }, &ann.token))
        .await
        .expect("restore");
    assert_eq!(get_session(&mesh, &ann.token, &session.id).await.expect("restored").title, "Trip to Lisbon");

    // Purging needs a soft delete first and the admin role.
    mesh.chat()
        .delete_session(authed(chat_pb::DeleteSessionRequest { session_id: session.id.clone() }, &ann.token))
        .await
        .expect("delete again");
    let purge = || chat_pb::PurgeSessionRequest { session_id: session.id.clone() };
    expect_code(
        "a member purging",
        Code::PermissionDenied,
        mesh.chat().purge_session(authed(purge(), &bob.token)).await,
    );
    mesh.chat().purge_session(authed(purge(), &ann.token)).await.expect("purge");
    assert_eq!(list(ann.token.clone(), false, true).await.len(), 0, "gone for good");
    let pool = mesh.chat_db().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM chat_sessions WHERE id = $1::uuid")
        .bind(&session.id)
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn messages_are_numbered_idempotent_branched_and_validated() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "Chats").await;
    let session = create_session(&mesh, &ann, &project, "Q&A").await;
    let other = create_session(&mesh, &ann, &project, "Other").await;
    use chat_pb::MessageRole::{Assistant, User};

    let question = append(
        &mesh,
        &ann.token,
        chat_pb::AppendMessageRequest { client_message_id: "q1".into(), ..message(&session.id, User, "What is Rust?") },
    )
    .await;
    let retry = append(
        &mesh,
        &ann.token,
        chat_pb::AppendMessageRequest { client_message_id: "q1".into(), ..message(&session.id, User, "What is Rust?") },
    )
    .await;
    assert_eq!((question.sequence, retry.id.as_str()), (1, question.id.as_str()));
    let answer = append(&mesh, &ann.token, message(&session.id, Assistant, "A systems programming language.")).await;
    assert_eq!(
        (answer.sequence, answer.parent_message_id.as_str()),
        (2, question.id.as_str()),
        "the latest is the default parent"
    );

    // Editing the answer starts a branch beside it, with the same parent.
    let edit = chat_pb::EditMessageRequest {
        session_id: session.id.clone(),
        message_id: answer.id.clone(),
        content: "A language for fast, reliable software.".into(),
        tokens: 12,
        ..Default::default()
    };
    let edited = mesh.chat().edit_message(authed(edit, &ann.token)).await.expect("edit").into_inner();
    assert_eq!((edited.sequence, edited.parent_message_id.as_str()), (3, question.id.as_str()));
    let branch = mesh
        .chat()
        .get_branch(authed(
            chat_pb::GetBranchRequest { session_id: session.id.clone(), message_id: edited.id.clone() },
            &ann.token,
        ))
        .await
        .expect("branch")
        .into_inner();
    let path: Vec<&str> = branch.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(path, [question.id.as_str(), edited.id.as_str()], "root first, the old answer not on it");
    let listed = mesh
        .chat()
        .list_messages(authed(
            chat_pb::ListMessagesRequest { session_id: session.id.clone(), ..Default::default() },
            &ann.token,
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.messages.iter().map(|m| m.sequence).collect::<Vec<_>>(), [1, 2, 3], "history kept");
    let counted = get_session(&mesh, &ann.token, &session.id).await.expect("session");
    assert_eq!((counted.message_count, counted.total_tokens), (3, 32));

    // Bad input names the field and writes nothing.
    let foreign_parent =
        chat_pb::AppendMessageRequest { parent_message_id: question.id.clone(), ..message(&other.id, User, "hi") };
    let cases = [
        (message(&session.id, chat_pb::MessageRole::Unspecified, "hi"), Code::InvalidArgument, "role"),
        (message(&session.id, User, ""), Code::InvalidArgument, "content"),
        (
            chat_pb::AppendMessageRequest { tokens: -1, ..message(&session.id, User, "hi") },
            Code::InvalidArgument,
            "tokens",
        ),
        (foreign_parent, Code::InvalidArgument, "parent_message_id"),
        (
            chat_pb::AppendMessageRequest {
                attachment_ids: vec![uuid::Uuid::new_v4().to_string()],
                ..message(&session.id, User, "see file")
            },
            Code::NotFound,
            "attachment_ids",
        ),
    ];
    for (request, code, field) in cases {
        let status = expect_code(field, code, mesh.chat().append_message(authed(request, &ann.token)).await);
        assert_eq!(reason_and_field(&status).1.as_deref(), Some(field), "{status:?}");
    }
    let counted = get_session(&mesh, &ann.token, &session.id).await.expect("session");
    assert_eq!(counted.message_count, 3);
    let other_count = get_session(&mesh, &ann.token, &other.id).await.expect("other").message_count;
    assert_eq!(other_count, 0);
}

#[tokio::test]
async fn a_watcher_gets_stored_then_live_messages_in_order() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "Chats").await;
    let session = create_session(&mesh, &ann, &project, "Live").await;
    use chat_pb::MessageRole::User;
    for text in ["one", "two"] {
        append(&mesh, &ann.token, message(&session.id, User, text)).await;
    }
    let watch = chat_pb::WatchSessionRequest { session_id: session.id.clone(), after_sequence: 1 };
    let mut stream = mesh.chat().watch_session(authed(watch, &ann.token)).await.expect("watch").into_inner();
    for text in ["three", "four"] {
        append(&mesh, &ann.token, message(&session.id, User, text)).await;
    }
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("a message within 10 s");
        let next = next.expect("the stream stays open").expect("a message");
        seen.push((next.sequence, next.content));
    }
    let expected: Vec<(i64, String)> = vec![(2, "two".into()), (3, "three".into()), (4, "four".into())];
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn search_finds_ranked_snippets_and_export_round_trips() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let project = mesh.create_project(&ann, "Chats").await;
    let session = create_session(&mesh, &ann, &project, "Cooking").await;
    let gone = create_session(&mesh, &ann, &project, "Old").await;
    use chat_pb::MessageRole::{Assistant, User};
    append(&mesh, &ann.token, message(&session.id, User, "How long do I boil an egg?")).await;
    append(&mesh, &ann.token, message(&session.id, Assistant, "Boil the egg for nine minutes.")).await;
    append(&mesh, &ann.token, message(&gone.id, User, "Boil water for pasta")).await;
    mesh.chat()
        .delete_session(authed(chat_pb::DeleteSessionRequest { session_id: gone.id.clone() }, &ann.token))
        .await
        .expect("delete");

    let search =
        chat_pb::SearchMessagesRequest { project_id: project.clone(), query: "boil egg".into(), ..Default::default() };
    let hits = mesh.chat().search_messages(authed(search, &ann.token)).await.expect("search").into_inner().hits;
    assert_eq!(hits.len(), 2, "the deleted session's message is not found");
    assert!(hits.iter().all(|hit| hit.snippet.contains("<mark>")), "{hits:?}");
    assert!(hits.windows(2).all(|pair| pair[0].rank >= pair[1].rank));
    let empty =
        chat_pb::SearchMessagesRequest { project_id: project.clone(), query: "  ".into(), ..Default::default() };
    let status =
        expect_code("empty query", Code::InvalidArgument, mesh.chat().search_messages(authed(empty, &ann.token)).await);
    assert_eq!(reason_and_field(&status).1.as_deref(), Some("query"));

    let export = |format: chat_pb::ExportFormat| chat_pb::ExportSessionRequest {
        session_id: session.id.clone(),
        format: format.into(),
    };
    let json = collect(
        mesh.chat().export_session(authed(export(chat_pb::ExportFormat::Json), &ann.token)).await.expect("export"),
    )
    .await;
    let parsed: serde_json::Value = serde_json::from_slice(&json).expect("the JSON export parses");
    let text = parsed.to_string();
    assert!(text.contains("Boil the egg for nine minutes.") && text.contains("How long do I boil an egg?"), "{text}");
    let markdown = collect(
        mesh.chat().export_session(authed(export(chat_pb::ExportFormat::Markdown), &ann.token)).await.expect("export"),
    )
    .await;
    let markdown = String::from_utf8(markdown).expect("utf-8");
    assert!(markdown.contains("Boil the egg for nine minutes."), "{markdown}");

    let archive = collect(
        mesh.chat()
            .export_project(authed(chat_pb::ExportProjectRequest { project_id: project.clone() }, &ann.token))
            .await
            .expect("export project"),
    )
    .await;
    assert_eq!(archive.len() % 512, 0, "a tar archive is made of 512-byte blocks");
    let first_name = String::from_utf8_lossy(&archive[..100]).trim_end_matches('\0').to_owned();
    assert!(first_name.starts_with(&session.id), "the live session only: {first_name}");
    assert!(!String::from_utf8_lossy(&archive).contains(&gone.id), "no deleted session in the archive");
}

async fn collect(response: tonic::Response<tonic::Streaming<chat_pb::ExportChunk>>) -> Vec<u8> {
    let mut stream = response.into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend(chunk.expect("a chunk").data);
    }
    bytes
}

#[tokio::test]
async fn a_stranger_reaches_no_chat_of_another_project() {
    let mesh = Mesh::start().await;
    let (ann, bob) = (mesh.signup("ann").await, mesh.signup("bob").await);
    let project = mesh.create_project(&ann, "Chats").await;
    let session = create_session(&mesh, &ann, &project, "Private").await;
    let first = append(&mesh, &ann.token, message(&session.id, chat_pb::MessageRole::User, "secret plans")).await;
    let bobs_project = mesh.create_project(&bob, "Chats").await;
    let key = pb::CreateApiKeyRequest {
        project_id: bobs_project.clone(),
        name: "bot".into(),
        scopes: vec!["chat:read".into(), "chat:write".into()],
        expire_time: None,
        requests_per_minute: 0,
        project_owned: false,
    };
    let bobs_key = mesh.api_keys().create_api_key(authed(key, &bob.token)).await.expect("key").into_inner().secret;
    let id = session.id.clone();

    for credential in [bob.token.as_str(), bobs_key.as_str()] {
        let refused = |call: &str, status: Result<(), tonic::Status>| {
            let status = status.expect_err(call);
            assert!(matches!(status.code(), Code::PermissionDenied | Code::NotFound), "{call}: {status:?}");
        };
        let chat = || mesh.chat();
        refused(
            "get",
            chat()
                .get_session(authed(chat_pb::GetSessionRequest { session_id: id.clone() }, credential))
                .await
                .map(drop),
        );
        let listed = chat()
            .list_sessions(authed(
                chat_pb::ListSessionsRequest { project_id: project.clone(), all_users: true, ..Default::default() },
                credential,
            ))
            .await
            .map(drop);
        refused("list", listed);
        let update = chat_pb::UpdateSessionRequest {
            session_id: id.clone(),
            session: Some(chat_pb::Session { title: "x".into(), ..Default::default() }),
            update_mask: mask(&["title"]),
        };
        refused("update", chat().update_session(authed(update, credential)).await.map(drop));
        refused(
            "delete",
            chat()
                .delete_session(authed(chat_pb::DeleteSessionRequest { session_id: id.clone() }, credential))
                .await
                .map(drop),
        );
        refused(
            "restore",
            chat()
                .restore_session(authed(chat_pb::RestoreSessionRequest { session_id: id.clone() }, credential))
                .await
                .map(drop),
        );
        refused(
            "purge",
            chat()
                .purge_session(authed(chat_pb::PurgeSessionRequest { session_id: id.clone() }, credential))
                .await
                .map(drop),
        );
        refused(
            "append",
            chat().append_message(authed(message(&id, chat_pb::MessageRole::User, "x"), credential)).await.map(drop),
        );
        let get = chat_pb::GetMessageRequest { session_id: id.clone(), message_id: first.id.clone() };
        refused("get message", chat().get_message(authed(get, credential)).await.map(drop));
        refused(
            "list messages",
            chat()
                .list_messages(authed(
                    chat_pb::ListMessagesRequest { session_id: id.clone(), ..Default::default() },
                    credential,
                ))
                .await
                .map(drop),
        );
        refused(
            "branch",
            chat()
                .get_branch(authed(
                    chat_pb::GetBranchRequest { session_id: id.clone(), message_id: String::new() },
                    credential,
                ))
                .await
                .map(drop),
        );
        let edit = chat_pb::EditMessageRequest {
            session_id: id.clone(),
            message_id: first.id.clone(),
            content: "x".into(),
            ..Default::default()
        };
        refused("edit", chat().edit_message(authed(edit, credential)).await.map(drop));
        refused(
            "watch",
            chat()
                .watch_session(authed(
                    chat_pb::WatchSessionRequest { session_id: id.clone(), after_sequence: 0 },
                    credential,
                ))
                .await
                .map(drop),
        );
        let search = chat_pb::SearchMessagesRequest {
            project_id: project.clone(),
            query: "secret".into(),
            ..Default::default()
        };
        refused("search", chat().search_messages(authed(search, credential)).await.map(drop));
        let export =
            chat_pb::ExportSessionRequest { session_id: id.clone(), format: chat_pb::ExportFormat::Json.into() };
        refused("export", export_refusal(chat().export_session(authed(export, credential)).await).await);
        let export = chat_pb::ExportProjectRequest { project_id: project.clone() };
        refused("export project", export_refusal(chat().export_project(authed(export, credential)).await).await);
        let create =
            chat_pb::CreateSessionRequest { project_id: project.clone(), model: "gpt-4o".into(), ..Default::default() };
        refused("create", chat().create_session(authed(create, credential)).await.map(drop));
    }
    // Nothing changed.
    let unchanged = get_session(&mesh, &ann.token, &session.id).await.expect("ann still reads it");
    assert_eq!((unchanged.title.as_str(), unchanged.message_count), ("Private", 1));
}

/// A streaming call may fail at once or with its first item; either way it must fail.
async fn export_refusal(
    result: Result<tonic::Response<tonic::Streaming<chat_pb::ExportChunk>>, tonic::Status>,
) -> Result<(), tonic::Status> {
    let mut stream = result?.into_inner();
    match stream.next().await {
        Some(Err(status)) => Err(status),
        Some(Ok(chunk)) => panic!("a stranger got export data: {} bytes", chunk.data.len()),
        None => panic!("a stranger got an empty export instead of an error"),
    }
}
