//! The chat domain against the real PostgreSQL and Redis Cluster, with two replicas sharing one
//! database and key prefix: gap-free sequences under concurrent appends, idempotent appends,
//! live watch with resume, search, exports, soft delete / restore / purge, and bad input that
//! writes nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use aimesh_chat::attachments::NoFilesService;
use aimesh_chat::conversations::{Conversations, SessionMeta, Settings};
use aimesh_chat::domain::{MessageEdit, MessageLimits, MessageRole, NewMessage, NewSession, Parent};
use aimesh_chat::error::ChatError;
use aimesh_chat::export::{self, ChunkWriter, Format, MAX_CHUNK};
use aimesh_chat::store::{Appended, MessageRow, SessionRow};
use aimesh_kit::config::{DatabaseConfig, RedisConfig};
use aimesh_kit::data::cache::InvalidationBus;
use aimesh_kit::data::redis::Redis;
use aimesh_kit::testing::{self, TestDatabase};

/// One replica of the chat service: its own pool, Redis connections, invalidation bus and
/// live-message subscriber.
struct Replica {
    chats: Conversations,
    _bus: InvalidationBus,
}

fn settings() -> Settings {
    Settings {
        limits: MessageLimits { max_content_bytes: 256 * 1024 },
        grace: chrono::Duration::days(30),
        // Long enough that the watch test fails if live delivery does not work.
        watch_poll: Duration::from_secs(3),
    }
}

async fn replica(url: &str, prefix: &str) -> Replica {
    let database = DatabaseConfig { max_connections: 20, min_connections: 0, ..DatabaseConfig::default() };
    let pool = aimesh_kit::data::db::connect(url, &database).await.expect("connect to the test database");
    let redis = Redis::connect_with_prefix(&testing::redis_urls(), &RedisConfig::default(), prefix)
        .await
        .expect("connect to the redis cluster");
    let bus = InvalidationBus::start(&redis).await.expect("subscribe to invalidations");
    let chats = Conversations::new(pool, redis, &bus, Arc::new(NoFilesService), settings()).await.expect("start chat");
    Replica { chats, _bus: bus }
}

/// A migrated database and two replicas on it with a fresh key prefix.
async fn setup() -> (TestDatabase, Replica, Replica) {
    let db = TestDatabase::new(&aimesh_chat::MIGRATOR).await;
    aimesh_kit::data::outbox::migrate(&db.pool).await.expect("migrate the outbox");
    let prefix = format!("test-{}", Uuid::new_v4().simple());
    let a = replica(&db.url, &prefix).await;
    let b = replica(&db.url, &prefix).await;
    (db, a, b)
}

async fn session(chats: &Conversations, project: Uuid, title: &str) -> (SessionRow, SessionMeta) {
    let new = NewSession {
        project_id: project,
        user_id: Uuid::new_v4(),
        model: "gpt-4o".into(),
        title: title.into(),
        system_prompt: "Be brief.".into(),
        config: serde_json::json!({"temperature": 0.2}),
    };
    let row = chats.create_session(&new).await.expect("create session");
    let meta = SessionMeta::from(&row);
    (row, meta)
}

fn message(content: &str) -> NewMessage {
    NewMessage {
        role: MessageRole::User,
        content: content.into(),
        content_type: "text".into(),
        metadata: serde_json::json!({}),
        tokens: 3,
        parent: Parent::Latest,
        client_message_id: None,
        attachment_ids: Vec::new(),
        user_id: Uuid::new_v4(),
    }
}

async fn append(chats: &Conversations, meta: &SessionMeta, content: &str) -> MessageRow {
    chats.append(meta, &message(content)).await.expect("append").into_message()
}

/// Sequences a watch delivers until it reaches `until`.
async fn collect(watch: &mut aimesh_chat::live::Watch, until: i64) -> Vec<i64> {
    let mut seen = Vec::new();
    while seen.last().copied().unwrap_or(0) < until {
        seen.push(watch.next().await.expect("next").sequence);
    }
    seen
}

async fn all_messages(chats: &Conversations, session_id: Uuid) -> Vec<MessageRow> {
    chats.store().messages_after(session_id, 0, None, 10_000).await.expect("list messages")
}

async fn count(pool: &PgPool, statement: &'static str, id: Uuid) -> i64 {
    sqlx::query_scalar(statement).bind(id).fetch_one(pool).await.expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_over_two_replicas_are_gap_free() {
    let (db, a, b) = setup().await;
    let (_, meta) = session(&a.chats, Uuid::new_v4(), "race").await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let chats = if i % 2 == 0 { a.chats.clone() } else { b.chats.clone() };
        let meta = meta.clone();
        tasks.push(tokio::spawn(async move {
            let mut new = message(&format!("message {i}"));
            new.tokens = i;
            chats.append(&meta, &new).await.expect("append").into_message()
        }));
    }
    let mut sequences = Vec::new();
    for task in tasks {
        sequences.push(task.await.expect("appender").sequence);
    }
    sequences.sort_unstable();
    assert_eq!(sequences, (1..=32).collect::<Vec<i64>>(), "no gap, no duplicate");

    let stored = all_messages(&a.chats, meta.id).await;
    assert_eq!(stored.len(), 32);
    // Each default parent is the message stored just before: one linear conversation.
    assert_eq!(stored[0].parent_message_id, None);
    for pair in stored.windows(2) {
        assert_eq!(pair[1].parent_message_id, Some(pair[0].id), "parent of {}", pair[1].sequence);
    }
    let row = a.chats.live_session(meta.id).await.expect("session");
    assert_eq!((row.message_count, row.total_tokens), (32, (0..32).sum::<i64>()));
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE event_type = 'chat.message_appended'")
            .fetch_one(&db.pool)
            .await
            .expect("count events");
    assert_eq!(events, 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_are_idempotent_by_client_message_id() {
    let (db, a, b) = setup().await;
    let (_, meta) = session(&a.chats, Uuid::new_v4(), "retries").await;
    let mut first = message("hello");
    first.client_message_id = Some("client-1".into());
    let stored = a.chats.append(&meta, &first).await.expect("append");
    let retried = b.chats.append(&meta, &first).await.expect("retry");
    assert!(matches!(stored, Appended::Stored(_)));
    assert!(matches!(retried, Appended::Duplicate(_)));
    assert_eq!(stored.message(), retried.message());

    // Concurrent duplicates over both replicas: one message, everybody gets it.
    let mut duplicate = message("again");
    duplicate.client_message_id = Some("client-2".into());
    let mut tasks = Vec::new();
    for i in 0..8 {
        let chats = if i % 2 == 0 { a.chats.clone() } else { b.chats.clone() };
        let (meta, duplicate) = (meta.clone(), duplicate.clone());
        tasks.push(tokio::spawn(async move { chats.append(&meta, &duplicate).await.expect("append").into_message() }));
    }
    let mut ids = BTreeSet::new();
    for task in tasks {
        let message = task.await.expect("appender");
        assert_eq!(message.sequence, 2);
        ids.insert(message.id);
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM chat_messages WHERE session_id = $1", meta.id).await, 2);
    let row = a.chats.live_session(meta.id).await.expect("session");
    assert_eq!((row.message_count, row.total_tokens), (2, 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_across_replicas_resumes_without_loss_or_duplicates() {
    let (_db, a, b) = setup().await;
    let (_, meta) = session(&a.chats, Uuid::new_v4(), "live").await;
    for i in 1..=5 {
        append(&a.chats, &meta, &format!("before {i}")).await;
    }
    // Replica A keeps appending while B's watcher starts up and after.
    let writer = {
        let (chats, meta) = (a.chats.clone(), meta.clone());
        tokio::spawn(async move {
            for i in 6..=40 {
                append(&chats, &meta, &format!("during {i}")).await;
                if i % 5 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    let mut resumed = b.chats.watch(meta.id, 3).await.expect("watch on b");
    let mut from_start = a.chats.watch(meta.id, 0).await.expect("watch on a");
    let resumed_seen = tokio::time::timeout(Duration::from_secs(20), collect(&mut resumed, 40)).await.expect("in time");
    writer.await.expect("writer");
    assert_eq!(resumed_seen, (4..=40).collect::<Vec<i64>>());
    let all_seen = tokio::time::timeout(Duration::from_secs(20), collect(&mut from_start, 40)).await.expect("in time");
    assert_eq!(all_seen, (1..=40).collect::<Vec<i64>>());

    // Live messages after the backlog arrive through pub/sub, well before the poll interval.
    let started = std::time::Instant::now();
    let late = {
        let (chats, meta) = (b.chats.clone(), meta.clone());
        tokio::spawn(async move { append(&chats, &meta, "late").await })
    };
    let next = tokio::time::timeout(Duration::from_secs(10), resumed.next()).await.expect("in time").expect("next");
    assert_eq!(next.sequence, 41);
    assert!(started.elapsed() < settings().watch_poll, "delivered live, not by polling");
    late.await.expect("late append");
}

#[tokio::test]
async fn search_ranks_highlights_and_skips_deleted_sessions() {
    let (_db, a, _b) = setup().await;
    let project = Uuid::new_v4();
    let (_, live) = session(&a.chats, project, "Foxes").await;
    append(&a.chats, &live, "The quick brown fox jumps over the lazy dog").await;
    let best = append(&a.chats, &live, "Foxes everywhere: a fox, another fox, and the fox den").await;
    append(&a.chats, &live, "Nothing to see here").await;
    append(&a.chats, &live, "<b>fox</b> & friends").await;
    let (_, gone) = session(&a.chats, project, "Deleted").await;
    append(&a.chats, &gone, "a secret fox in a deleted session").await;
    a.chats.delete_session(gone.id).await.expect("delete");
    let (_, other_project) = session(&a.chats, Uuid::new_v4(), "Elsewhere").await;
    append(&a.chats, &other_project, "a fox of another project").await;

    let hits = a.chats.store().search(project, "fox", None, 0, 10).await.expect("search");
    assert_eq!(hits.len(), 3, "only the live session's matching messages");
    assert_eq!(hits[0].message.id, best.id, "most matches rank first");
    assert!(hits.windows(2).all(|pair| pair[0].rank >= pair[1].rank));
    assert!(hits.iter().all(|hit| hit.session_title == "Foxes" && hit.snippet.contains("<mark>")));
    assert!(hits[0].snippet.contains("<mark>fox</mark>"), "{}", hits[0].snippet);
    let escaped = hits.iter().find(|hit| hit.message.content.starts_with("<b>")).expect("html message");
    // HTML in the content comes out escaped: only the <mark> tags are markup.
    assert!(escaped.snippet.contains("<mark>fox</mark>&lt;/b&gt; &amp;"), "{}", escaped.snippet);
    assert!(!escaped.snippet.replace("<mark>", "").replace("</mark>", "").contains('<'), "{}", escaped.snippet);

    // Web search syntax, paging, one session only.
    let phrase = a.chats.store().search(project, "\"brown fox\" -lazy", None, 0, 10).await.expect("search");
    assert!(phrase.is_empty());
    let page = a.chats.store().search(project, "fox", Some(live.id), 1, 1).await.expect("search");
    assert_eq!(page.len(), 2, "one hit and one more to say there is a next page");
    assert_eq!(page[0].message.id, hits[1].message.id);
}

/// Runs an export into a channel and collects its chunks.
async fn exported<F, Fut>(export: F) -> Vec<Vec<u8>>
where
    F: FnOnce(ChunkWriter) -> Fut,
    Fut: std::future::Future<Output = Result<(), export::Stopped>> + Send + 'static,
{
    let (sender, mut receiver) = mpsc::channel(4);
    let task = tokio::spawn(export(ChunkWriter::new(sender)));
    let mut chunks = Vec::new();
    while let Some(chunk) = receiver.recv().await {
        chunks.push(chunk);
    }
    assert!(task.await.expect("export task").is_ok(), "export failed");
    chunks
}

#[derive(serde::Deserialize)]
struct SessionDocument {
    session: SessionRow,
    messages: Vec<MessageRow>,
}

/// The entries of a tar archive: (name, content).
fn untar(mut archive: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut entries = Vec::new();
    while archive.len() >= 512 && archive[..512].iter().any(|&b| b != 0) {
        let header = &archive[..512];
        let name_end = header[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let name = String::from_utf8(header[..name_end].to_vec()).expect("name");
        let size_text = std::str::from_utf8(&header[124..135]).expect("size");
        let size = usize::from_str_radix(size_text, 8).expect("octal size");
        assert_eq!(&header[257..263], b"ustar\0");
        let content = archive[512..512 + size].to_vec();
        entries.push((name, content));
        archive = &archive[512 + size.div_ceil(512) * 512..];
    }
    assert_eq!(archive, &[0u8; 1024][..], "two zero blocks end the archive");
    entries
}

#[tokio::test]
async fn exports_round_trip_in_small_chunks() {
    let (_db, a, _b) = setup().await;
    let project = Uuid::new_v4();
    let (_, meta) = session(&a.chats, project, "Export me").await;
    let big = "x".repeat(100 * 1024);
    for i in 0..230 {
        let content = if i == 7 { big.clone() } else { format!("message {i} with \"quotes\" and `ticks`") };
        let mut new = message(&content);
        if i % 3 == 0 {
            new.content_type = "json".into();
            new.metadata = serde_json::json!({"i": i});
        }
        a.chats.append(&meta, &new).await.expect("append");
    }
    let exported_session = a.chats.live_session(meta.id).await.expect("session");
    let stored = all_messages(&a.chats, meta.id).await;

    let store = a.chats.store().clone();
    let row = exported_session.clone();
    let chunks =
        exported(move |out| async move { export::export_session(&store, &row, Format::Json, out).await }).await;
    assert!(chunks.len() > 3 && chunks.iter().all(|chunk| !chunk.is_empty() && chunk.len() <= MAX_CHUNK));
    let document: SessionDocument = serde_json::from_slice(&chunks.concat()).expect("the export is JSON");
    assert_eq!(document.session, exported_session);
    assert_eq!(document.messages, stored, "the export parses back to the stored messages");

    let store = a.chats.store().clone();
    let row = exported_session.clone();
    let markdown =
        exported(move |out| async move { export::export_session(&store, &row, Format::Markdown, out).await }).await;
    let markdown = String::from_utf8(markdown.concat()).expect("utf-8");
    assert!(markdown.starts_with("# Export me\n"));
    assert!(markdown.contains("### 230 · User · "));
    assert!(markdown.contains("```json\nmessage 0 with"));

    let (_, second) = session(&a.chats, project, "Second").await;
    append(&a.chats, &second, "short").await;
    let (_, deleted) = session(&a.chats, project, "Deleted").await;
    a.chats.delete_session(deleted.id).await.expect("delete");
    let store = a.chats.store().clone();
    let tar = exported(move |out| async move { export::export_project(&store, project, out).await }).await;
    assert!(tar.iter().all(|chunk| chunk.len() <= MAX_CHUNK));
    let entries = untar(&tar.concat());
    let names: BTreeSet<String> = entries.iter().map(|(name, _)| name.clone()).collect();
    let expected: BTreeSet<String> =
        [meta.id, second.id].iter().flat_map(|id| [format!("{id}.json"), format!("{id}.md")]).collect();
    assert_eq!(names, expected, "live sessions only, a JSON and a Markdown file each");
    let (_, json) = entries.iter().find(|(name, _)| *name == format!("{}.json", meta.id)).expect("json entry");
    let document: SessionDocument = serde_json::from_slice(json).expect("archived JSON");
    assert_eq!(document.messages, stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_delete_restore_and_purge() {
    let (db, a, b) = setup().await;
    let (_, meta) = session(&a.chats, Uuid::new_v4(), "doomed").await;
    append(&a.chats, &meta, "one").await;
    // B caches the live session; A's delete must reach it.
    assert!(!b.chats.session_meta(meta.id).await.expect("meta").expect("found").is_deleted());
    let deleted = a.chats.delete_session(meta.id).await.expect("delete");
    let grace = deleted.purge_at.expect("purge time") - deleted.deleted_at.expect("delete time");
    assert_eq!(grace, chrono::Duration::days(30));
    let mut seen_deleted = false;
    for _ in 0..50 {
        if b.chats.session_meta(meta.id).await.expect("meta").expect("found").is_deleted() {
            seen_deleted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen_deleted, "the other replica's cache learned of the delete");
    assert!(matches!(b.chats.append(&meta, &message("no")).await, Err(ChatError::SessionNotFound)));
    assert!(matches!(a.chats.delete_session(meta.id).await, Err(ChatError::SessionNotFound)));

    let restored = b.chats.restore_session(meta.id).await.expect("restore");
    assert!(restored.deleted_at.is_none() && restored.purge_at.is_none());
    assert_eq!(append(&a.chats, &meta, "two").await.sequence, 2);
    assert!(matches!(a.chats.purge_session(meta.id).await, Err(ChatError::SessionNotDeleted)));

    a.chats.delete_session(meta.id).await.expect("delete again");
    a.chats.purge_session(meta.id).await.expect("purge");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM chat_messages WHERE session_id = $1", meta.id).await, 0);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM chat_sessions WHERE id = $1", meta.id).await, 0);
    assert!(a.chats.session_meta(meta.id).await.expect("meta").is_none());
    assert!(matches!(a.chats.purge_session(meta.id).await, Err(ChatError::SessionNotFound)));

    // The periodic purge takes sessions past their purge time, and only those.
    let (_, due) = session(&a.chats, Uuid::new_v4(), "due").await;
    append(&a.chats, &due, "bye").await;
    let (_, waiting) = session(&a.chats, Uuid::new_v4(), "waiting").await;
    a.chats.delete_session(due.id).await.expect("delete");
    a.chats.delete_session(waiting.id).await.expect("delete");
    sqlx::query("UPDATE chat_sessions SET purge_at = now() - interval '1 second' WHERE id = $1")
        .bind(due.id)
        .execute(&db.pool)
        .await
        .expect("age the session");
    assert!(matches!(a.chats.restore_session(due.id).await, Err(ChatError::GracePeriodOver)));
    let (one, two) = tokio::join!(a.chats.purge_due(10), b.chats.purge_due(10));
    assert_eq!(one.expect("purge on a") + two.expect("purge on b"), 1);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM chat_messages WHERE session_id = $1", due.id).await, 0);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM chat_sessions WHERE id = $1", due.id).await, 0);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM chat_sessions WHERE id = $1", waiting.id).await, 1);
}

#[tokio::test]
async fn branches_and_edits_never_rewrite_history() {
    let (_db, a, _b) = setup().await;
    let (_, meta) = session(&a.chats, Uuid::new_v4(), "branches").await;
    let first = append(&a.chats, &meta, "question").await;
    let second = append(&a.chats, &meta, "answer").await;
    let third = append(&a.chats, &meta, "follow-up").await;
    let edit = MessageEdit {
        message_id: second.id,
        content: "a better answer".into(),
        metadata: None,
        tokens: 5,
        client_message_id: Some("edit-1".into()),
        user_id: Uuid::new_v4(),
    };
    let edited = a.chats.edit(&meta, edit.clone()).await.expect("edit").into_message();
    assert_eq!((edited.sequence, edited.parent_message_id, edited.role.as_str()), (4, Some(first.id), "user"));
    assert_eq!(edited.tokens, 5);
    assert_eq!(a.chats.edit(&meta, edit).await.expect("retried edit").into_message().id, edited.id);
    let ids = |path: Vec<MessageRow>| path.into_iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(
        ids(a.chats.branch(meta.id, Some(third.id)).await.expect("branch")),
        vec![first.id, second.id, third.id]
    );
    assert_eq!(ids(a.chats.branch(meta.id, None).await.expect("latest branch")), vec![first.id, edited.id]);
    // Appending after an edit continues the new branch.
    let next = append(&a.chats, &meta, "thanks").await;
    assert_eq!(next.parent_message_id, Some(edited.id));
    assert!(matches!(
        a.chats.branch(meta.id, Some(Uuid::new_v4())).await,
        Err(ChatError::MessageNotFound { field: "message_id" })
    ));
}

#[tokio::test]
async fn bad_input_writes_nothing() {
    let (db, a, _b) = setup().await;
    let (_, meta) = session(&a.chats, Uuid::new_v4(), "strict").await;
    let (_, other) = session(&a.chats, Uuid::new_v4(), "other").await;
    let foreign = append(&a.chats, &other, "elsewhere").await;
    append(&a.chats, &meta, "fine").await;
    let events_before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_events").fetch_one(&db.pool).await.expect("count");

    let mut wrong_parent = message("reply");
    wrong_parent.parent = Parent::Exactly(Some(foreign.id));
    let refused = a.chats.append(&meta, &wrong_parent).await.expect_err("parent of another session");
    let refused = aimesh_kit::ServiceError::from(refused);
    assert_eq!(
        (refused.code, refused.field.as_deref()),
        (aimesh_kit::ErrorCode::InvalidArgument, Some("parent_message_id"))
    );

    let mut unknown_parent = message("reply");
    unknown_parent.parent = Parent::Exactly(Some(Uuid::new_v4()));
    assert!(matches!(
        a.chats.append(&meta, &unknown_parent).await,
        Err(ChatError::Invalid { field: "parent_message_id", .. })
    ));

    let mut attached = message("see file");
    attached.attachment_ids = vec![Uuid::new_v4()];
    let refused = aimesh_kit::ServiceError::from(a.chats.append(&meta, &attached).await.expect_err("no files service"));
    assert_eq!(
        (refused.code, refused.reason.as_ref(), refused.field.as_deref()),
        (aimesh_kit::ErrorCode::FailedPrecondition, "FILES_UNAVAILABLE", Some("attachment_ids"))
    );

    let missing = SessionMeta { id: Uuid::new_v4(), ..meta.clone() };
    assert!(matches!(a.chats.append(&missing, &message("x")).await, Err(ChatError::SessionNotFound)));

    let row = a.chats.live_session(meta.id).await.expect("session");
    assert_eq!((row.message_count, row.total_tokens), (1, 3), "counts untouched");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM chat_messages WHERE session_id = $1", meta.id).await, 1);
    let events_after: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_events").fetch_one(&db.pool).await.expect("count");
    assert_eq!(events_after, events_before, "no events for refused appends");
    // The next good append takes the next number: refusals leave no gap.
    assert_eq!(append(&a.chats, &meta, "still fine").await.sequence, 2);
}
