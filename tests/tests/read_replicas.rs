//! PostgreSQL read replicas under a whole mesh: every service's database lives on a server of
//! the test's own with a real streaming replica (`pg_basebackup -R`). Read-only RPCs read from
//! the replica; a caller never reads older than their own last write (replay paused: the writer
//! still reads their write back, through the primary, while another caller reads the replica's
//! older state); a replica lagging past the bound is skipped; a stopped replica is skipped and
//! taken back once it answers again. Which server answered is read from the data itself (the
//! paused replica lacks the newest message) and from the `db_reads_total` and
//! `db_replica_usable` metrics of the process.

use std::time::Duration;

use aimesh_kit::testing::ScratchPostgres;
use aimesh_proto::chat::v1 as chat_pb;
use aimesh_proto::identity::v1 as pb;
use aimesh_tests::{Account, Mesh, authed, metric, test_config, use_postgres_server};

/// How far behind the replica may be before reads skip it, in these tests: long beside the
/// few calls between pausing the replay and the read that must still go to the replica, even
/// on a loaded machine.
const MAX_LAG: Duration = Duration::from_secs(10);
/// Bound of every wait for a condition.
const PATIENCE: Duration = Duration::from_secs(30);

/// A mesh whose services' databases are on `primary`, each with its replica on `replica`.
async fn mesh_on(primary: &ScratchPostgres, replica: &ScratchPostgres) -> Mesh {
    let (mut config, _shared_server_databases) = test_config();
    use_postgres_server(&mut config, &primary.url(), Some(&replica.url()));
    config.common.database.replica_max_lag_ms = MAX_LAG.as_millis() as u64;
    config.common.database.replica_check_interval_ms = 100;
    Mesh::start_with(config, Vec::new()).await
}

/// Waits until `done` holds, polling every 100 ms, failing the test after [`PATIENCE`].
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether chat's replica took reads at its last check.
fn chat_replica_usable() -> bool {
    metric("db_replica_usable", &["database=\"chat\""]) >= 1.0
}

/// Whether any service's process still took its replica as usable at its last check: each
/// service checks on its own schedule, and a read that reaches a replica stopped since its
/// service's last check fails (UNAVAILABLE, retryable) rather than moving to the primary.
fn any_replica_usable() -> bool {
    ["identity", "chat", "usage", "files"]
        .iter()
        .any(|service| metric("db_replica_usable", &[&format!("database=\"{service}\"")]) >= 1.0)
}

fn replica_reads(database: &str) -> f64 {
    metric("db_reads_total", &[&format!("database=\"{database}\""), "target=\"replica\""])
}

fn primary_reads(database: &str, reason: &str) -> f64 {
    metric("db_reads_total", &[&format!("database=\"{database}\""), &format!("reason=\"{reason}\"")])
}

/// A project of `owner` with `reader` as a viewer, and a chat session in it.
async fn shared_session(mesh: &Mesh, owner: &Account, reader: &Account) -> String {
    let project_id = mesh.create_project(owner, "replicated").await;
    mesh.add_member(owner, &project_id, reader, pb::ProjectRole::Viewer).await;
    let request = chat_pb::CreateSessionRequest {
        project_id,
        model: "gpt-4o".into(),
        title: "replicated".into(),
        ..Default::default()
    };
    mesh.chat().create_session(authed(request, &owner.token)).await.expect("create session").into_inner().id
}

async fn append(mesh: &Mesh, account: &Account, session_id: &str, content: &str) {
    let request = chat_pb::AppendMessageRequest {
        session_id: session_id.into(),
        role: chat_pb::MessageRole::User.into(),
        content: content.into(),
        ..Default::default()
    };
    mesh.chat().append_message(authed(request, &account.token)).await.expect("append");
}

/// The contents of the session's messages as `account` lists them.
async fn contents(mesh: &Mesh, account: &Account, session_id: &str) -> Vec<String> {
    let request = chat_pb::ListMessagesRequest { session_id: session_id.into(), ..Default::default() };
    let listed = mesh.chat().list_messages(authed(request, &account.token)).await.expect("list messages");
    listed.into_inner().messages.into_iter().map(|message| message.content).collect()
}

async fn on_server(server: &ScratchPostgres, statement: &'static str) {
    let pool = sqlx::PgPool::connect(&format!("{}/postgres", server.url())).await.expect("connect");
    sqlx::query(statement).execute(&pool).await.expect(statement);
    pool.close().await;
}

/// Pauses the replica's replay and waits until it has really stopped.
async fn pause_replay(replica: &ScratchPostgres) {
    on_server(replica, "SELECT pg_wal_replay_pause()").await;
    let pool = sqlx::PgPool::connect(&format!("{}/postgres", replica.url())).await.expect("connect");
    eventually("replay paused", || async {
        let state: String =
            sqlx::query_scalar("SELECT pg_get_wal_replay_pause_state()").fetch_one(&pool).await.expect("pause state");
        state == "paused"
    })
    .await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_reads_its_own_writes_others_read_the_replica_until_it_lags_past_the_bound() {
    let primary = ScratchPostgres::start();
    let replica = primary.start_replica();
    let mesh = mesh_on(&primary, &replica).await;
    // Registration and login write without a caller: identity keeps the new user's position
    // itself, so reading the account back at once works even with a replica behind.
    let (ann, bob) = (mesh.signup("ann").await, mesh.signup("bob").await);
    let me = mesh.users().get_user(authed(pb::GetUserRequest { user_id: "me".into() }, &ann.token)).await;
    assert_eq!(me.expect("ann reads herself back").into_inner().email, ann.email);
    let session_id = shared_session(&mesh, &ann, &bob).await;
    append(&mesh, &ann, &session_id, "first").await;
    eventually("the replica usable and caught up with the first message", || async {
        chat_replica_usable() && contents(&mesh, &bob, &session_id).await == ["first"]
    })
    .await;
    let before = replica_reads("chat");
    assert_eq!(contents(&mesh, &bob, &session_id).await, ["first"]);
    assert!(replica_reads("chat") > before, "a reader who wrote nothing reads the replica");

    pause_replay(&replica).await;
    append(&mesh, &ann, &session_id, "second").await;
    let own_before = primary_reads("chat", "own_write_not_replayed");
    assert_eq!(
        contents(&mesh, &ann, &session_id).await,
        ["first", "second"],
        "the writer reads their own write at once, though the replica has not replayed it"
    );
    assert!(primary_reads("chat", "own_write_not_replayed") > own_before, "the writer's read went to the primary");
    assert_eq!(
        contents(&mesh, &bob, &session_id).await,
        ["first"],
        "another caller reads the replica, up to the lag bound behind"
    );

    // Replay stays paused: once the replica lags past the bound, nobody reads it.
    eventually("reads leave the replica once it lags past the bound", || async {
        !chat_replica_usable() && contents(&mesh, &bob, &session_id).await == ["first", "second"]
    })
    .await;
    assert!(primary_reads("chat", "no_usable_replica") > 0.0);
    assert!(
        metric("db_replica_lag_seconds", &["database=\"chat\""]) > MAX_LAG.as_secs_f64(),
        "the lag gauge shows the replica behind by more than the bound"
    );

    on_server(&replica, "SELECT pg_wal_replay_resume()").await;
    eventually("the replica is taken back once it caught up", || async { chat_replica_usable() }).await;
    let before = replica_reads("chat");
    assert_eq!(contents(&mesh, &bob, &session_id).await, ["first", "second"]);
    assert!(replica_reads("chat") > before);
    mesh.stop().await.expect("the mesh stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_is_skipped_without_an_error_and_taken_back_when_it_returns() {
    let primary = ScratchPostgres::start();
    let replica = primary.start_replica();
    let mesh = mesh_on(&primary, &replica).await;
    let (ann, bob) = (mesh.signup("ann").await, mesh.signup("bob").await);
    let session_id = shared_session(&mesh, &ann, &bob).await;
    append(&mesh, &ann, &session_id, "before the outage").await;
    eventually("the replica usable", || async { chat_replica_usable() }).await;

    replica.stop();
    eventually("no service uses the stopped replica any more", || async { !any_replica_usable() }).await;
    append(&mesh, &ann, &session_id, "during the outage").await;
    // Every read answers, and from the primary, while the replica is away.
    let before = replica_reads("chat");
    for _ in 0..5 {
        assert_eq!(contents(&mesh, &bob, &session_id).await, ["before the outage", "during the outage"]);
        let projects = mesh.projects().list_projects(authed(pb::ListProjectsRequest::default(), &bob.token)).await;
        assert_eq!(projects.expect("list projects while the replica is down").into_inner().projects.len(), 1);
    }
    assert_eq!(replica_reads("chat"), before, "no read went to the stopped replica");

    replica.start_again();
    eventually("the replica is taken back once it answers and has caught up", || async { chat_replica_usable() }).await;
    let before = replica_reads("chat");
    assert_eq!(contents(&mesh, &bob, &session_id).await, ["before the outage", "during the outage"]);
    assert!(replica_reads("chat") > before, "reads return to the replica");
    mesh.stop().await.expect("the mesh stops cleanly");
}
