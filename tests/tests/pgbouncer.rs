//! The services behind PgBouncer in transaction mode: every transaction of a client may run on
//! another server connection, so nothing may rely on session state (session `SET`, session
//! advisory locks, LISTEN, temporary tables, held cursors), and sqlx's prepared statements must
//! be re-prepared by PgBouncer (1.21 or later, `max_prepared_statements`). Migrations, which hold
//! a session advisory lock, go to the direct URL. The PgBouncers are the tests' own
//! ([`ScratchPgBouncer`]), in front of the test run's PostgreSQL server.

use std::time::Duration;

use aimesh_kit::testing::{ScratchDatabase, ScratchPgBouncer, postgres_url};
use aimesh_proto::chat::v1 as chat_pb;
use aimesh_proto::files::v1 as files_pb;
use aimesh_proto::usage::v1 as usage_pb;
use aimesh_tests::{Mesh, authed, catalog, eventually, outbox_drains, project_with_key, record, test_config};
use sqlx::{Connection, PgConnection};

/// Callers at once: more than the pool's server connections, and more than each service's
/// connections to PgBouncer.
const CALLERS: usize = 12;

/// Client connections each service keeps to PgBouncer, more than its server connections.
const SERVICE_CONNECTIONS: u32 = 6;

/// A connection to the test server's `postgres` database, bypassing PgBouncer.
async fn direct_admin() -> PgConnection {
    let url = aimesh_kit::data::db::database_url(&postgres_url(), "postgres");
    PgConnection::connect(&url).await.expect("connect to the test server")
}

/// The database name of a URL.
fn database_of(url: &str) -> String {
    url.rsplit('/').next().expect("a database in the url").to_owned()
}

/// Server connections PgBouncer holds in a `SHOW POOLS` row, whatever their state.
fn server_connections(pool: &aimesh_kit::testing::ConsoleRow) -> i64 {
    ["sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"].iter().map(|column| pool.number(column)).sum()
}

async fn download(mesh: &Mesh, token: &str, file_id: &str) -> Vec<u8> {
    let request = files_pb::DownloadRequest { file_id: file_id.into(), ..Default::default() };
    let mut stream = mesh.files().download(authed(request, token)).await.expect("download").into_inner();
    let mut bytes = Vec::new();
    while let Some(message) = stream.message().await.expect("a download message") {
        if let Some(files_pb::download_response::Part::Chunk(chunk)) = message.part {
            bytes.extend_from_slice(&chunk);
        }
    }
    bytes
}

/// One caller's story across the mesh: sign-up and login, a project with a key, a chat session
/// with messages and a search, usage recorded, reserved and settled or released, a file
/// uploaded and downloaded. Returns its project.
async fn caller(mesh: &Mesh, index: usize) -> String {
    let account = mesh.signup(&format!("caller{index}")).await;
    let (project, secret) = project_with_key(mesh, &account, &["usage:write", "usage:read"]).await;

    let session = chat_pb::CreateSessionRequest {
        project_id: project.clone(),
        model: "gpt-4o".into(),
        title: format!("Session {index}"),
        ..Default::default()
    };
    let session = mesh.chat().create_session(authed(session, &account.token)).await.expect("session").into_inner();
    for (role, content) in [
        (chat_pb::MessageRole::User, format!("How long do I boil egg number {index}?")),
        (chat_pb::MessageRole::Assistant, "Boil the egg for nine minutes.".to_owned()),
        (chat_pb::MessageRole::User, "And pasta?".to_owned()),
    ] {
        let message = chat_pb::AppendMessageRequest {
            session_id: session.id.clone(),
            role: role.into(),
            content,
            tokens: 10,
            ..Default::default()
        };
        mesh.chat().append_message(authed(message, &account.token)).await.expect("append");
    }
    let search =
        chat_pb::SearchMessagesRequest { project_id: project.clone(), query: "boil egg".into(), ..Default::default() };
    let hits = mesh.chat().search_messages(authed(search, &account.token)).await.expect("search").into_inner().hits;
    assert_eq!(hits.len(), 2, "both messages about boiling eggs are found: {hits:?}");

    mesh.usage().record_usage(mesh.on_behalf(record(&project, "plain"), &secret)).await.expect("record usage");
    let reserve = usage_pb::ReserveRequest {
        project_id: project.clone(),
        model: "gpt-4o".into(),
        estimated_input_tokens: 300,
        estimated_output_tokens: 300,
        ttl_seconds: 60,
        ..Default::default()
    };
    let settled = mesh.quotas().reserve(mesh.on_behalf(reserve.clone(), &secret)).await.expect("reserve").into_inner();
    let settle = usage_pb::RecordUsageRequest {
        input_tokens: 60,
        cached_input_tokens: 0,
        output_tokens: 40,
        reservation_id: settled.id,
        ..record(&project, "settled")
    };
    mesh.usage().record_usage(mesh.on_behalf(settle, &secret)).await.expect("settle a reservation");
    let released = mesh.quotas().reserve(mesh.on_behalf(reserve, &secret)).await.expect("reserve").into_inner();
    let release = usage_pb::ReleaseReservationRequest { project_id: project.clone(), reservation_id: released.id };
    mesh.quotas().release_reservation(mesh.on_behalf(release, &secret)).await.expect("release a reservation");

    let content = format!("the file of caller {index}").into_bytes();
    let file = mesh.upload_text(&account.token, &project, &format!("notes-{index}.txt"), &content).await;
    assert_eq!(download(mesh, &account.token, &file.id).await, content, "the file comes back as uploaded");
    project
}

/// `file.uploaded` events of `projects` in analytics' ClickHouse.
async fn uploads_in_analytics(mesh: &Mesh, projects: &[String]) -> u64 {
    let client = aimesh_analytics::store::client_of(&aimesh_tests::clickhouse_url());
    let database = &mesh.config.analytics.clickhouse_database;
    client
        .query(&format!(
            "SELECT count() FROM {database}.product_events FINAL \
             WHERE event_type = 'file.uploaded' AND has(?, toString(project_id))"
        ))
        .bind(projects)
        .fetch_one::<u64>()
        .await
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_works_behind_pgbouncer_in_transaction_mode() {
    // Declared first, so dropped last: the mesh's connections end before PgBouncer does.
    let bouncer = ScratchPgBouncer::start().await;
    let (mut config, databases) = test_config();
    config.common.database.max_connections = 10;
    config.common.database.min_connections = SERVICE_CONNECTIONS;
    // Every caller signs up and logs in at once: their password hashes queue for the few
    // hashing slots (on a busy machine, for seconds) rather than being refused.
    config.identity.password_hash_wait_ms = 60_000;
    let mut direct_urls = Vec::new();
    for urls in [
        &mut config.identity.database,
        &mut config.chat.database,
        &mut config.usage.database,
        &mut config.files.database,
    ] {
        let direct = urls.url.take().expect("test_config names each database");
        urls.url = Some(bouncer.url_of(&direct));
        urls.migration_url = Some(direct.clone());
        direct_urls.push(direct);
    }
    let mesh = Mesh::start_with(config, databases).await;
    catalog(&mesh).await;

    let projects = futures::future::join_all((0..CALLERS).map(|index| caller(&mesh, index))).await;

    // Every outbox drains to analytics through PgBouncer too (the relay's batches are
    // transactions with SET LOCAL and FOR UPDATE SKIP LOCKED).
    for direct in &direct_urls {
        let pool = sqlx::PgPool::connect(direct).await.expect("connect to a service database directly");
        outbox_drains(&pool, &database_of(direct)).await;
        pool.close().await;
    }
    eventually("every upload is counted in analytics", || async {
        uploads_in_analytics(&mesh, &projects).await == CALLERS as u64
    })
    .await;

    // The traffic went through PgBouncer, in transaction mode: each service's clients (its
    // pool's connections) outnumber the server connections they share, and PostgreSQL itself
    // sees no more backends on the database than PgBouncer's pool (once those of the direct
    // connections above, closed, have exited).
    let mut admin = direct_admin().await;
    let pool_size = i64::from(ScratchPgBouncer::DEFAULT_POOL_SIZE);
    for direct in &direct_urls {
        let database = database_of(direct);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let pool = loop {
            let pool = bouncer.row_of("POOLS", &database).await.expect("a pool of each service database");
            let backends: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                .bind(&database)
                .fetch_one(&mut admin)
                .await
                .expect("count backends");
            let clients = pool.number("cl_active") + pool.number("cl_waiting");
            if clients >= i64::from(SERVICE_CONNECTIONS) && backends <= pool_size {
                break pool;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{database}: {clients} clients at PgBouncer, {backends} backends at PostgreSQL: {pool:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(pool.text("pool_mode"), Some("transaction"), "{pool:?}");
        assert!(server_connections(&pool) <= pool_size, "{pool:?}");

        let stats = bouncer.row_of("STATS", &database).await.expect("stats of each service database");
        let transactions = stats.number("total_xact_count");
        assert!(transactions > CALLERS as i64, "{database}: {stats:?}");
        // A server connection is assigned per transaction, not per client session (which would
        // make a few assignments for hundreds of transactions).
        assert!(2 * stats.number("total_server_assignment_count") > transactions, "{database}: {stats:?}");
        // sqlx prepared its statements through PgBouncer, which prepared them on the servers.
        assert!(stats.number("total_client_parse_count") > 0, "{database}: {stats:?}");
        assert!(stats.number("total_server_parse_count") > 0, "{database}: {stats:?}");
        assert!(stats.number("total_bind_count") > 0, "{database}: {stats:?}");
    }
    let _ = admin.close().await;

    // PgBouncer saw no protocol error (a statement unknown on its server connection, say).
    let log = bouncer.log();
    let problems: Vec<&str> =
        log.lines().filter(|line| line.contains(" WARNING ") || line.contains(" ERROR ")).collect();
    assert!(problems.is_empty(), "pgbouncer reported problems:\n{}", problems.join("\n"));
}

/// What one caller sees of its server session inside a transaction.
#[derive(Debug, PartialEq)]
struct Session {
    backend: i32,
    enable_sort: String,
    caller: Option<String>,
}

const SESSION: &str = "SELECT pg_backend_pid(), current_setting('enable_sort'), \
                       nullif(current_setting('aimesh.caller', true), '')";

async fn session(conn: &mut PgConnection) -> Session {
    let (backend, enable_sort, caller) =
        sqlx::query_as(SESSION).fetch_one(&mut *conn).await.expect("read the session's settings");
    Session { backend, enable_sort, caller }
}

/// Two callers on one server connection (a pool of one), the second waiting while the first's
/// transaction is open: the first's transaction-local state (the outbox relay's `SET LOCAL`,
/// a `set_config(.., true)`, a transaction advisory lock) is gone when the second gets the
/// connection. A session-level `SET` would leak, which is why the services use none.
#[tokio::test]
async fn concurrent_callers_never_see_each_other_s_session_state() {
    let bouncer = ScratchPgBouncer::start_with_pool_size(1).await;
    let scratch = ScratchDatabase::new();
    aimesh_kit::data::db::ensure_database(&scratch.url).await.expect("create the scratch database");
    let database = database_of(&scratch.url);
    let mut first = bouncer.client(&scratch.url).await.expect("the first caller connects");
    let mut second = bouncer.client(&scratch.url).await.expect("the second caller connects");
    let lock_key = 20_004_i64;

    let mut tx = first.begin().await.expect("begin");
    sqlx::query("SET LOCAL enable_sort = off").execute(&mut *tx).await.expect("set local");
    sqlx::query("SELECT set_config('aimesh.caller', 'first', true)").execute(&mut *tx).await.expect("set_config");
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(lock_key).execute(&mut *tx).await.expect("lock");
    let inside = session(&mut tx).await;
    assert_eq!((inside.enable_sort.as_str(), inside.caller.as_deref()), ("off", Some("first")));

    let waiting = tokio::spawn(async move {
        let mut tx = second.begin().await.expect("begin");
        let seen = session(&mut tx).await;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(lock_key)
            .fetch_one(&mut *tx)
            .await
            .expect("try the lock");
        tx.commit().await.expect("commit");
        (seen, locked, second)
    });
    // The second caller waits for the only server connection, which the first one's open
    // transaction holds: the two run at once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while bouncer.row_of("POOLS", &database).await.is_none_or(|pool| pool.number("cl_waiting") < 1) {
        assert!(tokio::time::Instant::now() < deadline, "the second caller never waited for the connection");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tx.commit().await.expect("commit");
    let (seen, locked, mut second) = waiting.await.expect("the second caller");
    assert_eq!(
        seen,
        Session { backend: inside.backend, enable_sort: "on".into(), caller: None },
        "the second caller, on the same server connection, sees none of the first one's transaction"
    );
    assert!(locked, "the first caller's transaction lock ended with its transaction");

    // The control: a session-level SET outlives its statement on the server connection, and the
    // other caller sees it. This is what the services must never do.
    sqlx::query("SET enable_sort = off").execute(&mut first).await.expect("set for the session");
    let leaked = session(&mut second).await;
    assert_eq!((leaked.backend, leaked.enable_sort.as_str()), (inside.backend, "off"), "the probe sees a leak");
    sqlx::query("RESET enable_sort").execute(&mut second).await.expect("reset");

    // Prepared statements: sqlx names them per client connection (sqlx_s_1, sqlx_s_2, ...), so
    // the two callers have used the same names for other statements on the one server
    // connection all along; PgBouncer keeps them apart, with their own text and types.
    let a: String = sqlx::query_scalar("SELECT $1::text || '!'").bind("a").fetch_one(&mut first).await.expect("a");
    let b: i64 = sqlx::query_scalar("SELECT $1::int8 + 1").bind(41_i64).fetch_one(&mut second).await.expect("b");
    let a_again: String =
        sqlx::query_scalar("SELECT $1::text || '!'").bind("c").fetch_one(&mut first).await.expect("a again");
    assert_eq!((a.as_str(), b, a_again.as_str()), ("a!", 42, "c!"));

    let _ = first.close().await;
    let _ = second.close().await;
    ScratchDatabase::disconnect_all(std::slice::from_ref(&scratch));
}
